"""Drive one secure-aggregation session in one process, with every message really encoded.

Used by the benchmark, the tests and the simulator. Each message crosses
``wire.encode``/``wire.decode`` exactly as a transport would carry it, so the byte counts
are those of the real messages. ``drop`` names, per member, the stage at which it
vanishes (it never sends that stage's message, nor any later one).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from ftte import wire
from ftte.crypto.primitives import Signer
from ftte.crypto.secagg_client import SecAggClient
from ftte.crypto.secagg_server import AggregateResult, SecAggServer
from ftte.crypto.secagg_session import SessionAborted, SessionParams

STAGES = ("advertise", "share", "upload", "consistency", "unmask")


@dataclass
class SessionStats:
    bytes_up: dict[int, int] = field(default_factory=dict)
    bytes_down: dict[int, int] = field(default_factory=dict)
    mask_seconds: dict[int, float] = field(default_factory=dict)
    server_unmask_seconds: float = 0.0
    server_seconds: float = 0.0
    aborted: str = ""
    # stage -> member -> bytes, for charging virtual network time per stage
    stage_up: dict[str, dict[int, int]] = field(default_factory=dict)
    stage_down: dict[str, dict[int, int]] = field(default_factory=dict)

    def carry(self, msg, member: int, stage: str, upward: bool):
        """Encode and decode ``msg`` as a transport would, counting its bytes."""
        data = wire.encode(msg)
        total, per_stage = (self.bytes_up, self.stage_up) if upward else (self.bytes_down, self.stage_down)
        total[member] = total.get(member, 0) + len(data)
        bucket = per_stage.setdefault(stage, {})
        bucket[member] = bucket.get(member, 0) + len(data)
        return wire.decode(data, expect=type(msg))


def run_session(
    params: SessionParams,
    identities: Mapping[int, Signer],
    inputs: Mapping[int, np.ndarray],
    drop: Mapping[int, str] | None = None,
) -> tuple[AggregateResult | None, SessionStats]:
    """Run all five stages; returns (result or None if aborted, stats)."""
    drop = dict(drop or {})
    for member, stage in drop.items():
        if stage not in STAGES:
            raise ValueError(f"unknown drop stage {stage!r} for member {member}; stages are {STAGES}")
    stats = SessionStats()
    server = SecAggServer(params)
    clients = {m: SecAggClient(params, m, identities[m]) for m in params.members}
    alive = set(params.members)

    def still(stage: str) -> list[int]:
        for m in sorted(alive):
            if drop.get(m) == stage:
                alive.discard(m)
        return sorted(alive)

    def server_time(fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            stats.server_seconds += time.perf_counter() - t0

    try:
        for m in still("advertise"):
            server_time(server.receive, stats.carry(clients[m].advertise(), m, "advertise", True))
        roster = server_time(server.close_advertise)
        for m in still("share"):
            r = stats.carry(roster, m, "share", False)
            server_time(server.receive, stats.carry(clients[m].share_keys(r), m, "share", True))
        deliveries = server_time(server.close_share)
        for m in still("upload"):
            d = stats.carry(deliveries[m], m, "upload", False)
            t0 = time.perf_counter()
            masked = clients[m].masked_input(d, inputs[m])
            stats.mask_seconds[m] = time.perf_counter() - t0
            server_time(server.receive, stats.carry(masked, m, "upload", True))
        survivors = server_time(server.close_upload)
        for m in still("consistency"):
            if m not in survivors.survivors:
                continue
            s = stats.carry(survivors, m, "consistency", False)
            server_time(server.receive, stats.carry(clients[m].consistency(s), m, "consistency", True))
        bundle = server_time(server.close_consistency)
        for m in still("unmask"):
            if m not in server.consistency_sigs:
                continue
            b = stats.carry(bundle, m, "unmask", False)
            server_time(server.receive, stats.carry(clients[m].unmask(b), m, "unmask", True))
        t0 = time.perf_counter()
        result = server_time(server.finish)
        stats.server_unmask_seconds = time.perf_counter() - t0
        return result, stats
    except SessionAborted as exc:
        stats.aborted = str(exc)
        return None, stats

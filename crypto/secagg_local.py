"""Drive one secure-aggregation session in one process, with every message really encoded.

Used by the benchmark, the tests and the simulator. Each message crosses
``wire.encode``/``wire.decode`` exactly as a transport would carry it, so the byte counts
are those of the real messages. ``drop`` names, per member, the stage (its label) at
which it vanishes: it never sends that stage's message, nor any later one. The stages,
and what each member receives before each, come from :mod:`ftte.crypto.stages`; each
member's side is a :class:`~ftte.crypto.secagg_member.MemberSession`, as on a device.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from ftte import wire
from ftte.crypto.primitives import Signer
from ftte.crypto.secagg_member import MemberSession
from ftte.crypto.secagg_server import AggregateResult, SecAggServer
from ftte.crypto.secagg_session import SessionAborted, SessionParams
from ftte.crypto.stages import STAGE_LABELS, Stage, close_stage, input_for

STAGES = STAGE_LABELS


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
    for member, label in drop.items():
        if label not in STAGE_LABELS:
            raise ValueError(f"unknown drop stage {label!r} for member {member}; stages are {STAGE_LABELS}")
    stats = SessionStats()
    server = SecAggServer(params)
    members = {m: MemberSession(params, m, identities[m], lambda m=m: inputs[m]) for m in params.members}
    alive = set(params.members)

    def server_time(fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            stats.server_seconds += time.perf_counter() - t0

    published = None
    try:
        for stage in Stage:
            label = stage.label
            alive -= {m for m in alive if drop.get(m) == label}
            for m in sorted(alive):
                given = input_for(stage, m, published)
                if stage is not Stage.ADVERTISE and given is None:
                    continue  # the server already left this member out
                received = None if given is None else stats.carry(given, m, label, False)
                t0 = time.perf_counter()
                reply = members[m].reply(stage, received)
                if stage is Stage.UPLOAD:
                    stats.mask_seconds[m] = time.perf_counter() - t0
                server_time(server.receive, stats.carry(reply, m, label, True))
            published = server_time(close_stage, server, stage)
        t0 = time.perf_counter()
        result = server_time(server.finish)
        stats.server_unmask_seconds = time.perf_counter() - t0
        return result, stats
    except SessionAborted as exc:
        stats.aborted = str(exc)
        return None, stats

"""Drive one secure-aggregation session, with every message really encoded.

Used by the benchmark, the tests and the simulator. Each message crosses
``wire.encode``/``wire.decode`` exactly as a transport would carry it, so the byte counts
are those of the real messages. ``drop`` names, per member, the stage (its label) at
which it vanishes: it never sends that stage's message, nor any later one. The stages,
and what each member receives before each, come from :mod:`ftte.crypto.stages`; each
member's side is a :class:`~ftte.crypto.secagg_member.MemberSession`, as on a device.

The server runs here; the members run wherever a :class:`MemberRunner` puts them: in this
process (:class:`InProcessMembers`, the default) or spread over worker processes (the
simulator's Ray backend). Either way every member's work is
:meth:`~ftte.crypto.secagg_member.MemberHost.stage`, one batch of members per host and
stage. A host that dies mid-stage takes its members with it: they vanish at that stage,
exactly as a ``drop`` at that stage would have them (listed in ``SessionStats.lost``).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from ftte import wire
from ftte.crypto.primitives import Signer
from ftte.crypto.secagg_client import RandomSource
from ftte.crypto.secagg_member import MemberHost, StageReplies
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
    # member -> stage at which the process playing it died (it vanished there, like a drop)
    lost: dict[int, str] = field(default_factory=dict)

    def count(self, data: bytes, member: int, stage: str, upward: bool) -> None:
        total, per_stage = (self.bytes_up, self.stage_up) if upward else (self.bytes_down, self.stage_down)
        total[member] = total.get(member, 0) + len(data)
        bucket = per_stage.setdefault(stage, {})
        bucket[member] = bucket.get(member, 0) + len(data)

    def carry(self, msg, member: int, stage: str, upward: bool):
        """Encode and decode ``msg`` as a transport would, counting its bytes."""
        data = wire.encode(msg)
        self.count(data, member, stage, upward)
        return wire.decode(data, expect=type(msg))


class MemberRunner(ABC):
    """Where one session's members run: :meth:`open` once, then :meth:`stage` per stage, then
    :meth:`close`. A runner is used for one session."""

    @abstractmethod
    def open(self, params: SessionParams, seats: Mapping[int, tuple[Signer, np.ndarray]],
             randomness: Mapping[int, RandomSource] | None = None) -> None:
        """Place the members (id -> identity and input vector; ``randomness``: id -> the member's
        generator in a simulation, see :class:`~ftte.crypto.secagg_client.SecAggClient`)."""

    @abstractmethod
    def stage(self, stage: Stage, inbound: Mapping[int, bytes | None]) -> tuple[StageReplies, set[int]]:
        """The named members' replies to ``stage``, and the members lost (their process died) in it."""

    @abstractmethod
    def close(self) -> None:
        """Forget the session's member state (also after an abort)."""


class InProcessMembers(MemberRunner):
    """Every member in this process, on one :class:`MemberHost`."""

    def __init__(self, host: MemberHost | None = None, key: str = "session") -> None:
        self.host = host if host is not None else MemberHost()
        self.key = key

    def open(self, params: SessionParams, seats: Mapping[int, tuple[Signer, np.ndarray]],
             randomness: Mapping[int, RandomSource] | None = None) -> None:
        self.host.open(self.key, params, seats, randomness)

    def stage(self, stage: Stage, inbound: Mapping[int, bytes | None]) -> tuple[StageReplies, set[int]]:
        return self.host.stage(self.key, stage, inbound), set()

    def close(self) -> None:
        self.host.close(self.key)


def run_session(
    params: SessionParams,
    identities: Mapping[int, Signer],
    inputs: Mapping[int, np.ndarray],
    drop: Mapping[int, str] | None = None,
    members: MemberRunner | Callable[[], MemberRunner] | None = None,
    randomness: Mapping[int, RandomSource] | None = None,
) -> tuple[AggregateResult | None, SessionStats]:
    """Run all five stages; returns (result or None if aborted, stats).

    ``members``: a runner (or a factory of one) for this session's members; default: this
    process. The server receives the replies of a stage in ascending member order, whatever
    process computed them, so the outcome does not depend on the runner. ``randomness``: each
    member's generator (a simulation derives them from its run seed; None: the OS)."""
    drop = dict(drop or {})
    for member, label in drop.items():
        if label not in STAGE_LABELS:
            raise ValueError(f"unknown drop stage {label!r} for member {member}; stages are {STAGE_LABELS}")
    stats = SessionStats()
    server = SecAggServer(params)
    runner = members() if callable(members) and not isinstance(members, MemberRunner) else members
    if runner is None:
        runner = InProcessMembers()
    alive = set(params.members)

    def server_time(fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            stats.server_seconds += time.perf_counter() - t0

    published = None
    try:
        runner.open(params, {m: (identities[m], inputs[m]) for m in params.members}, randomness)
        for stage in Stage:
            label = stage.label
            alive -= {m for m in alive if drop.get(m) == label}
            inbound: dict[int, bytes | None] = {}
            for m in sorted(alive):
                given = input_for(stage, m, published)
                if stage is not Stage.ADVERTISE and given is None:
                    continue  # the server already left this member out
                if given is None:
                    inbound[m] = None
                else:
                    data = wire.encode(given)
                    stats.count(data, m, label, False)
                    inbound[m] = data
            batch, lost = runner.stage(stage, inbound)
            for m in sorted(lost):
                stats.lost[m] = label
            alive -= lost
            if stage is Stage.UPLOAD:
                stats.mask_seconds.update(batch.seconds)
            for m in sorted(batch.replies):
                if m in lost or (batch.aborted_by is not None and m > batch.aborted_by):
                    continue  # a single host answering in order would have stopped at the refusal
                data = batch.replies[m]
                stats.count(data, m, label, True)
                server_time(server.receive, wire.decode(data, expect=stage.member_message))
            if batch.aborted:
                raise SessionAborted(batch.aborted)
            published = server_time(close_stage, server, stage)
        t0 = time.perf_counter()
        result = server_time(server.finish)
        stats.server_unmask_seconds = time.perf_counter() - t0
        return result, stats
    except SessionAborted as exc:
        stats.aborted = str(exc)
        return None, stats
    finally:
        runner.close()

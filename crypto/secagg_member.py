"""One member's side of a secure-aggregation session, a stage at a time, whatever carries the messages.

The in-process runner (:mod:`ftte.crypto.secagg_local`), the edge client and the HTTP load
benchmark each keep only their transport: they hand this driver the server's input for a
stage and send back what it returns. The member's input vector is asked for only when the
upload stage comes, so a device can weigh and encode its update once it knows the cohort.

:class:`MemberHost` plays many members of one or more sessions in one process (the
simulator's own process, or a Ray worker): it takes a stage's encoded messages for a batch
of its members and returns their encoded replies. It is the one definition of the members'
work in a simulation, whichever backend runs it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np

from ftte import wire
from ftte.crypto.primitives import Signer
from ftte.crypto.secagg_client import RandomSource, SecAggClient
from ftte.crypto.secagg_session import ReplayError, SessionAborted, SessionParams
from ftte.crypto.stages import Stage


class MemberSession:
    def __init__(self, params: SessionParams, member: int, identity: Signer,
                 input_vector: Callable[[], np.ndarray], rng: RandomSource | None = None) -> None:
        """``rng``: None on a device (fresh OS randomness per session); a simulation's seeded generator."""
        self.client = SecAggClient(params, member, identity, rng)
        self.member = member
        self._input_vector = input_vector

    def reply(self, stage: Stage, server_input: object | None) -> object:
        """This member's message for ``stage`` given the server's input to it (checked for its type)."""
        want = stage.server_input
        if want is None:
            if server_input is not None:
                raise ReplayError(f"stage {stage.label} takes no server message")
            return self.client.advertise()
        if not isinstance(server_input, want):
            raise ReplayError(f"stage {stage.label} needs a {want.__name__}, got {type(server_input).__name__}")
        if stage is Stage.SHARE:
            return self.client.share_keys(server_input)  # type: ignore[arg-type]
        if stage is Stage.UPLOAD:
            return self.client.masked_input(server_input, self._input_vector())  # type: ignore[arg-type]
        if stage is Stage.CONSISTENCY:
            return self.client.consistency(server_input)  # type: ignore[arg-type]
        return self.client.unmask(server_input)  # type: ignore[arg-type]


class StageReplies:
    """A batch of members' replies to one stage: each reply encoded, with the seconds the member
    took to compute it. If a member refused to go on (``SessionAborted``), ``aborted`` says why
    and ``aborted_by`` names it; members are answered in ascending order, so the replies are
    those of the members before it."""

    __slots__ = ("replies", "seconds", "aborted", "aborted_by")

    def __init__(self) -> None:
        self.replies: dict[int, bytes] = {}
        self.seconds: dict[int, float] = {}
        self.aborted = ""
        self.aborted_by: int | None = None

    def __reduce__(self):  # small and picklable across processes (Ray)
        return (_rebuild_replies, (self.replies, self.seconds, self.aborted, self.aborted_by))

    def merge(self, other: "StageReplies") -> None:
        """Add another host's batch; of two refusals, the lower member's is the one a single host
        answering every member in order would have met first."""
        self.replies.update(other.replies)
        self.seconds.update(other.seconds)
        if other.aborted_by is not None and (self.aborted_by is None or other.aborted_by < self.aborted_by):
            self.aborted, self.aborted_by = other.aborted, other.aborted_by


def _rebuild_replies(replies: dict[int, bytes], seconds: dict[int, float], aborted: str,
                     aborted_by: int | None) -> StageReplies:
    out = StageReplies()
    out.replies, out.seconds, out.aborted, out.aborted_by = replies, seconds, aborted, aborted_by
    return out


class MemberHost:
    """The members of secure-aggregation sessions that one process plays.

    A session is opened with each hosted member's identity and input vector, then driven a
    stage at a time: the server's input to each member arrives encoded (``None`` for the first
    stage), as a transport would deliver it, and each member's reply leaves encoded. Members are
    answered in ascending id order. Keys, seeds and nonces are drawn by the members
    (:class:`SecAggClient`) from the OS, or from the generator :meth:`open` gives a member (a
    simulation's, derived from its run seed, so that the ring and every message size repeat).
    """

    def __init__(self) -> None:
        self._sessions: dict[str, dict[int, MemberSession]] = {}

    def open(self, key: str, params: SessionParams, seats: Mapping[int, tuple[Signer, np.ndarray]],
             randomness: Mapping[int, RandomSource] | None = None) -> None:
        """``randomness``: each member's generator (a simulation); None or a missing member: the OS."""
        if key in self._sessions:
            raise ValueError(f"member session {key!r} is already open here")
        rngs = randomness or {}
        self._sessions[key] = {m: MemberSession(params, m, identity, lambda v=vector: v, rngs.get(m))
                               for m, (identity, vector) in sorted(seats.items())}

    def stage(self, key: str, stage: Stage, inbound: Mapping[int, bytes | None]) -> StageReplies:
        """Every named member's reply to ``stage`` (its server input encoded, or None for the first stage)."""
        members = self._sessions[key]
        want = stage.server_input
        out = StageReplies()
        for m in sorted(inbound):
            data = inbound[m]
            received = None if data is None or want is None else wire.decode(data, expect=want)
            t0 = time.perf_counter()
            try:
                reply = members[m].reply(stage, received)
            except SessionAborted as exc:
                out.aborted, out.aborted_by = str(exc), m
                return out
            out.seconds[m] = time.perf_counter() - t0
            out.replies[m] = wire.encode(reply)
        return out

    def close(self, key: str) -> None:
        self._sessions.pop(key, None)

    def holds(self, key: str) -> bool:
        return key in self._sessions

    @property
    def open_sessions(self) -> int:
        return len(self._sessions)

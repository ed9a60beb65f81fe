"""The deployment's coordinator: real time, real devices, no transport.

It does over a network what :mod:`ftte.pipeline.simulator` and :mod:`ftte.pipeline.cohort`
do on a virtual clock: hold the model version and its hash, gather devices that finished
training into the open cohort (closing it at ``buffer_size`` members, or at the deadline
with at least the threshold), drive one :class:`SecAggServer` per cohort through its five
stages (each closes when every expected member answered or at the stage timeout), decode
the unmasked sum with the cohort's :class:`UpdateCodec`, merge it with the
:class:`ServerOptimizer` and commit version, cohort record, history row and ledger rows in
one transaction. The HTTP layer (:mod:`ftte.pipeline.http_server`) authenticates devices
and hands decoded messages to the ``async`` methods here; a refusal is a
:class:`ProtocolError` carrying the status code, raised before any state changes.

Crash safety (see :mod:`ftte.pipeline.journal`): every state change is made synchronously
on the event loop and its journal entry queued in the same step; a reply (an ack, or a
stage's outputs to pollers) is released only once its entry is durable. On start,
:meth:`Coordinator.recover` replays the journal through the same code paths, so in-flight
cohorts resume where they were; members that still live retry and finish them, the others
are dropped at the stage timeout and the cohort completes or aborts like any other.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from ftte.crypto.quantize import QuantizationError, choose_ring_bits
from ftte.crypto.secagg_server import SecAggServer
from ftte.crypto.secagg_session import ConfigError as SessionConfigError
from ftte.crypto.secagg_session import (
    MemberError,
    ReplayError,
    SecAggError,
    SessionAborted,
    ShapeError,
    SignatureError,
)
from ftte.protocol.cohort import session_params
from ftte.protocol.encoding import EXTRA_COORDINATES, UpdateCodec
from ftte.edge.plan import apply_subset_vector
from ftte.protocol.cohort import model_hash
from ftte.pipeline.deploy_task import DeployTask
from ftte.pipeline.journal import (
    CLOSE,
    JOIN,
    LEAVE,
    MESSAGE,
    OPEN,
    START,
    CohortCommit,
    Database,
    JournalEntry,
    JournalWriter,
    MemberRound,
    Recovered,
)
from ftte.pipeline.merge import ServerOptimizer, weighted_mean
from ftte.privacy.accountant import PrivacyStep

from ftte import wire
from ftte.secagg_messages import (
    AdvertiseKeys,
    ConsistencyBundle,
    ConsistencySignature,
    MaskedInput,
    Roster,
    ShareDelivery,
    ShareKeys,
    SurvivorList,
    UnmaskShares,
)
from ftte.round_messages import ModelPull
from ftte.deploy_messages import (
    Ack,
    CohortEnd,
    CohortStart,
    JoinReply,
    JoinRequest,
    LeaveRequest,
    Pending,
    PollRequest,
    PullRequest,
    SpentRound,
    Submit,
    TaskInfo,
)

STAGES = ("advertise", "share", "upload", "consistency", "unmask")
MEMBER_MESSAGES = (AdvertiseKeys, ShareKeys, MaskedInput, ConsistencySignature, UnmaskShares)
STAGE_OF_MESSAGE = {cls: i for i, cls in enumerate(MEMBER_MESSAGES)}
POLL_END = 5  # poll stages: 0 start, 1 roster, 2 delivery, 3 survivors, 4 bundle, 5 end
ENDED_CACHE = 512
TICK_S = 0.1
MAX_UNREPORTED = 500  # late-reported rounds accepted in one join (about 35 KB, under the body limit)
UNMERGED = "unmerged"  # cohort id of a ledger row for a round that was spent but never aggregated


class ProtocolError(Exception):
    """A refused request: HTTP status, a stable code, a detail. Raised before any state change."""

    def __init__(self, status: int, code: str, detail: str = "") -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status, self.code, self.detail = status, code, detail


@dataclass
class LiveCohort:
    """One cohort from its first join to its commit."""

    cohort_id: str
    opened_at: float
    joins: dict[int, JoinRequest] = field(default_factory=dict)
    join_bytes: dict[int, bytes] = field(default_factory=dict)
    start: CohortStart | None = None
    codec: UpdateCodec | None = None
    server: SecAggServer | None = None
    stage: int = -1  # -1 forming; 0..4 the SecAggServer stage open; 5 finishing
    stage_opened_at: float = 0.0
    published: int = -1  # highest poll stage whose server message is durable and visible
    got: list[set[int]] = field(default_factory=lambda: [set() for _ in STAGES])
    accepted: dict[tuple[int, int], bytes] = field(default_factory=dict)
    durable: dict[tuple[int, int], asyncio.Future] = field(default_factory=dict)
    roster: Roster | None = None
    deliveries: dict[int, ShareDelivery] = field(default_factory=dict)
    survivors: SurvivorList | None = None
    bundle: ConsistencyBundle | None = None
    aborted: str = ""
    end: CohortEnd | None = None
    changed: asyncio.Event | None = None

    def notify(self) -> None:
        old, self.changed = self.changed, asyncio.Event()
        if old is not None:
            old.set()

    def event(self) -> asyncio.Event:
        if self.changed is None:
            self.changed = asyncio.Event()
        return self.changed

    def expected(self) -> set[int]:
        """Members whose message the open stage still waits for."""
        if self.stage == 0:
            return set(self.joins)
        if 1 <= self.stage <= 4:
            return set(self.got[self.stage - 1])
        return set()

    def stage_name(self) -> str:
        if self.aborted:
            return "aborting"
        return "forming" if self.stage < 0 else (STAGES[self.stage] if self.stage < len(STAGES) else "finishing")

    def dropped_stages(self) -> dict[int, str]:
        out: dict[int, str] = {}
        for m in self.joins:
            for i, name in enumerate(STAGES):
                if m not in self.got[i]:
                    out[m] = name
                    break
        return out


@dataclass
class Counters:
    joins: int = 0
    uploads: int = 0
    cohorts_applied: int = 0
    cohorts_aborted: int = 0
    ledger_rows: int = 0
    recovered_cohorts: int = 0


class Coordinator:
    def __init__(self, task: DeployTask, db: Database, identities: dict[int, bytes], *,
                 clock: Callable[[], float] = time.time) -> None:
        self.task = task
        self.settings = task.settings
        self.cfg = task.settings.run
        self.db = db
        self.journal = JournalWriter(db)
        self.identities = identities  # member id -> Ed25519 public key
        self.clock = clock
        self.plan_id = task.plan.plan_id
        self.stage_timeout = task.settings.deploy.stage_timeout_s
        self.poll_wait = task.settings.http.poll_wait_s
        self.version = 0
        self.weights = task.initial_subset.copy()
        self.velocity: np.ndarray | None = None
        self.reference_variance: float | None = None
        self.hashes: dict[int, bytes] = {}
        self.live: dict[str, LiveCohort] = {}
        self.forming: LiveCohort | None = None
        self.ended: dict[str, CohortEnd] = {}
        self.finished_members: dict[str, set[int]] = {}
        self.counters = Counters()
        self.started_at = 0.0
        self.history_tail: dict[str, Any] | None = None
        self._merge_lock = asyncio.Lock()
        self.commit_seconds: deque[float] = deque(maxlen=1000)
        self._tasks: set[asyncio.Task] = set()
        self._pull_cache: tuple[int, ModelPull] | None = None
        self._eval_model = None
        self._test: tuple[np.ndarray, np.ndarray] | None = None

    # -- start-up ------------------------------------------------------------------------
    def load_test_data(self, x: np.ndarray, y: np.ndarray) -> None:
        import copy

        self._test = (np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64))
        self._eval_model = copy.deepcopy(self.task.model)

    async def recover(self) -> None:
        """Load the latest version and replay the journal of every unfinished cohort."""
        await self.db.call(self.db.commit_initial, self.task.initial_subset, self.plan_id, self.cfg.to_json())
        self.started_at = await self.db.call(self.db.started_at)
        rec: Recovered = await self.db.call(self.db.recover, self.settings.deploy.max_staleness)
        if rec.checkpoint is not None:
            ck = rec.checkpoint
            self.version, self.weights = ck.version, ck.weights
            self.velocity, self.reference_variance = ck.velocity, ck.reference_variance
            self.history_tail = ck.history[-1] if ck.history else None
        for v, w in rec.recent_weights.items():
            self.hashes[v] = model_hash(self.plan_id, w.astype(np.float32))
        self.hashes[self.version] = model_hash(self.plan_id, self.weights.astype(np.float32))
        for cid, record in rec.finished.items():
            self.finished_members[cid] = set(record.get("members", []))
            self.ended[cid] = _end_from_record(record)
        self._trim_ended()
        for entry in rec.journal:
            self._replay(entry)
        now = self.clock()
        for c in list(self.live.values()):
            if c.start is None and not c.joins:  # every member left before the crash
                del self.live[c.cohort_id]
                if self.forming is c:
                    self.forming = None
                await self.db.call(self.db.forget_cohort, c.cohort_id)
                continue
            c.published = min(c.stage, 4) if c.start is not None else -1
            c.stage_opened_at = now  # give surviving members a whole stage to come back
            if c.aborted:
                self._spawn(self._conclude(c, None))
            elif c.stage == 5:
                self._spawn(self._finish(c))
            elif c.start is None and len(c.joins) >= self.cfg.server.buffer_size:
                self._start(c)  # the crash fell between the last join and the start entry
            elif 0 <= c.stage <= 4 and c.expected() <= c.got[c.stage]:
                self._close_stage(c, now, journal=True)  # ... or between the last message and the close
        self.counters.recovered_cohorts = len(self.live)

    def _replay(self, e: JournalEntry) -> None:
        if e.kind == OPEN:
            c = LiveCohort(e.cohort_id, e.at)
            self.live[c.cohort_id] = c
            self.forming = c
            return
        c = self.live.get(e.cohort_id)
        if c is None:
            print(f"ftte server: journal entry for unknown cohort {e.cohort_id} ignored", file=sys.stderr)
            return
        if e.kind == JOIN:
            assert e.member is not None and e.data is not None
            c.joins[e.member] = wire.decode(e.data, expect=JoinRequest)
            c.join_bytes[e.member] = e.data
        elif e.kind == LEAVE:
            assert e.member is not None
            c.joins.pop(e.member, None)
            c.join_bytes.pop(e.member, None)
        elif e.kind == START:
            assert e.data is not None
            self._begin(c, wire.decode(e.data, expect=CohortStart), e.at)
        elif e.kind == MESSAGE:
            assert e.member is not None and e.data is not None
            msg = wire.decode(e.data)
            assert c.server is not None
            try:
                c.server.receive(msg)
            except SecAggError as exc:  # cannot happen with the same code; never stop a restart for it
                print(f"ftte server: replayed message refused in {c.cohort_id}: {exc}", file=sys.stderr)
                return
            stage = STAGE_OF_MESSAGE[type(msg)]
            c.got[stage].add(e.member)
            c.accepted[(stage, e.member)] = e.data
        elif e.kind == CLOSE:
            self._close_stage(c, e.at, journal=False)

    # -- background work -------------------------------------------------------------------
    def _spawn(self, coro) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._task_done)

    def _task_done(self, t: asyncio.Task) -> None:
        self._tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            exc = t.exception()
            print(f"ftte server: background task failed: {exc!r}", file=sys.stderr, flush=True)

    async def run_timers(self) -> None:
        """Close cohorts at their deadline and stages at their timeout."""
        while True:
            await asyncio.sleep(TICK_S)
            try:
                self.tick()
            except Exception as exc:  # a bug must not stop every deadline of the server
                print(f"ftte server: timer failed: {exc!r}", file=sys.stderr, flush=True)

    def tick(self) -> None:
        now = self.clock()
        f = self.forming
        if f is not None and now - f.opened_at >= self.cfg.server.deadline_s and len(f.joins) >= self.min_cohort:
            self._start(f)
        for c in list(self.live.values()):
            if 0 <= c.stage <= 4 and not c.aborted and now - c.stage_opened_at >= self.stage_timeout:
                self._close_stage(c, now, journal=True)

    async def drain(self) -> None:
        await self.journal.flush()

    # -- derived settings -----------------------------------------------------------------
    @property
    def min_cohort(self) -> int:
        return max(2, self.cfg.secagg_threshold)

    # -- device requests -----------------------------------------------------------------
    def task_info(self, member: int) -> TaskInfo:
        return self.task.task_info(member, self.stage_timeout, self.poll_wait)

    def pull(self, member: int, req: PullRequest) -> ModelPull:
        if req.plan_id != self.plan_id:
            raise ProtocolError(409, "wrong_plan", f"this server trains {self.plan_id}, not {req.plan_id}")
        if self._pull_cache is None or self._pull_cache[0] != self.version:
            w32 = self.weights.astype(np.float32)
            self._pull_cache = (self.version, ModelPull(self.version, self.plan_id, self.hashes[self.version], w32))
        return self._pull_cache[1]

    def _check_join(self, req: JoinRequest) -> None:
        if req.plan_id != self.plan_id:
            raise ProtocolError(409, "wrong_plan", f"this server trains {self.plan_id}, not {req.plan_id}")
        if req.base_version > self.version:
            raise ProtocolError(422, "future_version", f"version {req.base_version} does not exist yet")
        if self.version - req.base_version > self.settings.deploy.max_staleness:
            raise ProtocolError(409, "too_stale", f"trained from version {req.base_version}, now {self.version}")
        known = self.hashes.get(req.base_version)
        if known is None or known != req.model_hash:
            raise ProtocolError(409, "model_mismatch", f"model hash does not match version {req.base_version}")
        p = self.cfg.privacy
        if p.enabled:
            if req.accountant != p.accountant:
                raise ProtocolError(422, "dp_mismatch", f"accountant must be {p.accountant!r}")
            if req.noise_multiplier + 1e-12 < p.noise_multiplier or req.max_grad_norm > p.max_grad_norm + 1e-12:
                raise ProtocolError(422, "dp_mismatch", "noise multiplier or clipping norm differ from the task")
            if req.steps != self.cfg.train.local_steps or not 0.0 < req.sample_rate <= 1.0:
                raise ProtocolError(422, "dp_mismatch", "steps or sample rate outside the task")
            if not 0.0 < req.delta < 1.0 or req.epsilon_max < 0.0:
                raise ProtocolError(422, "dp_mismatch", "delta must lie in (0, 1) and epsilon_max >= 0")
            self._spent_rounds(req)  # validates the late-reported rounds

    @staticmethod
    def _spent_rounds(req: JoinRequest) -> list[tuple[int, SpentRound]]:
        """The rounds a join reports late, decoded and range-checked (raises ``ProtocolError``)."""
        if len(req.unreported) > MAX_UNREPORTED:
            raise ProtocolError(422, "malformed", f"more than {MAX_UNREPORTED} late rounds in one join")
        out: list[tuple[int, SpentRound]] = []
        for seq, blob in req.unreported:
            try:
                r = wire.decode(blob, expect=SpentRound, max_bytes=256)
            except wire.WireError as exc:
                raise ProtocolError(422, "malformed", f"late round {seq}: {exc}") from None
            if not (1 <= seq < req.round_seq and r.steps >= 1 and 0.0 < r.sample_rate <= 1.0
                    and r.noise_multiplier > 0.0 and r.max_grad_norm > 0.0 and 0.0 < r.delta < 1.0):
                raise ProtocolError(422, "dp_mismatch", f"late round {seq} is out of range")
            out.append((seq, r))
        if len({seq for seq, _ in out}) != len(out):
            raise ProtocolError(422, "malformed", "a late round is reported twice")
        return sorted(out, key=lambda x: x[0])

    async def join(self, member: int, req: JoinRequest, raw: bytes) -> JoinReply:
        self._check_join(req)
        for c in self.live.values():  # a retried join whose reply was lost
            if c.join_bytes.get(member) == raw:
                fut = c.durable.get((-1, member))
                if fut is not None:
                    await asyncio.shield(fut)
                return JoinReply(c.cohort_id, req.base_version)
        now = self.clock()
        futs = []
        if self.forming is None:
            c = LiveCohort("c-" + secrets.token_hex(8), now)
            self.live[c.cohort_id] = c
            self.forming = c
            futs.append(self.journal.append(JournalEntry(c.cohort_id, OPEN, now)))
        c = self.forming
        c.joins[member] = req  # a device that gave up on its earlier join replaces it
        c.join_bytes[member] = raw
        fut = self.journal.append(JournalEntry(c.cohort_id, JOIN, now, member, None, raw))
        c.durable[(-1, member)] = fut
        futs.append(fut)
        self.counters.joins += 1
        if len(c.joins) >= self.cfg.server.buffer_size:
            self._start(c)
        await asyncio.shield(asyncio.gather(*futs))
        return JoinReply(c.cohort_id, req.base_version)

    async def leave(self, member: int, req: LeaveRequest) -> Ack:
        """A device stops waiting for a cohort that has not started; too late once it has."""
        c = self._cohort_for(member, req.cohort_id)
        if c.start is not None:
            raise ProtocolError(409, "started", "the cohort has started; a member that leaves now is dropped")
        del c.joins[member]
        del c.join_bytes[member]
        c.durable.pop((-1, member), None)
        empty = not c.joins
        if empty:  # nobody waits any more: a later join opens a fresh cohort with a fresh deadline
            del self.live[c.cohort_id]
            if self.forming is c:
                self.forming = None
        await asyncio.shield(self.journal.append(JournalEntry(c.cohort_id, LEAVE, self.clock(), member)))
        if empty:
            await self.db.call(self.db.forget_cohort, c.cohort_id)
        return Ack(c.cohort_id, 0)

    async def submit(self, member: int, req: Submit, max_payload: int) -> Ack:
        c = self._cohort_for(member, req.cohort_id)
        if c.server is None or c.start is None:
            raise ProtocolError(409, "not_started", "the cohort has not started yet")
        try:
            msg = wire.decode(req.payload, max_bytes=max_payload)
        except wire.WireError as exc:
            raise ProtocolError(422, "malformed", str(exc)) from None
        stage = STAGE_OF_MESSAGE.get(type(msg))
        if stage is None:
            raise ProtocolError(422, "malformed", f"{type(msg).__name__} is not a member message")
        if msg.member != member:  # type: ignore[attr-defined]
            raise ProtocolError(403, "member_mismatch", "the message names another member")
        key = (stage, member)
        if key in c.accepted:
            if c.accepted[key] != req.payload:
                raise ProtocolError(409, "duplicate", f"another {type(msg).__name__} was already accepted")
            fut = c.durable.get(key)
            if fut is not None:
                await asyncio.shield(fut)
            return Ack(c.cohort_id, stage)
        if c.aborted or c.end is not None or c.stage != stage:
            raise ProtocolError(409, "stage_closed", f"{STAGES[stage]} is not the open stage of {c.cohort_id}")
        try:
            c.server.receive(msg)
        except ReplayError as exc:
            raise ProtocolError(409, "wrong_session", str(exc)) from None
        except MemberError as exc:
            raise ProtocolError(409, "not_expected", str(exc)) from None
        except ShapeError as exc:
            raise ProtocolError(422, "bad_shape", str(exc)) from None
        except SignatureError as exc:
            raise ProtocolError(422, "bad_message_signature", str(exc)) from None
        now = self.clock()
        c.got[stage].add(member)
        c.accepted[key] = req.payload
        fut = self.journal.append(JournalEntry(c.cohort_id, MESSAGE, now, member, STAGES[stage], req.payload))
        c.durable[key] = fut
        if stage == 2:
            self.counters.uploads += 1
        if c.expected() <= c.got[stage]:
            self._close_stage(c, now, journal=True)
        await asyncio.shield(fut)
        return Ack(c.cohort_id, stage)

    async def poll(self, member: int, req: PollRequest, wait_s: float | None = None):
        if req.stage > POLL_END:
            raise ProtocolError(422, "bad_stage", f"stages are 0..{POLL_END}")
        wait = self.poll_wait if wait_s is None else wait_s
        deadline = self.clock() + wait
        while True:
            answer = self._answer(member, req)
            if answer is not None:
                return answer
            c = self.live.get(req.cohort_id)
            remaining = deadline - self.clock()
            if c is None or remaining <= 0:
                return Pending(req.cohort_id, req.stage, 200)
            try:
                await asyncio.wait_for(c.event().wait(), timeout=remaining)
            except asyncio.TimeoutError:
                pass

    def _cohort_for(self, member: int, cohort_id: str) -> LiveCohort:
        c = self.live.get(cohort_id)
        if c is None:
            if cohort_id in self.ended:
                raise ProtocolError(409, "cohort_over", f"{cohort_id} has ended")
            raise ProtocolError(404, "unknown_cohort", cohort_id)
        if member not in c.joins:
            raise ProtocolError(403, "not_a_member", f"not a member of {cohort_id}")
        return c

    def _answer(self, member: int, req: PollRequest):
        cid, k = req.cohort_id, req.stage
        c = self.live.get(cid)
        if c is None:
            end = self.ended.get(cid)
            if end is None:
                raise ProtocolError(404, "unknown_cohort", cid)
            if member not in self.finished_members.get(cid, set()):
                raise ProtocolError(403, "not_a_member", f"not a member of {cid}")
            return end
        if member not in c.joins:
            raise ProtocolError(403, "not_a_member", f"not a member of {cid}")
        if k > c.published or k == POLL_END:
            return None
        if k == 0:
            return c.start
        if k == 1:
            assert c.roster is not None
            ok = any(m == member for m, _ in c.roster.adverts)
            return c.roster if ok else self._dropped(cid, "advertise")
        if k == 2:
            d = c.deliveries.get(member)
            return d if d is not None else self._dropped(cid, "share")
        if k == 3:
            assert c.survivors is not None
            return c.survivors if member in c.survivors.survivors else self._dropped(cid, "upload")
        assert c.bundle is not None
        return c.bundle if any(m == member for m, _ in c.bundle.signatures) else self._dropped(cid, "consistency")

    @staticmethod
    def _dropped(cohort_id: str, stage: str) -> CohortEnd:
        return CohortEnd(cohort_id, "dropped", 0, (), f"missed the {stage} stage")

    # -- cohort life cycle (synchronous state changes; journal queued in the same step) ------------
    def _cohort_start(self, cohort_id: str, members: tuple[int, ...], keys: tuple[bytes, ...],
                      model_hash: bytes | None = None) -> CohortStart:
        """The session a cohort of these members gets: graph, thresholds and ring as the simulator picks them."""
        n = len(members)
        sa = self.cfg.secagg
        ring = sa.graph == "ring" and sa.neighbors < n - 1  # a small cohort falls back to the full graph
        threshold = sa.effective_threshold(n)
        if not ring:
            threshold = max(threshold, n // 2 + 1)
        ring_bits = choose_ring_bits(n, sa.value_bits)
        rule = self.task.rule
        return CohortStart(
            cohort_id=cohort_id, plan_id=self.plan_id,
            model_hash=self.hashes[self.version] if model_hash is None else model_hash,
            close_version=self.version, members=members, identity_keys=tuple(zip(members, keys)),
            threshold=min(threshold, n), share_threshold=0, graph="ring" if ring else "full",
            neighbors=sa.neighbors if ring else 0, dim=self.task.dim + EXTRA_COORDINATES, ring_bits=ring_bits,
            value_bits=sa.value_bits, clip=sa.clip,
            reference_variance=-1.0 if self.reference_variance is None else float(self.reference_variance),
            staleness_exponent=rule.staleness_exponent, variance_penalty=rule.variance_penalty, r_min=rule.r_min,
        )

    def check_sessions(self) -> None:
        """Fail at start-up, not at the first full cohort, if some cohort size could not form a session."""
        for n in range(self.min_cohort, self.cfg.server.buffer_size + 1):
            members = tuple(range(1, n + 1))
            try:
                session_params(self._cohort_start("check", members, tuple(bytes(32) for _ in members), bytes(32)))
            except (SessionConfigError, QuantizationError) as exc:
                raise ValueError(f"a cohort of {n} members cannot run secure aggregation: {exc}") from None

    def _start(self, c: LiveCohort) -> None:
        """Close the cohort to new members and fix its session parameters."""
        members = tuple(sorted(c.joins))
        start = self._cohort_start(c.cohort_id, members, tuple(self.identities[m] for m in members))
        now = self.clock()
        data = wire.encode(start)
        self._begin(c, start, now)
        fut = self.journal.append(JournalEntry(c.cohort_id, START, now, None, None, data))
        self._publish_after(c, fut, 0)

    def _begin(self, c: LiveCohort, start: CohortStart, now: float) -> None:
        params = session_params(start)
        c.start = start
        c.codec = UpdateCodec(self.task.dim, start.clip, start.value_bits, start.ring_bits)
        c.server = SecAggServer(params)
        c.stage, c.stage_opened_at = 0, now
        if self.forming is c:
            self.forming = None

    def _close_stage(self, c: LiveCohort, now: float, *, journal: bool) -> None:
        """End the open stage (all expected answers in, or its timeout); abort below the threshold."""
        assert c.server is not None
        stage = c.stage
        try:
            if stage == 0:
                c.roster = c.server.close_advertise()
            elif stage == 1:
                c.deliveries = c.server.close_share()
            elif stage == 2:
                c.survivors = c.server.close_upload()
            elif stage == 3:
                c.bundle = c.server.close_consistency()
            elif stage == 4:
                pass  # unmasking happens in _finish, off the event loop
        except SessionAborted as exc:
            c.aborted = str(exc)
        c.stage, c.stage_opened_at = stage + 1, now
        if not journal:
            return
        fut = self.journal.append(JournalEntry(c.cohort_id, CLOSE, now, None, STAGES[stage]))
        if c.aborted:
            self._spawn(self._conclude_after(c, fut))
        elif stage == 4:
            self._spawn(self._finish_after(c, fut))
        else:
            self._publish_after(c, fut, stage + 1)

    def _publish_after(self, c: LiveCohort, fut: asyncio.Future, poll_stage: int) -> None:
        def publish(_: asyncio.Future) -> None:
            c.published = max(c.published, poll_stage)
            c.notify()
        fut.add_done_callback(publish)

    async def _conclude_after(self, c: LiveCohort, fut: asyncio.Future) -> None:
        await fut
        await self._conclude(c, None)

    async def _finish_after(self, c: LiveCohort, fut: asyncio.Future) -> None:
        await fut
        await self._finish(c)

    async def _finish(self, c: LiveCohort) -> None:
        """Unmask off the event loop, then merge and commit."""
        assert c.server is not None and c.codec is not None
        try:
            result = await asyncio.to_thread(c.server.finish)
        except SessionAborted as exc:
            c.aborted = str(exc)
            await self._conclude(c, None)
            return
        total, wsum, vsum = c.codec.decode_sum(result.total, len(result.survivors))
        await self._conclude(c, (result.survivors, total, wsum, vsum))

    async def _conclude(self, c: LiveCohort, outcome) -> None:
        """Commit an applied or aborted cohort (serialised: versions are bumped one at a time)."""
        assert c.start is not None
        async with self._merge_lock:
            now = self.clock()
            dropped = c.dropped_stages()
            record: dict[str, Any] = {
                "cohort_id": c.cohort_id,
                "close_version": c.start.close_version,
                "members": sorted(c.joins),
                "included": [],
                "dropped": {str(m): s for m, s in sorted(dropped.items())},
                "weight_sum": 0.0,
                "duration_s": round(now - c.opened_at, 6),
                "aborted": c.aborted,
            }
            version, weights, velocity, ref = self.version, self.weights, self.velocity, self.reference_variance
            history_row = None
            if outcome is not None:
                survivors, total, wsum, vsum = outcome
                record["included"] = list(survivors)
                record["weight_sum"] = wsum
                if wsum > 0 and np.all(np.isfinite(total)):
                    opt = ServerOptimizer(self.cfg.server.lr, self.cfg.server.momentum)
                    opt.load_state(None if velocity is None else velocity.copy())
                    weights = opt.step(weights, weighted_mean(total, wsum))
                    velocity = opt.state()
                    version += 1
                    ref = vsum / len(survivors)
                    record["applied_version"] = version
                    history_row = {
                        "version": version,
                        "elapsed_s": round(now - self.started_at, 6),
                        "cohort_id": c.cohort_id,
                        "cohort_size": len(survivors),
                        "dropped": len(dropped),
                        "mean_weight": wsum / len(survivors),
                        "mean_staleness": float(np.mean([c.start.close_version - c.joins[m].base_version for m in survivors])),
                    }
                    if self._test is not None:
                        acc, loss = await asyncio.to_thread(self._evaluate, weights)
                        history_row.update(accuracy=acc, loss=loss)
                else:
                    record["aborted"] = c.aborted = "the cohort's weights summed to zero"
            rounds = tuple(r for m in sorted(c.joins) for r in self._member_rounds(m, c)) if self.cfg.privacy.enabled else ()
            commit = CohortCommit(version, now - self.started_at, weights, velocity, ref, record, history_row, rounds)
            t0 = time.perf_counter()
            written = await self.db.call(self.db.commit_cohort, commit)
            self.commit_seconds.append(time.perf_counter() - t0)
            self.counters.ledger_rows += written
            if history_row is not None:
                self.version, self.weights, self.velocity, self.reference_variance = version, weights, velocity, ref
                self.hashes[version] = model_hash(self.plan_id, weights.astype(np.float32))
                self.hashes.pop(version - self.settings.deploy.max_staleness - 1, None)
                self.history_tail = history_row
                self.counters.cohorts_applied += 1
                c.end = CohortEnd(c.cohort_id, "applied", version, tuple(record["included"]), "")
            else:
                self.counters.cohorts_aborted += 1
                c.end = CohortEnd(c.cohort_id, "aborted", 0, (), record["aborted"][:1000])
            del self.live[c.cohort_id]
            self.ended[c.cohort_id] = c.end
            self.finished_members[c.cohort_id] = set(c.joins)
            self._trim_ended()
            c.notify()

    def _member_rounds(self, member: int, c: LiveCohort) -> list[MemberRound]:
        """Ledger rows of one member: rounds it reports late (``unmerged``), then this round."""
        j = c.joins[member]
        eps_max = j.epsilon_max if j.epsilon_max > 0 else math.inf
        common = dict(device_id=str(member), plan_id=j.plan_id, version=j.base_version, accountant=j.accountant,
                      epsilon_max=eps_max, rng_source=j.rng_source, torch_version=j.torch_version,
                      opacus_version=j.opacus_version, ftte_version=j.ftte_version)
        rows = [MemberRound(step=PrivacyStep(r.noise_multiplier, r.sample_rate, r.steps),
                            max_grad_norm=r.max_grad_norm, delta=r.delta, cohort_id=UNMERGED, **common)
                for _, r in self._spent_rounds(j)]
        rows.append(MemberRound(step=PrivacyStep(j.noise_multiplier, j.sample_rate, j.steps),
                                max_grad_norm=j.max_grad_norm, delta=j.delta, **common))
        return rows

    def _evaluate(self, weights: np.ndarray) -> tuple[float, float]:
        from ftte.pipeline.simulator import evaluate

        assert self._eval_model is not None and self._test is not None
        with torch.no_grad():
            apply_subset_vector(self._eval_model, self.task.plan, weights.astype(np.float32))
        return evaluate(self._eval_model, *self._test)

    def _trim_ended(self) -> None:
        while len(self.ended) > ENDED_CACHE:
            oldest = next(iter(self.ended))
            del self.ended[oldest]
            self.finished_members.pop(oldest, None)

    # -- reporting ---------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        forming = self.forming
        return {
            "version": self.version,
            "plan_id": self.plan_id,
            "model_hash": self.hashes[self.version].hex(),
            "forming_cohort_members": 0 if forming is None else len(forming.joins),
            "open_cohorts": len(self.live),
            "cohorts_in_flight": sum(1 for c in self.live.values() if c.start is not None),
            "cohort_stages": {c.cohort_id: c.stage_name() for c in self.live.values()},
            "cohorts_applied": self.counters.cohorts_applied,
            "cohorts_aborted": self.counters.cohorts_aborted,
            "joins": self.counters.joins,
            "uploads_accepted": self.counters.uploads,
            "ledger_rows_written": self.counters.ledger_rows,
            "recovered_cohorts": self.counters.recovered_cohorts,
            "journal_transactions": self.journal.transactions,
            "journal_entries": self.journal.entries,
            "journal_write_ms": _quantiles_ms(self.journal.write_seconds),
            "cohort_commit_ms": _quantiles_ms(self.commit_seconds),
            "last_history_row": self.history_tail,
        }


def _quantiles_ms(values) -> dict[str, float]:
    v = sorted(values)
    if not v:
        return {}
    return {"p50": round(1000 * v[len(v) // 2], 2), "p99": round(1000 * v[min(len(v) - 1, int(0.99 * len(v)))], 2),
            "max": round(1000 * v[-1], 2)}


def _end_from_record(record: dict[str, Any]) -> CohortEnd:
    applied = record.get("applied_version")
    if applied is not None:
        return CohortEnd(record["cohort_id"], "applied", int(applied), tuple(record.get("included", [])), "")
    return CohortEnd(record["cohort_id"], "aborted", 0, (), str(record.get("aborted", ""))[:1000])


__all__ = ["Coordinator", "LiveCohort", "ProtocolError"]

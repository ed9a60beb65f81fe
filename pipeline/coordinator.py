"""The deployment's coordinator: real time, real devices, no transport.

It does over a network what :mod:`ftte.pipeline.simulator` does on a virtual clock, with the
same cohort planner (:func:`ftte.protocol.cohort.plan_cohort`), the same stages
(:mod:`ftte.crypto.stages`) and the same server core (:class:`ServerModel`): hold the model version and its hash, gather devices that finished
training into the open cohort (closing it at ``buffer_size`` members, or at the deadline
with at least the threshold), drive one :class:`SecAggServer` per cohort through its five
stages (each closes when every expected member answered or at the stage timeout), decode
the unmasked sum with the cohort's :class:`UpdateCodec`, merge it with the
:class:`ServerOptimizer` and commit version, cohort record, history row and ledger rows in
one transaction. The HTTP layer (:mod:`ftte.pipeline.http_server`) authenticates devices
and hands decoded messages to the ``async`` methods here; a refusal is a
:class:`~ftte.pipeline.refusal.Refused` carrying a stable code (the HTTP layer maps it to a
status), raised before any state changes.

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
from dataclasses import dataclass
from typing import Any

import numpy as np
from ftte.crypto.quantize import QuantizationError
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
from ftte.crypto.stages import POLL_END, Stage, close_stage
from ftte.pipeline.admission import check_join, check_plan, spent_rounds
from ftte.pipeline.deploy_task import DeployTask, min_cohort
from ftte.pipeline.evaluation import Evaluator
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
from ftte.pipeline.live_cohort import FINISHING, LiveCohort
from ftte.pipeline.merge import ServerOptimizer
from ftte.pipeline.refusal import Refused
from ftte.pipeline.server_model import Applied, CohortResult, CohortSum, ServerModel
from ftte.pipeline.strategies import cohort_policy
from ftte.privacy.accountant import PrivacyStep
from ftte.privacy.spend import RoundOutcome
from ftte.privacy.distributed_dp import UserMechanism, parse_user_mechanism, user_row_problems
from ftte.protocol.cohort import codec_for, contribution_binding, is_user_level, plan_cohort, session_params, weight_rule
from ftte.protocol.user_encoding import UserCodec, decode_user_sum, rotation_seed
from ftte.protocol.weighting import update_weight

from ftte import wire
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
from ftte.round_messages import ModelPull

ENDED_CACHE = 512
TICK_S = 0.1


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
        self.policy = cohort_policy(self.cfg)
        self.stage_timeout = task.settings.deploy.stage_timeout_s
        self.poll_wait = task.settings.http.poll_wait_s
        self.model = ServerModel(self.plan_id, task.initial_subset.copy(),
                                 ServerOptimizer(self.cfg.server.lr, self.cfg.server.momentum),
                                 keep_hashes=task.settings.deploy.max_staleness)
        self.live: dict[str, LiveCohort] = {}
        self.forming: LiveCohort | None = None
        self.ended: dict[str, CohortEnd] = {}
        self.finished_members: dict[str, set[int]] = {}
        self.counters = Counters()
        self.started_at = 0.0
        # version -> history row, the last ENDED_CACHE versions (the progress log names a cohort's accuracy)
        self.recent_history: dict[int, dict[str, Any]] = {}
        self._merge_lock = asyncio.Lock()
        self.commit_seconds: deque[float] = deque(maxlen=1000)
        self._tasks: set[asyncio.Task] = set()
        self._pull_cache: tuple[int, ModelPull] | None = None
        self._evaluate: Evaluator | None = None
        self.privacy_policy = self.cfg.privacy.policy()

    # -- the model, as the rest of the server and the tests read it -----------------------------
    @property
    def version(self) -> int:
        return self.model.version

    @property
    def weights(self) -> np.ndarray:
        return self.model.weights

    @property
    def hashes(self) -> dict[int, bytes]:
        return self.model.hashes

    # -- start-up ------------------------------------------------------------------------
    def load_test_data(self, x: np.ndarray, y: np.ndarray) -> None:
        self._evaluate = Evaluator(self.task.model, self.task.plan, x, y)

    async def recover(self) -> None:
        """Load the latest version and replay the journal of every unfinished cohort."""
        await self.db.call(self.db.commit_initial, self.task.initial_subset, self.plan_id, self.cfg.to_json())
        if self.cfg.privacy.enabled:
            await self.db.call(self.db.set_policy, self.privacy_policy)  # the audit checks every row against it
        self.started_at = await self.db.call(self.db.started_at)
        rec: Recovered = await self.db.call(self.db.recover, self.settings.deploy.max_staleness)
        if rec.checkpoint is not None:
            ck = rec.checkpoint
            self.model.restore(version=ck.version, weights=ck.weights, velocity=ck.velocity,
                               reference_variance=ck.reference_variance)
            for row in ck.history[-ENDED_CACHE:]:
                self.recent_history[int(row["version"])] = row
        for v, w in rec.recent_weights.items():
            self.model.remember(v, w)
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
            if c.start is None:
                c.published = -1
            else:
                c.published = int(c.stage) if isinstance(c.stage, Stage) else int(Stage.UNMASK)
            c.stage_opened_at = now  # give surviving members a whole stage to come back
            if c.aborted:
                self._spawn(self._conclude(c, None))
            elif c.stage == FINISHING:
                self._spawn(self._finish(c))
            elif c.start is None and len(c.joins) >= self.cfg.server.buffer_size:
                self._start(c)  # the crash fell between the last join and the start entry
            elif c.collecting is not None and c.expected() <= c.got[c.collecting]:
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
            c.add_join(e.member, wire.decode(e.data, expect=JoinRequest), e.data)
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
            stage = Stage.of_message(msg)
            assert stage is not None
            c.got[stage].add(e.member)
            c.accepted[(int(stage), e.member)] = e.data
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
            if c.collecting is not None and not c.aborted and now - c.stage_opened_at >= self.stage_timeout:
                self._close_stage(c, now, journal=True)

    async def drain(self) -> None:
        await self.journal.flush()

    # -- derived settings -----------------------------------------------------------------
    @property
    def min_cohort(self) -> int:
        return min_cohort(self.settings)

    # -- device requests -----------------------------------------------------------------
    def task_info(self, member: int) -> TaskInfo:
        return self.task.task_info(member, self.stage_timeout, self.poll_wait)

    def pull(self, member: int, req: PullRequest) -> ModelPull:
        check_plan(self.plan_id, req.plan_id)
        m = self.model
        if self._pull_cache is None or self._pull_cache[0] != m.version:
            self._pull_cache = (m.version, ModelPull(m.version, self.plan_id, m.current_hash,
                                                     m.weights.astype(np.float32)))
        return self._pull_cache[1]

    async def join(self, member: int, req: JoinRequest, raw: bytes) -> JoinReply:
        check_join(req, self.model, self.cfg, self.settings.deploy.max_staleness)
        if self.cfg.privacy.enabled:
            await self._check_policy(member, req)
        for c in self.live.values():  # a retried join whose reply was lost
            if c.join_bytes.get(member) == raw:
                fut = c.durable.get((-1, member))
                if fut is not None:
                    await asyncio.shield(fut)
                return JoinReply(c.cohort_id, req.base_version)
        for c in self.live.values():
            if member in c.joins and c.start is not None:
                # One running cohort per device: its rounds then reach the ledger in the device's own
                # order, which is what the cumulative epsilon it signs for each round assumes.
                raise Refused("busy", f"this device's round in {c.cohort_id} is still being aggregated; "
                                      "join again once it has ended")
        now = self.clock()
        futs = []
        if self.forming is None:
            c = LiveCohort("c-" + secrets.token_hex(8), now)
            self.live[c.cohort_id] = c
            self.forming = c
            futs.append(self.journal.append(JournalEntry(c.cohort_id, OPEN, now)))
        c = self.forming
        c.add_join(member, req, raw)  # a device that gave up on its earlier join replaces it (both are spent)
        fut = self.journal.append(JournalEntry(c.cohort_id, JOIN, now, member, None, raw))
        c.durable[(-1, member)] = fut
        futs.append(fut)
        self.counters.joins += 1
        if len(c.joins) >= self.cfg.server.buffer_size:
            self._start(c)
        await asyncio.shield(asyncio.gather(*futs))
        return JoinReply(c.cohort_id, req.base_version)

    async def _check_policy(self, member: int, req: JoinRequest) -> None:
        """Refuse, before anything is stored, a join whose round breaks the task's privacy policy or
        would take the device's ledger ε past the cap (counting its rounds still in flight)."""
        policy = self.privacy_policy
        rounds = [r for c in self.live.values() if member in c.joins
                  for r in self._member_rounds(member, c, ())]
        rounds += join_rounds(member, req, self.identities.get(member), merged=False)
        for r in rounds:
            problems = policy.violations(delta=r.delta, noise_multiplier=r.step.noise_multiplier,
                                         accountant=r.accountant, epsilon_max=r.epsilon_max)
            if self.task.user is not None:
                problems += self._user_round_problems(r)
            if problems:
                raise Refused("policy", "; ".join(problems))
        eps = await self.db.call(self.db.epsilon_after, rounds)
        if eps > policy.epsilon_cap:
            raise Refused("policy", f"this round would take the device to epsilon {eps:.4g}, above the "
                                    f"task's cap {policy.epsilon_cap:g}")

    def _user_round_problems(self, r: MemberRound) -> list[str]:
        """A user-level round must be one participation of exactly this deployment's mechanism
        (the audit's rule, plus: the tag names the mechanism the cohorts will use)."""
        assert self.task.user is not None
        problems = user_row_problems(r.step.noise_multiplier, r.step.sample_rate, r.step.steps, r.accountant,
                                     r.max_grad_norm, r.rng_source)
        try:
            mech = parse_user_mechanism(r.rng_source)
        except ValueError:
            mech = None
        if not problems and mech != UserMechanism.of(self.task.user.params):
            problems.append("the round's user-level mechanism is not this deployment's")
        return problems

    async def leave(self, member: int, req: LeaveRequest) -> Ack:
        """A device stops waiting for a cohort that has not started; too late once it has."""
        c = self._cohort_for(member, req.cohort_id)
        if c.start is not None:
            raise Refused("started", "the cohort has started; a member that leaves now is dropped")
        if c.superseded.get(member):  # its earlier, replaced joins must still reach the ledger with this cohort
            raise Refused("started", "this member's earlier rounds are recorded with this cohort; it cannot leave")
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
            raise Refused("not_started", "the cohort has not started yet")
        try:
            msg = wire.decode(req.payload, max_bytes=max_payload)
        except wire.WireError as exc:
            raise Refused("malformed", str(exc)) from None
        stage = Stage.of_message(msg)
        if stage is None:
            raise Refused("malformed", f"{type(msg).__name__} is not a member message")
        if msg.member != member:  # type: ignore[attr-defined]
            raise Refused("member_mismatch", "the message names another member")
        key = (int(stage), member)
        if key in c.accepted:
            if c.accepted[key] != req.payload:
                raise Refused("duplicate", f"another {type(msg).__name__} was already accepted")
            fut = c.durable.get(key)
            if fut is not None:
                await asyncio.shield(fut)
            return Ack(c.cohort_id, int(stage))
        if c.aborted or c.end is not None or c.collecting is not stage:
            raise Refused("stage_closed", f"{stage.label} is not the open stage of {c.cohort_id}")
        try:
            c.server.receive(msg)
        except ReplayError as exc:
            raise Refused("wrong_session", str(exc)) from None
        except MemberError as exc:
            raise Refused("not_expected", str(exc)) from None
        except ShapeError as exc:
            raise Refused("bad_shape", str(exc)) from None
        except SignatureError as exc:
            raise Refused("bad_message_signature", str(exc)) from None
        now = self.clock()
        c.got[stage].add(member)
        c.accepted[key] = req.payload
        fut = self.journal.append(JournalEntry(c.cohort_id, MESSAGE, now, member, stage.label, req.payload))
        c.durable[key] = fut
        if stage is Stage.UPLOAD:
            self.counters.uploads += 1
        if c.expected() <= c.got[stage]:
            self._close_stage(c, now, journal=True)
        await asyncio.shield(fut)
        return Ack(c.cohort_id, int(stage))

    async def poll(self, member: int, req: PollRequest, wait_s: float | None = None):
        if req.stage > POLL_END:
            raise Refused("bad_stage", f"stages are 0..{POLL_END}")
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
                raise Refused("cohort_over", f"{cohort_id} has ended")
            raise Refused("unknown_cohort", cohort_id)
        if member not in c.joins:
            raise Refused("not_a_member", f"not a member of {cohort_id}")
        return c

    def _answer(self, member: int, req: PollRequest):
        cid, slot = req.cohort_id, req.stage
        c = self.live.get(cid)
        if c is None:
            end = self.ended.get(cid)
            if end is None:
                raise Refused("unknown_cohort", cid)
            if member not in self.finished_members.get(cid, set()):
                raise Refused("not_a_member", f"not a member of {cid}")
            return end
        if member not in c.joins:
            raise Refused("not_a_member", f"not a member of {cid}")
        if slot > c.published or slot == POLL_END:
            return None
        if slot == 0:
            return c.start
        stage = Stage(slot)
        given = c.input_for(stage, member)
        return given if given is not None else self._dropped(cid, Stage(slot - 1).label)

    @staticmethod
    def _dropped(cohort_id: str, stage: str) -> CohortEnd:
        return CohortEnd(cohort_id, "dropped", 0, (), f"missed the {stage} stage")

    # -- cohort life cycle (synchronous state changes; journal queued in the same step) ------------
    def _cohort_start(self, cohort_id: str, members: tuple[int, ...], keys: tuple[bytes, ...],
                      model_hash: bytes | None = None) -> CohortStart:
        m = self.model
        return plan_cohort(self.policy, cohort_id=cohort_id, plan_id=self.plan_id,
                           model_hash=m.current_hash if model_hash is None else model_hash, close_version=m.version,
                           members=members, identity_keys=keys, coordinates=self.task.dim,
                           reference_variance=m.reference_variance, user=self.task.user)

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
        if is_user_level(start):  # the mechanism's decoder; the example-level codec does not apply
            assert self.task.user is not None
            c.codec = UserCodec(self.task.user.params, rotation_seed(start.cohort_id, contribution_binding(start)))
        else:
            c.codec = codec_for(start)
        c.server = SecAggServer(params)
        c.stage, c.stage_opened_at = Stage.ADVERTISE, now
        if self.forming is c:
            self.forming = None

    def _close_stage(self, c: LiveCohort, now: float, *, journal: bool) -> None:
        """End the open stage (all expected answers in, or its timeout); abort below the threshold."""
        assert c.server is not None
        stage = c.collecting
        assert stage is not None
        try:
            out = close_stage(c.server, stage)  # the last stage unmasks in _finish, off the event loop
            if stage is Stage.ADVERTISE:
                c.roster = out
            elif stage is Stage.SHARE:
                c.deliveries = out
            elif stage is Stage.UPLOAD:
                c.survivors = out
            elif stage is Stage.CONSISTENCY:
                c.bundle = out
        except SessionAborted as exc:
            c.aborted = str(exc)
        last = stage is Stage.UNMASK
        c.stage, c.stage_opened_at = (FINISHING if last else Stage(stage + 1)), now
        if not journal:
            return
        fut = self.journal.append(JournalEntry(c.cohort_id, CLOSE, now, None, stage.label))
        if c.aborted:
            self._spawn(self._conclude_after(c, fut))
        elif last:
            self._spawn(self._finish_after(c, fut))
        else:
            self._publish_after(c, fut, int(stage) + 1)

    def _publish_after(self, c: LiveCohort, fut: asyncio.Future, poll_slot: int) -> None:
        def publish(_: asyncio.Future) -> None:
            c.published = max(c.published, poll_slot)
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
        if isinstance(c.codec, UserCodec):
            assert c.start is not None
            weights = {m: update_weight(c.start.close_version - c.joins[m].base_version, 0.0, None,
                                        weight_rule(c.start)) for m in result.survivors}
            total, wsum, refused = decode_user_sum(c.codec, result.total, weights, result.survivors)
            if refused:
                c.aborted = refused
                await self._conclude(c, None)
                return
            await self._conclude(c, CohortSum(result.survivors, total, wsum, 0.0))
            return
        total, wsum, vsum = c.codec.decode_sum(result.total, len(result.survivors))
        await self._conclude(c, CohortSum(result.survivors, total, wsum, vsum))

    async def _conclude(self, c: LiveCohort, total: CohortSum | None) -> None:
        """Commit an applied or aborted cohort (serialised: versions are bumped one at a time)."""
        start = c.start
        assert start is not None
        async with self._merge_lock:
            now = self.clock()
            staleness = {m: start.close_version - j.base_version for m, j in c.joins.items()}
            # a user-level sum carries noise: the example-level limits of the start do not apply to it
            # (decode_user_sum checked the mechanism's own bound)
            result = CohortResult(c.cohort_id, start.close_version, tuple(sorted(c.joins)), c.dropped_stages(),
                                  staleness, round(now - c.opened_at, 6), total, c.aborted,
                                  None if is_user_level(start) else start)
            m = self.model
            evaluate = self._evaluate
            applied: Applied = await asyncio.to_thread(
                m.propose, result, now=now - self.started_at, evaluate=evaluate, time_key="elapsed_s")
            included = applied.record.included
            rounds = tuple(r for mem in sorted(c.joins) for r in self._member_rounds(mem, c, included)) \
                if self.cfg.privacy.enabled else ()
            history = applied.history.to_dict() if applied.history is not None else None
            st = applied.state
            if st is None:
                commit = CohortCommit(m.version, now - self.started_at, m.weights, m.optimizer.state(),
                                      m.reference_variance, applied.record.to_dict(), None, rounds)
            else:
                commit = CohortCommit(st.version, now - self.started_at, st.weights, st.velocity,
                                      st.reference_variance, applied.record.to_dict(), history, rounds)
            t0 = time.perf_counter()
            written = await self.db.call(self.db.commit_cohort, commit)
            m.adopt(applied)  # pulls see the new version only once it is durable
            self.commit_seconds.append(time.perf_counter() - t0)
            self.counters.ledger_rows += written
            if applied.applied:
                self.recent_history[m.version] = history
                self.recent_history.pop(m.version - ENDED_CACHE, None)
                self.counters.cohorts_applied += 1
                c.end = CohortEnd(c.cohort_id, "applied", m.version, applied.record.included, "")
            else:
                c.aborted = applied.record.aborted
                self.counters.cohorts_aborted += 1
                c.end = CohortEnd(c.cohort_id, "aborted", 0, (), applied.record.aborted[:1000])
            del self.live[c.cohort_id]
            self.ended[c.cohort_id] = c.end
            self.finished_members[c.cohort_id] = set(c.joins)
            self._trim_ended()
            c.notify()

    def _member_rounds(self, member: int, c: LiveCohort, included: tuple[int, ...]) -> list[MemberRound]:
        """Ledger rows of one member, in its own order: joins it made earlier into this cohort and
        that a later join replaced (their rounds were spent all the same), rounds it reports late,
        then this round (MERGED only if its update is in the applied sum)."""
        rows: list[MemberRound] = []
        for j in c.superseded.get(member, []):
            rows += join_rounds(member, j, self.identities.get(member), merged=False, superseded=True)
        rows += join_rounds(member, c.joins[member], self.identities.get(member), merged=member in included)
        return rows

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
            "model_hash": self.model.current_hash.hex(),
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
            "last_history_row": self.recent_history[max(self.recent_history)] if self.recent_history else None,
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


__all__ = ["Coordinator", "LiveCohort", "Refused"]


def join_rounds(member: int, j: JoinRequest, identity: bytes | None, *, merged: bool,
                superseded: bool = False) -> list[MemberRound]:
    """The ledger rows a join stands for: the rounds it reports late, then its own round (with the
    device's signature over its spend claim, when it sent one). A superseded join's own round is
    UNMERGED: it was trained and reported, then replaced by a later join of the same device."""
    eps_max = j.epsilon_max if j.epsilon_max > 0 else math.inf
    common = dict(device_id=str(member), plan_id=j.plan_id, version=j.base_version, accountant=j.accountant,
                  epsilon_max=eps_max, rng_source=j.rng_source, torch_version=j.torch_version,
                  opacus_version=j.opacus_version, ftte_version=j.ftte_version, accountant_id=j.accountant_id.hex())
    unmerged = RoundOutcome.UNMERGED.value
    rows = [MemberRound(step=PrivacyStep(r.noise_multiplier, r.sample_rate, r.steps),
                        max_grad_norm=r.max_grad_norm, delta=r.delta, cohort_id=unmerged, seq=seq,
                        **{**common, **_late_evidence(r, identity)})
            for seq, r in spent_rounds(j)]
    signed = dict(device_public_key=identity.hex(), device_signature=j.spend_signature.hex()) \
        if j.spend_signature and identity is not None else {}
    rows.append(MemberRound(step=PrivacyStep(j.noise_multiplier, j.sample_rate, j.steps),
                            max_grad_norm=j.max_grad_norm, delta=j.delta, merged=merged, seq=j.round_seq,
                            cohort_id=unmerged if superseded else None, **signed, **common))
    return rows


def _late_evidence(r: SpentRound, identity: bytes | None) -> dict[str, Any]:
    """A late round's own version, generator and signature, as the device signed them when it trained."""
    if not r.signature or identity is None:
        return {}
    return dict(version=r.version, rng_source=r.rng_source, device_public_key=identity.hex(),
                device_signature=r.signature.hex())

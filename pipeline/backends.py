"""Where the simulator's device work runs: in the driver process, or on Ray actors.

The coordinator, the virtual clock, every decision and the server's side of secure
aggregation stay in the driver (:class:`~ftte.pipeline.simulator.Simulation`); a backend
does the devices' work: it trains, and it plays the members of each secure-aggregation
session (:meth:`DeviceBackend.member_runner`, see "Members" below). The driver

1. checks the device's privacy budget and records the round in its persistent
   accountant store (:func:`reserve_round`), exactly as
   :meth:`~ftte.privacy.dpsgd.PrivateTrainer.train_round` would, so an over-budget device
   is refused before any training and a round is counted before it starts;
2. :meth:`DeviceBackend.submit`\\ s a :class:`TrainTask` (device, seed, base version, the
   device's accountant state *before* this round and the plan it checked) with the pulled
   weights;
3. :meth:`DeviceBackend.resolve`\\ s it when the result is needed (the "trained" event of
   the asynchronous loop; before the cohort of a synchronous round is built). ``None``
   means the worker died mid-task: a dropout of that device.

A worker (:class:`DeviceWorker`) wraps its copy of the model with Opacus once and trains
each task from the weights, data and seed it names, with an in-memory accountant store
seeded with the history it was handed; it trains under the plan the driver checked
instead of checking again (an accountant evaluation can cost up to a second, and every
worker process would repeat it). The driver compares the worker's ``RoundStats`` with that
plan when it resolves the round. A round depends on nothing else, so which
worker runs which task, and in what order, cannot change a result: the Ray backend
reproduces the local backend bit for bit.

``RayBackend`` puts the model, plan and settings and the training data into Ray's
object store once (actors receive the references), and each model version's weights
once, shared by every task of that version. Ray restarts a dead actor
(``max_restarts=-1``); tasks are never retried by Ray. Of the tasks a dead actor held,
the oldest unfinished one was running: that device is counted as dropped. The others
had not started and are resubmitted (a round is a pure function of its inputs, so this
changes nothing).

Members: a session's member work is :meth:`MemberHost.stage
<ftte.crypto.secagg_member.MemberHost.stage>` on the worker's host, in the driver for the
local backend, on the actors for Ray: each actor plays a contiguous slice of the sorted
member ids, one call per actor and stage, on its own concurrency group so a stage does not
wait behind queued training. An actor that dies during a stage takes its slice with it:
those members vanish at that stage (a dropout, as a drawn dropout at that stage would), the
session goes on with the others, and the driver waits for Ray to restart the actor.

Ray is an optional extra (``pip install 'ftte[ray]'``); nothing here imports it unless
the Ray backend is used.
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from ftte.crypto.primitives import Signer
from ftte.crypto.secagg_local import InProcessMembers, MemberRunner
from ftte.crypto.secagg_member import MemberHost, StageReplies
from ftte.crypto.secagg_session import SessionParams
from ftte.crypto.stages import Stage
from ftte.edge.plan import SubsetPlan
from ftte.edge.runtime import LocalTrainer, LocalUpdate, TrainSettings
from ftte.round_messages import ModelPull
from ftte.privacy.accountant import AccountantStore, DeviceAccountantState
from ftte.privacy.dpsgd import RNG_SOURCE_SIMULATION, DPConfig, RoundPlan, RoundStats
from ftte.privacy.ledger import library_versions
from ftte.privacy.spend import SpendRecord

__all__ = [
    "BackendUnavailable",
    "DeviceBackend",
    "DeviceWorker",
    "LocalBackend",
    "RayBackend",
    "TrainTask",
    "WorkerData",
    "WorkerSpec",
    "lost_round_spend",
    "lost_round_stats",
    "make_backend",
    "plan_device_round",
    "charge_planned",
    "reserve_round",
    "seeded_store",
]


class BackendUnavailable(ValueError):
    """The configured backend cannot run here (for instance Ray is not installed)."""


# --- what travels to a worker ---------------------------------------------------------------

@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to build its trainer; shipped once."""

    model: nn.Sequential
    plan: SubsetPlan
    dp: DPConfig
    settings: TrainSettings


@dataclass(frozen=True)
class WorkerData:
    """The devices' training records; shipped once (the server's test set stays in the driver)."""

    x_train: np.ndarray
    y_train: np.ndarray
    device_indices: tuple[np.ndarray, ...]
    shards: Any = None  # an on-demand source (synthetic): devices' records are generated when asked for

    @classmethod
    def from_federated(cls, data: Any) -> "WorkerData":
        return cls(data.x_train, data.y_train, tuple(data.device_indices), getattr(data, "shards", None))

    def device_arrays(self, device_id: int) -> tuple[np.ndarray, np.ndarray]:
        if self.shards is not None:
            return self.shards.device_arrays(device_id)
        idx = self.device_indices[device_id]
        return self.x_train[idx], self.y_train[idx]


@dataclass(frozen=True)
class TrainTask:
    """One device round as the driver hands it out."""

    device_id: int
    attempt: int
    base_version: int
    seed: int
    account: DeviceAccountantState | None  # the device's accountant state before this round (None: first round / no DP)
    plan: RoundPlan  # what the driver checked and recorded; the worker's RoundStats must agree
    crash: bool = False  # test hook: the worker exits (os._exit) instead of training


# --- driver side of the privacy accounting ------------------------------------------------------

def reserve_round(trainer: LocalTrainer, device_id: int, n_records: int) -> tuple[DeviceAccountantState | None, RoundPlan]:
    """Budget check and charge, in the driver's store, of the round ``device_id`` is about to train.

    The same steps as ``PrivateTrainer.train_round`` takes before it trains: plan (raises
    ``BudgetExceededError`` and stores nothing if the round would exceed the budget), then
    one ``AccountantStore.charge`` (register if new, re-check, record; atomically) against the
    history length the plan was based on. Returns the device's state before the round (what
    the worker is handed) and the plan.
    """
    plan = trainer.plan_round(device_id, n_records)
    if plan.budget is None:  # DP disabled: nothing is accounted
        return None, plan
    key = str(device_id)
    store = trainer.store
    prior = store.state(key)
    store.charge(key, plan.privacy_step, accountant=plan.accountant, delta=plan.delta,
                 epsilon_max=plan.budget.epsilon_max, expected_rounds=plan.prior_rounds)
    return prior, plan


def plan_device_round(trainer: LocalTrainer, device_id: int, n_records: int
                      ) -> tuple[DeviceAccountantState | None, RoundPlan]:
    """Budget check of the round ``device_id`` is about to train, charging nothing: returns the
    device's accountant state before the round (what the worker is handed) and the plan. Raises
    ``BudgetExceededError`` if the round would exceed the budget. The simulator charges the
    round with :func:`charge_planned` when the round is released (see the simulator)."""
    plan = trainer.plan_round(device_id, n_records)
    if plan.budget is None:
        return None, plan
    return trainer.store.state(str(device_id)), plan


def charge_planned(store: AccountantStore, device_id: int, plan: RoundPlan) -> None:
    """Record a planned round in ``store`` (no-op without DP), against the history length it
    was planned on: a device's history must not have moved in between."""
    if plan.budget is None:
        return
    store.charge(str(device_id), plan.privacy_step, accountant=plan.accountant, delta=plan.delta,
                 epsilon_max=plan.budget.epsilon_max, expected_rounds=plan.prior_rounds)


def lost_round_spend(task: TrainTask, dp: DPConfig, *, plan_id: str) -> SpendRecord:
    """The :class:`SpendRecord` of a round whose worker died: charged before it started, never
    released. Write it with ``ftte.privacy.spend.ledger_rows(ledger, [(spend, RoundOutcome.LOST,
    None)])``, which computes the row's ε from the ledger like every other row."""
    plan = task.plan
    versions = library_versions()
    return SpendRecord(
        device_id=str(task.device_id), plan_id=plan_id, version=task.base_version, step=plan.privacy_step,
        max_grad_norm=plan.max_grad_norm, delta=plan.delta, accountant=plan.accountant,
        epsilon_max=dp.epsilon_max if plan.budget is not None else float("inf"), rng_source=RNG_SOURCE_SIMULATION,
        torch_version=versions["torch"], opacus_version=versions["opacus"], ftte_version=versions["ftte"],
    )


def lost_round_stats(task: TrainTask, dp: DPConfig) -> RoundStats:
    """Deprecated (kept while the simulator migrates): prefer :func:`lost_round_spend`.

    The :class:`RoundStats` of a round whose worker died: spent (recorded before it started),
    never released. What the ledger needs comes from the plan; loss and wall time are unknown."""
    plan = task.plan
    if plan.budget is not None:
        eps_round, eps_total, eps_max = plan.budget.round_cost, plan.budget.epsilon_after, dp.epsilon_max
    else:
        eps_round = eps_total = eps_max = float("inf")
    return RoundStats(
        device_id=str(task.device_id), enabled=dp.enabled, steps=plan.steps, sample_rate=plan.sample_rate,
        noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.max_grad_norm, epsilon_round=eps_round,
        epsilon_total=eps_total, delta=plan.delta, epsilon_max=eps_max, accountant=plan.accountant,
        mean_loss=float("nan"), n_records=plan.n_records, empty_batches=0, rng_source=RNG_SOURCE_SIMULATION,
        wall_seconds=0.0,
    )


def seeded_store(state: DeviceAccountantState | None) -> AccountantStore:
    """A throw-away in-memory store holding one device's history (empty for ``None``).

    Only the last row's cached ``epsilon_total`` is ever read (``state().epsilon_total``);
    every row gets that figure, and ε itself is always recomputed from the history.
    """
    store = AccountantStore(":memory:")
    if state is not None:
        store.register(state.device_id, accountant=state.accountant, delta=state.delta)
        for i, step in enumerate(state.history):
            store.record(state.device_id, step, epsilon_total=state.epsilon_total, expected_rounds=i)
    return store


# --- the worker -----------------------------------------------------------------------------------

class DeviceWorker:
    """Trains rounds for any device; one per process (Ray actor) or one in the driver (local)."""

    def __init__(self, spec: WorkerSpec, data: WorkerData) -> None:
        # Device models are tiny: one intra-op thread. Oversubscribing a small machine made
        # torch ~100x slower.
        torch.set_num_threads(1)
        self.data = data
        self._idle_store = AccountantStore(":memory:")
        self.trainer = LocalTrainer(spec.model, spec.plan, spec.dp, spec.settings, self._idle_store)
        self.members = MemberHost()  # the secure-aggregation members this process plays
        self.rounds_trained = 0

    # The members' side of secure aggregation (the Ray backend calls these on its own thread of
    # the actor, so a stage never waits behind the training queue).
    def open_members(self, key: str, params: SessionParams, seats: dict[int, tuple[bytes, np.ndarray]],
                     randomness: dict[int, Any] | None = None) -> None:
        """Host these members of session ``key`` (id -> identity private key, input vector;
        ``randomness``: id -> the member's unused seeded generator, or None: the OS)."""
        self.members.open(key, params, {m: (Signer(sk), vector) for m, (sk, vector) in seats.items()}, randomness)

    def member_stage(self, key: str, stage: int, inbound: dict[int, bytes | None],
                     crash: bool = False) -> StageReplies | None:
        """The replies; None if this process does not hold the session (it was restarted since the
        session was opened here: its members' state is gone, as with a death mid-stage)."""
        if crash:  # test hook: the process dies in the middle of a stage
            os._exit(71)
        if not self.members.holds(key):
            return None
        return self.members.stage(key, Stage(stage), inbound)

    def close_members(self, key: str) -> None:
        self.members.close(key)

    def train(self, task: TrainTask, weights: np.ndarray) -> LocalUpdate:
        if task.crash:
            os._exit(70)
        if not weights.flags.writeable:  # zero-copy from Ray's object store; torch wants to own a buffer
            weights = weights.copy()
        x, y = self.data.device_arrays(task.device_id)
        self.rounds_trained += 1
        store = seeded_store(task.account)
        self.trainer.store = store
        try:
            # The driver checked the budget; the plan it checked replaces a second check here.
            return self.trainer.train(task.device_id, task.base_version, weights, x, y, task.seed, plan=task.plan)
        finally:
            self.trainer.store = self._idle_store
            store.close()

    def ping(self) -> int:
        return os.getpid()

    def usage(self) -> tuple[float, int]:
        """(CPU seconds of this process so far, every thread; rounds trained here so far): the
        benchmark's driver/worker split."""
        return time.process_time(), self.rounds_trained

    def close(self) -> None:
        self.trainer.close()
        self._idle_store.close()


def _check(task: TrainTask, update: LocalUpdate) -> LocalUpdate:
    s, plan = update.stats, task.plan
    eps_total = plan.budget.epsilon_after if plan.budget is not None else float("inf")
    got = (update.device_id, update.base_version, s.steps, s.sample_rate, s.noise_multiplier, s.delta, s.epsilon_total)
    want = (task.device_id, task.base_version, plan.steps, plan.sample_rate, plan.noise_multiplier, plan.delta, eps_total)
    if got != want:
        raise RuntimeError(f"device {task.device_id}: the worker trained (device, version, steps, rate, noise, delta, "
                           f"epsilon) = {got}, the driver recorded {want}; do worker and driver run the same versions?")
    return update


# --- backends ------------------------------------------------------------------------------------------

class DeviceBackend(ABC):
    """Submit device rounds now, resolve them when their result is needed."""

    name: str = ""
    #: Rounds run in other processes: the simulator hands a closed cohort's rounds over at once,
    #: so workers train them while the driver goes on (the local backend trains at submit).
    remote: bool = False

    def __init__(self) -> None:
        self.lost: list[tuple[int, int]] = []  # (device_id, attempt) of rounds whose worker died
        self.members_lost: list[tuple[int, str]] = []  # (member, stage) lost with their worker
        self.puts: dict[str, int] = {"spec": 0, "data": 0, "weights": 0}

    @abstractmethod
    def start(self, spec: WorkerSpec, data: WorkerData) -> None: ...

    @abstractmethod
    def submit(self, task: TrainTask, pull: ModelPull) -> Any:
        """Start the round; the returned handle has the ``task`` as an attribute."""

    @abstractmethod
    def resolve(self, pending: Any) -> LocalUpdate | None:
        """The round's update, or ``None`` if its worker died (the device dropped out)."""

    @abstractmethod
    def close(self) -> None: ...

    @property
    def workers(self) -> int:
        return 1

    def running(self) -> list[Any]:
        """Handles of the rounds handed over that no worker has finished yet (the local backend
        trains at submit: none)."""
        return []

    def member_runner(self) -> MemberRunner:
        """Where the next secure-aggregation session's members run (a fresh runner per session)."""
        return InProcessMembers()


@dataclass(frozen=True)
class _LocalPending:
    task: TrainTask
    update: LocalUpdate


class LocalBackend(DeviceBackend):
    """In the driver process; trains at submit time. Needs nothing but the package."""

    name = "local"

    def __init__(self) -> None:
        super().__init__()
        self._worker: DeviceWorker | None = None

    def start(self, spec: WorkerSpec, data: WorkerData) -> None:
        self._worker = DeviceWorker(spec, data)

    def submit(self, task: TrainTask, pull: ModelPull) -> "_LocalPending":
        assert self._worker is not None, "start() first"
        return _LocalPending(task, _check(task, self._worker.train(task, pull.weights)))

    def resolve(self, pending: "_LocalPending") -> LocalUpdate | None:
        return pending.update

    def member_runner(self) -> MemberRunner:
        """The members run on the worker's :class:`MemberHost`, in this process: the same
        ``MemberHost.stage`` the Ray workers run."""
        assert self._worker is not None, "start() first"
        return InProcessMembers(self._worker.members)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None


@dataclass(eq=False)
class _RayPending:
    task: TrainTask
    weights_ref: Any
    ref: Any = None
    actor: int = -1
    state: str = "running"  # running (on an actor) -> done | lost
    finished: bool = False  # its actor is done with it (result or error waiting in the object store)
    result: LocalUpdate | None = None


@dataclass
class _Actor:
    handle: Any
    # unresolved, in submission = execution order; keyed by identity so removal is O(1)
    inflight: dict[int, _RayPending] = field(default_factory=dict)
    load: int = 0  # tasks handed to it and not yet known to be done (kept as a count: O(1) per submit)

    def add(self, p: _RayPending) -> None:
        self.inflight[id(p)] = p
        if not p.finished:
            self.load += 1

    def mark_finished(self, p: _RayPending) -> None:
        if not p.finished:
            p.finished = True
            self.load -= 1


class RayBackend(DeviceBackend):
    """Device rounds on a pool of Ray actors (one CPU each), each wrapping its model once.

    ``address``: join that cluster (it is left running); empty: use the Ray instance this
    process already initialised, or start a local one with ``num_cpus`` CPUs
    (default ``workers`` or the machine's CPU count) and shut it down in :meth:`close`.
    ``workers`` actors (0: the cluster's CPU count). ``crash_on``: test hook, the
    ``(device_id, attempt)`` rounds whose worker process exits (``os._exit``) while running
    them, once each.

    Each actor is restarted by Ray when it dies (``max_restarts=-1``, no task retries).
    :meth:`resolve` then returns ``None`` for the round that was running (a dropout) and
    runs the actor's other queued rounds again, once the actor is back.
    """

    name = "ray"
    remote = True

    def __init__(self, address: str = "", workers: int = 0, *, num_cpus: int | None = None,
                 crash_on: Iterable[tuple[int, int]] = (), crash_members_at: str = "") -> None:
        super().__init__()
        if workers < 0:
            raise ValueError("workers must be >= 0")
        self.address = address
        self._want_workers = workers
        self._num_cpus = num_cpus
        self._crash_on = set(crash_on)
        self._crash_members_at = crash_members_at  # test hook: stage label at which the last worker dies, once
        self._sessions = 0
        self._ray: Any = None
        self._owns_ray = False
        self._actors: list[_Actor] = []
        self._weights_key: tuple[int, str] | None = None
        self._weights_ref: Any = None
        self._spec_ref: Any = None
        self._data_ref: Any = None
        self.resubmitted = 0  # tasks that were queued on an actor when it died, run again
        self.restart_timeout_s = 300.0
        self.worker_pids: list[int] = []  # the actors' processes at start

    @property
    def workers(self) -> int:
        return len(self._actors)

    def running(self) -> list[_RayPending]:
        # One non-blocking look at the tasks not known finished: O(tasks in flight), asked once per
        # merge (never per submit); in lazy mode that is a few cohorts' rounds.
        live = [p for a in self._actors for p in a.inflight.values() if not p.finished]
        if not live:
            return []
        done, _ = self._ray.wait([p.ref for p in live], num_returns=len(live), timeout=0, fetch_local=False)
        finished = set(done)
        for p in live:
            if p.ref in finished:  # a result or an error (resolve tells which)
                self._actors[p.actor].mark_finished(p)
        return [p for p in live if not p.finished]

    def start(self, spec: WorkerSpec, data: WorkerData) -> None:
        try:
            import ray
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise BackendUnavailable("backend 'ray' needs Ray: pip install 'ftte[ray]'") from exc
        self._ray = ray
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        try:
            if not ray.is_initialized():
                if self.address:
                    try:
                        ray.init(address=self.address, log_to_driver=False)
                    except ConnectionError as exc:
                        raise BackendUnavailable(f"cannot join the Ray cluster at {self.address!r}: {exc}") from exc
                else:
                    cpus = self._num_cpus or self._want_workers or os.cpu_count() or 1
                    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
                    self._owns_ray = True
            n = self._want_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
            # Held for the backend's lifetime: a restarted actor is rebuilt from these objects.
            self._spec_ref = spec_ref = ray.put(spec)
            self._data_ref = data_ref = ray.put(data)
            self.puts["spec"] += 1
            self.puts["data"] += 1
            # Training runs on the actor's default thread; the members' secure-aggregation stages
            # on a thread of their own, so a stage does not wait behind queued training.
            actor_cls = ray.remote(num_cpus=1, max_restarts=-1, max_task_retries=0,
                                   concurrency_groups={MEMBERS_GROUP: 1})(DeviceWorker)
            strategy = "SPREAD" if self.address else "DEFAULT"
            self._actors = [_Actor(actor_cls.options(scheduling_strategy=strategy).remote(spec_ref, data_ref))
                            for _ in range(n)]
            # Fail here, not at the first round; the pids let a test see a restarted worker.
            self.worker_pids = ray.get([a.handle.ping.remote() for a in self._actors])
        except BaseException:
            self.close()
            raise

    # -- dispatch ---------------------------------------------------------------------------------
    def _weights(self, pull: ModelPull) -> Any:
        key = (pull.version, pull.model_hash)
        if key != self._weights_key:
            # Tasks already submitted keep the previous version's object alive; Ray frees it after them.
            self._weights_ref = self._ray.put(pull.weights)
            self._weights_key = key
            self.puts["weights"] += 1
        return self._weights_ref

    def _dispatch(self, p: _RayPending) -> None:
        # The least loaded actor: O(workers), whatever the number of tasks in flight. A task
        # counts until the driver resolves it (asking Ray which tasks are done scanned every
        # task in flight on every submit).
        i = min(range(len(self._actors)), key=lambda j: (self._actors[j].load, j))
        actor = self._actors[i]
        p.actor, p.state, p.finished = i, "running", False
        p.ref = actor.handle.train.remote(p.task, p.weights_ref)
        actor.add(p)

    def submit(self, task: TrainTask, pull: ModelPull) -> _RayPending:
        key = (task.device_id, task.attempt)
        if key in self._crash_on:
            self._crash_on.discard(key)
            task = replace(task, crash=True)
        p = _RayPending(task, self._weights(pull))
        self._dispatch(p)
        return p

    # -- results ------------------------------------------------------------------------------------
    def _failed(self) -> tuple[type[BaseException], ...]:
        ex = self._ray.exceptions
        return (ex.RayActorError, ex.WorkerCrashedError, ex.OutOfMemoryError)

    def _recover(self, actor_index: int) -> None:
        """The actor died. Of the unresolved tasks it held (oldest first), the first that failed was
        running: its device dropped out. Later failures had not started: once Ray has restarted the
        actor they run again, on whichever actor is least busy. (Two deaths of one actor between
        two looks count as one: the second victim runs again.)"""
        actor = self._actors[actor_index]
        group, actor.inflight, actor.load = list(actor.inflight.values()), {}, 0
        again: list[_RayPending] = []
        victim = False
        for q in group:
            if q.state == "running":
                try:
                    q.result = _check(q.task, self._ray.get(q.ref))
                    q.state = "done"
                except self._failed():
                    if victim:
                        again.append(q)
                        continue
                    victim = True
                    q.state = "lost"
                    self.lost.append((q.task.device_id, q.task.attempt))
            q.finished = True
            actor.add(q)  # dropped from the table when the driver resolves it
        self._wait_restarted(actor)
        for q in again:
            q.task = replace(q.task, crash=False)
            self.resubmitted += 1
            self._dispatch(q)

    def _wait_restarted(self, actor: _Actor) -> None:
        """Block until Ray has restarted the actor (calls made while it restarts fail)."""
        deadline = time.monotonic() + self.restart_timeout_s
        while True:
            try:
                self._ray.get(actor.handle.ping.remote(), timeout=self.restart_timeout_s)
                return
            except self._failed() + (self._ray.exceptions.GetTimeoutError,) as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"a Ray worker died and was not restarted within {self.restart_timeout_s} s") from exc
                time.sleep(0.2)

    def resolve(self, pending: _RayPending) -> LocalUpdate | None:
        while pending.state == "running":
            try:
                pending.result = _check(pending.task, self._ray.get(pending.ref))
                pending.state = "done"
            except self._failed():
                self._recover(pending.actor)
        actor = self._actors[pending.actor]
        if actor.inflight.pop(id(pending), None) is not None:
            actor.mark_finished(pending)
        return pending.result if pending.state == "done" else None

    # -- secure-aggregation members ----------------------------------------------------------------
    def member_runner(self) -> MemberRunner:
        self._sessions += 1
        return _RayMembers(self, f"s{self._sessions}")

    def worker_usage(self) -> list[tuple[float, int]]:
        """Each actor's (process CPU seconds, rounds trained) so far (asked on the members' thread:
        answers at once, without waiting behind queued training)."""
        return self._ray.get([a.handle.usage.options(concurrency_group=MEMBERS_GROUP).remote()
                              for a in self._actors])

    def _take_member_crash(self, label: str) -> bool:
        if self._crash_members_at and self._crash_members_at == label:
            self._crash_members_at = ""
            return True
        return False

    def close(self) -> None:
        ray = self._ray
        if ray is None:
            return
        try:
            if ray.is_initialized():
                for a in self._actors:
                    try:
                        ray.kill(a.handle)
                    except Exception:  # noqa: BLE001 - best effort while tearing down
                        pass
        finally:
            self._actors = []
            self._weights_ref = self._spec_ref = self._data_ref = None
            if self._owns_ray and ray.is_initialized():
                ray.shutdown()
            self._owns_ray = False
            self._ray = None


MEMBERS_GROUP = "members"


class _RayMembers(MemberRunner):
    """One session's members spread over the backend's actors: contiguous slices of the sorted
    member ids, one slice per actor, and one actor call per actor and stage.

    An actor that dies while it holds a stage call takes the members of its slice with it: they
    are lost at that stage (a dropout, as the local dropout model has a member vanish there),
    the session goes on with the others, and the driver waits for Ray to restart the actor so
    the next session finds it. Its queued training is recovered when it is resolved.
    """

    def __init__(self, backend: RayBackend, key: str) -> None:
        self.backend = backend
        self.key = key
        self.placement: dict[int, int] = {}  # member -> actor index
        self.dead: set[int] = set()  # actors that died during this session

    def open(self, params: SessionParams, seats: Any, randomness: Any = None) -> None:
        ids = sorted(seats)
        actors = self.backend._actors
        n = min(len(actors), len(ids))
        slices = [[int(m) for m in part] for part in np.array_split(np.array(ids, dtype=np.int64), n)] if n else []
        for i, part in enumerate(slices):
            for m in part:
                self.placement[m] = i
            # A simulated device's identity key travels to the worker that plays it (the simulator
            # holds every device's key anyway). Not awaited: the actor runs its calls of this group
            # in order, and a failure shows at the first stage.
            actors[i].handle.open_members.options(concurrency_group=MEMBERS_GROUP).remote(
                self.key, params, {m: (seats[m][0].private_bytes(), seats[m][1]) for m in part},
                None if randomness is None else {m: randomness[m] for m in part})

    def stage(self, stage: Stage, inbound: Any) -> tuple[StageReplies, set[int]]:
        b = self.backend
        by_actor: dict[int, dict[int, bytes | None]] = {}
        for m, data in inbound.items():
            by_actor.setdefault(self.placement[m], {})[m] = data
        crash = b._take_member_crash(stage.label)
        calls = []
        for i in sorted(by_actor):
            if i in self.dead:
                continue
            ref = b._actors[i].handle.member_stage.options(concurrency_group=MEMBERS_GROUP).remote(
                self.key, int(stage), by_actor[i], crash and i == len(b._actors) - 1)
            calls.append((i, ref))
        out, lost = StageReplies(), set()
        died: list[int] = []
        for i, ref in calls:
            try:
                replies = b._ray.get(ref)
            except b._failed():
                died.append(i)
                continue
            if replies is None:  # restarted since the session opened there: its members are gone
                self.dead.add(i)
            else:
                out.merge(replies)
        self.dead.update(died)
        for i in sorted(self.dead):  # its members vanish here (those of earlier deaths are already out)
            lost |= set(by_actor.get(i, ()))
        for m in sorted(lost):
            b.members_lost.append((m, stage.label))
        for i in died:
            b._wait_restarted(b._actors[i])
        return out, lost

    def close(self) -> None:
        actors = self.backend._actors
        for i in sorted(set(self.placement.values()) - self.dead):
            if i < len(actors):
                actors[i].handle.close_members.options(concurrency_group=MEMBERS_GROUP).remote(self.key)


def make_backend(run_cfg: Any) -> DeviceBackend:
    """The backend a ``[run]`` section asks for (not started)."""
    if run_cfg.backend == "local":
        return LocalBackend()
    if run_cfg.backend == "ray":
        try:
            import ray  # noqa: F401
        except ImportError as exc:
            raise BackendUnavailable("[run] backend = \"ray\" needs Ray: pip install 'ftte[ray]'") from exc
        return RayBackend(run_cfg.ray_address, run_cfg.ray_workers)
    raise BackendUnavailable(f"unknown backend {run_cfg.backend!r}")

"""The fleet simulator: a discrete-event run of one strategy over a heterogeneous fleet.

Training is real (torch, Opacus DP-SGD on the plan's subset); secure aggregation is real
(keys, masks, shares, encoded messages); only time is simulated. A device's round costs
the download of its pull message, its compute (MACs over its ``compute_speed``) and,
once its cohort closes, the protocol stages (bytes over its bandwidth, see
:mod:`ftte.pipeline.cohort`). The server's state after every applied buffer is
committed to ``ledger.db`` together with that buffer's ledger rows, so a stopped run
resumes from its last applied buffer.

Strategies share this engine (:mod:`ftte.pipeline.strategies`):

* ``ftte`` and ``fedbuff`` are buffered and asynchronous: every idle, online device
  pulls the current version and trains; finished devices join the open cohort, which
  closes at ``buffer_size`` members (or at its deadline with at least the threshold);
  several cohorts may be in flight.
* ``fedavg`` is synchronous: each round selects devices, waits for the first
  ``fedavg_clients_per_round`` of them (or the round deadline) and merges one cohort.

Randomness is derived per purpose from the run seed (``derive_rng``), so the order in
which events are handled never changes what a device draws.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ftte import wire
from ftte.edge.plan import SubsetPlan, subset_vector
from ftte.edge.runtime import LocalTrainer, LocalUpdate
from ftte.round_messages import ModelPull
from ftte.pipeline.backends import (DeviceBackend, TrainTask, WorkerData, WorkerSpec, charge_planned,
                                    lost_round_spend, make_backend, plan_device_round)
from ftte.pipeline.clock import VirtualClock, compute_time, transfer_time
from ftte.pipeline.cohort import CohortRun, UserLevel, run_cohort, simulated_identities
from ftte.pipeline.cohort_time import ModelledCohort, model_cohort, supports as duration_known
from ftte.pipeline.config import Config, ConfigError
from ftte.pipeline.datasets import load_dataset
from ftte.pipeline.fleet import SimDevice, build_fleet
from ftte.pipeline.evaluation import Evaluator
from ftte.pipeline.merge import ServerOptimizer
from ftte.pipeline.model_builder import build_global_model
from ftte.pipeline.server_model import CohortRecord, CohortResult, ServerModel
from ftte.protocol.cohort import plan_cohort, reference_of
from ftte.pipeline.partition import derive_rng
from ftte.pipeline.report import time_to_target
from ftte.pipeline.state import ServerState
from ftte.pipeline.strategies import Strategy, cohort_policy, strategy_for
from ftte.pipeline.work import layer_macs, macs_per_sample, round_seconds
from ftte.privacy.accountant import AccountantStore
from ftte.privacy.budget import BudgetExceededError
from ftte.privacy.dpsgd import RNG_SOURCE_SIMULATION, RoundPlan
from ftte.privacy.accountant import PrivacyStep
from ftte.privacy.distributed_dp import MECH_CENTRAL, UserMechanism, user_rng_source
from ftte.privacy.spend import RoundOutcome, SpendRecord, ledger_rows, unrecorded_spends
from ftte.privacy.ledger import Ledger, load_or_create_signing_key

OFFLINE_MEAN_S = 60.0  # mean time an unavailable device stays offline before trying again
AHEAD_PER_WORKER = 2  # remote lazy mode: rounds each worker holds beyond the merge being waited for


# --- run state -----------------------------------------------------------------------------

@dataclass
class OpenCohort:
    cohort_id: str
    opened_at: float
    members: list[tuple[SimDevice, LocalUpdate]] = field(default_factory=list)
    deadline_passed: bool = False


@dataclass(eq=False)
class DeviceRound:
    """A round a device started (at its ``ready`` event): what it pulled, its seed and, once
    known, its plan. Eager mode trains it at once (``pending``); lazy mode when its cohort's
    merge is reached. ``plan`` None: not planned yet (its budget provably admits it)."""

    device: SimDevice
    attempt: int
    pull: ModelPull
    seed: int
    n_records: int
    plan: RoundPlan | None
    pending: Any = None


@dataclass
class RunResult:
    summary: dict[str, Any]
    history: list[dict[str, Any]]
    weights: np.ndarray


class Simulation:
    """One run of one strategy; :meth:`run` returns its summary and per-version history."""

    # The accountants live in memory and reach ``accountants.db`` in one transaction right
    # before each applied buffer's commit (and at close): durable per buffer, not per round.
    store_durability = "flush"

    def __init__(self, cfg: Config, out_dir: str | Path | None = None, *, on_version: Callable[[dict], None] | None = None,
                 plan: SubsetPlan | None = None, backend: DeviceBackend | None = None, lazy: bool | None = None) -> None:
        """``lazy``: compute device rounds and cohorts only when a merge needs them (the default
        where supported, see :meth:`lazy_supported`); False computes each when it happens (eager),
        which gives the same history, ledger and weights."""
        # Device models are tiny: intra-op threads buy nothing and, next to other busy
        # processes on a 2-core machine, oversubscription made a step ~100x slower.
        torch.set_num_threads(1)
        self.cfg = cfg.check_simulation()
        self.strategy: Strategy = strategy_for(cfg)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.on_version = on_version
        seed = cfg.run.seed
        self.data = load_dataset(cfg.data, seed, cfg.fleet.devices)
        self.fleet = build_fleet(cfg.fleet, cfg.fleet.devices, seed)
        self.model = build_global_model(cfg.model.name, seed, self.data.input_shape, self.data.n_classes)
        if plan is not None:
            self.plan, clipping, chunk = plan, cfg.train.settings().clipping, None
        else:
            choice = self.strategy.choose_training(self.model, self.data, self.fleet)
            self.plan, clipping, chunk = choice.plan, choice.clipping, choice.prefix_chunk
        self.evaluator = Evaluator(self.model, self.plan, self.data.x_test, self.data.y_test)
        self.policy = cohort_policy(cfg)
        self.dp = cfg.privacy.dp_config()
        self.user = (UserLevel(cfg.privacy.user_noise, cfg.privacy.user_noise_multiplier())
                     if cfg.privacy.user_level else None)
        self._check_delta()
        self.settings = dataclasses.replace(cfg.train.settings(clipping), prefix_chunk=chunk)
        self.admitted = self.strategy.admitted_devices(self.fleet, self.peak_client_memory)
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            store_path: str | Path = self.out_dir / "accountants.db"
            self.state: ServerState | None = ServerState(self.out_dir / "ledger.db", cfg.run.keep_versions)
            self.ledger: Ledger | None = Ledger(self.out_dir / "ledger.db", load_or_create_signing_key(self.out_dir / "server.key"))
            if cfg.privacy.enabled:  # the operator's policy, recorded for the audit (as a deployment does)
                self.ledger.set_policy(cfg.privacy.policy())
        else:
            store_path, self.state, self.ledger = ":memory:", None, None
        self.store = AccountantStore(store_path, durability=self.store_durability)
        self.trainer = LocalTrainer(self.model, self.plan, self.dp, self.settings, self.store)
        self.identities = simulated_identities(seed, [d.device_id for d in self.fleet])
        layers = layer_macs(self.model, self.data.input_shape)
        self.macs = macs_per_sample(layers, self.plan.trainable_layers[0], self.dp.enabled, self.settings.clipping)
        self.server = ServerModel(self.plan.plan_id, subset_vector(self.model, self.plan).astype(np.float64),
                                  ServerOptimizer(cfg.server.lr, cfg.server.momentum))
        self.history: list[dict[str, Any]] = []
        self.clock: VirtualClock = VirtualClock()
        self.retired: set[int] = set()
        self.busy: set[int] = set()
        self.updates_applied = 0
        self.upload_bytes: list[int] = []
        self.download_bytes: list[int] = []
        self.cohort_counter = 0
        self.aborted_cohorts = 0
        self.train_rounds = 0  # rounds devices started (virtual work)
        self.rounds_computed = 0  # rounds this process actually trained
        self._plans: dict[int, RoundPlan] = {}  # the plan of each device's round in flight, charged at release
        self.unmodelled_cohorts = 0  # lazy mode: cohorts a dead worker made differ from their model
        self._pull_cache: tuple[Any, ModelPull, int] | None = None  # (version key, pull, its encoded size)
        # Remote lazy mode: rounds started but not handed over yet, by arrival (see _keep_workers_busy).
        self._ahead: list[tuple[float, int, DeviceRound]] = []
        self._ahead_seq = itertools.count()
        self.rounds_ahead = 0  # rounds handed over before their cohort closed
        self._resume()
        # Device work: in this process, or on Ray (cfg.run.backend); started last, so nothing can fail after it.
        self.backend: DeviceBackend = backend if backend is not None else make_backend(cfg.run)
        try:
            self.backend.start(WorkerSpec(self.model, self.plan, self.dp, self.settings), WorkerData.from_federated(self.data))
        except BaseException:
            self.close()
            raise
        why_not = self.lazy_unsupported()
        if lazy and why_not:
            self.close()
            raise ValueError(f"lazy device work is not available here: {why_not}")
        self.lazy = not why_not if lazy is None else bool(lazy)

    def lazy_unsupported(self) -> str:
        """Why rounds must be computed when they happen (empty: lazy work is possible)."""
        if self.strategy.synchronous:
            return "a synchronous strategy"
        if self.user is not None:
            return "user-level DP"
        if not duration_known(secure=self.cfg.secagg.enabled, graph=self.cfg.secagg.graph):
            return "the ring masking graph (its neighbours are drawn during the session)"
        return ""

    def _check_delta(self) -> None:
        """A configured delta must stay below 1/n on every device: δ >= 1/n may publish a whole record."""
        d = self.cfg.privacy.delta
        if not (self.dp.enabled and d):
            return
        largest = max(len(ix) for ix in self.data.device_indices)
        if d >= 1.0 / largest:
            raise ConfigError(f"[privacy] delta: {d:g} is at least 1/n for a device holding {largest} records "
                              f"(1/n = {1.0 / largest:.3g}); use a smaller delta or 0 (auto: min(1e-5, 1/(10 n)))")

    def weak_privacy_devices(self) -> int:
        """Devices whose records are so few that example-level DP says little (n below 100, so
        δ = 1/(10 n) > 1e-3 or sampling gives no amplification)."""
        return sum(1 for ix in self.data.device_indices if len(ix) < 100) if self.dp.enabled else 0

    # -- persistence ---------------------------------------------------------------------------
    def _resume(self) -> None:
        if self.state is None:
            return
        saved_plan = self.state.get_meta("plan_id")
        if saved_plan is not None and saved_plan != self.plan.plan_id:
            raise ValueError(f"{self.out_dir} holds a run with plan {saved_plan}, this config chose {self.plan.plan_id}")
        self.state.set_meta("plan_id", self.plan.plan_id)
        self.state.set_meta("config", self.cfg.to_json())
        ckpt = self.state.latest()
        if ckpt is None:
            return
        self.server.restore(version=ckpt.version, weights=ckpt.weights, velocity=ckpt.velocity,
                            reference_variance=ckpt.reference_variance)
        self.history = ckpt.history
        self.cohort_counter = ckpt.cohorts
        self.clock = VirtualClock(start=ckpt.virtual_time_s)
        self.resumed_from = ckpt.version
        self._reconcile_ledger()

    def _reconcile_ledger(self) -> int:
        """Write a ledger row for every spent round the ledger lacks; returns how many.

        Charged rounds that lack a row: an asynchronous round is charged when released, in
        the same buffer commit as its row, so only a crash between the accountants' flush and
        that commit leaves one; a synchronous round (and a user-level participation) is charged
        when it starts, so rounds in flight at the stop are spent too. They are written as
        :attr:`RoundOutcome.UNMERGED` and, as their trained-from version is no longer known,
        with the latest applied version.
        """
        if self.ledger is None or not self.accounting:
            return 0
        if self.user is not None:
            clip, cap, source = self.cfg.secagg.clip, self.cfg.privacy.user_epsilon, self._user_source(None)
        else:
            clip, cap, source = self.dp.max_grad_norm, self.dp.epsilon_max, RNG_SOURCE_SIMULATION
        spends = unrecorded_spends(self.ledger, self.store, plan_id=self.plan.plan_id, version=self.version,
                                   max_grad_norm=clip, epsilon_max=cap, rng_source=source)
        rows = ledger_rows(self.ledger, [(s, RoundOutcome.UNMERGED, None) for s in spends])
        if rows:
            self.store.flush()  # a ledger row never precedes its round in the accountants on disk
            self.ledger.append_many(rows)
        return len(rows)

    def close(self) -> None:
        try:
            if getattr(self, "backend", None) is not None:
                self.backend.close()  # stops a Ray instance this run started
        finally:
            self.trainer.close()
            self.store.close()
            if self.state is not None:
                self.state.close()
            if self.ledger is not None:
                self.ledger.close()

    # -- device work -----------------------------------------------------------------------------
    def _seed(self, *tags: Any) -> int:
        return int(derive_rng(self.cfg.run.seed, *tags).integers(0, 2**31 - 1))

    @property
    def version(self) -> int:
        return self.server.version

    @property
    def weights(self) -> np.ndarray:
        return self.server.weights

    def _pull(self) -> ModelPull:
        s = self.server
        return ModelPull(s.version, self.plan.plan_id, s.current_hash, s.weights.astype(np.float32))

    def _pull_and_size(self) -> tuple[ModelPull, int]:
        """The current version's pull and its encoded size, built once per version (every device
        pulling that version gets the same message)."""
        key = (self.server.version, self.server.current_hash)
        cached = self._pull_cache
        if cached is None or cached[0] != key:
            pull = self._pull()
            cached = self._pull_cache = (key, pull, len(wire.encode(pull)))
        return cached[1], cached[2]

    def _first_round_fits(self, device_id: int) -> bool:
        """Whether this device's round provably fits its budget without planning it (planning in
        target-ε mode runs a noise search, the bulk of a large fleet's cost). True without DP (a
        plan never refuses), and for a device's first round in target-ε mode under RDP: the noise
        multiplier it will get makes ``planned_rounds`` (>= 2) rounds cost at most the target,
        so one round costs less (ε grows with the rounds and falls with the noise, which the
        floor can only raise), and the target is within ``epsilon_max``."""
        dp = self.dp
        if not dp.enabled:
            return True
        return (dp.target_epsilon is not None and dp.accountant == "rdp" and (dp.planned_rounds or 0) >= 2
                and dp.target_epsilon <= dp.epsilon_max and self.store.state(str(device_id)) is None)

    def _begin_round(self, device: SimDevice, attempt: int, *, charge_now: bool = False) -> tuple[DeviceRound | None, float]:
        """Pull and check the budget of a round the device starts; returns (the round, or None if
        over budget; virtual seconds until its update arrives). The seconds depend only on the
        profile, the data size and the pull's bytes, never on the training result, so lazy mode
        trains the round only when its result is needed.

        Example-level rounds are charged when released (:meth:`_release`), or at once with
        ``charge_now`` (synchronous rounds); a user-level participation is charged here."""
        pull, down = self._pull_and_size()
        self.download_bytes.append(down)
        n_records = len(self.data.device_indices[device.device_id])
        plan: RoundPlan | None = None
        try:
            if not (self.lazy and self._first_round_fits(device.device_id)):
                _, plan = plan_device_round(self.trainer, device.device_id, n_records)
            if self.user is not None:  # user level: the update this round yields is one participation
                p = self.cfg.privacy
                self.store.charge(str(device.device_id), PrivacyStep(self.user.z, 1.0, 1), accountant="rdp",
                                  delta=p.user_delta, epsilon_max=p.user_epsilon)
        except BudgetExceededError:
            self.retired.add(device.device_id)
            return None, 0.0
        r = DeviceRound(device, attempt, pull, self._seed("train", device.device_id, attempt), n_records, plan)
        if not self.lazy:
            r.pending = self._submit(r)  # hands the worker the device's state before this round
        if plan is not None:
            if charge_now:
                charge_planned(self.store, device.device_id, plan)
            else:
                self._plans[device.device_id] = plan
        self.train_rounds += 1
        batch = min(float(self.settings.batch_size), float(n_records))
        seconds = transfer_time(down, device.profile.downlink_bps, self.cfg.fleet.latency_s) + compute_time(
            round_seconds(self.settings.local_steps, batch, self.macs, 1.0), device.profile.compute_speed)
        return r, seconds

    def _submit(self, r: DeviceRound) -> Any:
        """Hand a planned round to the backend, with the device's accountant state before it."""
        assert r.plan is not None
        account = self.store.state(str(r.device.device_id)) if r.plan.budget is not None else None
        self.rounds_computed += 1
        return self.backend.submit(TrainTask(r.device.device_id, r.attempt, r.pull.version, r.seed, account, r.plan),
                                   r.pull)

    def _hand_over(self, r: DeviceRound) -> None:
        """Lazy mode: give the backend a round whose cohort has closed. Its plan is the one it
        would have had when it started: the device's history has not moved since (a device has
        one round in flight, charged only when released), so handing it over at the cohort's
        close or at its merge trains the same round."""
        if r.pending is not None:
            return
        if r.plan is None:
            _, r.plan = plan_device_round(self.trainer, r.device.device_id, r.n_records)
            self._plans[r.device.device_id] = r.plan
        r.pending = self._submit(r)

    def _keep_workers_busy(self, rounds: list[tuple[SimDevice, DeviceRound]]) -> None:
        """Remote lazy mode, at a merge (before it waits for its ``rounds`` and again before the
        server's side): hand over rounds that have started but whose cohort has not closed,
        earliest arrival first, until the workers have ``AHEAD_PER_WORKER`` unfinished rounds each
        besides the merge's own. Otherwise they sit idle while the driver waits and merges whenever
        no later cohort has closed yet (about 12% of each worker's time at 100 local steps). Every
        started round joins a cohort unless the run stops first, so at most that many rounds are
        trained in vain, and results cannot change: a round is a pure function of its inputs (see
        :meth:`_hand_over`)."""
        merging = {id(r.pending) for _, r in rounds}
        queued = sum(1 for p in self.backend.running() if id(p) not in merging)
        while self._ahead and (queued < AHEAD_PER_WORKER * self.backend.workers
                               or self._ahead[0][2].pending is not None):  # entries handed over at a close go too
            _, _, r = heapq.heappop(self._ahead)
            if r.pending is None:
                self._hand_over(r)
                self.rounds_ahead += 1
                queued += 1

    def _resolve_rounds(self, rounds: list[tuple[SimDevice, DeviceRound]]
                        ) -> tuple[list[tuple[SimDevice, LocalUpdate]], list[DeviceRound]]:
        """Lazy mode, at a merge: every member's update, and the rounds whose worker died.
        All are handed over before any is awaited, so remote workers train them side by side."""
        for _, r in rounds:
            self._hand_over(r)
        members: list[tuple[SimDevice, LocalUpdate]] = []
        lost: list[DeviceRound] = []
        for d, r in rounds:
            update = self.backend.resolve(r.pending)
            if update is None:
                lost.append(r)
            else:
                members.append((d, update))
        return members, lost

    def _release(self, members: list[tuple[SimDevice, LocalUpdate]]) -> None:
        """Charge the members' rounds: their updates were released into a cohort that ended
        (merged or aborted). Rounds still in flight when the run stops were never released and
        are not charged (see docs/ARCHITECTURE.md, "Lazy device work")."""
        for d, _ in members:
            plan = self._plans.pop(d.device_id, None)
            if plan is not None:
                charge_planned(self.store, d.device_id, plan)

    def _worker_lost(self, pending: Any) -> None:
        """A worker died mid-round: the device dropped out; its round counts as spent (it may have
        released its update before dying), so it is charged and gets its ledger row now."""
        plan = self._plans.pop(pending.task.device_id, None)
        if plan is not None:
            charge_planned(self.store, pending.task.device_id, plan)
        if self.ledger is not None and self.dp.enabled and self.user is None:
            spend = lost_round_spend(pending.task, self.dp, plan_id=self.plan.plan_id)
            self.store.flush()
            self.ledger.append_many(ledger_rows(self.ledger, [(spend, RoundOutcome.LOST, None)]))

    # -- merging -----------------------------------------------------------------------------------
    def _start(self, cohort_id: str, members: list[tuple[SimDevice, Any]], closed: Any = None):
        """The cohort's start, closing now, or at the close of the start ``closed`` (its version,
        model and reference variance) when a lazy cohort lost members after it closed."""
        ids = tuple(sorted(d.device_id for d, _ in members))
        if closed is None:
            model_hash, version, ref = self.server.current_hash, self.server.version, self.server.reference_variance
        else:
            model_hash, version, ref = closed.model_hash, closed.close_version, reference_of(closed)
        return plan_cohort(self.policy, cohort_id=cohort_id, plan_id=self.plan.plan_id, model_hash=model_hash,
                           close_version=version, members=ids,
                           identity_keys=tuple(self.identities[m].public_key for m in ids),
                           coordinates=self.plan.num_coordinates, reference_variance=ref)

    def _cohort_rng(self, cohort_id: str) -> np.random.Generator:
        return derive_rng(self.cfg.run.seed, "cohort", cohort_id)

    def _run_cohort(self, cohort_id: str, members: list[tuple[SimDevice, LocalUpdate]]) -> CohortRun:
        return self._run(self._start(cohort_id, members), members)

    def _run(self, start: Any, members: list[tuple[SimDevice, LocalUpdate]]) -> CohortRun:
        """Run a planned cohort: its session (or plain path), with the members on the backend's workers."""
        return run_cohort(start, members, self.identities, self._cohort_rng(start.cohort_id),
                          secure=self.cfg.secagg.enabled, latency_s=self.cfg.fleet.latency_s, user=self.user,
                          member_runner=self.backend.member_runner, seed=self.cfg.run.seed)

    def _run_started(self, start: Any, members: list[tuple[SimDevice, LocalUpdate]], modelled: ModelledCohort) -> CohortRun:
        """Lazy mode: run a cohort planned at its close, and hold it to the drops and duration its
        merge was scheduled with (a difference would change the history: stop loudly). A worker
        that dies during a stage is the one difference allowed: its members drop out there."""
        lost_before = len(self.backend.members_lost)
        run = self._run(start, members)
        if len(self.backend.members_lost) > lost_before:
            self.unmodelled_cohorts += 1
            return run
        if dict(run.result.dropped) != modelled.drops or run.duration_s != modelled.duration_s:
            raise RuntimeError(f"cohort {start.cohort_id}: modelled drops {modelled.drops} and {modelled.duration_s!r} s, "
                               f"the run gave {dict(run.result.dropped)} and {run.duration_s!r} s")
        return run

    def _without_lost(self, start: Any, members: list[tuple[SimDevice, LocalUpdate]], n_lost: int,
                      min_size: int) -> CohortRun | None:
        """Lazy mode: workers died training some of a closed cohort's rounds. Those devices never
        uploaded, as if they had dropped before the session opened; the others run a session of
        their own, planned at the same close (version and model) as the modelled cohort. Too few
        left: the round fails and their spent rounds are recorded (None)."""
        self.unmodelled_cohorts += 1
        if len(members) < max(1, min_size):
            self._record_failed_round(start.cohort_id, members,
                                      f"{n_lost} members' workers died; {len(members)} left, need {min_size}")
            for d, _ in members:
                self.clock.schedule(self.clock.now, ("ready", d.device_id))
            return None
        return self._run(self._start(start.cohort_id, members, closed=start), members)

    def _ledger_rows(self, members: list[tuple[SimDevice, LocalUpdate]], cohort_id: str,
                     merged: tuple[int, ...] = (), user_params: Any = None) -> list[Any]:
        """One row per member: MERGED if its update is in the applied sum, else ABORTED (spent all the same)."""
        if not self.accounting or self.ledger is None:
            return []
        spends = [(self._spend(d, u, user_params), RoundOutcome.MERGED if d.device_id in merged else RoundOutcome.ABORTED,
                   cohort_id) for d, u in members]
        return ledger_rows(self.ledger, spends)

    @property
    def accounting(self) -> bool:
        """Whether rounds are charged: example-level DP-SGD, or a user-level participation."""
        return self.dp.enabled or self.user is not None

    def _user_source(self, params: Any) -> str:
        mech = UserMechanism.of(params) if params is not None else UserMechanism(MECH_CENTRAL)
        return user_rng_source(RNG_SOURCE_SIMULATION, mech)

    def _spend(self, device: SimDevice, update: LocalUpdate, user_params: Any) -> Any:
        if self.user is None:
            return update.stats.spend_record(plan_id=self.plan.plan_id, version=update.base_version)
        p = self.cfg.privacy
        return SpendRecord(device_id=str(device.device_id), plan_id=self.plan.plan_id, version=update.base_version,
                           step=PrivacyStep(self.user.z, 1.0, 1), max_grad_norm=self.cfg.secagg.clip,
                           delta=p.user_delta, accountant="rdp", epsilon_max=p.user_epsilon,
                           rng_source=self._user_source(user_params))

    def _apply(self, run: CohortRun, members: list[tuple[SimDevice, LocalUpdate]], now: float) -> None:
        self._release(members)
        applied = self.server.apply(run.result, now=now, evaluate=self.evaluator)
        if applied.applied:
            for m in applied.record.included:
                self.upload_bytes.append(run.bytes_up[m])
            self.updates_applied += len(applied.record.included)
            self.history.append(applied.history.to_dict())  # type: ignore[union-attr]
        else:
            for m in run.result.total.included if run.result.total is not None else ():
                self.upload_bytes.append(run.bytes_up[m])
            self.aborted_cohorts += 1
        self._commit(applied.record, applied.history.to_dict() if applied.history else None, now,
                     self._ledger_rows(members, run.result.cohort_id, applied.record.included, run.user_params))
        if applied.applied and self.on_version is not None:
            self.on_version(self.history[-1])

    def _commit(self, record: CohortRecord, history_row: dict[str, Any] | None, now: float, rows: list[Any]) -> None:
        if self.state is None:
            return
        s = self.server
        self.store.flush()  # first: a crash in between leaves spent rounds without rows, which resume reconciles
        self.state.commit_version(version=s.version, virtual_time_s=now, weights=s.weights,
                                  velocity=s.optimizer.state(), reference_variance=s.reference_variance,
                                  cohort=record.to_dict(), history_row=history_row, ledger=self.ledger,
                                  ledger_rows=rows)

    def _record_failed_round(self, cohort_id: str, members: list[tuple[SimDevice, LocalUpdate]], reason: str) -> None:
        """A round that never formed a cohort still spent its members' budgets: record them now,
        so every later row of those devices stays consistent with the rows before it."""
        self.aborted_cohorts += 1
        self._release(members)
        result = CohortResult(cohort_id, self.server.version, tuple(d.device_id for d, _ in members), {}, {}, 0.0,
                              None, reason)
        self._commit(self.server.apply(result, now=self.clock.now).record, None, self.clock.now,
                     self._ledger_rows(members, cohort_id))

    def _done(self) -> bool:
        limit = self.cfg.run.max_versions  # 0 = no version limit: the horizon (or spent budgets) ends the run
        return (limit > 0 and self.version >= limit) or self.clock.now >= self.cfg.run.max_virtual_time_s

    # -- the run -------------------------------------------------------------------------------------
    def run(self) -> RunResult:
        t0 = time.perf_counter()
        start_version = self.version
        if self.strategy.synchronous:
            self._run_sync()
        else:
            self._run_async()
        self._reconcile_ledger()  # rounds still in flight at the stop were spent too
        wall = time.perf_counter() - t0
        return RunResult(self.summary(wall, start_version), list(self.history), self.server.weights.copy())

    def _new_cohort(self) -> OpenCohort:
        self.cohort_counter += 1
        return OpenCohort(f"{self.strategy.name}-{self.cohort_counter}", self.clock.now)

    def _run_async(self) -> None:
        cfg = self.cfg
        k = cfg.server.buffer_size
        min_size = cfg.secagg_threshold if cfg.secagg.enabled else 1
        attempts: dict[int, int] = {d.device_id: 0 for d in self.fleet}
        devices = {d.device_id: d for d in self.fleet}
        open_cohort: OpenCohort | None = None
        base = self.clock.now
        for d in self.fleet:
            self.clock.schedule(base, ("ready", d.device_id))

        def lost_round(r: DeviceRound, now: float) -> None:
            self._worker_lost(r.pending)
            rng = derive_rng(cfg.run.seed, "worker-lost", r.device.device_id, attempts[r.device.device_id])
            self.clock.schedule(now + rng.exponential(OFFLINE_MEAN_S), ("ready", r.device.device_id))

        def close(cohort: OpenCohort) -> None:
            nonlocal open_cohort
            open_cohort = None
            if self.lazy:  # the merge time is known now; members train when it is reached
                start = self._start(cohort.cohort_id, cohort.members)
                modelled = model_cohort(start, [d for d, _ in cohort.members],
                                        {d.device_id: r.pull.version for d, r in cohort.members},
                                        self._cohort_rng(cohort.cohort_id), secure=cfg.secagg.enabled,
                                        latency_s=cfg.fleet.latency_s)
                self.clock.schedule(self.clock.now + modelled.duration_s, ("merged", (start, modelled, cohort.members)))
                if self.backend.remote:  # its workers train these rounds while the driver goes on
                    for _, r in cohort.members:
                        self._hand_over(r)
                return
            run = self._run_cohort(cohort.cohort_id, cohort.members)
            self.clock.schedule(self.clock.now + run.duration_s, ("merged", (run, cohort.members)))

        while self.clock and not self._done():
            now, (kind, payload) = self.clock.pop()
            if now > cfg.run.max_virtual_time_s:  # the horizon: nothing that happens after it counts
                break
            if kind == "ready":
                dev = devices[payload]
                if dev.device_id in self.retired:
                    continue
                attempts[dev.device_id] += 1
                n = attempts[dev.device_id]
                rng = derive_rng(cfg.run.seed, "availability", dev.device_id, n)
                if rng.random() > dev.profile.availability:
                    self.clock.schedule(now + rng.exponential(OFFLINE_MEAN_S), ("ready", dev.device_id))
                    continue
                if dev.drops_at("train", rng):
                    self.clock.schedule(now + rng.exponential(OFFLINE_MEAN_S), ("ready", dev.device_id))
                    continue
                started, seconds = self._begin_round(dev, n)
                if started is not None:
                    self.clock.schedule(now + seconds, ("trained", started))
                    if self.lazy and self.backend.remote:
                        heapq.heappush(self._ahead, (now + seconds, next(self._ahead_seq), started))
            elif kind == "trained":
                r: DeviceRound = payload
                dev = r.device
                if self.lazy:
                    update: Any = r  # trained when its cohort's merge is reached
                else:
                    update = self.backend.resolve(r.pending)
                if update is None:  # its worker died mid-task: a dropout; the device comes back later
                    lost_round(r, now)
                    continue
                if open_cohort is None:
                    open_cohort = self._new_cohort()
                    if math.isfinite(cfg.server.deadline_s):
                        self.clock.schedule(now + cfg.server.deadline_s, ("deadline", open_cohort.cohort_id))
                open_cohort.members.append((dev, update))
                if len(open_cohort.members) >= k or (open_cohort.deadline_passed and len(open_cohort.members) >= min_size):
                    close(open_cohort)
            elif kind == "deadline":
                if open_cohort is not None and open_cohort.cohort_id == payload:
                    open_cohort.deadline_passed = True
                    if len(open_cohort.members) >= min_size:
                        close(open_cohort)
            elif kind == "merged":
                if self.lazy:
                    start, modelled, rounds = payload
                    if self.backend.remote:  # work for while the driver waits, then for while it merges
                        self._keep_workers_busy(rounds)
                    members, lost = self._resolve_rounds(rounds)
                    if self.backend.remote:
                        self._keep_workers_busy(rounds)
                    for r in lost:
                        lost_round(r, now)
                    if lost:
                        merged = self._without_lost(start, members, len(lost), min_size)
                        if merged is None:
                            continue
                        run = merged
                    else:
                        run = self._run_started(start, members, modelled)
                else:
                    run, members = payload
                self._apply(run, members, now)
                for dev, _ in members:
                    self.clock.schedule(now, ("ready", dev.device_id))

    def _run_sync(self) -> None:
        cfg = self.cfg
        m = cfg.server.fedavg_clients_per_round
        selected_n = cfg.server.fedavg_selected()
        round_no = len(self.history)
        while not self._done():
            round_no += 1
            now = self.clock.now
            rng = derive_rng(cfg.run.seed, "fedavg-round", round_no)
            min_size = cfg.secagg_threshold if cfg.secagg.enabled else 1
            pool = [d for d in self.fleet if d.device_id not in self.retired and d.device_id in self.admitted]
            if len(pool) < max(2, min(m, min_size)):
                break
            # Like a real FedAvg server, select among the devices that check in (are online)
            # this round; offline devices are never picked, so they cost the round nothing.
            online = [d for d in pool
                      if derive_rng(cfg.run.seed, "fedavg-online", round_no, d.device_id).random() <= d.profile.availability]
            if len(online) < max(1, min_size):
                self.clock.advance_to(now + OFFLINE_MEAN_S)
                continue
            chosen = rng.choice(len(online), size=min(selected_n, len(online)), replace=False)
            submitted: list[tuple[float, SimDevice, Any]] = []
            for i in sorted(chosen):
                dev = online[i]
                drng = derive_rng(cfg.run.seed, "fedavg-device", round_no, dev.device_id)
                if dev.drops_at("train", drng):
                    continue
                started, seconds = self._begin_round(dev, round_no, charge_now=True)
                if started is not None:
                    submitted.append((seconds, dev, started.pending))
            finished: list[tuple[float, SimDevice, LocalUpdate]] = []
            for seconds, dev, pending in submitted:
                update = self.backend.resolve(pending)
                if update is None:  # its worker died mid-task: the device dropped out of this round
                    self._worker_lost(pending)
                else:
                    finished.append((seconds, dev, update))
            finished.sort(key=lambda f: (f[0], f[1].device_id))
            if cfg.server.fedavg_deadline_s > 0:
                finished = [f for f in finished if f[0] <= cfg.server.fedavg_deadline_s]
            taken, late = finished[:m], finished[m:]
            self.cohort_counter += 1
            cohort_id = f"{self.strategy.name}-{self.cohort_counter}"
            if len(taken) < max(1, min_size):
                wait = cfg.server.fedavg_deadline_s or (finished[-1][0] if finished else OFFLINE_MEAN_S)
                self.clock.advance_to(now + wait)
                self._record_failed_round(cohort_id, [(dev, upd) for _, dev, upd in finished],
                                          f"{len(taken)} devices finished, threshold is {min_size}")
                continue
            close_at = now + taken[-1][0]
            members = [(dev, upd) for _, dev, upd in taken]
            run = self._run_cohort(cohort_id, members)
            done_at = close_at + run.duration_s
            if done_at > cfg.run.max_virtual_time_s:  # the horizon: a round merged after it does not count
                self.clock.advance_to(cfg.run.max_virtual_time_s)
                break
            self.clock.advance_to(done_at)
            self._apply(run, members + [(dev, upd) for _, dev, upd in late], done_at)

    # -- results ---------------------------------------------------------------------------------------
    def peak_client_memory(self) -> int:
        """Measured peak bytes of one DP-SGD step under this run's plan and batch size."""
        from ftte.edge.memory import TrainingSetup, measure_training_memory

        setup = TrainingSetup(batch_size=self.settings.batch_size, input_shape=self.data.input_shape,
                              dp=self.dp.enabled, optimizer="sgd", num_classes=self.data.n_classes,
                              clipping=self.settings.clipping, prefix_chunk=self.settings.prefix_chunk)
        return int(measure_training_memory(self.model, self.plan, setup).peak_bytes)

    def epsilon_max(self) -> float:
        if not self.accounting:
            return math.inf
        eps = [self.store.epsilon(dev) for dev in self.store.devices()]
        return max(eps) if eps else 0.0

    def _noise_summary(self) -> dict[str, float] | float | None:
        """The noise multiplier in force: the configured one, or (target-epsilon mode) the range derived per device."""
        if self.user is not None:
            return round(self.user.z, 4)
        if not self.dp.enabled:
            return None
        if self.dp.target_epsilon is None:
            return self.dp.noise_multiplier
        used = [step.noise_multiplier for dev in self.store.devices() for step in self.store.history(dev)]
        if not used:
            return None
        return {"min": round(min(used), 4), "max": round(max(used), 4), "target_epsilon": self.dp.target_epsilon,
                "planned_rounds": self.dp.planned_rounds}

    def summary(self, wall: float, start_version: int) -> dict[str, Any]:
        cfg = self.cfg
        target = cfg.run.target_accuracy
        delta = self.cfg.privacy.user_delta if self.user is not None else self.dp.delta
        if delta is None and self.dp.enabled:
            deltas = [self.store.state(dev).delta for dev in self.store.devices()]
            delta = max(deltas) if deltas else None
        full_floats = sum(p.numel() for p in self.model.parameters())
        return {
            "strategy": self.strategy.name,
            "devices": len(self.fleet),
            "plan_id": self.plan.plan_id,
            "trainable_coordinates": self.plan.num_coordinates,
            # which tensors the plan trains, and the layers trained in part (leading output channels)
            "trainable_parameters": list(self.plan.trainable),
            "trainable_slices": {layer: rows for layer, rows in self.plan.slices},
            "model_coordinates": int(full_floats),
            "target_accuracy": target,
            "time_to_target_s": time_to_target(self.history, target),
            "final_accuracy": self.history[-1]["accuracy"] if self.history else None,
            "best_accuracy": max((h["accuracy"] for h in self.history), default=None),
            "virtual_time_s": self.history[-1]["virtual_time_s"] if self.history else self.clock.now,
            "wall_time_s": wall,
            "versions": self.version,
            "resumed_from_version": start_version if start_version else None,
            "updates_applied": self.updates_applied,
            "aborted_cohorts": self.aborted_cohorts,
            "train_rounds": self.train_rounds,
            "rounds_computed": self.rounds_computed,
            "rounds_ahead": self.rounds_ahead,
            "lazy_device_work": self.lazy,
            "unmodelled_cohorts": self.unmodelled_cohorts,
            "bytes_up_per_update": float(np.mean(self.upload_bytes)) if self.upload_bytes else None,
            "bytes_down_per_update": float(np.mean(self.download_bytes)) if self.download_bytes else None,
            "float32_full_update_bytes": 4 * int(full_floats),
            "peak_client_memory_bytes": self.peak_client_memory(),
            "clipping": self.settings.clipping if self.dp.enabled else None,
            "prefix_chunk": self.settings.prefix_chunk,
            "secure_aggregation": cfg.secagg.enabled,
            "differential_privacy": self.accounting,
            "epsilon_max": self.epsilon_max(),
            "delta": delta,
            "privacy_unit": ("a device's whole contribution (user-level, " + self.user.noise + " noise)"
                             if self.user is not None else
                             "a record on a device (example-level DP-SGD)" if self.dp.enabled else None),
            "noise_multiplier": self._noise_summary(),
            "devices_with_weak_privacy": self.weak_privacy_devices(),
            "devices_out_of_budget": len(self.retired),
            "worker_dropouts": len(getattr(self.backend, "lost", ())),
            "backend": cfg.run.backend,
        }


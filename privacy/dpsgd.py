"""DP-SGD with Opacus on the trainable suffix of a model.

An edge device trains only a planned subset of the shared model. We split the model into
a frozen *prefix* (any callable, run under ``torch.no_grad()``) and a trainable *module*
(the suffix) that Opacus wraps. Because the prefix runs without autograd, it keeps no
activations and gets no per-sample gradients: the memory DP-SGD needs is paid only for
the suffix, which is the whole point of subset training on small devices.

Design choices, each from a known failure mode:

* **Wrap once.** :class:`PrivateTrainer` attaches Opacus's ``GradSampleModule`` hooks to
  the module once, at construction, and every round reuses them. Wrapping per round
  stacks duplicate hooks (Opacus refuses a second wrap of the same module; we refuse it
  earlier with a clearer message). Hooks are disabled between rounds so evaluation code
  cannot accumulate activations.
* **No ``_module.`` prefix.** The caller keeps the plain module (:attr:`module`); the
  wrapper shares its parameter tensors, so ``module.state_dict()`` has the caller's keys
  and ``module.load_state_dict(...)`` (in place) feeds the next round.
* **Poisson sampling, always.** Both accountants assume each record joins each batch
  independently with probability ``sample_rate``. Batches therefore vary in size and can
  be empty; an empty batch is still a DP step (noise only) and is counted.
* **Budget first.** The round's cost is computed and checked against the device's budget
  before any data is read (:mod:`budget`); the round is then recorded in the persistent
  accountant store *before* training, so a crash mid-round can never under-count.
* **Cryptographic RNG.** Poisson sampling and Gaussian noise come from a ChaCha20
  keystream (:mod:`.secure_random`), keyed from ``os.urandom`` unless the caller supplies
  a generator (the simulator derives one from its run seed); noise uses the same
  several-draws defence against floating-point attacks as Opacus's ``secure_mode`` (which
  needs torchcsprng, not installable here). Opacus still does the per-sample clipping; only
  its noise addition is replaced (:class:`SecureNoiseDPOptimizer`).
  :attr:`RoundStats.rng_source` names the generator and where its key came from. Every
  round draws a fresh 256-bit round key from the generator, so no two rounds share noise.
* **Same interface without DP** (``DPConfig(enabled=False)``) for ablations: same
  sampling and loop, no clipping/noise, ε reported as ``inf``, nothing recorded.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset, default_collate

from .accountant import (
    NON_PRIVATE_ACCOUNTANT,
    AccountantStore,
    PrivacyStep,
    check_accountant_name,
)
from .budget import BudgetCheck, PrivacyBudget
from .ledger import LedgerRow, library_versions
from .policy import check_delta, default_delta, noise_multiplier_for_target
from .secure_random import SOURCE_KEY, SOURCE_OS, SOURCE_SEED, SecureRandom, poisson_batches
from .spend import RoundOutcome, SpendRecord, ledger_row

RNG_SOURCE_OS = SOURCE_OS
RNG_SOURCE_SIMULATION = SOURCE_SEED
RNG_SOURCE_CALLER = SOURCE_KEY
RNG_SOURCE_DEFAULT = RNG_SOURCE_OS  # what a trainer built without ``rng`` uses

__all__ = ["DPConfig", "PrivateTrainer", "RoundPlan", "RoundStats", "SecureNoiseDPOptimizer", "default_delta",
           "check_delta"]


@dataclass(frozen=True)
class DPConfig:
    """Per-device DP-SGD settings.

    ``noise_multiplier`` is used as given unless ``target_epsilon`` and
    ``planned_rounds`` are set, in which case it is derived (Opacus
    ``get_noise_multiplier``, run through our accountants:
    :func:`~ftte.privacy.policy.noise_multiplier_for_target`) so that ``planned_rounds``
    identical rounds spend at most ``target_epsilon``. ``epsilon_max`` is the hard lifetime
    budget enforced before each round. ``delta=None`` means ``min(1e-5, 1/(10·n_records))``
    fixed at the device's first round; a given ``delta >= 1/n_records`` is refused.
    """

    # Defaults equal ``[privacy]`` in ftte's config schema (a test keeps them equal); a run
    # always builds this from the schema (``PrivacyConfig.dp_config``).
    enabled: bool = True
    noise_multiplier: float = 1.5
    max_grad_norm: float = 1.0
    delta: float | None = None
    accountant: str = "rdp"
    epsilon_max: float = 10.0
    target_epsilon: float | None = None
    planned_rounds: int | None = None
    min_noise_multiplier: float = 0.0  # a floor under a derived noise multiplier (target-epsilon mode)

    def __post_init__(self) -> None:
        check_accountant_name(self.accountant)
        if not (self.max_grad_norm > 0.0):
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.enabled and not (self.noise_multiplier > 0.0) and self.target_epsilon is None:
            raise ValueError("DP-SGD needs noise_multiplier > 0 (or target_epsilon + planned_rounds)")
        if self.delta is not None and not (0.0 < self.delta < 1.0):
            raise ValueError(f"delta must lie in (0, 1), got {self.delta}")
        if not (self.epsilon_max > 0.0):
            raise ValueError(f"epsilon_max must be > 0, got {self.epsilon_max}")
        if (self.target_epsilon is None) != (self.planned_rounds is None):
            raise ValueError("target_epsilon and planned_rounds go together")
        if self.target_epsilon is not None:
            if not (0.0 < self.target_epsilon <= self.epsilon_max):
                raise ValueError(
                    f"target_epsilon must lie in (0, epsilon_max={self.epsilon_max}], got {self.target_epsilon}"
                )
            if self.planned_rounds is None or self.planned_rounds < 1:
                raise ValueError("planned_rounds must be >= 1")


@dataclass(frozen=True)
class RoundPlan:
    """What a round will do and cost, fixed before training starts."""

    n_records: int
    sample_rate: float
    steps: int
    noise_multiplier: float
    max_grad_norm: float
    delta: float
    accountant: str
    budget: BudgetCheck | None  # None when DP is disabled
    prior_rounds: int = 0  # history length the budget check was based on

    @property
    def privacy_step(self) -> PrivacyStep:
        return PrivacyStep(self.noise_multiplier, self.sample_rate, self.steps)


@dataclass(frozen=True)
class RoundStats:
    """What one round did. ``epsilon_round`` is the marginal cost of the round (see
    :class:`~ftte.privacy.budget.BudgetCheck`), ``epsilon_total`` the device's cumulative
    ε at ``delta`` afterwards. Non-private rounds report ``inf`` for both.

    ``mean_loss``, ``n_records`` and ``empty_batches`` are computed from the raw records
    and are *not* covered by the DP guarantee: keep them on the device (or treat them
    as public only if the dataset size is). :meth:`to_ledger_row` leaves them out.
    Note that ``sample_rate`` derived from a batch size (``batch_size / n``) and the
    default δ (``1/(10 n)``) do reveal ``n``; example-level DP treats ``n`` as public.
    """

    device_id: str
    enabled: bool
    steps: int
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    epsilon_round: float
    epsilon_total: float
    delta: float
    epsilon_max: float
    accountant: str
    mean_loss: float
    n_records: int
    empty_batches: int
    rng_source: str
    wall_seconds: float

    @property
    def privacy_step(self) -> PrivacyStep:
        return PrivacyStep(self.noise_multiplier, self.sample_rate, self.steps)

    def spend_record(self, *, plan_id: str, version: int) -> SpendRecord:
        """This round's :class:`~ftte.privacy.spend.SpendRecord` (what every ledger row is built from)."""
        versions = library_versions()
        return SpendRecord(
            device_id=self.device_id, plan_id=plan_id, version=version, step=self.privacy_step,
            max_grad_norm=self.max_grad_norm, delta=self.delta, accountant=self.accountant,
            epsilon_max=self.epsilon_max, rng_source=self.rng_source, torch_version=versions["torch"],
            opacus_version=versions["opacus"], ftte_version=versions["ftte"],
        )

    def to_ledger_row(
        self, *, plan_id: str, version: int, cohort_id: str | None = None, timestamp: str | None = None,
        outcome: RoundOutcome = RoundOutcome.MERGED,
    ) -> LedgerRow:
        """The ledger row for this round with the ε figures of the device's own store.

        Those equal the ledger meaning of ``epsilon_total`` (see :mod:`.spend`) only when the
        ledger holds every earlier round of this device, in order, as a single device's
        ledger does; a server writing many devices' rows should use
        :func:`ftte.privacy.spend.ledger_rows` with :meth:`spend_record`.
        """
        return ledger_row(self.spend_record(plan_id=plan_id, version=version), outcome=outcome,
                          cohort_id=cohort_id, epsilon_before=self.epsilon_total - self.epsilon_round,
                          epsilon_after=self.epsilon_total, timestamp=timestamp)


Data = Dataset | Sequence[torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _as_dataset(data: Data) -> Dataset:
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (tuple, list)) and data and all(torch.is_tensor(t) for t in data):
        return TensorDataset(*data)
    raise TypeError("data must be a map-style torch Dataset or a tuple of tensors (inputs, targets)")


def _fetch(ds: Dataset, idx: list[int]) -> tuple[torch.Tensor, ...]:
    if isinstance(ds, TensorDataset):
        index = torch.as_tensor(idx, dtype=torch.long)
        return tuple(t[index] for t in ds.tensors)
    return tuple(default_collate([ds[i] for i in idx]))


@functools.cache
def _secure_noise_optimizer_class(ghost: bool = False):
    """Build the optimizer subclass lazily: importing Opacus costs seconds. ``ghost``: on
    Opacus's fast-gradient-clipping optimizer (its ``p.summed_grad`` is the clipped sum the
    second backward pass produced; noise is added the same way)."""
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    base = DPOptimizerFastGradientClipping if ghost else DPOptimizer

    class _SecureNoiseDPOptimizer(base):  # type: ignore[valid-type,misc]
        """Opacus's DPOptimizer (per-sample clipping, accumulation, scaling unchanged) whose
        Gaussian noise comes from :attr:`noise_rng` instead of torch's generator."""

        noise_rng: SecureRandom | None = None

        def add_noise(self) -> None:
            rng = self.noise_rng
            if rng is None:
                # Never fall back to torch's generator silently: that is the weakness we replaced.
                raise RuntimeError("SecureNoiseDPOptimizer.noise_rng is not set for this round")
            std = float(self.noise_multiplier) * float(self.max_grad_norm)
            for p in self.params:
                _check_processed_flag(p.summed_grad)
                noise = rng.gaussian_tensor(p.summed_grad.shape, std, dtype=p.summed_grad.dtype,
                                            device=p.summed_grad.device)
                p.grad = (p.summed_grad + noise).view_as(p)
                _mark_as_processed(p.summed_grad)

    return _SecureNoiseDPOptimizer


def __getattr__(name: str):
    if name == "SecureNoiseDPOptimizer":
        return _secure_noise_optimizer_class()
    raise AttributeError(name)


class PrivateTrainer:
    """DP-SGD (or plain SGD) rounds on one trainable module, for one device process.

    Construct once per device process and per subset plan; call :meth:`train_round`
    every round. Load new global weights with ``trainer.module.load_state_dict(...)``
    (an in-place copy; do not replace the Parameter objects, the optimizer holds them).
    Call :meth:`close` to remove Opacus's hooks before wrapping the module again (for
    instance after a new plan changed which parameters are trainable).

    ``store`` holds the device's accountant history; pass an
    :class:`~ftte.privacy.accountant.AccountantStore` on a file so the budget survives
    restarts (the default in-memory store does not).

    ``rng`` is the generator rounds draw their keys from (default: a fresh
    :meth:`SecureRandom.from_os` per round); :meth:`train_round` also takes one per round.
    """

    def __init__(
        self,
        module: nn.Module,
        config: DPConfig,
        *,
        prefix: Callable[[torch.Tensor], torch.Tensor] | None = None,
        device_id: str = "local",
        store: AccountantStore | None = None,
        momentum: float = 0.0,
        rng: SecureRandom | None = None,
        clipping: str = "per_sample",
    ) -> None:
        """``clipping="ghost"`` uses Opacus's fast gradient clipping: the same clipped,
        noised update without materialising per-sample gradients of ``Linear`` layers, at
        the price of a second backward pass; ``train_round``'s ``loss_fn`` must then be a
        loss module with a ``reduction`` attribute (Opacus re-evaluates it per sample)."""
        from opacus import GradSampleModule
        from opacus.grad_sample.gsm_base import AbstractGradSampleModule
        from opacus.validators import ModuleValidator

        if isinstance(module, AbstractGradSampleModule):
            raise ValueError("pass the plain nn.Module, not an Opacus GradSampleModule")
        if hasattr(module, "autograd_grad_sample_hooks"):
            raise ValueError(
                "this module already carries Opacus hooks (another PrivateTrainer wraps it); reuse that "
                "trainer or call its close() first — wrapping again would stack duplicate hooks"
            )
        self._module = module
        self._config = config
        self.prefix = prefix
        self.device_id = device_id
        self.store = store if store is not None else AccountantStore(":memory:")
        self.rng = rng
        self._named_trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not self._named_trainable:
            raise ValueError("the trainable module has no parameter with requires_grad=True")
        self._derived_noise: dict[tuple[float, int, float], float] = {}
        if clipping not in ("per_sample", "ghost"):
            raise ValueError(f"clipping must be 'per_sample' or 'ghost', got {clipping!r}")
        self.clipping = clipping
        self._ghost = config.enabled and clipping == "ghost"
        self._gsm = None
        base = torch.optim.SGD([p for _, p in self._named_trainable], lr=0.0, momentum=momentum)
        self._base_optimizer = base
        if config.enabled:
            # BatchNorm and friends mix samples, which breaks per-example DP: fail loudly.
            ModuleValidator.validate(module, strict=True)
            if self._ghost:
                from opacus.grad_sample import GradSampleModuleFastGradientClipping

                self._gsm = GradSampleModuleFastGradientClipping(
                    module, batch_first=True, loss_reduction="mean", strict=True,
                    max_grad_norm=config.max_grad_norm, use_ghost_clipping=True,
                )
            else:
                self._gsm = GradSampleModule(module, batch_first=True, loss_reduction="mean", strict=True)
            optimizer_cls = _secure_noise_optimizer_class(ghost=self._ghost)
            self._gsm.disable_hooks()
            self._optimizer = optimizer_cls(
                base,
                noise_multiplier=config.noise_multiplier,
                max_grad_norm=config.max_grad_norm,
                expected_batch_size=1,  # set per round from sample_rate * n_records
                loss_reduction="mean",
            )
        else:
            self._optimizer = base
        self._closed = False

    # -- properties ------------------------------------------------------------------
    @property
    def config(self) -> DPConfig:
        return self._config

    @config.setter
    def config(self, value: DPConfig) -> None:
        """Settings may change between rounds (e.g. the noise schedule); whether DP is
        on may not, because that decides whether the module is wrapped."""
        if value.enabled != self._config.enabled:
            raise ValueError("cannot switch DP on/off on an existing trainer; build a new one")
        self._config = value

    @property
    def module(self) -> nn.Module:
        """The caller's module (never the wrapper): its state_dict keys are unchanged."""
        return self._module

    @property
    def hook_count(self) -> int:
        """Number of Opacus hook handles on the module; constant across rounds."""
        return len(getattr(self._module, "autograd_grad_sample_hooks", []))

    def epsilon(self) -> float:
        """Cumulative ε of this device, recomputed from the stored history."""
        if self.store.state(self.device_id) is None:
            return 0.0
        return self.store.epsilon(self.device_id)

    # -- planning --------------------------------------------------------------------
    def plan_round(
        self,
        n_records: int,
        *,
        batch_size: int | None = None,
        sample_rate: float | None = None,
        steps: int | None = None,
        epochs: float | None = None,
    ) -> RoundPlan:
        """Resolve sample rate, steps, δ and noise, and run the budget check.

        Raises :class:`~ftte.privacy.budget.BudgetExceededError` if the round would
        exceed the budget. Stores nothing.
        """
        if n_records < 1:
            raise ValueError("the device has no records to train on")
        if (batch_size is None) == (sample_rate is None):
            raise ValueError("give exactly one of batch_size or sample_rate")
        q = min(1.0, batch_size / n_records) if batch_size is not None else float(sample_rate)  # type: ignore[operator]
        if not (0.0 < q <= 1.0):
            raise ValueError(f"sample_rate must lie in (0, 1], got {q}")
        if steps is not None and epochs is not None:
            raise ValueError("give at most one of steps or epochs")
        if steps is None:
            steps = max(1, int((1.0 if epochs is None else epochs) / q))
        if steps < 1:
            raise ValueError("steps must be >= 1")
        cfg = self.config
        if not cfg.enabled:
            # No clipping, no noise: ε is infinite whatever δ; δ is kept for the record.
            delta = cfg.delta if cfg.delta is not None else default_delta(n_records)
            return RoundPlan(n_records, q, steps, 0.0, math.inf, delta, NON_PRIVATE_ACCOUNTANT, None)

        state = self.store.state(self.device_id)
        if cfg.delta is not None:
            check_delta(cfg.delta, n_records)
        if state is not None:
            delta = state.delta
        else:
            delta = cfg.delta if cfg.delta is not None else default_delta(n_records)
        if state is not None and state.accountant != cfg.accountant:
            raise ValueError(
                f"device {self.device_id!r} is accounted with {state.accountant!r}, config asks for {cfg.accountant!r}"
            )
        if state is not None and cfg.delta is not None and cfg.delta != state.delta:
            raise ValueError(f"device {self.device_id!r} is accounted at delta={state.delta!r}, config asks for "
                             f"delta={cfg.delta!r}")
        noise = self._noise_multiplier(q, steps, delta)
        budget = PrivacyBudget(cfg.epsilon_max, delta)
        history = state.history if state is not None else ()
        spent = state.epsilon_total if state is not None else None  # cached; a pure function of history
        check = budget.check(history, PrivacyStep(noise, q, steps), accountant=cfg.accountant,
                             device_id=self.device_id, epsilon_spent=spent)
        return RoundPlan(n_records, q, steps, noise, cfg.max_grad_norm, delta, cfg.accountant, check, len(history))

    def _noise_multiplier(self, q: float, steps: int, delta: float) -> float:
        cfg = self.config
        if cfg.target_epsilon is None:
            return float(cfg.noise_multiplier)
        key = (q, steps, delta)
        if key not in self._derived_noise:
            assert cfg.planned_rounds is not None
            derived = noise_multiplier_for_target(
                cfg.target_epsilon, delta, q, steps, cfg.planned_rounds, accountant=cfg.accountant)
            self._derived_noise[key] = max(derived, cfg.min_noise_multiplier)
        return self._derived_noise[key]

    # -- training --------------------------------------------------------------------
    def train_round(
        self,
        data: Data,
        *,
        loss_fn: LossFn,
        lr: float,
        batch_size: int | None = None,
        sample_rate: float | None = None,
        steps: int | None = None,
        epochs: float | None = None,
        plan: RoundPlan | None = None,
        rng: SecureRandom | None = None,
    ) -> RoundStats:
        """One local round: budget check, record, then ``steps`` Poisson-sampled steps.

        ``loss_fn(output, target)`` must reduce by the *mean* over the batch (Opacus
        rescales per-sample gradients accordingly). ``steps`` defaults to
        ``epochs / sample_rate`` with ``epochs=1``.

        ``plan``: a :meth:`plan_round` result for this device and data that the caller has
        already checked against the budget (a simulator's driver does, then hands the round
        to a worker); it replaces the second check, whose accountant maths can cost up to a
        second. The round is still recorded in :attr:`store`, which must hold the history
        the plan was based on.

        ``rng``: this round's generator (else :attr:`rng`, else a fresh OS-keyed one). The
        round draws a 256-bit round key from it, and its sampling and noise streams from that.
        """
        if self._closed:
            raise RuntimeError("trainer is closed")

        criterion = self._ghost_loss(loss_fn) if self._ghost else loss_fn  # checked before anything is recorded
        ds = _as_dataset(data)
        n = len(ds)  # type: ignore[arg-type]
        if plan is None:
            plan = self.plan_round(n, batch_size=batch_size, sample_rate=sample_rate, steps=steps, epochs=epochs)
        elif plan.n_records != n or (plan.budget is None) == self.config.enabled:
            raise ValueError(f"the given plan is for {plan.n_records} records with DP "
                             f"{'off' if plan.budget is None else 'on'}; this round has {n} records, DP "
                             f"{'on' if self.config.enabled else 'off'}")
        cfg = self.config

        if cfg.enabled:
            assert plan.budget is not None
            # Charge before training: if the process dies mid-round, the cost is counted.
            # expected_rounds makes the charge fail if another writer got in since the check.
            self.store.charge(self.device_id, plan.privacy_step, accountant=plan.accountant, delta=plan.delta,
                              epsilon_max=cfg.epsilon_max, expected_rounds=plan.prior_rounds)
            self._optimizer.noise_multiplier = plan.noise_multiplier  # type: ignore[attr-defined]
            self._optimizer.max_grad_norm = plan.max_grad_norm  # type: ignore[attr-defined]
            if self._ghost:
                self._gsm.max_grad_norm = plan.max_grad_norm  # type: ignore[union-attr]
            self._optimizer.expected_batch_size = plan.sample_rate * n  # type: ignore[attr-defined]

        # Draw the round key only now: a refused round consumes no randomness at all.
        source = rng if rng is not None else self.rng if self.rng is not None else SecureRandom.from_os()
        round_rng = SecureRandom.from_key(source.random_bytes(32), source=source.source)
        sampling_rng, noise_rng = round_rng.child("poisson-sampling"), round_rng.child("gaussian-noise")
        if cfg.enabled:
            self._optimizer.noise_rng = noise_rng  # type: ignore[attr-defined]
        for group in self._base_optimizer.param_groups:
            group["lr"] = lr
        self._base_optimizer.state.clear()  # each round starts from fresh global weights

        sampler = poisson_batches(sampling_rng, n, plan.sample_rate, plan.steps)
        prefix_mode = self.prefix.training if isinstance(self.prefix, nn.Module) else None
        if isinstance(self.prefix, nn.Module):
            self.prefix.eval()  # frozen norm layers must not update running stats
        self._module.train()
        if self._gsm is not None:
            self._gsm.enable_hooks()

        losses: list[float] = []
        empty = 0
        t0 = time.perf_counter()
        try:
            for idx in sampler:
                self._optimizer.zero_grad(set_to_none=True)
                if len(idx) == 0:
                    empty += 1
                    if cfg.enabled:
                        self._noise_only_step()
                    continue
                x, y = _fetch(ds, idx)[:2]
                if self.prefix is not None:
                    with torch.no_grad():
                        x = self.prefix(x)
                out = self._gsm(x) if self._gsm is not None else self._module(x)
                loss = criterion(out, y)  # ghost: its backward() runs both passes
                with warnings.catch_warnings():
                    # With a frozen prefix no input requires grad, so torch warns that the
                    # full backward hook fires on outputs only; that is exactly what
                    # Opacus's per-sample hooks need here.
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    loss.backward()
                if cfg.enabled:
                    self._check_grad_samples()
                self._optimizer.step()
                losses.append(float(loss.detach()))
        finally:
            self._optimizer.zero_grad(set_to_none=True)  # drop per-sample grads now
            if self._gsm is not None:
                self._gsm.disable_hooks()
                self._optimizer.noise_rng = None  # type: ignore[attr-defined]
            if isinstance(self.prefix, nn.Module) and prefix_mode:
                self.prefix.train(prefix_mode)
        wall = time.perf_counter() - t0

        mean_loss = sum(losses) / len(losses) if losses else math.nan
        if cfg.enabled:
            assert plan.budget is not None
            eps_round, eps_total = plan.budget.round_cost, plan.budget.epsilon_after
            eps_max = cfg.epsilon_max
        else:
            eps_round = eps_total = eps_max = math.inf
        return RoundStats(
            device_id=self.device_id,
            enabled=cfg.enabled,
            steps=plan.steps,
            sample_rate=plan.sample_rate,
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=plan.max_grad_norm,
            epsilon_round=eps_round,
            epsilon_total=eps_total,
            delta=plan.delta,
            epsilon_max=eps_max,
            accountant=plan.accountant,
            mean_loss=mean_loss,
            n_records=n,
            empty_batches=empty,
            rng_source=source.source,
            wall_seconds=wall,
        )

    def _ghost_loss(self, loss_fn: LossFn) -> Callable:
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        if loss_fn is nn.functional.cross_entropy:  # the functional default: same loss as a module
            loss_fn = nn.CrossEntropyLoss()
        if not isinstance(loss_fn, nn.Module) or getattr(loss_fn, "reduction", None) != "mean":
            raise ValueError("ghost clipping needs loss_fn to be a loss module with reduction='mean' "
                             "(e.g. nn.CrossEntropyLoss()), so per-sample losses can be re-weighted")
        return DPLossFastGradientClipping(self._gsm, self._optimizer, loss_fn, loss_reduction="mean")

    def _noise_only_step(self) -> None:
        # An empty Poisson batch is still a step of the mechanism: the update is pure
        # noise. Skipping it would make the released update depend on the batch being
        # empty, and the accountant already counted it.
        for _, p in self._named_trainable:
            if self._ghost:  # the fast-clipping optimizer noises p.grad, the clipped sum
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        self._optimizer.step()

    def _check_grad_samples(self) -> None:
        attr = "grad" if self._ghost else "grad_sample"
        missing = [n for n, p in self._named_trainable if getattr(p, attr, None) is None]
        if missing:
            raise RuntimeError(
                f"trainable parameters {missing} received no per-sample gradient: forward never used them. "
                "Freeze them (requires_grad=False) or move them out of the trainable module."
            )

    def close(self) -> None:
        """Remove Opacus's hooks and attributes; the module is plain again."""
        if self._gsm is not None and not self._closed:
            self._gsm.to_standard_module()
        self._closed = True

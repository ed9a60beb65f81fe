"""Choose the subset plan with the most expected benefit whose training memory fits a budget.

**Benefit.** A unit is a top-level layer's parameters (``granularity="layer"``, the
default) or a single parameter tensor (``"tensor"``). Its score is the squared norm of
the loss gradient w.r.t. its parameters on a calibration batch: to first order, one SGD
step of size ``eta`` on a subset ``S`` lowers the loss by ``eta * sum_{p in S} |g_p|^2``,
so scores add up over a plan and the plan's benefit is the sum of its units' scores.
The calibration batch must be server-side proxy or public data, never a device's
private records: the plan is public and is chosen before any private training. Without
a batch the score is the unit's parameter count (train as many coordinates as fit).

**Cost.** The peak memory from :class:`ftte.edge.memory.MemoryEstimator`. It is not
additive: making an early layer trainable makes autograd keep activations from that
layer on, and per-sample-gradient temporaries depend on the largest trainable layer, so
every candidate set is costed as a whole.

**Search.** With at most ``exhaustive_limit`` units every non-empty subset is costed
(that is 2^n estimates at well under a millisecond each) and the highest-scoring one
that fits wins (ties: less memory). Beyond that, a greedy pass per possible first
trainable layer ``f``: start from ``{f}``, repeatedly add the later unit with the best
score gained per byte added that still fits, keep the best plan over all ``f``.

**Clipping mode.** Under DP a plan can be trained with per-sample clipping or with
ghost clipping (:mod:`ftte.edge.step`). Ghost clipping avoids ``batch x parameters``
per-sample gradients for ``Linear`` layers but keeps the whole graph through a second
backward pass, so it is cheaper for linear heads and dearer for convolutions. With
``clipping="auto"`` every candidate is costed in both modes and takes the cheaper (ties:
per-sample, which has no extra backward pass); :attr:`PlanChoice.clipping` says which the
device must use. With ``verify=True`` the final choice between the two modes is made on
measured peaks.

**Prefix micro-batches.** The frozen prefix runs without autograd, but at the whole batch
its widest layers' activations are live at once, and on a small head that is the step's
peak (cnn28 at batch 16: the first convolution's output and its GroupNorm's, 3.2 MB of a
3.8 MB peak). The prefix can run in micro-batches (:class:`ftte.edge.plan.FrozenPrefix`)
without changing the step's result beyond float rounding: it is frozen, in eval mode and
normalises per sample. With ``prefix_chunk="auto"`` every candidate is costed with the
whole batch and with chunks of ``ceil(b/2), ceil(b/4), ..., 1`` samples, and takes the
lowest estimated peak; ties go to the largest chunk (fewest, widest kernel calls), so a
plan whose peak is not in the prefix keeps the whole batch. :attr:`PlanChoice.prefix_chunk`
says which chunk the device must run. The rule is the same for every plan and strategy
(a full-model plan has no prefix, so nothing to chunk); it never changes the batch size.

With ``verify=True`` the chosen plan is also measured (a real Opacus step); if the
measurement exceeds the budget, the search repeats with the budget shrunk by the
overshoot, so the returned plan's *measured* peak fits.

**Contribution analysis** (:func:`choose_plan_by_contribution`). The gradient-norm score
above ignores DP noise: under DP-SGD every trained coordinate also receives noise, so
on small devices a larger plan can learn *less* than a smaller one. Following the
contribution analysis of Lin et al. 2022 ("On-device training under 256KB memory"), the
server instead measures what each candidate plan buys: from the current model, a few
DP-SGD steps of that plan (clipping at the run's ``max_grad_norm``, Gaussian noise at
the run's ``noise_multiplier``, the devices' batch size and learning rate) on one half
of a calibration split, then the loss drop on the other half, averaged over a few
repeats with common batches and seeds. Candidates are the plans that fit the memory
budget among: every head (the last ``k`` units), every head whose first layer is cut to
a fraction of its output channels (channel slices, :mod:`ftte.edge.plan`), every single
unit, and the plan the score search picks. This **assumes the server holds public or server-owned data**
resembling the task (the calibration split of :mod:`ftte.pipeline.datasets`, never a
device's records and never the test set). Without such data, fall back to
:func:`search_plan` without calibration (parameter count) or with a synthetic/proxy batch,
and prefer smaller plans when the noise per coordinate is high; do not score plans on
device data, because that spends (unaccounted) privacy.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from torch import nn

from ftte.edge.memory import MemoryEstimate, MemoryEstimator, MemoryMeasurement, TrainingSetup, measure_training_memory
from ftte.edge.plan import SubsetPlan, layer_of
from ftte.edge.profile import DeviceProfile
from ftte.edge.step import ClippingMode, OptimizerKind

__all__ = [
    "DEFAULT_BUDGET_FRACTION",
    "BudgetTooSmallError",
    "CoordinateCapError",
    "PlanChoice",
    "default_budget",
    "parameter_importance",
    "PrefixChunk",
    "prefix_chunk_options",
    "cheapest_estimate",
    "search_plan",
    "PlanContribution",
    "ContributionChoice",
    "candidate_plans",
    "contribution_scores",
    "choose_plan_by_contribution",
]

#: Share of the weakest device's RAM given to the training working set. The rest is the
#: OS, other apps, the Python/torch runtime and allocator slack, none of which the memory
#: estimate counts; a quarter is a conservative default for phones and tablets.
DEFAULT_BUDGET_FRACTION = 0.25


#: A prefix micro-batch size, ``None`` for the whole batch, or ``"auto"``: let the search choose.
PrefixChunk = int | None | Literal["auto"]


def prefix_chunk_options(batch_size: int, prefix_chunk: PrefixChunk = "auto") -> tuple[int | None, ...]:
    """Prefix chunk sizes to cost: ``(None, ceil(b/2), ceil(b/4), ..., 1)`` for ``"auto"``, else just the one given."""
    if prefix_chunk != "auto":
        if prefix_chunk is not None and int(prefix_chunk) < 1:
            raise ValueError(f"prefix_chunk must be >= 1, None or 'auto', got {prefix_chunk!r}")
        return (None if prefix_chunk is None else int(prefix_chunk),)
    out: list[int | None] = [None]
    c = int(batch_size)
    while c > 1:
        c = -(-c // 2)
        out.append(c)
    return tuple(out)


def cheapest_estimate(
    estimator: MemoryEstimator,
    plan: SubsetPlan,
    batch_size: int,
    *,
    dp: bool,
    optimizer: OptimizerKind,
    modes: Sequence[ClippingMode],
    prefix_chunk: PrefixChunk = None,
) -> MemoryEstimate:
    """The lowest estimated peak of ``plan`` over the clipping ``modes`` and prefix chunk options.

    Ties go to the earlier mode (per-sample first: no extra backward pass), then to the
    larger chunk (the whole batch first). The estimate says which mode and chunk it costed.
    """
    best: MemoryEstimate | None = None
    for mode in modes:
        for chunk in prefix_chunk_options(batch_size, prefix_chunk):
            est = estimator.estimate(plan, batch_size, dp=dp, optimizer=optimizer, prefix_chunk=chunk, clipping=mode)
            if best is None or est.peak_bytes < best.peak_bytes:
                best = est
    assert best is not None, "no clipping mode to cost"
    return best


def device_prefix_chunk(
    model: nn.Module,
    plan: SubsetPlan,
    input_shape: tuple[int, ...],
    batch_size: int,
    *,
    dp: bool,
    clipping: ClippingMode,
) -> int | None:
    """The frozen prefix's micro-batch a device runs its ``plan`` with: the lowest estimated peak.

    A device works this out for itself (the chunk changes its memory, not its update), with
    the same rule the server's plan search costs plans by. A model the estimator cannot
    walk (not an ``nn.Sequential``) runs its prefix on the whole batch.
    """
    try:
        estimator = MemoryEstimator(model, tuple(input_shape))
    except (TypeError, ValueError, RuntimeError):
        return None
    best = cheapest_estimate(estimator, plan, batch_size, dp=dp, optimizer="sgd", modes=(clipping,),
                             prefix_chunk="auto")
    return best.prefix_chunk


class BudgetTooSmallError(ValueError):
    """Not even the cheapest single-unit plan fits the memory budget."""


class CoordinateCapError(BudgetTooSmallError):
    """Plans fit the memory budget, but none trains few enough coordinates for the cap given."""

    def __init__(self, message: str, *, smallest: int) -> None:
        super().__init__(message)
        self.smallest = smallest  # coordinates of the smallest single-unit plan within the memory budget


@dataclass(frozen=True)
class PlanChoice:
    """The chosen plan with its estimated (and, if verified, measured) peak memory."""

    plan: SubsetPlan
    estimate: MemoryEstimate
    measured: MemoryMeasurement | None
    budget_bytes: int
    score: float  # sum of the plan's unit scores
    score_fraction: float  # share of the whole model's score
    candidates_evaluated: int
    method: str
    prefix_chunk: int | None = None  # the frozen prefix's micro-batch size the device must run (None: whole batch)
    clipping: str = "per_sample"  # the DP clipping mode the device must train this plan with

    @property
    def fits(self) -> bool:
        peak = self.measured.peak_bytes if self.measured is not None else self.estimate.peak_bytes
        return peak <= self.budget_bytes


def default_budget(
    profiles: Sequence[DeviceProfile],
    *,
    fraction: float = DEFAULT_BUDGET_FRACTION,
    admit: Callable[[DeviceProfile], bool] | None = None,
) -> int:
    """Training-memory budget for a fleet: ``fraction`` of the weakest admitted device's RAM.

    FTTE plans for the weakest device so that every admitted device can train the same
    subset (one plan id, one cohort). ``admit`` filters the device classes the server
    accepts (default: all given).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    admitted = [p for p in profiles if admit is None or admit(p)]
    if not admitted:
        raise ValueError("no admitted device profiles to budget for")
    weakest = min(admitted, key=lambda p: p.memory_bytes)
    return int(weakest.memory_bytes * fraction)


def parameter_importance(
    model: nn.Module,
    x: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    loss_fn: nn.Module | None = None,
) -> dict[str, float]:
    """Squared gradient norm of the mean loss per parameter tensor, on a copy of ``model``.

    One ordinary (non-private) backward pass on server-side calibration data
    (``x`` float features, ``y`` integer class labels; tensors or arrays).
    """
    x = torch.as_tensor(x, dtype=torch.float32)
    y = torch.as_tensor(y).long()
    work = copy.deepcopy(model)
    work.train()
    for p in work.parameters():
        p.requires_grad_(True)
        p.grad = None
    loss = (loss_fn or nn.CrossEntropyLoss())(work(x), y)
    loss.backward()
    return {
        name: float(p.grad.detach().double().pow(2).sum()) if p.grad is not None else 0.0
        for name, p in work.named_parameters()
    }


def _units(model: nn.Module, granularity: str) -> list[tuple[str, ...]]:
    names = [n for n, _ in model.named_parameters()]
    if granularity == "tensor":
        return [(n,) for n in names]
    if granularity != "layer":
        raise ValueError(f"granularity must be 'layer' or 'tensor', got {granularity!r}")
    grouped: dict[str, list[str]] = {}
    for n in names:
        grouped.setdefault(layer_of(n), []).append(n)
    return [tuple(v) for v in grouped.values()]


def search_plan(
    model: nn.Module,
    budget_bytes: int,
    setup: TrainingSetup | None = None,
    *,
    batch_size: int | None = None,
    input_shape: tuple[int, ...] | None = None,
    dp: bool = True,
    optimizer: OptimizerKind = "momentum",
    calibration: tuple[torch.Tensor | np.ndarray, torch.Tensor | np.ndarray] | None = None,
    granularity: Literal["layer", "tensor"] = "layer",
    method: Literal["auto", "exhaustive", "greedy"] = "auto",
    exhaustive_limit: int = 12,
    prefix_chunk: PrefixChunk = None,
    verify: bool = False,
    max_retries: int = 3,
    clipping: ClippingMode | Literal["auto"] | None = None,
    max_coordinates: int | None = None,
) -> PlanChoice:
    """The highest-benefit plan whose estimated peak memory is at most ``budget_bytes`` (and which
    trains at most ``max_coordinates`` coordinates, when given: a cap from outside memory, such as
    the user-level DP noise rule of :mod:`ftte.pipeline.strategies`).

    The step is described either by ``setup`` (a :class:`TrainingSetup`, whose batch size,
    input shape, DP flag, optimizer and prefix chunk are used) or by the keyword
    arguments. ``prefix_chunk`` is the micro-batch size the device will run its frozen
    prefix with (see :class:`ftte.edge.plan.FrozenPrefix`); the estimate, and the plan,
    depend on it. ``"auto"`` (given here, it overrides the setup's) lets the search choose
    it per candidate (module docstring). ``calibration`` is ``(x, y)`` server-side data, tensors or arrays.
    ``clipping`` is ``"per_sample"``, ``"ghost"`` or ``"auto"`` (cheaper of the two per
    candidate, see the module docstring); ``None`` takes ``setup.clipping`` (per-sample
    without a setup). It only matters with DP.
    Raises :class:`BudgetTooSmallError` if no plan fits (:class:`CoordinateCapError` when the
    memory alone would admit one but ``max_coordinates`` does not). See the module docstring for
    score, cost and search.
    """
    if setup is not None:
        if batch_size is not None or input_shape is not None:
            raise ValueError("give either setup or batch_size/input_shape, not both")
        batch_size, input_shape = setup.batch_size, setup.input_shape
        dp, optimizer = setup.dp, setup.optimizer
        if prefix_chunk != "auto":
            prefix_chunk = setup.prefix_chunk
        if clipping is None:
            clipping = setup.clipping
    if clipping is None:
        clipping = "per_sample"
    if clipping not in ("per_sample", "ghost", "auto"):
        raise ValueError(f"clipping must be 'per_sample', 'ghost' or 'auto', got {clipping!r}")
    modes: tuple[ClippingMode, ...]
    if not dp:
        modes = ("per_sample",)
    elif clipping == "auto":
        modes = ("per_sample", "ghost")
    else:
        modes = (clipping,)  # type: ignore[assignment]
    if batch_size is None or input_shape is None:
        raise ValueError("search_plan needs a TrainingSetup or both batch_size and input_shape")
    input_shape = tuple(int(s) for s in input_shape)
    if budget_bytes <= 0:
        raise ValueError(f"budget_bytes must be > 0, got {budget_bytes}")
    if max_coordinates is not None and max_coordinates < 0:
        raise ValueError(f"max_coordinates must be >= 0 or None, got {max_coordinates}")
    estimator = MemoryEstimator(model, input_shape)
    units = _units(model, granularity)
    if calibration is not None:
        importance = parameter_importance(model, *calibration)
    else:
        importance = {n: float(p.numel()) for n, p in model.named_parameters()}
    scores = [sum(importance[n] for n in u) for u in units]
    numel = dict((n, p.numel()) for n, p in model.named_parameters())
    sizes = [sum(numel[n] for n in u) for u in units]
    total = sum(scores) or 1.0
    if method == "auto":
        method = "exhaustive" if len(units) <= exhaustive_limit else "greedy"
    if method not in ("exhaustive", "greedy"):
        raise ValueError(f"method must be 'auto', 'exhaustive' or 'greedy', got {method!r}")

    cache: dict[frozenset[int], tuple[SubsetPlan, MemoryEstimate]] = {}

    def cost(chosen: frozenset[int]) -> tuple[SubsetPlan, MemoryEstimate]:
        if chosen not in cache:
            plan = SubsetPlan.from_names(model, [n for i in sorted(chosen) for n in units[i]])
            cache[chosen] = (plan, cheapest_estimate(estimator, plan, batch_size, dp=dp, optimizer=optimizer,
                                                     modes=modes, prefix_chunk=prefix_chunk))
        return cache[chosen]

    limit = int(budget_bytes)
    for _ in range(max_retries + 1):
        best = _search(units, scores, cost, limit, method, sizes, max_coordinates)
        if best is None and max_coordinates is not None and _search(units, scores, cost, limit, method) is not None:
            fitting = [i for i in range(len(units)) if cost(frozenset({i}))[1].peak_bytes <= limit] or list(range(len(units)))
            small = min(fitting, key=lambda i: sizes[i])
            raise CoordinateCapError(
                f"no subset plan within {limit} bytes trains at most {max_coordinates} coordinates; the smallest "
                f"that fits, {list(units[small])}, trains {sizes[small]}", smallest=sizes[small])
        if best is None:
            cheapest = min((cost(frozenset({i}))[1].peak_bytes, i) for i in range(len(units)))
            raise BudgetTooSmallError(
                f"no subset plan fits {limit} bytes (budget {budget_bytes}); the cheapest, "
                f"{list(units[cheapest[1]])}, needs about {cheapest[0]} bytes at batch size {batch_size}. "
                "Lower the batch size or raise the budget."
            )
        plan, est = cost(best)
        measured = None
        if verify:
            runs = [
                measure_training_memory(
                    model,
                    plan,
                    TrainingSetup(
                        batch_size, input_shape, dp=dp, optimizer=optimizer, prefix_chunk=est.prefix_chunk,
                        clipping=mode,
                    ),
                )
                for mode in modes
            ]
            measured = min(runs, key=lambda m: m.peak_bytes)
            if measured.clipping != est.clipping:  # the measurement decides between the modes
                est = estimator.estimate(
                    plan, batch_size, dp=dp, optimizer=optimizer, prefix_chunk=est.prefix_chunk,
                    clipping=measured.clipping,
                )
            if measured.peak_bytes > budget_bytes:
                # the estimate was optimistic for this plan: shrink the limit by the overshoot and retry
                limit = int(limit * budget_bytes / measured.peak_bytes) - 1
                continue
        score = sum(scores[i] for i in best)
        return PlanChoice(
            plan, est, measured, int(budget_bytes), score, score / total, len(cache), method, est.prefix_chunk,
            est.clipping,
        )
    raise BudgetTooSmallError(f"no plan's measured peak fit {budget_bytes} bytes after {max_retries} retries")


def _search(
    units: list[tuple[str, ...]],
    scores: list[float],
    cost: Callable[[frozenset[int]], tuple[SubsetPlan, MemoryEstimate]],
    limit: int,
    method: str,
    sizes: Sequence[int] = (),
    max_coordinates: int | None = None,
) -> frozenset[int] | None:
    """Indices of the best-scoring unit set whose estimate fits ``limit`` and, with ``max_coordinates``,
    whose units' ``sizes`` add up to at most it (``None`` if none does)."""
    n = len(units)

    def fits(chosen: frozenset[int]) -> bool:
        if max_coordinates is not None and sum(sizes[i] for i in chosen) > max_coordinates:
            return False
        return cost(chosen)[1].peak_bytes <= limit

    def key(chosen: frozenset[int]) -> tuple[float, int]:
        return (sum(scores[i] for i in chosen), -cost(chosen)[1].peak_bytes)

    best: frozenset[int] | None = None
    if method == "exhaustive":
        for r in range(1, n + 1):
            for combo in itertools.combinations(range(n), r):
                chosen = frozenset(combo)
                if fits(chosen) and (best is None or key(chosen) > key(best)):
                    best = chosen
        return best
    for first in range(n):
        chosen = frozenset({first})
        if not fits(chosen):
            continue
        while True:
            here = cost(chosen)[1].peak_bytes
            options = []
            for j in range(first + 1, n):
                if j in chosen:
                    continue
                grown = chosen | {j}
                if fits(grown):
                    options.append((scores[j] / max(1, cost(grown)[1].peak_bytes - here), j))
            if not options:
                break
            chosen = chosen | {max(options)[1]}
        if best is None or key(chosen) > key(best):
            best = chosen
    return best


# --------------------------------------------------------------------------------------
# contribution analysis: candidates scored by what a few noisy steps actually buy
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanContribution:
    """What a few DP-SGD steps of one candidate plan did to the held-out calibration loss."""

    plan: SubsetPlan
    clipping: str
    estimate: MemoryEstimate | None
    loss_before: float
    loss_after: float  # mean over repeats
    loss_drop: float  # mean over repeats of before - after (higher is better)
    loss_drop_stderr: float  # standard error of that mean (0 with one repeat)
    repeats: int

    def to_dict(self) -> dict:
        return {
            "plan_id": self.plan.plan_id,
            "trainable": list(self.plan.trainable),
            "trainable_coordinates": self.plan.num_coordinates,
            "clipping": self.clipping,
            "estimate_bytes": None if self.estimate is None else self.estimate.peak_bytes,
            "loss_before": self.loss_before,
            "loss_after": self.loss_after,
            "loss_drop": self.loss_drop,
            "loss_drop_stderr": self.loss_drop_stderr,
            "repeats": self.repeats,
        }


@dataclass(frozen=True)
class ContributionChoice:
    """The candidate with the largest measured loss drop, and the whole scored table."""

    plan: SubsetPlan
    clipping: str
    estimate: MemoryEstimate
    budget_bytes: int
    scores: tuple[PlanContribution, ...]  # best first

    @property
    def best(self) -> PlanContribution:
        return self.scores[0]


def _setup_of(setup: TrainingSetup, clipping: str) -> TrainingSetup:
    return TrainingSetup(
        setup.batch_size, setup.input_shape, dp=setup.dp, optimizer=setup.optimizer,
        num_classes=setup.num_classes, prefix_chunk=setup.prefix_chunk, clipping=clipping,  # type: ignore[arg-type]
    )


def candidate_plans(
    model: nn.Module,
    budget_bytes: int,
    setup: TrainingSetup,
    *,
    clipping: ClippingMode | Literal["auto"] = "auto",
    granularity: Literal["layer", "tensor"] = "layer",
    include: Sequence[SubsetPlan] = (),
    slice_fractions: Sequence[float] = (0.25, 0.5),
    prefix_chunk: Literal["auto"] | None = None,
) -> list[tuple[SubsetPlan, MemoryEstimate]]:
    """Plans worth scoring that fit ``budget_bytes`` by estimate, each with its cheaper clipping mode.

    Every head (the last ``k`` units, ``k = 1..n``); for every head whose first unit is a
    whole ``Conv2d``/``Linear`` layer, the same head with that layer cut to each of
    ``slice_fractions`` of its output channels (a channel slice, see
    :mod:`ftte.edge.plan`), so a budget can buy part of a layer; every single unit; and
    ``include``. Duplicates removed, in that order. ``clipping`` as in :func:`search_plan`;
    ``prefix_chunk="auto"`` costs each candidate at its best prefix chunk (as
    :func:`search_plan` does), ``None`` at the setup's.
    """
    if clipping not in ("per_sample", "ghost", "auto"):
        raise ValueError(f"clipping must be 'per_sample', 'ghost' or 'auto', got {clipping!r}")
    modes = ("per_sample",) if not setup.dp else (("per_sample", "ghost") if clipping == "auto" else (clipping,))
    estimator = MemoryEstimator(model, setup.input_shape)
    units = _units(model, granularity)
    plans: list[SubsetPlan] = []
    children = dict(model.named_children())
    for k in range(1, len(units) + 1):
        names = [n for u in units[-k:] for n in u]
        plans.append(SubsetPlan.from_names(model, names))
        first = layer_of(units[-k][0])
        layer = children.get(first)
        whole_layer = {n for n, _ in model.named_parameters() if layer_of(n) == first} == set(units[-k])
        if whole_layer and isinstance(layer, (nn.Conv2d, nn.Linear)) and getattr(layer, "groups", 1) == 1:
            rows = int(layer.weight.shape[0])
            for f in slice_fractions:
                cut = int(round(f * rows))
                if 1 <= cut < rows:
                    plans.append(SubsetPlan.with_slices(model, names, {first: cut}))
    plans += [SubsetPlan.from_names(model, u) for u in units]
    plans += list(include)
    out: list[tuple[SubsetPlan, MemoryEstimate]] = []
    seen: set[str] = set()
    for plan in plans:
        if plan.plan_id in seen:
            continue
        seen.add(plan.plan_id)
        est = cheapest_estimate(estimator, plan, setup.batch_size, dp=setup.dp, optimizer=setup.optimizer,
                                modes=modes,  # type: ignore[arg-type]
                                prefix_chunk="auto" if prefix_chunk == "auto" else setup.prefix_chunk)
        if est.peak_bytes <= budget_bytes:
            out.append((plan, est))
    return out


def contribution_scores(
    model: nn.Module,
    candidates: Sequence[SubsetPlan | tuple[SubsetPlan, MemoryEstimate]],
    calibration: tuple[torch.Tensor | np.ndarray, torch.Tensor | np.ndarray],
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    lr: float,
    batch_size: int,
    steps: int = 5,
    repeats: int = 3,
    optimizer: OptimizerKind = "sgd",
    dp: bool = True,
    seed: int = 0,
    loss_fn: nn.Module | None = None,
) -> list[PlanContribution]:
    """Score each candidate by the calibration-loss drop of ``steps`` DP-SGD steps; best first.

    ``calibration`` is server-held ``(x, y)`` (see the module docstring for why it must
    not be device data or the test set). It is split once, by ``seed``, into a half the
    steps train on and a half the loss is measured on. Each repeat draws its batches
    (``batch_size`` samples without replacement) and its noise seed once and uses them for
    every candidate (common random numbers), so differences between candidates are not
    differences between batches. A candidate given with its estimate is trained in the
    estimate's clipping mode (the result does not depend on the mode, only the memory
    does). ``model`` is not modified.
    """
    if steps < 1 or repeats < 1 or batch_size < 1:
        raise ValueError("steps, repeats and batch_size must be >= 1")
    from ftte.edge.step import StepConfig, SubsetStep

    x = torch.as_tensor(calibration[0], dtype=torch.float32)
    y = torch.as_tensor(calibration[1]).long()
    if len(x) != len(y) or len(y) < 4:
        raise ValueError(f"calibration needs matching x and y with at least 4 samples, got {len(x)} and {len(y)}")
    criterion = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(len(y), generator=gen)
    half = len(y) // 2
    tr_idx, ev_idx = perm[:half], perm[half:]
    x_ev, y_ev = x[ev_idx], y[ev_idx]
    b = min(int(batch_size), len(tr_idx))

    def eval_loss(m: nn.Module) -> float:
        was = m.training
        m.eval()
        with torch.no_grad():
            value = float(criterion(m(x_ev), y_ev))
        m.train(was)
        return value

    loss_before = eval_loss(model)
    draws = []
    for _ in range(repeats):
        batches = [tr_idx[torch.randperm(len(tr_idx), generator=gen)[:b]] for _ in range(steps)]
        draws.append((batches, int(torch.randint(0, 2**62, (1,), generator=gen))))

    results: list[PlanContribution] = []
    for item in candidates:
        plan, est = (item if isinstance(item, tuple) else (item, None))
        mode = est.clipping if est is not None else "per_sample"
        chunk = est.prefix_chunk if est is not None else None
        drops, afters = [], []
        for batches, noise_seed in draws:
            work = copy.deepcopy(model)
            cfg = StepConfig(dp=dp, optimizer=optimizer, lr=lr, noise_multiplier=noise_multiplier,
                             max_grad_norm=max_grad_norm, clipping=mode, prefix_chunk=chunk)  # type: ignore[arg-type]
            step = SubsetStep(work, plan, cfg, expected_batch_size=b, loss_fn=copy.deepcopy(criterion),
                              generator=torch.Generator().manual_seed(noise_seed))
            for idx in batches:
                step(x[idx], y[idx])
            step.zero_grad()
            after = eval_loss(work)
            afters.append(after)
            drops.append(loss_before - after)
        mean = float(np.mean(drops))
        stderr = float(np.std(drops, ddof=1) / np.sqrt(len(drops))) if len(drops) > 1 else 0.0
        results.append(PlanContribution(plan, mode, est, loss_before, float(np.mean(afters)), mean, stderr, repeats))
    results.sort(key=lambda r: (-r.loss_drop, r.plan.num_coordinates))
    return results


def choose_plan_by_contribution(
    model: nn.Module,
    budget_bytes: int,
    setup: TrainingSetup,
    calibration: tuple[torch.Tensor | np.ndarray, torch.Tensor | np.ndarray],
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    lr: float,
    steps: int = 5,
    repeats: int = 3,
    clipping: ClippingMode | Literal["auto"] = "auto",
    granularity: Literal["layer", "tensor"] = "layer",
    seed: int = 0,
    prefix_chunk: Literal["auto"] | None = None,
) -> ContributionChoice:
    """The fitting candidate plan whose few noisy steps lower the held-out calibration loss most.

    Candidates come from :func:`candidate_plans` (heads, heads whose first layer is a
    channel slice, single units, and the plan :func:`search_plan` picks by gradient-norm
    score on the same calibration data); each
    is scored by :func:`contribution_scores` at the run's own ``noise_multiplier``,
    ``max_grad_norm``, learning rate and the setup's batch size and optimizer. Raises
    :class:`BudgetTooSmallError` when nothing fits. ``prefix_chunk="auto"``: every candidate
    at its best prefix chunk (``ContributionChoice.estimate.prefix_chunk`` says which).
    Module docstring: assumptions.
    """
    try:
        searched = [search_plan(model, budget_bytes, setup, calibration=calibration, clipping=clipping,
                                prefix_chunk=prefix_chunk).plan]
    except BudgetTooSmallError:
        searched = []
    cands = candidate_plans(model, budget_bytes, setup, clipping=clipping, granularity=granularity, include=searched,
                            prefix_chunk=prefix_chunk)
    if not cands:
        raise BudgetTooSmallError(f"no candidate plan fits {budget_bytes} bytes at batch size {setup.batch_size}")
    scores = contribution_scores(
        model, cands, calibration, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, lr=lr,
        batch_size=setup.batch_size, steps=steps, repeats=repeats, optimizer=setup.optimizer, dp=setup.dp,
        seed=seed,
    )
    best = scores[0]
    assert best.estimate is not None
    return ContributionChoice(best.plan, best.clipping, best.estimate, int(budget_bytes), tuple(scores))

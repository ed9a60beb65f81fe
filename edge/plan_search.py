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

With ``verify=True`` the chosen plan is also measured (a real Opacus step); if the
measurement exceeds the budget, the search repeats with the budget shrunk by the
overshoot, so the returned plan's *measured* peak fits.
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
    "PlanChoice",
    "default_budget",
    "parameter_importance",
    "search_plan",
]

#: Share of the weakest device's RAM given to the training working set. The rest is the
#: OS, other apps, the Python/torch runtime and allocator slack, none of which the memory
#: estimate counts; a quarter is a conservative default for phones and tablets.
DEFAULT_BUDGET_FRACTION = 0.25


class BudgetTooSmallError(ValueError):
    """Not even the cheapest single-unit plan fits the memory budget."""


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
    prefix_chunk: int | None = None  # the micro-batch size the estimate assumed for the frozen prefix
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
    prefix_chunk: int | None = None,
    verify: bool = False,
    max_retries: int = 3,
    clipping: ClippingMode | Literal["auto"] | None = None,
) -> PlanChoice:
    """The highest-benefit plan whose estimated peak memory is at most ``budget_bytes``.

    The step is described either by ``setup`` (a :class:`TrainingSetup`, whose batch size,
    input shape, DP flag, optimizer and prefix chunk are used) or by the keyword
    arguments. ``prefix_chunk`` is the micro-batch size the device will run its frozen
    prefix with (see :class:`ftte.edge.plan.FrozenPrefix`); the estimate, and the plan,
    depend on it. ``calibration`` is ``(x, y)`` server-side data, tensors or arrays.
    ``clipping`` is ``"per_sample"``, ``"ghost"`` or ``"auto"`` (cheaper of the two per
    candidate, see the module docstring); ``None`` takes ``setup.clipping`` (per-sample
    without a setup). It only matters with DP.
    Raises :class:`BudgetTooSmallError` if no plan fits. See the module docstring for
    score, cost and search.
    """
    if setup is not None:
        if batch_size is not None or input_shape is not None:
            raise ValueError("give either setup or batch_size/input_shape, not both")
        batch_size, input_shape = setup.batch_size, setup.input_shape
        dp, optimizer, prefix_chunk = setup.dp, setup.optimizer, setup.prefix_chunk
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
    estimator = MemoryEstimator(model, input_shape)
    units = _units(model, granularity)
    if calibration is not None:
        importance = parameter_importance(model, *calibration)
    else:
        importance = {n: float(p.numel()) for n, p in model.named_parameters()}
    scores = [sum(importance[n] for n in u) for u in units]
    total = sum(scores) or 1.0
    if method == "auto":
        method = "exhaustive" if len(units) <= exhaustive_limit else "greedy"
    if method not in ("exhaustive", "greedy"):
        raise ValueError(f"method must be 'auto', 'exhaustive' or 'greedy', got {method!r}")

    cache: dict[frozenset[int], tuple[SubsetPlan, MemoryEstimate]] = {}

    def cost(chosen: frozenset[int]) -> tuple[SubsetPlan, MemoryEstimate]:
        if chosen not in cache:
            plan = SubsetPlan.from_names(model, [n for i in sorted(chosen) for n in units[i]])
            options = [
                estimator.estimate(
                    plan, batch_size, dp=dp, optimizer=optimizer, prefix_chunk=prefix_chunk, clipping=mode
                )
                for mode in modes
            ]
            cache[chosen] = (plan, min(options, key=lambda e: e.peak_bytes))  # first (per-sample) on ties
        return cache[chosen]

    limit = int(budget_bytes)
    for _ in range(max_retries + 1):
        best = _search(units, scores, cost, limit, method)
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
                        batch_size, input_shape, dp=dp, optimizer=optimizer, prefix_chunk=prefix_chunk, clipping=mode
                    ),
                )
                for mode in modes
            ]
            measured = min(runs, key=lambda m: m.peak_bytes)
            if measured.clipping != est.clipping:  # the measurement decides between the modes
                est = estimator.estimate(
                    plan, batch_size, dp=dp, optimizer=optimizer, prefix_chunk=prefix_chunk, clipping=measured.clipping
                )
            if measured.peak_bytes > budget_bytes:
                # the estimate was optimistic for this plan: shrink the limit by the overshoot and retry
                limit = int(limit * budget_bytes / measured.peak_bytes) - 1
                continue
        score = sum(scores[i] for i in best)
        return PlanChoice(
            plan, est, measured, int(budget_bytes), score, score / total, len(cache), method, prefix_chunk,
            est.clipping,
        )
    raise BudgetTooSmallError(f"no plan's measured peak fit {budget_bytes} bytes after {max_retries} retries")


def _search(
    units: list[tuple[str, ...]],
    scores: list[float],
    cost: Callable[[frozenset[int]], tuple[SubsetPlan, MemoryEstimate]],
    limit: int,
    method: str,
) -> frozenset[int] | None:
    """Indices of the best-scoring unit set whose estimate fits ``limit`` (``None`` if none does)."""
    n = len(units)

    def key(chosen: frozenset[int]) -> tuple[float, int]:
        return (sum(scores[i] for i in chosen), -cost(chosen)[1].peak_bytes)

    best: frozenset[int] | None = None
    if method == "exhaustive":
        for r in range(1, n + 1):
            for combo in itertools.combinations(range(n), r):
                chosen = frozenset(combo)
                if cost(chosen)[1].peak_bytes <= limit and (best is None or key(chosen) > key(best)):
                    best = chosen
        return best
    for first in range(n):
        chosen = frozenset({first})
        if cost(chosen)[1].peak_bytes > limit:
            continue
        while True:
            here = cost(chosen)[1].peak_bytes
            options = []
            for j in range(first + 1, n):
                if j in chosen:
                    continue
                grown = chosen | {j}
                peak = cost(grown)[1].peak_bytes
                if peak <= limit:
                    options.append((scores[j] / max(1, peak - here), j))
            if not options:
                break
            chosen = chosen | {max(options)[1]}
        if best is None or key(chosen) > key(best):
            best = chosen
    return best

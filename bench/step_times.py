"""Side-by-side DP-SGD step times: full model vs budgeted subset, private vs non-private.

Shared CPUs are noisy, so the four configurations are timed in one process, interleaved
round-robin (one step of each per round), and compared by median. The ratios are what
matter; absolute milliseconds depend on the machine.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass

import torch

from ftte.edge.memory import MemoryEstimator
from ftte.edge.models import build_model, model_input_shape
from ftte.edge.plan import SubsetPlan
from ftte.edge.plan_search import search_plan
from ftte.edge.step import StepConfig, SubsetStep

__all__ = ["StepBench", "make_step", "subset_plan_for", "compare_step_times"]


@dataclass
class StepBench:
    """A ready-to-run step with its batch (what a benchmark round calls)."""

    name: str
    step: SubsetStep
    x: torch.Tensor
    y: torch.Tensor

    def __call__(self) -> float:
        return self.step(self.x, self.y)  # the step clears the previous gradients itself


def subset_plan_for(
    model: torch.nn.Module,
    input_shape: tuple[int, ...],
    batch_size: int,
    budget_fraction: float,
    prefix_chunk: int | None = None,
) -> SubsetPlan:
    """The plan the memory command would pick: budget = fraction of the full model's estimated DP peak."""
    full = MemoryEstimator(model, input_shape).estimate(SubsetPlan.full(model), batch_size, dp=True)
    choice = search_plan(
        model,
        int(budget_fraction * full.peak_bytes),
        batch_size=batch_size,
        input_shape=input_shape,
        prefix_chunk=prefix_chunk,
    )
    return choice.plan


def make_step(
    model: torch.nn.Module,
    plan: SubsetPlan,
    *,
    dp: bool,
    batch_size: int,
    input_shape: tuple[int, ...],
    seed: int = 0,
    prefix_chunk: int | None = None,
) -> StepBench:
    """A :class:`StepBench` on a private copy of ``model`` with a fixed random batch."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch_size,) + tuple(input_shape), generator=gen)
    with torch.no_grad():
        classes = int(model(x[:1]).shape[-1])
    y = torch.randint(0, classes, (batch_size,), generator=gen)
    step = SubsetStep(
        copy.deepcopy(model),
        plan,
        StepConfig(dp=dp, prefix_chunk=prefix_chunk),
        expected_batch_size=batch_size,
        generator=torch.Generator().manual_seed(seed + 1),
    )
    name = f"{'full' if plan.is_full() else 'subset'}_{'private' if dp else 'nonprivate'}"
    return StepBench(name, step, x, y)


def compare_step_times(
    model_name: str = "cnn28",
    *,
    batch_size: int = 64,
    budget_fraction: float = 0.2,
    rounds: int = 30,
    warmup: int = 3,
    seed: int = 0,
    prefix_chunk: int | None = None,
) -> dict:
    """Median step time of four configurations, interleaved in one run, and their ratios."""
    torch.manual_seed(seed)
    model = build_model(model_name)
    shape = model_input_shape(model_name)
    subset = subset_plan_for(model, shape, batch_size, budget_fraction, prefix_chunk)
    full = SubsetPlan.full(model)
    benches = [
        make_step(model, plan, dp=dp, batch_size=batch_size, input_shape=shape, seed=seed, prefix_chunk=prefix_chunk)
        for plan in (full, subset)
        for dp in (True, False)
    ]
    times: dict[str, list[float]] = {b.name: [] for b in benches}
    for r in range(warmup + rounds):
        for b in benches:
            t0 = time.perf_counter()
            b()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[b.name].append(dt)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return {
        "model": model_name,
        "batch_size": batch_size,
        "rounds": rounds,
        "prefix_chunk": prefix_chunk,
        "threads": torch.get_num_threads(),
        "plan_id": subset.plan_id,
        "trainable": list(subset.trainable),
        "median_seconds": {k: round(v, 6) for k, v in med.items()},
        "ratios": {
            # the target: DP-SGD on the subset costs at most 1.5x plain SGD on the same subset
            "subset_private_over_subset_nonprivate": round(med["subset_private"] / med["subset_nonprivate"], 3),
            "full_private_over_full_nonprivate": round(med["full_private"] / med["full_nonprivate"], 3),
            "subset_private_over_full_private": round(med["subset_private"] / med["full_private"], 3),
        },
    }


if __name__ == "__main__":  # pragma: no cover
    import json

    print(json.dumps(compare_step_times(), indent=2))

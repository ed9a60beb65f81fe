"""DP-SGD step time: budgeted subset vs full model, private vs non-private.

Run with timings: ``pytest bench/test_bench_dpsgd.py --benchmark-enable``. Without
``--benchmark-enable`` (the project default) each benchmark body runs once, as a smoke
test. The four configurations share one benchmark group so pytest-benchmark prints them
side by side; ``test_side_by_side_ratios`` times them interleaved in one loop, which is
the fairer comparison on a noisy machine, and records the ratios in ``extra_info``.

Target: a private step on the subset plan costs at most 1.5x a non-private step on the
same plan.
"""

from __future__ import annotations

import math

import pytest

from ftte.bench.step_times import compare_step_times, make_step, subset_plan_for
from ftte.edge.models import build_model, model_input_shape
from ftte.edge.plan import SubsetPlan

MODEL = "cnn28"
BATCH = 64
BUDGET_FRACTION = 0.2
GROUP = f"dpsgd-step-{MODEL}-b{BATCH}"


@pytest.fixture(scope="module")
def setting():
    model = build_model(MODEL)
    shape = model_input_shape(MODEL)
    plans = {"full": SubsetPlan.full(model), "subset": subset_plan_for(model, shape, BATCH, BUDGET_FRACTION)}
    return model, shape, plans


@pytest.mark.parametrize("dp", [True, False], ids=["private", "nonprivate"])
@pytest.mark.parametrize("which", ["subset", "full"])
def test_dpsgd_step(benchmark, setting, which: str, dp: bool) -> None:
    model, shape, plans = setting
    bench = make_step(model, plans[which], dp=dp, batch_size=BATCH, input_shape=shape)
    bench()  # warm-up outside the timer (first call allocates optimizer state)
    benchmark.group = GROUP
    benchmark.extra_info.update(plan_id=plans[which].plan_id, coordinates=plans[which].num_coordinates, dp=dp)
    loss = benchmark.pedantic(bench, rounds=15, iterations=1, warmup_rounds=2)
    assert math.isfinite(loss)


def test_side_by_side_ratios(benchmark) -> None:
    result = benchmark.pedantic(
        compare_step_times,
        kwargs={"model_name": MODEL, "batch_size": BATCH, "budget_fraction": BUDGET_FRACTION, "rounds": 10},
        rounds=1,
        iterations=1,
    )
    benchmark.group = f"{GROUP}-side-by-side"
    benchmark.extra_info.update(result["ratios"])
    ratios = result["ratios"]
    # Generous bounds: this asserts the shape of the result, not the machine's noise.
    assert ratios["subset_private_over_full_private"] < 1.0
    assert 0.5 < ratios["subset_private_over_subset_nonprivate"] < 3.0

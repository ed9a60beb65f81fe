"""Plan search under a memory budget, and the fleet budget helper."""

from __future__ import annotations

import pytest
import torch

from ftte.edge.memory import MemoryEstimator, TrainingSetup, measure_training_memory
from ftte.edge.models import build_model
from ftte.edge.plan import SubsetPlan
from ftte.edge.plan_search import (
    DEFAULT_BUDGET_FRACTION,
    BudgetTooSmallError,
    default_budget,
    parameter_importance,
    search_plan,
)
from ftte.edge.profile import DeviceProfile


def _full_dp_peak(model, shape, batch_size: int) -> int:
    return measure_training_memory(model, SubsetPlan.full(model), TrainingSetup(batch_size, shape)).peak_bytes


@pytest.mark.parametrize("name, shape, fraction", [("cnn28", (1, 28, 28), 0.2), ("cnn8", (1, 8, 8), 0.3)])
def test_chosen_plan_measured_peak_fits_the_budget(name: str, shape: tuple, fraction: float) -> None:
    model = build_model(name)
    full = _full_dp_peak(model, shape, 32)
    budget = int(fraction * full)
    choice = search_plan(model, budget, batch_size=32, input_shape=shape, verify=True)
    assert choice.measured is not None
    assert choice.measured.peak_bytes <= budget
    assert choice.estimate.peak_bytes <= budget
    assert choice.fits and not choice.plan.is_full()
    # independent re-measurement of the returned plan agrees
    again = measure_training_memory(model, choice.plan, TrainingSetup(32, shape))
    assert again.peak_bytes <= budget


def test_too_small_budget_raises_a_clear_error() -> None:
    model = build_model("cnn28")
    with pytest.raises(BudgetTooSmallError, match="no subset plan fits .*cheapest.*batch size 32"):
        search_plan(model, 100_000, batch_size=32, input_shape=(1, 28, 28))
    with pytest.raises(ValueError):
        search_plan(model, 0, batch_size=32, input_shape=(1, 28, 28))


def test_bigger_budget_never_scores_lower_and_ample_budget_trains_everything() -> None:
    model = build_model("cnn8")
    shape = (1, 8, 8)
    full_est = MemoryEstimator(model, shape).estimate(SubsetPlan.full(model), 16)
    scores = []
    for fraction in (0.15, 0.3, 0.6, 1.0):
        choice = search_plan(model, int(fraction * full_est.peak_bytes), batch_size=16, input_shape=shape)
        assert choice.estimate.peak_bytes <= choice.budget_bytes
        scores.append(choice.score)
    assert scores == sorted(scores)
    assert search_plan(model, full_est.peak_bytes, batch_size=16, input_shape=shape).plan.is_full()


def test_greedy_fits_and_is_no_better_than_exhaustive() -> None:
    model = build_model("cnn28")
    shape = (1, 28, 28)
    full_est = MemoryEstimator(model, shape).estimate(SubsetPlan.full(model), 16)
    for fraction in (0.3, 0.5):
        budget = int(fraction * full_est.peak_bytes)
        exact = search_plan(model, budget, batch_size=16, input_shape=shape, method="exhaustive")
        greedy = search_plan(model, budget, batch_size=16, input_shape=shape, method="greedy")
        assert greedy.estimate.peak_bytes <= budget
        assert greedy.score <= exact.score + 1e-9
        assert greedy.candidates_evaluated < exact.candidates_evaluated


def test_calibrated_importance_on_real_digits() -> None:
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    digits = load_digits()
    x = torch.tensor(digits.images[:64] / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target[:64])
    model = build_model("cnn8")
    scores = parameter_importance(model, x, y)
    assert set(scores) == {n for n, _ in model.named_parameters()}
    assert all(v >= 0 for v in scores.values()) and sum(scores.values()) > 0
    assert all(p.grad is None for p in model.parameters()), "importance must not touch the model"
    full_est = MemoryEstimator(model, (1, 8, 8)).estimate(SubsetPlan.full(model), 16)
    choice = search_plan(
        model, int(0.4 * full_est.peak_bytes), batch_size=16, input_shape=(1, 8, 8), calibration=(x, y)
    )
    assert 0 < choice.score_fraction < 1


def test_tensor_granularity_can_split_a_layer() -> None:
    model = build_model("cnn8")
    full_est = MemoryEstimator(model, (1, 8, 8)).estimate(SubsetPlan.full(model), 16)
    choice = search_plan(
        model, int(0.3 * full_est.peak_bytes), batch_size=16, input_shape=(1, 8, 8), granularity="tensor"
    )
    assert choice.estimate.peak_bytes <= choice.budget_bytes
    with pytest.raises(ValueError, match="granularity"):
        search_plan(model, 10**9, batch_size=16, input_shape=(1, 8, 8), granularity="channel")  # type: ignore[arg-type]


def test_default_budget_is_a_fraction_of_the_weakest_admitted_device() -> None:
    fleet = [
        DeviceProfile("phone", 4 * 2**30),
        DeviceProfile("watch", 512 * 2**20, availability=0.3),
        DeviceProfile("tablet", 8 * 2**30),
    ]
    assert default_budget(fleet) == int(512 * 2**20 * DEFAULT_BUDGET_FRACTION)
    assert default_budget(fleet, fraction=0.5) == 256 * 2**20
    assert default_budget(fleet, admit=lambda p: p.availability > 0.5) == int(4 * 2**30 * DEFAULT_BUDGET_FRACTION)
    with pytest.raises(ValueError, match="no admitted"):
        default_budget(fleet, admit=lambda p: False)
    with pytest.raises(ValueError, match="fraction"):
        default_budget(fleet, fraction=0.0)


def test_setup_form_and_numpy_calibration() -> None:
    import numpy as np

    from ftte.edge.memory import TrainingSetup

    model = build_model("mlp")
    setup = TrainingSetup(batch_size=16, input_shape=(64,), dp=True, optimizer="sgd", num_classes=10)
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((32, 64)).astype(np.float32), rng.integers(0, 10, 32)
    budget = int(0.5 * MemoryEstimator(model, (64,)).estimate(SubsetPlan.full(model), 16, optimizer="sgd").peak_bytes)
    choice = search_plan(model, budget, setup, calibration=calib)
    assert choice.estimate.peak_bytes <= budget and not choice.plan.is_full()
    with pytest.raises(ValueError, match="either setup"):
        search_plan(model, budget, setup, batch_size=16)
    with pytest.raises(ValueError, match="needs a TrainingSetup"):
        search_plan(model, budget)


def test_auto_clipping_buys_the_linear_head_that_per_sample_clipping_cannot_fit() -> None:
    """cnn28 at batch 32: its two-Linear head needs ~20 MB with per-sample gradients but
    ~7.4 MB with ghost clipping; under an 8 MB budget only ghost clipping trains it."""
    model = build_model("cnn28")
    shape = (1, 28, 28)
    budget = 8_000_000
    per = search_plan(model, budget, batch_size=32, input_shape=shape, verify=True)
    auto = search_plan(model, budget, batch_size=32, input_shape=shape, verify=True, clipping="auto")
    assert per.clipping == "per_sample" and auto.clipping == "ghost"
    assert auto.measured is not None and auto.measured.clipping == "ghost" and auto.fits
    assert auto.estimate.clipping == "ghost"
    assert {"13.weight", "15.weight"} <= set(auto.plan.trainable)
    assert auto.plan.num_coordinates > per.plan.num_coordinates
    assert auto.score > per.score
    # an independent measurement in the chosen mode fits too
    again = measure_training_memory(model, auto.plan, TrainingSetup(32, shape, clipping="ghost"))
    assert again.peak_bytes <= budget


def test_auto_clipping_keeps_per_sample_where_ghost_costs_more() -> None:
    """A conv-heavy plan is dearer under ghost clipping (retained graph, second backward),
    so with an ample budget the full model keeps per-sample clipping when that is cheaper."""
    model = build_model("cnn8")
    shape = (1, 8, 8)
    est = MemoryEstimator(model, shape)
    plan = SubsetPlan.from_layers(model, ["3", "10"])
    per, ghost = (est.estimate(plan, 16, clipping=m).peak_bytes for m in ("per_sample", "ghost"))
    assert ghost > per
    choice = search_plan(model, per, batch_size=16, input_shape=shape, clipping="auto",
                         calibration=None, granularity="layer")
    assert choice.estimate.peak_bytes <= per
    assert choice.estimate.peak_bytes == min(
        est.estimate(choice.plan, 16, clipping=m).peak_bytes for m in ("per_sample", "ghost")
    )
    nodp = search_plan(model, per, batch_size=16, input_shape=shape, dp=False, clipping="auto")
    assert nodp.clipping == "per_sample"
    with pytest.raises(ValueError, match="clipping"):
        search_plan(model, per, batch_size=16, input_shape=shape, clipping="fast")  # type: ignore[arg-type]

"""Contribution analysis: candidate plans scored by the loss drop of a few noisy DP steps."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from ftte.edge.memory import MemoryEstimator, TrainingSetup
from ftte.edge.models import build_model
from ftte.edge.plan import SubsetPlan
from ftte.edge.plan_search import (
    BudgetTooSmallError,
    candidate_plans,
    choose_plan_by_contribution,
    contribution_scores,
)


def _calibration(n: int = 400):
    d = load_digits()
    rng = np.random.default_rng(0)
    idx = rng.choice(len(d.target), n, replace=False)
    x = (d.data[idx] / 16.0 - 0.3).astype(np.float32)
    return x, d.target[idx].astype(np.int64)


def _model():
    torch.manual_seed(0)
    return build_model("mlp")


def test_noise_decides_what_a_plan_buys() -> None:
    """Without noise the whole network learns most; under heavy noise per coordinate the
    small last layer does, because every trained coordinate also receives noise."""
    model = _model()
    calib = _calibration()
    setup = TrainingSetup(32, (64,), optimizer="sgd")
    budget = 10**9
    quiet = choose_plan_by_contribution(model, budget, setup, calib, noise_multiplier=1e-3, max_grad_norm=1.0,
                                        lr=0.5, steps=8, repeats=2)
    loud = choose_plan_by_contribution(model, budget, setup, calib, noise_multiplier=5.0, max_grad_norm=1.0,
                                       lr=0.5, steps=8, repeats=2)
    assert loud.plan.num_coordinates < quiet.plan.num_coordinates
    # the full plan is among the candidates and is hurt by the noise
    full = next(s for s in loud.scores if s.plan.is_full())
    assert full.loss_drop < 0 < loud.best.loss_drop
    assert quiet.plan.is_full() and quiet.best.loss_drop > 0
    assert all(s.loss_before == loud.best.loss_before for s in loud.scores)
    assert [s.loss_drop for s in loud.scores] == sorted((s.loss_drop for s in loud.scores), reverse=True)


def test_scores_are_reproducible_and_leave_the_model_alone() -> None:
    model = _model()
    before = copy.deepcopy(model.state_dict())
    calib = _calibration(200)
    plans = [SubsetPlan.from_layers(model, ["5"]), SubsetPlan.from_layers(model, ["3", "5"])]
    kw = dict(noise_multiplier=1.0, max_grad_norm=1.0, lr=0.2, batch_size=16, steps=3, repeats=2, seed=5)
    a = contribution_scores(model, plans, calib, **kw)
    b = contribution_scores(model, plans, calib, **kw)
    assert [(s.plan.plan_id, s.loss_drop) for s in a] == [(s.plan.plan_id, s.loss_drop) for s in b]
    c = contribution_scores(model, plans, calib, **{**kw, "seed": 6})
    assert [s.loss_drop for s in c] != [s.loss_drop for s in a]
    for k, v in model.state_dict().items():
        assert torch.equal(before[k], v)
    assert all(s.repeats == 2 and s.loss_drop_stderr >= 0 for s in a)
    with pytest.raises(ValueError, match="calibration"):
        contribution_scores(model, plans, (calib[0][:2], calib[1][:2]), **kw)


def test_candidates_fit_the_budget_and_carry_their_clipping_mode() -> None:
    model = build_model("cnn28")
    setup = TrainingSetup(32, (1, 28, 28))
    est = MemoryEstimator(model, (1, 28, 28))
    cands = candidate_plans(model, 8_000_000, setup, clipping="auto")
    assert cands and all(e.peak_bytes <= 8_000_000 for _, e in cands)
    by_layers = {p.trainable_layers: e for p, e in cands if not p.slices}
    # the two-Linear head fits only under ghost clipping, so it is a ghost candidate
    assert by_layers[("13", "15")].clipping == "ghost"
    assert est.estimate(SubsetPlan.from_layers(model, ["13", "15"]), 32).peak_bytes > 8_000_000
    per_sample_only = candidate_plans(model, 8_000_000, setup, clipping="per_sample")
    assert ("13", "15") not in {p.trainable_layers for p, _ in per_sample_only if not p.slices}
    with pytest.raises(BudgetTooSmallError):
        choose_plan_by_contribution(model, 1000, setup, _calibration_images(), noise_multiplier=1.0,
                                    max_grad_norm=1.0, lr=0.1)


def _calibration_images():
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)


def test_candidates_include_channel_slices_that_buy_part_of_a_layer() -> None:
    model = build_model("cnn28")
    setup = TrainingSetup(32, (1, 28, 28))
    budget = 8_100_000
    est = MemoryEstimator(model, (1, 28, 28))
    whole = SubsetPlan.from_layers(model, ["8", "9", "13", "15"])
    assert min(est.estimate(whole, 32, clipping=m).peak_bytes for m in ("per_sample", "ghost")) > budget
    cands = candidate_plans(model, budget, setup, clipping="auto")
    sliced = [(p, e) for p, e in cands if p.slices]
    assert sliced, [p.trainable_layers for p, _ in cands]
    # part of conv 8 (a quarter of its filters) fits where the whole layer does not
    part = next(p for p, _ in sliced if p.slices == (("8", 16),))
    assert part.trainable_layers == ("8", "9", "13", "15")
    for p, e in sliced:
        assert e.peak_bytes <= budget and e.trainable_bytes == 4 * p.num_coordinates
        (layer, k), = p.slices
        assert layer == p.trainable_layers[0]
    assert not any(p.slices for p, _ in candidate_plans(model, budget, setup, slice_fractions=()))

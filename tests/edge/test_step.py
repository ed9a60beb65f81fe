"""The device step: ghost clipping gives the same clipped update as per-sample clipping."""

from __future__ import annotations

import copy

import pytest
import torch

from ftte.edge.models import MODELS, build_model, model_input_shape
from ftte.edge.plan import SubsetPlan
from ftte.edge.step import StepConfig, SubsetStep, clipping_compute_factor


def _update(model, plan, clipping: str, x, y, *, noise: float = 0.0, seed: int = 0, max_grad_norm: float = 0.05):
    work = copy.deepcopy(model)
    cfg = StepConfig(dp=True, optimizer="sgd", lr=1.0, noise_multiplier=noise, max_grad_norm=max_grad_norm,
                     clipping=clipping)
    step = SubsetStep(work, plan, cfg, expected_batch_size=len(y), generator=torch.Generator().manual_seed(seed))
    loss = step(x, y)
    before = dict(model.named_parameters())
    delta = torch.cat([(before[n] - p).detach().reshape(-1) for n, p in work.named_parameters() if n in plan.trainable])
    return delta, loss


@pytest.mark.parametrize("name", sorted(MODELS))
def test_ghost_step_equals_per_sample_step_without_noise(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name)
    shape = model_input_shape(name)
    x, y = torch.randn(12, *shape), torch.randint(0, 10, (12,))
    layers = [n for n, m in model.named_children() if any(True for _ in m.parameters())]
    for plan in (SubsetPlan.full(model), SubsetPlan.from_layers(model, layers[-2:])):
        per, loss_per = _update(model, plan, "per_sample", x, y)
        ghost, loss_ghost = _update(model, plan, "ghost", x, y)
        assert loss_per == pytest.approx(loss_ghost, rel=1e-6)
        # the clip bound binds (max_grad_norm is small), so this checks clipping, not plain SGD
        unclipped, _ = _update(model, plan, "per_sample", x, y, max_grad_norm=1e6)
        assert not torch.allclose(per, unclipped, atol=1e-6)
        assert torch.allclose(per, ghost, atol=1e-6, rtol=1e-4), float((per - ghost).abs().max())
        assert float(ghost.norm()) <= 0.05 + 1e-6  # mean of clipped gradients, lr 1


def test_ghost_noise_has_the_per_sample_scale() -> None:
    """Same generator seed: same Gaussian draw in both modes, so the noised updates agree."""
    model = build_model("cnn8")
    plan = SubsetPlan.from_layers(model, ["8", "10"])
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    per, _ = _update(model, plan, "per_sample", x, y, noise=1.0, seed=3)
    ghost, _ = _update(model, plan, "ghost", x, y, noise=1.0, seed=3)
    clean, _ = _update(model, plan, "ghost", x, y)
    assert torch.allclose(per, ghost, atol=1e-5)
    # noise std per coordinate is noise_multiplier * max_grad_norm / batch
    std = float((ghost - clean).std())
    assert 0.8 * 0.05 / 8 < std < 1.2 * 0.05 / 8


def test_ghost_empty_batch_is_a_noise_only_step() -> None:
    model = build_model("mlp")
    plan = SubsetPlan.from_layers(model, ["3"])
    work = copy.deepcopy(model)
    step = SubsetStep(work, plan, StepConfig(dp=True, optimizer="sgd", lr=1.0, clipping="ghost"),
                      expected_batch_size=4, generator=torch.Generator().manual_seed(1))
    step(torch.randn(4, 64), torch.randint(0, 10, (4,)))
    before = work[3].weight.detach().clone()
    loss = step(torch.zeros(0, 64), torch.zeros(0, dtype=torch.long))
    assert loss != loss  # nan
    assert not torch.equal(before, work[3].weight.detach())  # noise moved the weights


def test_clipping_mode_is_validated_and_priced() -> None:
    with pytest.raises(ValueError, match="clipping"):
        StepConfig(clipping="fast")  # type: ignore[arg-type]
    assert clipping_compute_factor("ghost") == 2.0
    assert clipping_compute_factor("per_sample") == 1.0
    assert clipping_compute_factor("ghost", dp=False) == 1.0
    with pytest.raises(ValueError):
        clipping_compute_factor("other")


def test_simulated_compute_charges_ghost_clipping_its_second_backward() -> None:
    from ftte.pipeline.work import layer_macs, macs_per_sample

    model = build_model("cnn28")
    layers = layer_macs(model, (1, 28, 28))
    forward = sum(l.macs for l in layers)
    suffix = sum(l.macs for l in layers if int(l.name) >= 13)
    per = macs_per_sample(layers, "13", True)
    ghost = macs_per_sample(layers, "13", True, "ghost")
    # per-sample: forward + backward + per-sample gradients of both Linear layers
    assert per == forward + 2 * suffix + suffix
    # ghost: a second suffix backward, and only the norms (in + out) of each Linear
    assert ghost == forward + 4 * suffix + (576 + 128) + (128 + 10)
    # a conv suffix still forms per-sample gradients under ghost clipping
    conv_suffix = sum(l.macs for l in layers if int(l.name) >= 8)
    conv_params = sum(l.macs for l in layers if int(l.name) >= 8 and l.has_params and l.ghost_norm_macs is None)
    assert macs_per_sample(layers, "8", True, "ghost") == forward + 4 * conv_suffix + conv_params + 704 + 138
    assert macs_per_sample(layers, "13", False, "ghost") == macs_per_sample(layers, "13", False)

"""PrivateTrainer with ghost clipping: the same clipped, noised updates as per-sample clipping.

(Lives under tests/edge because the device step is its user; it tests ftte.privacy.dpsgd.)
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ftte.privacy.dpsgd import DPConfig, PrivateTrainer
from ftte.privacy.secure_random import SecureRandom


def _task(n: int = 64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 12, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return x, y


def _model() -> nn.Module:
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 2))


def _round(model: nn.Module, clipping: str, *, noise: float, seed: int, dp: bool = True) -> torch.Tensor:
    x, y = _task()
    cfg = DPConfig(enabled=dp, noise_multiplier=noise, max_grad_norm=0.1, epsilon_max=1e300, accountant="rdp")
    trainer = PrivateTrainer(model, cfg, rng=SecureRandom.from_seed(seed, "ghost-test"), clipping=clipping)
    stats = trainer.train_round((x, y), loss_fn=nn.CrossEntropyLoss(), lr=0.5, batch_size=16, steps=6)
    assert stats.steps == 6 and stats.mean_loss == stats.mean_loss
    trainer.close()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_ghost_round_matches_per_sample_round_with_tiny_noise() -> None:
    start = _model()
    per = _round(copy.deepcopy(start), "per_sample", noise=1e-4, seed=1)
    ghost = _round(copy.deepcopy(start), "ghost", noise=1e-4, seed=1)
    plain = _round(copy.deepcopy(start), "per_sample", noise=1e-4, seed=1, dp=False)
    assert torch.allclose(per, ghost, atol=1e-5), float((per - ghost).abs().max())
    assert not torch.allclose(per, plain, atol=1e-3)  # the clip bound (0.1) was active


def test_ghost_round_draws_the_same_noise_as_per_sample() -> None:
    """Same generator: same Poisson batches and the same Gaussian draws, so with real noise the
    two modes release the same weights; another seed releases different ones."""
    start = _model()
    per = _round(copy.deepcopy(start), "per_sample", noise=1.0, seed=7)
    ghost = _round(copy.deepcopy(start), "ghost", noise=1.0, seed=7)
    other = _round(copy.deepcopy(start), "ghost", noise=1.0, seed=8)
    assert torch.allclose(per, ghost, atol=1e-5)
    assert not torch.allclose(ghost, other, atol=1e-3)


def test_ghost_needs_a_mean_loss_module_and_a_known_mode() -> None:
    x, y = _task()
    trainer = PrivateTrainer(_model(), DPConfig(noise_multiplier=1.0, epsilon_max=1e6, accountant="rdp"),
                             clipping="ghost")
    with pytest.raises(ValueError, match="reduction='mean'"):
        trainer.train_round((x, y), loss_fn=lambda out, t: nn.functional.nll_loss(out.log_softmax(1), t), lr=0.1,
                            batch_size=16, steps=1)
    with pytest.raises(ValueError, match="reduction='mean'"):
        trainer.train_round((x, y), loss_fn=nn.CrossEntropyLoss(reduction="sum"), lr=0.1, batch_size=16, steps=1)
    assert trainer.epsilon() == 0.0  # a refused loss spends no budget
    # the functional cross-entropy (what edge.runtime passes) is accepted as its module
    stats = trainer.train_round((x, y), loss_fn=nn.functional.cross_entropy, lr=0.1, batch_size=16, steps=2)
    assert stats.steps == 2
    with pytest.raises(ValueError, match="clipping"):
        PrivateTrainer(_model(), DPConfig(noise_multiplier=1.0), clipping="fast")

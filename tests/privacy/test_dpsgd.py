"""DP-SGD trains, wraps once, clips, handles empty Poisson batches and a frozen prefix."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.validators.errors import UnsupportedModuleError
from torch import nn

from ftte.privacy.secure_random import SecureRandom
from ftte.privacy.accountant import AccountantStore
from ftte.privacy.dpsgd import RNG_SOURCE_DEFAULT, RNG_SOURCE_SIMULATION, DPConfig, PrivateTrainer

ce = nn.functional.cross_entropy


def _frozen_prefix() -> nn.Module:
    torch.manual_seed(0)
    prefix = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU())
    for p in prefix.parameters():
        p.requires_grad_(False)
    return prefix


def _full_loss_and_acc(prefix, head, x, y):
    with torch.no_grad():
        out = head(prefix(x))
        return float(ce(out, y)), float((out.argmax(1) == y).float().mean())


def test_dp_sgd_learns_an_easy_task_with_frozen_prefix(easy_task):
    x, y = easy_task
    prefix = _frozen_prefix()
    prefix.eval()
    torch.manual_seed(1)
    head = nn.Linear(16, 2)
    loss0, acc0 = _full_loss_and_acc(prefix, head, x, y)
    trainer = PrivateTrainer(head, DPConfig(noise_multiplier=0.7, max_grad_norm=1.0, epsilon_max=1e3,
                                            accountant="rdp"),
                             prefix=prefix, rng=SecureRandom.from_seed(2))
    stats = [trainer.train_round((x, y), loss_fn=ce, lr=0.5, batch_size=16, steps=15) for _ in range(3)]
    loss1, acc1 = _full_loss_and_acc(prefix, head, x, y)
    assert loss1 < 0.6 * loss0, (loss0, loss1)
    assert acc1 >= 0.85 and acc1 > acc0
    assert stats[-1].mean_loss < stats[0].mean_loss
    assert all(s.noise_multiplier == 0.7 and s.max_grad_norm == 1.0 for s in stats)
    assert stats[0].rng_source == RNG_SOURCE_SIMULATION == "chacha20:derived-from-run-seed (simulation)"


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_wraps_once_and_hooks_do_not_stack(easy_task):
    x, y = easy_task
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    trainer = PrivateTrainer(model, DPConfig(noise_multiplier=1.0, epsilon_max=1e3, accountant="rdp"))
    # one forward + one backward hook per module with trainable parameters
    assert trainer.hook_count == 4
    per_module = [(len(m._forward_hooks), len(m._backward_hooks)) for m in model]
    for _ in range(3):
        trainer.train_round((x, y), loss_fn=ce, lr=0.1, batch_size=8, steps=3)
        assert trainer.hook_count == 4
        assert [(len(m._forward_hooks), len(m._backward_hooks)) for m in model] == per_module
    assert trainer.module is model
    assert list(model.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]  # no "_module." prefix

    with pytest.raises(ValueError, match="already carries Opacus hooks"):
        PrivateTrainer(model, DPConfig(noise_multiplier=1.0, accountant="prv"))

    # hooks are off between rounds: evaluation with grad enabled stores no activations
    model.train()
    model(x).sum().backward()
    assert not hasattr(model[0], "activations") or model[0].activations == []

    trainer.close()
    assert trainer.hook_count == 0 and not hasattr(model, "autograd_grad_sample_hooks")
    again = PrivateTrainer(model, DPConfig(noise_multiplier=1.0, epsilon_max=1e3, accountant="rdp"))
    again.train_round((x, y), loss_fn=ce, lr=0.1, batch_size=8, steps=1)
    assert again.hook_count == 4


def test_prefix_gets_no_gradients_and_frozen_norm_stays_put(easy_task):
    x, y = easy_task
    prefix = _frozen_prefix()
    prefix.train()  # the caller left it in train mode; the trainer must not update BN stats
    running = prefix[1].running_mean.clone()
    head = nn.Linear(16, 2)
    trainer = PrivateTrainer(head, DPConfig(noise_multiplier=1.0, epsilon_max=1e3, accountant="rdp"), prefix=prefix)
    trainer.train_round((x, y), loss_fn=ce, lr=0.1, batch_size=8, steps=3)
    assert torch.equal(prefix[1].running_mean, running)
    assert prefix.training  # mode restored
    for p in prefix.parameters():
        assert p.grad is None and getattr(p, "grad_sample", None) is None
    for p in head.parameters():
        assert getattr(p, "grad_sample", None) is None  # freed after the round


@pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha")
def test_per_sample_clipping_bounds_the_update(easy_task):
    x, y = easy_task
    x = x * 100.0  # large gradients
    dp_model, plain_model = nn.Linear(4, 2), nn.Linear(4, 2)
    plain_model.load_state_dict(dp_model.state_dict())
    w0 = torch.cat([p.detach().flatten().clone() for p in dp_model.parameters()])
    # sample_rate 1: every record in the single batch; noise std = 0.01*C/64, negligible
    dp = PrivateTrainer(dp_model, DPConfig(noise_multiplier=0.01, max_grad_norm=0.01, epsilon_max=1e300,
                                           accountant="rdp"))
    dp.train_round((x, y), loss_fn=ce, lr=1.0, sample_rate=1.0, steps=1)
    plain = PrivateTrainer(plain_model, DPConfig(enabled=False))
    plain.train_round((x, y), loss_fn=ce, lr=1.0, sample_rate=1.0, steps=1)
    dp_step = torch.cat([p.detach().flatten() for p in dp_model.parameters()]) - w0
    plain_step = torch.cat([p.detach().flatten() for p in plain_model.parameters()]) - w0
    assert dp_step.norm() <= 0.01 * 1.05  # mean of per-sample clipped grads (+ tiny noise)
    assert plain_step.norm() > 10 * dp_step.norm()


def test_empty_poisson_batches_are_noise_only_steps(tmp_path):
    # (at q=1e-5 Opacus's RDP conversion yields a slightly negative ε; we report max(0, ε))
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1])
    store = AccountantStore(tmp_path / "a.db")
    cfg = DPConfig(noise_multiplier=1.0, epsilon_max=1e3, accountant="rdp")
    mixed = PrivateTrainer(nn.Linear(3, 2), cfg, store=store, device_id="sensor",
                           rng=SecureRandom.from_seed(3))
    stats = mixed.train_round((x, y), loss_fn=ce, lr=0.1, sample_rate=0.05, steps=12)
    assert 6 <= stats.empty_batches < 12  # P(empty) = 0.95^5 ≈ 0.77
    assert stats.steps == 12 and store.history("sensor")[0].steps == 12  # empty steps are counted
    assert math.isfinite(stats.mean_loss)

    # every batch empty: the only thing that can move the weights is the noise of the
    # noise-only steps, and the round is still accounted in full
    model = nn.Linear(3, 2)
    w0 = [p.detach().clone() for p in model.parameters()]
    empty = PrivateTrainer(model, cfg, store=store, device_id="idle", rng=SecureRandom.from_seed(4))
    stats = empty.train_round((x, y), loss_fn=ce, lr=0.1, sample_rate=1e-5, steps=12)
    assert stats.empty_batches == 12 and math.isnan(stats.mean_loss)
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), w0))
    assert store.history("idle")[0].steps == 12 and stats.epsilon_total >= 0.0
    store.close()


def test_non_private_mode_same_interface(easy_task):
    x, y = easy_task
    model = nn.Linear(4, 2)
    trainer = PrivateTrainer(model, DPConfig(enabled=False))
    stats = trainer.train_round((x, y), loss_fn=ce, lr=0.5, batch_size=8, steps=10)
    assert trainer.hook_count == 0
    assert stats.enabled is False and stats.noise_multiplier == 0.0 and stats.accountant == "none"
    assert stats.epsilon_total == math.inf and stats.epsilon_round == math.inf
    assert stats.rng_source == RNG_SOURCE_DEFAULT == "chacha20:os"
    assert trainer.store.state("local") is None  # nothing accounted
    row = stats.to_ledger_row(plan_id="ablation", version=0)
    assert row.accountant == "none" and row.epsilon_total == math.inf
    with pytest.raises(ValueError, match="switch DP"):
        trainer.config = DPConfig(enabled=True, accountant="prv")


def test_rejects_modules_that_break_per_sample_dp(easy_task):
    with pytest.raises(UnsupportedModuleError):
        PrivateTrainer(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), DPConfig(accountant="prv"))
    x, y = easy_task

    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.spare = nn.Linear(4, 2), nn.Linear(4, 2)

        def forward(self, inp):
            return self.used(inp)

    trainer = PrivateTrainer(Unused(), DPConfig(noise_multiplier=1.0, epsilon_max=1e3, accountant="rdp"))
    with pytest.raises(RuntimeError, match=r"spare\.weight.*no per-sample gradient"):
        trainer.train_round((x, y), loss_fn=ce, lr=0.1, batch_size=8, steps=1)


def test_config_validation():
    with pytest.raises(ValueError):
        DPConfig(noise_multiplier=0.0, accountant="prv")
    with pytest.raises(ValueError):
        DPConfig(accountant="gdp")
    with pytest.raises(ValueError):
        DPConfig(target_epsilon=5.0, accountant="prv")  # without planned_rounds
    with pytest.raises(ValueError):
        DPConfig(target_epsilon=50.0, planned_rounds=2, epsilon_max=10.0, accountant="prv")

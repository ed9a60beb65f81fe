"""The ChaCha20 generator behind DP noise and Poisson sampling: distribution, independence,
reproducibility from a key, and that the trainer really uses it (not torch's generator)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from torch import nn

from ftte.privacy.dpsgd import DPConfig, PrivateTrainer
from ftte.privacy.secure_random import (
    SECURE_GAUSSIAN_DRAWS,
    SOURCE_KEY,
    SOURCE_OS,
    SOURCE_SEED,
    SecureRandom,
    poisson_batches,
)

N = 200_000


def _key(i: int) -> bytes:
    return bytes([i]) * 32


def test_gaussian_mean_variance_and_goodness_of_fit():
    std = 1.7
    z = SecureRandom.from_key(_key(1)).gaussian(N, std)
    # mean: standard error std/sqrt(N) ~ 0.0038; 5 sigma bound
    assert abs(z.mean()) < 5 * std / math.sqrt(N)
    # variance: sd of the sample variance ~ std^2 sqrt(2/N) ~ 0.0091; 5 sigma bound
    assert abs(z.var() - std**2) < 5 * std**2 * math.sqrt(2 / N)
    ks = stats.kstest(z / std, "norm")
    assert ks.pvalue > 1e-3, ks
    ad = stats.anderson(z[:20_000] / std, dist="norm", method="interpolate")
    assert ad.pvalue > 0.01, ad
    # tails: fraction beyond 3 sigma matches 2*(1-Phi(3)) = 0.0027 within 5 binomial sds
    p = 2 * stats.norm.sf(3.0)
    frac = float(np.mean(np.abs(z / std) > 3.0))
    assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / N)


def test_standard_normal_box_muller_is_normal_too():
    z = SecureRandom.from_key(_key(2)).standard_normal(N)
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert abs(z.mean()) < 5 / math.sqrt(N)


def test_secure_noise_is_the_scaled_sum_of_independent_draws():
    """What makes it 'secure mode': each coordinate is sum(4 draws)/2, not one draw."""
    n, std = 1001, 0.3
    got = SecureRandom.from_key(_key(3)).gaussian(n, std)
    draws = SecureRandom.from_key(_key(3)).standard_normal(SECURE_GAUSSIAN_DRAWS * n).reshape(
        SECURE_GAUSSIAN_DRAWS, n)
    np.testing.assert_allclose(got, draws.sum(axis=0) * std / math.sqrt(SECURE_GAUSSIAN_DRAWS), rtol=1e-15, atol=0)
    assert not np.array_equal(got, SecureRandom.from_key(_key(3)).standard_normal(n) * std)


def test_same_key_same_noise_different_keys_uncorrelated():
    a = SecureRandom.from_key(_key(4)).gaussian(N, 1.0)
    b = SecureRandom.from_key(_key(4)).gaussian(N, 1.0)
    c = SecureRandom.from_key(_key(5)).gaussian(N, 1.0)
    np.testing.assert_array_equal(a, b)
    r = np.corrcoef(a, c)[0, 1]
    assert abs(r) < 5 / math.sqrt(N), r  # independent: |r| ~ 1/sqrt(N)
    assert not np.any(a == c)


def test_children_and_successive_draws_do_not_repeat():
    root = SecureRandom.from_key(_key(6))
    s, n = root.child("poisson-sampling"), root.child("gaussian-noise")
    x, y = s.uniform(10_000), n.uniform(10_000)
    assert abs(np.corrcoef(x, y)[0, 1]) < 5 / math.sqrt(10_000)
    first, second = root.uniform(10_000), root.uniform(10_000)
    assert not np.any(first == second)
    assert root.bytes_drawn == 2 * 8 * 10_000


def test_seed_derivation_is_reproducible_and_context_bound():
    a = SecureRandom.from_seed(42, "dev", "1").uniform(64)
    assert np.array_equal(a, SecureRandom.from_seed(42, "dev", "1").uniform(64))
    assert not np.array_equal(a, SecureRandom.from_seed(43, "dev", "1").uniform(64))
    assert not np.array_equal(a, SecureRandom.from_seed(42, "dev", "2").uniform(64))
    assert SecureRandom.from_seed(1).source == SOURCE_SEED
    assert SecureRandom.from_os().source == SOURCE_OS
    assert SecureRandom.from_key(_key(0)).source == SOURCE_KEY
    with pytest.raises(ValueError):
        SecureRandom.from_key(b"short")


@settings(max_examples=30, deadline=None)
@given(key=st.binary(min_size=32, max_size=32), n=st.integers(0, 300))
def test_uniform_lies_in_unit_interval(key, n):
    u = SecureRandom.from_key(key).uniform(n)
    assert u.shape == (n,) and u.dtype == np.float64
    assert np.all((u >= 0.0) & (u < 1.0))


def test_poisson_sampling_rate():
    q, n, steps = 0.03, 2_000, 200
    batches = poisson_batches(SecureRandom.from_key(_key(7)), n, q, steps)
    sizes = np.array([len(b) for b in batches])
    total = sizes.sum()
    expected = q * n * steps
    assert abs(total - expected) < 5 * math.sqrt(expected * (1 - q)), (total, expected)
    # each record's inclusion count is Binomial(steps, q): check the per-record mean too
    counts = np.bincount(np.concatenate([np.asarray(b, dtype=int) for b in batches]), minlength=n)
    # inclusions per record ~ Binomial(steps, q): variance steps q (1-q) = 5.82, sd of the estimate ~0.18
    assert abs(counts.var() - steps * q * (1 - q)) < 1.0, counts.var()
    # batch sizes ~ Binomial(n, q): variance n q (1-q) = 58.2, sd of the estimate ~5.8
    assert abs(sizes.var() - n * q * (1 - q)) < 30.0, sizes.var()
    assert all(len(set(b)) == len(b) and all(0 <= i < n for i in b) for b in batches)


def _train_once(rng: SecureRandom | None, *, torch_seed: int) -> tuple[torch.Tensor, str]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 4, generator=g), torch.randint(0, 2, (64,), generator=g)
    torch.manual_seed(123)
    model = nn.Linear(4, 2)
    trainer = PrivateTrainer(model, DPConfig(noise_multiplier=1.0, epsilon_max=1e3, accountant="rdp"))
    torch.manual_seed(torch_seed)  # torch's global generator must not matter to the round
    stats_ = trainer.train_round((x, y), loss_fn=nn.functional.cross_entropy, lr=0.5, batch_size=8, steps=4, rng=rng)
    trainer.close()
    return torch.cat([p.detach().flatten() for p in model.parameters()]), stats_.rng_source


def test_trainer_noise_and_sampling_come_from_the_key_not_torch():
    a, src = _train_once(SecureRandom.from_key(_key(8)), torch_seed=1)
    b, _ = _train_once(SecureRandom.from_key(_key(8)), torch_seed=999)
    c, _ = _train_once(SecureRandom.from_key(_key(9)), torch_seed=1)
    assert torch.equal(a, b)  # same key, different torch seed: identical round
    assert not torch.equal(a, c)  # another key: another round
    assert src == SOURCE_KEY
    d, src_os = _train_once(None, torch_seed=1)
    e, _ = _train_once(None, torch_seed=1)
    assert src_os == SOURCE_OS and not torch.equal(d, e)  # OS keys: never the same noise twice


def test_successive_rounds_of_one_generator_draw_fresh_noise():
    """One generator handed to the trainer for many rounds: each round takes a new round key,
    so two rounds from identical weights and data still differ."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 4, generator=g), torch.randint(0, 2, (32,), generator=g)
    model = nn.Linear(4, 2)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = PrivateTrainer(model, DPConfig(noise_multiplier=1.0, epsilon_max=1e3, accountant="rdp"),
                             rng=SecureRandom.from_key(_key(10)))
    results = []
    for _ in range(2):
        model.load_state_dict(start)
        trainer.train_round((x, y), loss_fn=nn.functional.cross_entropy, lr=0.5, batch_size=32, steps=1)
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    trainer.close()
    assert not torch.equal(results[0], results[1])


def test_optimizer_refuses_to_add_noise_without_a_secure_generator():
    from ftte.privacy.dpsgd import SecureNoiseDPOptimizer

    p = nn.Parameter(torch.zeros(3))
    opt = SecureNoiseDPOptimizer(torch.optim.SGD([p], lr=0.1), noise_multiplier=0.7, max_grad_norm=2.0,
                                 expected_batch_size=1)
    p.summed_grad = torch.zeros(3)
    with pytest.raises(RuntimeError, match="noise_rng"):
        opt.add_noise()
    opt.noise_rng = SecureRandom.from_key(_key(11))
    opt.add_noise()
    expected = SecureRandom.from_key(_key(11)).gaussian_tensor((3,), 0.7 * 2.0, dtype=torch.float32)
    assert torch.equal(p.grad, expected)

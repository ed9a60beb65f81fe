"""DP noise generation speed: ChaCha20 secure-mode Gaussian vs torch.normal, 1e6 coordinates.

Run with timings: ``pytest bench/test_bench_noise.py --benchmark-enable
--benchmark-json=noise.json``. Without ``--benchmark-enable`` (the project default) each
body runs once as a smoke test. The secure sampler does 4x the Box-Muller work of one
Gaussian (secure mode sums 4 draws) plus 32 bytes of keystream per coordinate; torch.normal
from the Mersenne Twister is the baseline we replaced, not a target to match.
"""

from __future__ import annotations

import pytest
import torch

from ftte.privacy.secure_random import SecureRandom

COORDS = 1_000_000
GROUP = "dp-noise-1e6"


@pytest.mark.benchmark(group=GROUP)
def test_secure_gaussian_noise(benchmark) -> None:
    rng = SecureRandom.from_os()
    out = benchmark(rng.gaussian_tensor, (COORDS,), 1.0, dtype=torch.float32)
    assert out.shape == (COORDS,) and out.dtype == torch.float32
    assert abs(float(out.std()) - 1.0) < 0.01


@pytest.mark.benchmark(group=GROUP)
def test_torch_normal_baseline(benchmark) -> None:
    gen = torch.Generator().manual_seed(0)
    out = benchmark(torch.normal, 0.0, 1.0, (COORDS,), generator=gen)
    assert out.shape == (COORDS,)


@pytest.mark.benchmark(group=GROUP)
def test_secure_uniform_for_poisson_sampling(benchmark) -> None:
    rng = SecureRandom.from_os()
    out = benchmark(rng.bernoulli, COORDS, 0.01)
    assert out.shape == (COORDS,)

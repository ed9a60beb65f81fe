import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ftte.crypto.quantize import Quantizer, QuantizationError, choose_ring_bits, levels


def test_choose_ring_bits_smallest_that_cannot_wrap():
    assert choose_ring_bits(10, 12) == 16  # 10 * 2047 = 20470 <= 32767
    assert choose_ring_bits(16, 12) == 16  # 16 * 2047 = 32752 <= 32767
    assert choose_ring_bits(17, 12) == 32
    with pytest.raises(QuantizationError):
        choose_ring_bits(3, 31)
    with pytest.raises(QuantizationError):
        choose_ring_bits(10**6, 16)


def test_choose_ring_bits_boundary_exact():
    L = levels(12)
    k16 = (2**15 - 1) // L
    assert choose_ring_bits(k16, 12) == 16
    assert choose_ring_bits(k16 + 1, 12) == 32


@settings(max_examples=50, deadline=None)
@given(k=st.integers(1, 64), value_bits=st.integers(2, 14), seed=st.integers(0, 2**31))
def test_sum_of_k_extreme_values_never_wraps(k, value_bits, seed):
    q = Quantizer.for_cohort(1.0, value_bits, k)
    rng = np.random.default_rng(seed)
    for sign in (1.0, -1.0):
        x = np.full((k, 8), sign * 5.0)  # beyond the clip: clipped to ±1
        ring = sum(q.quantize(row, rng).astype(np.uint64) for row in x) % (2**q.ring_bits)
        total = q.dequantize_sum(ring.astype(q.to_ring(np.zeros(1)).dtype), k)
        assert np.allclose(total, sign * k)


def test_stochastic_rounding_is_unbiased():
    q = Quantizer(1.0, 4, 16)  # coarse: 7 levels
    rng = np.random.default_rng(1)
    x = np.full(200_000, 0.123)
    ring = q.quantize(x, rng)
    mean = q.to_signed(ring).mean() / q.scale
    assert abs(mean - 0.123) < 2e-3


def test_quantize_rejects_nan_and_refuses_wrapping_sums():
    q = Quantizer(1.0, 12, 16)
    with pytest.raises(QuantizationError):
        q.quantize(np.array([np.nan]), np.random.default_rng(0))
    with pytest.raises(QuantizationError):
        q.dequantize_sum(np.zeros(3, np.uint16), count=q.max_summands() + 1)
    with pytest.raises(QuantizationError):
        Quantizer(1.0, 20, 16)
    with pytest.raises(QuantizationError):
        Quantizer(0.0, 8, 16)

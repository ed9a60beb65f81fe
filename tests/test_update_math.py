"""Weighting, encoding and merge math on hand-made updates."""


import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ftte.crypto.quantize import choose_ring_bits
from ftte.protocol.encoding import UpdateCodec, clip_l2, weigh_update
from ftte.protocol.weighting import WeightRule, staleness_factor, update_weight, variance_factor
from ftte.pipeline.merge import ServerOptimizer, weighted_mean


def test_staleness_factor_values():
    assert staleness_factor(0, 0.5) == 1.0
    assert staleness_factor(3, 0.5) == pytest.approx(0.5)
    assert staleness_factor(3, 1.0) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        staleness_factor(-1, 0.5)


def test_variance_factor_damps_only_noisier_updates_and_is_bounded():
    assert variance_factor(0.5, 1.0, penalty=1.0, r_min=0.25) == 1.0
    assert variance_factor(1.0, 1.0, penalty=1.0, r_min=0.25) == 1.0
    assert variance_factor(3.0, 1.0, penalty=1.0, r_min=0.25) == pytest.approx(1 / 3)
    assert variance_factor(1e9, 1.0, penalty=1.0, r_min=0.25) == pytest.approx(0.25)  # floor r_min
    assert variance_factor(3.0, None, penalty=1.0, r_min=0.25) == 1.0  # no reference yet
    assert variance_factor(3.0, 1.0, penalty=0.0, r_min=0.25) == 1.0  # age-only


@settings(max_examples=200, deadline=None)
@given(tau=st.integers(0, 10_000), var=st.floats(0, 1e6), ref=st.one_of(st.none(), st.floats(1e-9, 1e6)),
       a=st.floats(0, 3), lam=st.floats(0, 100))
def test_weight_always_in_unit_interval(tau, var, ref, a, lam):
    w = update_weight(tau, var, ref, WeightRule(a, lam, 0.25))
    assert 0 < w <= 1


def test_clip_l2():
    v = np.array([3.0, 4.0])
    assert np.allclose(clip_l2(v, 10.0), v)
    assert np.linalg.norm(clip_l2(v, 1.0)) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        clip_l2(np.array([np.nan]), 1.0)


def test_encode_sum_decode_recovers_weighted_sums():
    rng = np.random.default_rng(0)
    d, k, clip = 2000, 10, 1.0
    codec = UpdateCodec(d, clip, value_bits=14, ring_bits=choose_ring_bits(k, 14))
    deltas = [rng.normal(0, 1, d) for _ in range(k)]
    weights = []
    ring = np.zeros(codec.length, dtype=np.uint32 if codec.ring_bits == 32 else np.uint16)
    expect_sum, expect_var = np.zeros(d), 0.0
    for i, delta in enumerate(deltas):
        rule = WeightRule(staleness_exponent=1.0, variance_penalty=0.0, r_min=0.25)
        prepared = weigh_update(delta, base_version=10 - i, close_version=10, reference_variance=None, rule=rule, clip=clip)
        assert prepared.staleness == i and prepared.weight == pytest.approx(1 / (1 + i))
        w = prepared.weight
        expect_sum += prepared.weighted
        expect_var += prepared.variance
        ring += codec.encode(prepared.weighted, w, prepared.variance, rng)
        weights.append(w)
    wsum, wtotal, vtotal = codec.decode_sum(ring, k)
    step = codec.coordinate_range / (2 ** 13 - 1)
    assert np.max(np.abs(wsum - expect_sum)) < k * step + 1e-12
    assert wtotal == pytest.approx(sum(weights), abs=k / (2 ** 13 - 1))  # w rides in units of the range
    assert vtotal == pytest.approx(expect_var, rel=0.05)


def test_encode_rejects_bad_weight_and_shape():
    codec = UpdateCodec(10, 1.0, 12, 16)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        codec.encode(np.zeros(10), 0.0, 0.0, rng)
    with pytest.raises(ValueError):
        codec.encode(np.zeros(9), 0.5, 0.0, rng)


def test_weighted_mean_and_server_momentum():
    assert np.allclose(weighted_mean(np.array([2.0, 4.0]), 2.0), [1.0, 2.0])
    with pytest.raises(ValueError):
        weighted_mean(np.zeros(2), 0.0)
    opt = ServerOptimizer(lr=0.5, momentum=0.9)
    p = opt.step(np.zeros(1), np.ones(1))
    assert p[0] == pytest.approx(0.5)
    p = opt.step(p, np.ones(1))  # velocity 1.9
    assert p[0] == pytest.approx(0.5 + 0.5 * 1.9)
    plain = ServerOptimizer(lr=2.0)
    assert plain.step(np.ones(2), np.ones(2))[0] == pytest.approx(3.0)

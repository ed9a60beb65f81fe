"""The user-level encoding through real secure aggregation: exact up to the rounding bound with
noise off, calibrated noise with noise on, no wrap at the planned scale, an orthonormal rotation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secagg_helpers import make_params, signer
from ftte.crypto.secagg_local import run_session
from ftte.privacy.distributed_dp import UserDPParams, discrete_gaussian_variance, plan_user_dp
from ftte.privacy.secure_random import SecureRandom
from ftte.protocol.encoding import clip_l2
from ftte.protocol import user_encoding
from ftte.protocol.user_encoding import UserCodec, fwht, rotation_seed


def _session(params: UserDPParams, cohort: str, n: int, threshold: int):
    sp = make_params(n, dim=params.padded_dim, bits=params.ring_bits, cohort=cohort, threshold=threshold)
    return sp, {m: signer(m) for m in sp.members}


def _updates(n: int, dim: int, seed: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    # a mix of updates inside and far outside the clip, with a few spiky coordinates
    out = {}
    for m in range(n):
        x = rng.normal(size=dim) * (0.3 if m % 2 else 3.0) / math.sqrt(dim)
        x[rng.integers(0, dim, 3)] += 0.5
        out[m] = x
    return out


def test_noise_off_reproduces_the_plain_sum_within_the_rounding_bound():
    n, dim, clip = 7, 3000, 1.0
    params = plan_user_dp(dim=dim, clip=clip, noise_multiplier=0.0, members=n, threshold=4)
    assert params.sigma == 0.0
    sp, ids = _session(params, "user-exact", n, 4)
    codec = UserCodec(params, rotation_seed(sp.cohort_id))
    updates = _updates(n, dim, 1)
    weights = {m: 1.0 / (1 + m % 3) for m in range(n)}  # public staleness weights
    inputs = {m: codec.encode(updates[m], weights[m], SecureRandom.from_seed(m, "dev"), noise=False).ring
              for m in range(n)}
    result, stats = run_session(sp, ids, inputs, drop={5: "upload", 6: "consistency"})
    assert result is not None, stats.aborted
    survivors = result.survivors
    assert 5 not in survivors and len(survivors) >= 4
    decoded = codec.decode_sum(result.total)
    plain = sum(weights[m] * clip_l2(updates[m], clip) for m in survivors)
    error = float(np.linalg.norm(decoded - plain))
    bound = codec.rounding_bound(len(survivors))
    assert 0.0 < error <= bound
    assert bound < 1e-3 * float(np.linalg.norm(plain))  # the bound is small, not vacuous
    assert float(np.linalg.norm(decoded)) <= codec.decoded_norm_bound(len(survivors), sum(weights[m] for m in survivors))
    # another cohort's rotation does not decode this sum
    other = UserCodec(params, rotation_seed("another-cohort"))
    assert float(np.linalg.norm(other.decode_sum(result.total) - plain)) > 0.5 * float(np.linalg.norm(plain))


def test_noise_on_decoded_variance_matches_the_calibration():
    n, dim = 4, 2**15
    params = plan_user_dp(dim=dim, clip=1.0, noise_multiplier=0.8, members=n, threshold=3)
    assert params.calibrated_for == 3 and params.sigma > 100
    sp, ids = _session(params, "user-noise", n, 3)
    codec = UserCodec(params, rotation_seed(sp.cohort_id))
    zero = np.zeros(dim)
    encoded = {m: codec.encode(zero, 1.0, SecureRandom.from_seed(m, "noise-dev")) for m in range(n)}
    result, stats = run_session(sp, ids, {m: e.ring for m, e in encoded.items()}, drop={3: "upload"})
    assert result is not None, stats.aborted
    k = len(result.survivors)
    assert k == 3
    noise = codec.decode_sum(result.total)
    expected_var = k * discrete_gaussian_variance(params.sigma) / params.scale**2
    # the calibration: 3 honest survivors carry (z * sensitivity)^2, i.e. (z C)^2 up to rounding slack
    assert expected_var == pytest.approx((0.8 * params.sensitivity / params.scale) ** 2, rel=1e-6)
    rel_se = math.sqrt(2 / dim)  # ~0.8 %
    assert float(np.mean(noise**2)) == pytest.approx(expected_var, rel=5 * rel_se)
    assert abs(float(noise.mean())) < 5 * math.sqrt(expected_var / dim)
    # an honest sum stays inside the bound the server's impossible-sum check would use (and near it:
    # the noise norm concentrates at sqrt(d' var), the bound adds only the tail)
    bound = codec.decoded_norm_bound(k, 0.0)
    assert float(np.linalg.norm(noise)) <= bound <= 1.1 * math.sqrt(params.padded_dim * expected_var) + \
        codec.rounding_bound(k)
    # the rounded parts were zero: the decoded vector is exactly the survivors' noise, unrotated
    direct = codec.unrotate(sum(encoded[m].noise for m in result.survivors) / params.scale)
    assert np.allclose(noise, direct, rtol=0, atol=1e-9)


def test_worst_case_alignment_does_not_wrap_at_the_planned_scale():
    """Every member puts its whole clipped norm on one rotated coordinate, same sign: the
    signal bound the planner uses is met with equality, and the noisy sum still decodes."""
    n, dim = 20, 1024  # a power of two: no padding, so the spike survives unrotation
    params = plan_user_dp(dim=dim, clip=2.0, noise_multiplier=1.0, members=n, threshold=11)
    codec = UserCodec(params, rotation_seed("worst"))
    spike = np.zeros(params.padded_dim)
    spike[7] = params.clip
    x = codec.unrotate(spike)
    assert np.allclose(codec.rotate(x), spike, atol=1e-12)
    encoded = [codec.encode(x, 1.0, SecureRandom.from_seed(m, "worst")) for m in range(n)]
    ring = np.zeros(params.padded_dim, dtype=np.uint64)
    for e in encoded:
        ring += e.ring
    ring_sum = (ring % 2**32).astype(np.uint32)
    signed = codec.to_signed(ring_sum)
    exact = sum(e.rounded + e.noise for e in encoded)
    assert np.array_equal(signed, exact)  # no coordinate wrapped
    assert int(np.abs(exact).max()) > 0.9 * n * params.clip * params.scale  # the spike really is near the limit


@settings(max_examples=30, deadline=None)
@given(st.integers(min_value=1, max_value=2000), st.integers(min_value=0, max_value=2**31))
def test_rotation_is_orthonormal_and_inverts(dim, seed):
    params = UserDPParams(dim=dim, clip=1.0, scale=1.0, sigma=0.0, calibrated_for=1, members=1)
    codec = UserCodec(params, rotation_seed(f"r{seed}"))
    x = np.random.default_rng(seed).normal(size=dim)
    y = codec.rotate(x)
    assert y.shape == (params.padded_dim,)
    assert np.linalg.norm(y) == pytest.approx(np.linalg.norm(x), rel=1e-12)
    assert np.allclose(codec.unrotate(y), x, rtol=0, atol=1e-12 * max(1.0, float(np.abs(x).max())))


def _textbook_fwht(x: np.ndarray) -> np.ndarray:
    y = np.array(x, dtype=np.float64)
    h = 1
    while h < len(y):
        for i in range(0, len(y), 2 * h):
            a, b = y[i:i + h].copy(), y[i + h:i + 2 * h].copy()
            y[i:i + h], y[i + h:i + 2 * h] = a + b, a - b
        h *= 2
    return y


@pytest.mark.parametrize("levels", [0, 1, 2, 3, 4, 5, 11, 16, 17, 18])
def test_fwht_is_the_hadamard_matrix(levels):
    """Every size, even and odd numbers of levels, below and above the cache block (2^16)."""
    n = 1 << levels
    x = np.random.default_rng(levels).normal(size=n)
    if n <= 32:
        h = np.array([[1.0]])
        for _ in range(levels):
            h = np.block([[h, h], [h, -h]])
        assert np.allclose(fwht(x), h @ x)
    assert np.allclose(fwht(x), _textbook_fwht(x), rtol=0, atol=1e-9 * math.sqrt(n))
    with pytest.raises(ValueError):
        fwht(np.zeros(12))


def test_encode_clips_and_checks_its_input():
    params = plan_user_dp(dim=100, clip=0.5, noise_multiplier=0.0, members=3, threshold=2)
    codec = UserCodec(params, rotation_seed("c"))
    big = np.full(100, 10.0)
    enc = codec.encode(big, 0.5, SecureRandom.from_seed(0, "c"), noise=False)
    back = codec.unrotate(enc.rounded / params.scale)
    assert np.linalg.norm(back) == pytest.approx(0.25, rel=1e-3)  # clipped to 0.5, weighted by 0.5
    with pytest.raises(ValueError):
        codec.encode(np.zeros(99), 1.0, SecureRandom.from_seed(0, "c"))
    with pytest.raises(ValueError):
        codec.encode(np.zeros(100), 1.5, SecureRandom.from_seed(0, "c"))
    with pytest.raises(ValueError):
        codec.encode(np.full(100, np.nan), 1.0, SecureRandom.from_seed(0, "c"))
    # the rotation is a function of the cohort id alone
    assert np.array_equal(UserCodec(params, rotation_seed("c")).signs, codec.signs)
    assert not np.array_equal(UserCodec(params, rotation_seed("d")).signs, codec.signs)


def test_device_refuses_miscalibrated_cohorts():
    from ftte.protocol.cohort import CohortRefused, check_user_params, user_params_digest

    good = plan_user_dp(dim=500, clip=1.0, noise_multiplier=1.5, members=20, threshold=12, max_corrupt=2)
    terms = dict(members=20, threshold=12, max_corrupt=2, min_noise_multiplier=1.0)
    check_user_params(good, **terms)
    check_user_params(good, **{**terms, "members": 15})  # a smaller cohort fits the ring planned for 20
    with pytest.raises(CohortRefused, match="honest survivors"):
        check_user_params(good, **{**terms, "max_corrupt": 3})  # this device assumes one more colluder
    with pytest.raises(CohortRefused, match="floor"):
        check_user_params(good, **{**terms, "min_noise_multiplier": 2.0})
    with pytest.raises(CohortRefused, match="members"):
        check_user_params(good, **{**terms, "members": 21})
    loud = UserDPParams(500, 1.0, good.scale, good.sigma * 3, good.calibrated_for, 20)  # noise tail past the ring
    with pytest.raises(CohortRefused, match="wraps"):
        check_user_params(loud, **terms)
    assert user_params_digest(good, 1.5) != user_params_digest(loud, 1.5) and len(user_params_digest(good, 1.5)) == 32
    assert user_params_digest(good, 1.5) != user_params_digest(good, 1.4)


# -- the rotation as Kronecker GEMMs, against the butterflies -------------------------------------

@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=0, max_value=19), st.integers(min_value=0, max_value=2**31),
       st.floats(min_value=1e-6, max_value=1e6))
def test_gemm_transform_equals_the_butterflies(levels, seed, factor):
    """``_fwht_scaled`` (matrix products of small Hadamard factors, in cache-sized blocks and then
    across blocks, the factor folded into the last) equals the radix-4 butterflies times the
    factor, to float rounding, at every size: below, at and above the block (2^16)."""
    n = 1 << levels
    x = np.random.default_rng(seed).normal(size=n) * np.random.default_rng(seed + 1).lognormal(0, 3, size=n)
    want = user_encoding._fwht_inplace(x.copy()) * factor
    got = user_encoding._fwht_scaled(x.copy(), factor)
    tol = 1e-13 * factor * math.sqrt(n) * float(np.linalg.norm(x)) + 1e-300
    assert got.shape == (n,) and got.dtype == np.float64
    assert float(np.abs(got - want).max()) <= tol


@pytest.mark.parametrize("levels", [16, 17, 20, 21, 22])
def test_gemm_transform_equals_the_butterflies_across_several_blocks(levels):
    """Zero to three products across the blocks of 2^16 (2^20: two 4s; 2^22: two 8s)."""
    x = np.random.default_rng(levels).normal(size=1 << levels)
    want = user_encoding._fwht_inplace(x.copy())
    got = user_encoding._fwht_scaled(x.copy(), 1.0)
    assert float(np.abs(got - want).max()) <= 1e-13 * math.sqrt(x.size) * float(np.linalg.norm(x))


@pytest.mark.parametrize("levels", [0, 1, 2, 4, 5, 6, 10, 16, 20, 25])
def test_factor_sizes_split_the_levels_evenly(levels):
    sizes = user_encoding._factor_sizes(levels)
    assert math.prod(sizes) == 1 << levels
    assert all(2 <= k <= 1 << user_encoding._FACTOR_LEVELS and k & (k - 1) == 0 for k in sizes)
    if sizes:
        assert max(sizes) <= 2 * min(sizes)
        assert len(sizes) == -(-levels // user_encoding._FACTOR_LEVELS)  # as few products as the cap allows


def test_hadamard_factor_is_the_parity_matrix():
    for k in (1, 2, 8, 32):
        h = user_encoding._hadamard(k)
        parity = np.array([[(a & b).bit_count() % 2 for b in range(k)] for a in range(k)])
        assert np.array_equal(h, 1.0 - 2.0 * parity)
        assert np.array_equal(h @ h, k * np.eye(k))
        assert not h.flags.writeable  # shared by every call: nobody may scale it in place


def test_blas_thread_limit_is_restored_and_the_fallback_is_the_butterflies(monkeypatch):
    """The products run with BLAS limited to one thread only while they run; with no BLAS to limit,
    the transform is exactly the butterflies."""
    controller = user_encoding._blas_controller()
    before = None if controller is None else [lib.num_threads for lib in controller.lib_controllers]
    x = np.random.default_rng(3).normal(size=2**16)
    params = UserDPParams(dim=60_000, clip=1.0, scale=1.0, sigma=0.0, calibrated_for=1, members=1)
    codec = UserCodec(params, rotation_seed("threads"))
    y = codec.rotate(x[:60_000])
    if controller is not None:
        assert [lib.num_threads for lib in controller.lib_controllers] == before
    monkeypatch.setattr(user_encoding, "_one_blas_thread", lambda: None)
    assert np.array_equal(user_encoding._fwht_scaled(x.copy(), 1.0), user_encoding._fwht_inplace(x.copy()))
    assert np.allclose(codec.rotate(x[:60_000]), y, rtol=0, atol=1e-12)
    assert np.allclose(codec.unrotate(y), x[:60_000], rtol=0, atol=1e-12)


def test_rotation_round_trips_at_the_benchmark_size():
    """d = 1e6 padded to 2^20 (blocks of 2^16, then products across them): rotate then unrotate gives the update back,
    the norm is kept, and both sides agree on the signs."""
    params = UserDPParams(dim=1_000_000, clip=1.0, scale=1.0, sigma=0.0, calibrated_for=1, members=1)
    device = UserCodec(params, rotation_seed("big"))
    server = UserCodec(params, rotation_seed("big"))
    x = np.random.default_rng(5).normal(size=params.dim)
    y = device.rotate(x, 0.5)
    assert np.linalg.norm(y) == pytest.approx(0.5 * np.linalg.norm(x), rel=1e-12)
    assert np.allclose(server.unrotate(y) * 2.0, x, rtol=0, atol=1e-11)
    assert np.allclose(y, 0.5 * user_encoding._fwht_inplace(
        np.concatenate([x * device.signs[: params.dim], np.zeros(params.padded_dim - params.dim)]))
        / math.sqrt(params.padded_dim), rtol=0, atol=1e-12)


@pytest.mark.parametrize("bits,sigma", [(32, 300.0), (16, 3.0)])
def test_ring_is_the_residue_of_rounded_plus_noise(bits, sigma):
    """The ring vector (written in one pass) is ``(q + noise) mod 2^b``, negatives included, with q
    recomputed here from the documented recipe (float32 rotation, then :meth:`UserCodec.round` on
    the device generator's round stream) and the noise from its noise stream; it reads back as the
    signed sum."""
    params = UserDPParams(dim=5000, clip=1.0, scale=40.0 if bits == 16 else 4000.0, sigma=sigma,
                          calibrated_for=2, members=3, ring_bits=bits)
    codec = UserCodec(params, rotation_seed("ring"))
    x = np.random.default_rng(1).normal(size=params.dim) * 0.01
    assert np.linalg.norm(x) < params.clip * 0.99  # no clipping: the recipe below is the whole of encode
    enc = codec.encode(x, 0.7, SecureRandom.from_seed(4, "ring"))
    device = SecureRandom.from_seed(4, "ring")
    q = codec.round(codec.rotate(x, 0.7 * params.scale, np.float32), device.child("user-dp/round"))
    noise = codec.draw_noise(device)
    assert np.array_equal(enc.noise, noise) and np.array_equal(enc.rounded, q)
    signed = q + noise
    assert (signed < 0).any() and np.any(noise != 0)
    assert enc.ring.dtype == np.dtype(f"<u{bits // 8}")
    assert np.array_equal(enc.ring, (signed % 2**bits).astype(enc.ring.dtype))
    assert np.array_equal(codec.to_signed(enc.ring), signed)
    again = codec.encode(x, 0.7, SecureRandom.from_seed(4, "ring"))
    assert np.array_equal(again.ring, enc.ring)  # a deterministic function of the generator's key


@settings(max_examples=15, deadline=None)
@given(levels=st.integers(1, 20), seed=st.integers(0, 2**32 - 1), spike=st.booleans())
def test_float32_rotation_stays_within_its_stated_error(levels, seed, spike):
    """The device rotates in float32; every bound that depends on it (the clip margin, the rounding
    bound) assumes an error of at most ROTATION_ERROR of the norm. Measured: 2^-22.7 to 2^-28 (dense and
    single-spike inputs, up to 2^20 coordinates)."""
    n = 1 << levels
    g = np.random.default_rng(seed)
    x = np.zeros(n) if spike else g.normal(size=n)
    if spike:
        x[g.integers(0, n)] = g.normal() * 1e3
    exact = user_encoding._fwht_scaled(x.copy(), 1.0 / math.sqrt(n))
    single = user_encoding._fwht_scaled(x.astype(np.float32), 1.0 / math.sqrt(n))
    assert single.dtype == np.float32
    error = float(np.linalg.norm(single.astype(np.float64) - exact))
    assert error <= 2.0**-19 * float(np.linalg.norm(x)) + 1e-300
    assert 2.0**-19 < user_encoding.ROTATION_ERROR

"""The compiled loops (``privacy/_native.c``) against their numpy definitions: the same values, bit
for bit, on the same keystream; and the loops refuse buffers of the wrong size.

Skipped where the extension is not built, unless ``FTTE_REQUIRE_NATIVE=1`` (the Makefile's test
target sets it, so CI notices an install that silently lost the extension)."""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ftte.privacy import native
from ftte.privacy.distributed_dp import UserDPParams, _envelope, _sample, discrete_gaussian, plan_user_dp
from ftte.privacy.secure_random import SecureRandom
from ftte.protocol import user_encoding
from ftte.protocol.user_encoding import UserCodec, rotation_seed

if not native.built():
    if os.environ.get("FTTE_REQUIRE_NATIVE") == "1":
        raise AssertionError("ftte.privacy._native is not built but FTTE_REQUIRE_NATIVE=1")
    pytest.skip("the compiled loops are not built here", allow_module_level=True)


@pytest.fixture
def numpy_only():
    """Run the body with the numpy definitions, then restore."""
    before = native.use(False)
    yield
    native.use(before)


def _both(fn):
    """fn() with the compiled loops, then with numpy (the rotation by its butterflies, the compiled
    rotation's definition, not the BLAS products); the state is restored either way."""
    before = native.use(True)
    try:
        compiled = fn()
        native.use(False)
        with _butterflies():
            reference = fn()
    finally:
        native.use(before)
    return compiled, reference


@contextlib.contextmanager
def _butterflies():
    real = user_encoding._one_blas_thread
    user_encoding._one_blas_thread = lambda: None  # "no BLAS to limit": _fwht_scaled runs _fwht_inplace
    try:
        yield
    finally:
        user_encoding._one_blas_thread = real


@pytest.mark.parametrize("sigma,table_sigmas", [(0.5, 14), (3.0, 14), (40.0, 14), (3000.0, 14), (2.66e6, 14),
                                                (1e8, 14), (3.0, 1.5), (50.0, 0.6), (1e5, 3.0)])
def test_compiled_sampler_draws_the_same_integers_and_keystream(sigma, table_sigmas):
    env = _envelope(sigma, table_sigmas)

    def draw():
        rng = SecureRandom.from_seed(5, "native", str(sigma), str(table_sigmas))
        return _sample(rng, 150_000, env), rng.bytes_drawn

    (got, used), (want, want_used) = _both(draw)
    assert got.dtype == np.int64 and np.array_equal(got, want) and used == want_used


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 200_000), seed=st.integers(0, 2**32 - 1),
       sigma=st.sampled_from([1.0, 17.0, 250.0, 7e4, 2.66e6]))
def test_compiled_sampler_agrees_for_any_count(n, seed, sigma):
    """Counts across block boundaries (multiples of 2^16 and not) and several batches."""
    got, want = _both(lambda: discrete_gaussian(SecureRandom.from_seed(seed, "n"), n, sigma))
    assert np.array_equal(got, want)


@settings(max_examples=20, deadline=None)
@given(dim=st.integers(1, 70_000), seed=st.integers(0, 2**32 - 1), weight=st.floats(0.05, 1.0),
       norm=st.floats(0.0, 3.0), bits=st.sampled_from([16, 32]))
def test_compiled_rounding_gives_the_same_encoding(dim, seed, weight, norm, bits):
    """encode() with the compiled rounding-and-ring loop equals encode() with numpy's passes:
    the same rounded vector, noise and ring residues (clipped and unclipped inputs, both rings)."""
    if bits == 32:
        params = plan_user_dp(dim=dim, clip=1.0, noise_multiplier=0.8, members=20, threshold=11)
    else:  # a small ring, set by hand (plan_user_dp refuses 16 bits at most of these sizes)
        params = UserDPParams(dim=dim, clip=1.0, scale=40.0, sigma=3.0, calibrated_for=2, members=3, ring_bits=16)
    codec = UserCodec(params, rotation_seed(f"c{seed}"))
    x = np.random.default_rng(seed).normal(size=dim)
    x *= norm / max(float(np.linalg.norm(x)), 1e-300)
    got, want = _both(lambda: codec.encode(x, weight, SecureRandom.from_seed(seed, "enc")))
    assert np.array_equal(got.rounded, want.rounded)
    assert np.array_equal(got.noise, want.noise)
    assert got.ring.dtype == want.ring.dtype and np.array_equal(got.ring, want.ring)


def _round(y, words, noise, limit, ring_dtype="<u4", total=0):
    ring = np.empty(len(y), dtype=ring_dtype)
    return native.round_ring(np.asarray(y, np.float32), np.asarray(words, np.uint32), np.asarray(noise, np.int32),
                             limit, total, ring), ring


def test_round_ring_sums_the_norm_saturates_past_the_limit_and_refuses_31_bits():
    y, words, z = np.full(1000, 100.25), np.zeros(1000), np.zeros(1000)
    total, ring = _round(y, words, z, 100 * 100 * 1000)
    assert total == 100 * 100 * 1000 and np.all(ring == 100)
    assert _round(y, words, z, 100 * 100 * 1000 - 1)[0] == 100 * 100 * 1000  # saturated at limit + 1
    assert _round(y, words, z, 10**12, total=5)[0] == 5 + 100 * 100 * 1000  # pieces add up
    assert _round(np.full(4, 3e9), np.zeros(4), np.zeros(4), 2**62)[0] == -1
    total, ring = _round([-1.5, -0.25], [2**31, 2**31 + 2**30], [0, -3], 10, "<u2")
    assert total == 1 and ring.tolist() == [2**16 - 1, 2**16 - 3]  # q = -1, 0


@settings(max_examples=20, deadline=None)
@given(levels=st.integers(0, 20), seed=st.integers(0, 2**32 - 1), factor=st.sampled_from([1.0, 0.5, 1e-3, 3.7e6]))
def test_compiled_rotation_is_the_float32_butterflies(levels, seed, factor):
    """Odd and even numbers of levels, below and above the 2^16 block."""
    x = np.random.default_rng(seed).normal(size=1 << levels).astype(np.float32)
    want = user_encoding._fwht_inplace(x.copy())
    if factor != 1.0:
        want *= factor
    got = x.copy()
    native.fwht_f32(got, factor)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("levels", [0, 1, 2, 3, 15, 16, 17, 18])
def test_compiled_rotation_scales_in_its_last_pass_at_every_shape(levels):
    """The factor is folded into the last pass (radix-4 inside the block, across blocks, or the
    radix-2 pass of an odd number of levels); the values must still be the butterflies' times the
    float32 factor."""
    x = np.random.default_rng(levels).normal(size=1 << levels).astype(np.float32)
    want = user_encoding._fwht_inplace(x.copy())
    want *= 0.3
    got = x.copy()
    native.fwht_f32(got, 0.3)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("update", ["one coordinate 1e39", "every coordinate 1e37", "one coordinate 1e30"])
def test_a_huge_update_is_clipped_alike_on_both_paths(update):
    """The float32 rotation sums up to sqrt(d') ||x|| before it scales: a huge (finite) update is
    clipped in float64 first, so both paths encode the clipped update, within the sensitivity
    (once, the numpy path wrapped inf to int64's minimum and encoded zeros)."""
    params = plan_user_dp(dim=1000, clip=1.0, noise_multiplier=0.8, members=20, threshold=11)
    codec = UserCodec(params, rotation_seed("huge"))
    x = np.zeros(1000)
    if update == "every coordinate 1e37":
        x[:] = 1e37
    else:
        x[0] = float(update.split()[-1])
    got, want = _both(lambda: codec.encode(x, 1.0, SecureRandom.from_seed(1, "huge"), noise=False))
    assert np.array_equal(got.ring, want.ring)
    norm = float(np.linalg.norm(got.rounded))
    assert params.clip * params.scale * 0.99 < norm <= params.sensitivity


def test_numpy_rounding_refuses_values_it_cannot_hold():
    codec = UserCodec(plan_user_dp(dim=4, clip=1.0, noise_multiplier=0.8, members=20, threshold=11),
                      rotation_seed("r"))
    for bad in (np.array([np.inf, 0, 0, 0]), np.array([np.nan, 0, 0, 0]), np.array([3e9, 0, 0, 0])):
        with pytest.raises(ValueError):
            user_encoding._floor_plus_uniform(bad, SecureRandom.from_seed(0, "r"))
    assert codec.length == 4


def test_compiled_rounding_over_many_pieces_and_redraws_matches_numpy(monkeypatch):
    """Pieces of 1,000 coordinates and a norm limit that only a fraction of draws meet: the compiled
    loop redraws exactly as numpy's (same ring, same keystream consumed), on both ring sizes."""
    monkeypatch.setattr(user_encoding, "_NATIVE_PIECE", 1000)
    monkeypatch.setattr(user_encoding, "_ROUND_CHUNK", 777)
    for bits in (16, 32):
        params = UserDPParams(dim=5000, clip=1.0, scale=40.0 if bits == 16 else 4000.0, sigma=3.0, calibrated_for=2,
                              members=3, ring_bits=bits)
        codec = UserCodec(params, rotation_seed("pieces"))
        x = np.random.default_rng(0).normal(size=5000)
        y = codec.rotate(x * (0.999 / np.linalg.norm(x)), params.scale, np.float32)
        for seed in range(50):  # a generator whose first draw misses a limit a later draw meets
            ahead = SecureRandom.from_seed(seed, "pieces", str(bits))
            norms = [user_encoding._floor_plus_uniform(y, ahead)[1] for _ in range(10)]
            limit = min(norms[1:])
            if norms[0] > limit:
                break
        else:
            raise AssertionError("no generator draws a first rounding above a later one")
        monkeypatch.setattr(UserCodec, "_limit_sq", property(lambda self: limit))
        z = np.zeros(params.padded_dim, dtype=np.int32)
        native.use(True)
        fast_rng = SecureRandom.from_seed(seed, "pieces", str(bits))
        try:
            got = codec._round_to_ring_native(y, z, fast_rng)
        finally:
            native.use(False)
        slow_rng = SecureRandom.from_seed(seed, "pieces", str(bits))
        want = codec.to_ring(codec._round_bounded(y, slow_rng), z)
        assert np.array_equal(got, want)
        assert fast_rng.bytes_drawn == slow_rng.bytes_drawn > 4 * params.padded_dim  # redrawn at least once


def _crafted(first: int, second: int) -> np.ndarray:
    return np.array([first, second], dtype=np.uint32)  # one attempt: its first word, its second word


def test_compiled_sampler_sorts_crafted_attempts_like_the_full_test():
    """One attempt at a time, words chosen to hit each case: a selected tail entry and a tie go to
    the numpy test (pending); an unselected tail entry, a "-0" and a head far above its acceptance
    are refused; a head below the fast bound is accepted with its sign."""
    from ftte.privacy.distributed_dp import _EXP_POLY, _exponent_scale

    env = _envelope(2.66e6)
    assert env.tail_select == 16

    def run(first, second):
        value, pending = native.dg_batch(_crafted(first, second), 1 << 16, env, 1, _exponent_scale(env), _EXP_POLY)
        return int(value[0]), pending.tolist()

    entry_of_bin = {int(b): int(np.flatnonzero(env.guide == b)[0]) for b in (0, 5, env.bins, env.bins + 1)}
    tail = entry_of_bin[env.bins] << 16
    assert run(tail | 0, 0)[1] == [0]  # selected (spare bits zero): pending
    assert run(tail | 1, 0) == (np.iinfo(np.int32).min, [])  # unselected: refused
    assert run(entry_of_bin[0] << 16, 1) == (np.iinfo(np.int32).min, [])  # bin 0, offset 0, sign set: "-0"
    assert run(entry_of_bin[0] << 16, 0)[0] == 0  # bin 0, offset 0, head 0: accepted zero
    assert run(entry_of_bin[env.bins + 1] << 16, 0)[1] == [0]  # a reject entry at head 0 ties p = 0: pending
    assert run(entry_of_bin[env.bins + 1] << 16, 2)[0] == np.iinfo(np.int32).min  # head 1 > 0: refused
    b5 = entry_of_bin[5] << 16
    lo5 = int(env.lo_at[entry_of_bin[5]])
    assert run(b5 | 3, 0) == (lo5 + 3, [])  # head 0: under the fast bound
    assert run(b5 | 3, 1) == (-(lo5 + 3), [])  # the same, negative
    assert run(b5 | 3, 0xFFFFFFFE)[0] == np.iinfo(np.int32).min  # the largest head: refused


def test_loops_refuse_buffers_of_the_wrong_size():
    from ftte.privacy import _native

    env = _envelope(1e4)
    tables = (env.thr_at, env.lo_at, env.guide, env.low, env.bias)
    poly = np.ones(3)

    def batch(words, tabs=tables, k=10):
        return _native.dg_batch(words, 16, *tabs, 1, 0xFFFF, -1e-8, poly, np.zeros(k, np.int32), np.zeros(k, np.int64))

    assert batch(np.zeros(20, np.uint32)) == 0  # well formed: ten attempts, none pending
    with pytest.raises(ValueError):  # words for 10 attempts, value and pending for 11
        batch(np.zeros(20, np.uint32), k=11)
    with pytest.raises(ValueError):  # a table of the wrong size
        batch(np.zeros(20, np.uint32), (env.thr_at[:-1],) + tables[1:])
    with pytest.raises(ValueError):  # bias for one bin fewer than low
        batch(np.zeros(20, np.uint32), tables[:4] + (env.bias[:-1],))
    bad_guide = env.guide.copy()
    bad_guide[7] = env.bins + 2  # past the reject entries: would read beyond low and bias
    with pytest.raises(ValueError):
        batch(np.zeros(20, np.uint32), tables[:2] + (bad_guide,) + tables[3:])
    with pytest.raises(ValueError):  # 7 words for 8 coordinates
        _native.round_ring(np.zeros(8, np.float32), np.zeros(7, np.uint32), np.zeros(8, np.int32), 10, 0,
                           np.zeros(8, np.uint32))
    with pytest.raises(ValueError):  # a ring of 3-byte items
        _native.round_ring(np.zeros(8, np.float32), np.zeros(8, np.uint32), np.zeros(8, np.int32), 10, 0,
                           np.zeros(24, np.uint8))
    with pytest.raises(ValueError):  # not a power of two
        _native.fwht_f32(np.zeros(12, np.float32), 1.0)
    with pytest.raises(TypeError):
        native.fwht_f32(np.zeros(8, np.float64), 1.0)
    with pytest.raises(TypeError):
        native.round_ring(np.zeros(8, np.float64), np.zeros(8, np.uint32), np.zeros(8, np.int32), 10, 0,
                          np.zeros(8, np.uint32))


def test_the_switch_turns_the_loops_off(numpy_only, monkeypatch):
    assert native.built() and not native.enabled()
    native.use(True)
    assert native.enabled()
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    assert not native.enabled()

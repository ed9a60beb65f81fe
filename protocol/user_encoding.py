"""The device's user-level contribution and the server's decoding of the noisy sum.

Device (:meth:`UserCodec.encode`): clip the whole update (the trained subset) to ``C``,
multiply by the device's public weight ``w <= 1``, pad to ``d'`` (a power of two), rotate
with the cohort's randomized Walsh-Hadamard transform ``H D / sqrt(d')``, scale by ``s``,
round (``floor(y + u)``, ``u`` uniform: unbiased, and every coordinate moves by less than
1, so the norm stays below ``C s + sqrt(d')``, the sensitivity the accountant uses), add
``d'`` discrete Gaussians and embed in the ring ``Z_(2^b)``.

Server (:meth:`UserCodec.decode_sum`): read the unmasked ring sum as signed integers,
divide by ``s``, undo the rotation (it is orthonormal and its own inverse up to the signs)
and drop the padding. What comes out is ``sum w * clip(Delta)`` plus noise of variance
``k Var(N_Z(0, sigma^2)) / s^2`` per coordinate for ``k`` survivors.

Why rotate: after ``H D`` every coordinate of a vector of norm ``C`` is about ``C/sqrt(d')``
whatever the update looked like, so the rounding error and the noise are spread evenly,
and no coordinate carries a spike that a smaller ring would have to clip. The signs ``D``
are public (derived from the cohort id and a caller-given binding with HKDF in
:class:`SecureRandom`): privacy never relies on them, only the flattening does.

The weight must not depend on private data: in user mode it is the staleness weight
``(1 + tau)^-a`` alone (no variance term), which the server can compute for itself, so
``sum w`` is not sent. Only the ``d'`` update coordinates are masked.
"""

from __future__ import annotations

import functools
import math
import threading
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np

from ftte.crypto.primitives import sha256
from ftte.privacy import native
from ftte.privacy.distributed_dp import UserDPParams, discrete_gaussian
from ftte.privacy.secure_random import SOURCE_KEY, SecureRandom

_ROTATION_DOMAIN = b"ftte/user-dp/rotation/v1"
# The device rotates in float32 (half the memory traffic of float64; the rotation was the largest
# part of the mechanism's cost). Its error is far below one rounding unit: a relative error of at
# most ROTATION_ERROR of the norm is what the bounds below allow. Worst case, about (L + 4) 2^-24
# for L levels of butterflies and about 20 units of 2^-24 per BLAS product with factors of 8: under
# 2^-16 up to 2^30 coordinates; measured, 2^-22.7 to 2^-28 from 2^10 to 2^20
# coordinates, dense and single-spike inputs, both transforms (tests/protocol/test_user_encoding.py).
ROTATION_ERROR = 2.0**-16
_CLIP_MARGIN = 1.0 - ROTATION_ERROR  # so that the float32 rotation stays within C s, under the exact norm check
_FLOAT32_SAFE = 1e36  # below float32's largest value (3.4e38) with room for the transform's rounding


_BLOCK = 1 << 16  # levels inside 64k-element blocks first, while a block stays in cache


def _radix4(y: np.ndarray, h: int, t1: np.ndarray, t2: np.ndarray) -> int:
    """Levels h, 2h, 4h, ... of the transform of ``y`` in place, two per pass (a 4-point Hadamard on
    (a, b, c, d) = quarters of every group of 4h); returns the first level not done. ``t1``,
    ``t2``: scratch of len(y)/4."""
    n = y.shape[0]
    while 4 * h <= n:
        v = y.reshape(-1, 4, h)
        a, b, c, d = v[:, 0, :], v[:, 1, :], v[:, 2, :], v[:, 3, :]
        s1, d1 = t1.reshape(-1, h), t2.reshape(-1, h)
        np.add(a, b, out=s1)
        np.subtract(a, b, out=d1)
        np.add(c, d, out=a)  # s2
        np.subtract(c, d, out=b)  # d2
        np.subtract(s1, a, out=c)  # s1 - s2
        a += s1  # s1 + s2
        np.subtract(d1, b, out=d)  # d1 - d2
        b += d1  # d1 + d2
        h *= 4
    return h


def fwht(x: np.ndarray) -> np.ndarray:
    """Unnormalised Walsh-Hadamard transform of a float64 vector whose length is a power of two
    (a new array; H H = d' I): :func:`_fwht_scaled` with factor 1."""
    return _fwht_scaled(np.array(x, dtype=np.float64), 1.0)


# -- the transform as a few matrix products --------------------------------------------------------
#
# H_(2^m)[j, i] = (-1)^popcount(i & j) factors over any split of the m index bits into groups, so
# H_n = H_k1 (x) H_k2 (x) ... (x) H_kr with k1 k2 ... kr = n, and applying H_k along one axis of
# x (read as an array of shape (k1, ..., kr)) is a matrix product with a small +-1 matrix.
#
# Low bits, in cache: each block of 512 kB (2^16 doubles, 2^17 floats) is transformed on its
# own (the Kronecker factor of the low 16 or 17 bits). Read the block as (k1, rest); then
# ``block.reshape(k1, -1).T @ H_k1`` applies H_k1 along the first axis and leaves it last (a
# contiguous (rest, k1) result), so r such products, ping-ponging between the block and one
# scratch block, bring the axes back in order. High bits, across blocks: read the whole vector
# as (a, k, c) with c a multiple of the block; ``H_k @ v[a, :, strip]`` applies H_k along the
# middle axis, strip by strip through the scratch block and back (in place: no second 8 MB
# array, whose fresh pages cost as much system time as the products took). At 2^20: six products per block (8 x 8 four times,
# then 4 x 4 twice), then two 4 x 4 products across the 16 blocks: three passes over the 8 MB
# instead of ten radix-4 butterfly passes, about 100 flops per element in a BLAS kernel.
#
# BLAS threads: on a loaded small machine, OpenBLAS's default threads spin against other work
# (np.dot of 1e6 doubles took 14 ms instead of 0.1 ms), so the products run with BLAS limited to
# one thread (threadpoolctl, a declared dependency), under a lock so that
# concurrent callers restore the limit in order. Where no BLAS can be limited, the numpy
# butterflies below (no BLAS at all) do the work.

_BLOCK_BYTES = 1 << 19  # the in-cache block: 2^16 doubles or 2^17 floats; it and its scratch fill a 1 MB L2
# (float32 at 2^17 measured 2.5-2.7 ms against 2.8-2.9 at 2^16 for d' = 2^20)
_FACTOR_LEVELS = 3  # Hadamard factors of at most 2^3 = 8 (8, 16, 32 measured: 8 and 16 within 5 %, 32 slower)


def _factor_sizes(levels: int) -> list[int]:
    """Near-equal powers of two, each at most 2^_FACTOR_LEVELS, whose product is 2^levels."""
    count = -(-levels // _FACTOR_LEVELS)
    if count == 0:
        return []
    base, extra = divmod(levels, count)
    return [1 << (base + (1 if i < extra else 0)) for i in range(count)]


@functools.lru_cache(maxsize=32)
def _hadamard(k: int, dtype: str = "float64") -> np.ndarray:
    """The k x k Sylvester Hadamard matrix, entries +-1 (read-only: shared by every call)."""
    h = np.ones((1, 1), dtype=dtype)
    while h.shape[0] < k:
        h = np.block([[h, h], [h, -h]])
    h.setflags(write=False)
    return h


_BLAS_LOCK = threading.Lock()


@functools.lru_cache(maxsize=1)
def _blas_controller():
    """threadpoolctl's view of the BLAS libraries loaded with numpy, or None if it sees none (or is
    missing): then the butterflies, which need no BLAS, are used."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - a declared dependency
        return None
    controller = ThreadpoolController().select(user_api="blas")
    return controller if controller.lib_controllers else None


def _one_blas_thread() -> AbstractContextManager | None:
    controller = _blas_controller()
    return None if controller is None else controller.limit(limits=1, user_api="blas")


def _fwht_scaled(y: np.ndarray, factor: float) -> np.ndarray:
    """``factor * H y`` for a float64 or float32 vector of power-of-two length, in place (returns
    ``y``), in ``y``'s precision. In float32, where the compiled loops are built, they run
    :func:`_fwht_inplace`'s operations (the same values as the butterflies, not as the products)."""
    n = y.shape[0]
    if n < 1 or n & (n - 1):
        raise ValueError("length must be a power of two")
    if y.dtype not in (np.float64, np.float32):
        raise TypeError(f"the transform runs in float64 or float32, got {y.dtype}")
    if y.dtype == np.float32 and native.enabled():
        native.fwht_f32(y, factor)
        return y
    levels = n.bit_length() - 1
    block_levels = (_BLOCK_BYTES // y.dtype.itemsize).bit_length() - 1
    inner = _factor_sizes(min(levels, block_levels))
    outer = _factor_sizes(levels - min(levels, block_levels))
    mats = [_hadamard(k, y.dtype.name) for k in inner + outer]
    if mats and factor != 1.0:
        mats[-1] = mats[-1] * factor
    with _BLAS_LOCK:
        limit = _one_blas_thread() if mats else None
        if limit is None:
            out = _fwht_inplace(y)
            if factor != 1.0:
                out *= factor
            return out
        with limit:
            block = 1 << min(levels, block_levels)
            scratch = np.empty(block, dtype=y.dtype)
            for start in range(0, n, block):
                cur, other = y[start:start + block], scratch
                for k, h in zip(inner, mats):
                    np.matmul(cur.reshape(k, -1).T, h, out=other.reshape(-1, k))
                    cur, other = other, cur
                if cur is scratch:
                    y[start:start + block] = scratch
            before = 1
            for k, h in zip(outer, mats[len(inner):]):
                v = y.reshape(before, k, n // (before * k))
                strip = block // k  # k rows of a strip fill one scratch block
                for a in range(before):
                    for c in range(0, v.shape[2], strip):
                        rows = v[a, :, c:c + strip]
                        np.matmul(h, rows, out=scratch.reshape(k, strip))
                        rows[...] = scratch.reshape(k, strip)
                before *= k
    return y


def _fwht_inplace(y: np.ndarray) -> np.ndarray:
    """The transform by radix-4 butterflies, cache-blocked, numpy only (no BLAS): the fallback of
    :func:`_fwht_scaled` where BLAS threads cannot be limited, and the reference it is tested
    against."""
    n = y.shape[0]
    if n < 1 or n & (n - 1):
        raise ValueError("length must be a power of two")
    block = min(_BLOCK, n)
    t1 = np.empty(max(1, n // 4), dtype=y.dtype)
    t2 = np.empty_like(t1)
    h = 1
    for start in range(0, n, block):
        h = _radix4(y[start:start + block], 1, t1[: max(1, block // 4)], t2[: max(1, block // 4)])
    h = _radix4(y, h, t1, t2)
    if h < n:  # an odd number of levels: one radix-2 pass
        v = y.reshape(-1, 2, h)
        a, b = v[:, 0, :], v[:, 1, :]
        t = a - b
        a += b
        b[...] = t
    return y


def rotation_signs(seed: bytes, padded: int) -> np.ndarray:
    """The diagonal of ``D``: ``padded`` public random signs (+1.0 / -1.0) from ``seed``."""
    rng = SecureRandom.from_key(seed, source=SOURCE_KEY)
    bits = np.unpackbits(np.frombuffer(rng.random_bytes((padded + 7) // 8), dtype=np.uint8))[:padded]
    return 1.0 - 2.0 * bits.astype(np.float64)


def rotation_seed(cohort_id: str, binding: bytes = b"") -> bytes:
    """The 32-byte rotation key of a cohort: both sides derive it from what they already share."""
    return sha256(_ROTATION_DOMAIN, cohort_id.encode("utf-8"), binding)


def _squared_norm(x: np.ndarray) -> float:
    """``x . x`` in float64 without BLAS: on a busy 2-core machine OpenBLAS's threads made ``np.dot``
    of 1e6 doubles take 14 ms instead of 0.1 ms; einsum's own loop takes 0.25 ms whatever the load."""
    return float(np.einsum("i,i->", x, x, dtype=np.float64))


_ROUND_CHUNK = 1 << 16  # coordinates per pass: temporaries stay in cache and are reused
_ROUND_TRIES = 64  # redraws of the rounding before the input is declared beyond the clip
_NATIVE_PIECE = 1 << 18  # coordinates per call of the compiled rounding: its 1 MB of words is reused


def _floor_plus_uniform(y: np.ndarray, rng: SecureRandom) -> tuple[np.ndarray, int]:
    """``(q, ||q||^2)`` with ``q = floor(y + u)``, ``u = k / 2^32``, ``k`` a uniform 32-bit word from
    the keystream (drawn chunk by chunk: the same words as one draw of ``4 d'`` bytes).

    Why 32 bits and not 53: the rounding's randomness protects nothing (the noise does); it
    only makes the rounding unbiased, and with ``u`` on a 2^-32 grid ``E[floor(y + u)]`` is
    within 2^-32 of ``y``, far below the noise. Every coordinate still moves by less than 1,
    so the norm bound (the sensitivity) holds exactly; half the keystream of 53-bit uniforms.
    The squared norm is summed in int64 (exact)."""
    n = y.shape[0]
    q = np.empty(n, dtype=np.int64)
    total = 0
    for start in range(0, n, _ROUND_CHUNK):
        part = y[start:start + _ROUND_CHUNK]
        u = np.multiply(rng.words(part.shape[0], "<u4"), 2.0**-32)
        u += part
        np.floor(u, out=u)
        if not (u.min() > -2.0**31 and u.max() < 2.0**31):  # NaN fails too: refuse, never wrap in int64
            raise ValueError("rounding cannot meet the norm bound: a coordinate is not finite or beyond 2^31")
        chunk = q[start:start + part.shape[0]]
        chunk[...] = u
        total += int(np.einsum("i,i->", chunk, chunk))  # int64 arithmetic, and no BLAS
    return q, total


@dataclass(frozen=True)
class EncodedUpdate:
    ring: np.ndarray  # what is handed to secure aggregation (uint16/uint32, length d')
    noise: np.ndarray  # the signed noise added (int32: every draw of a plan's sigma fits)

    @functools.cached_property
    def rounded(self) -> np.ndarray:
        """The signed rounded contribution before noise (int64), for tests and checks: the ring
        minus the noise, read as signed (exact, since every ``|q|`` is below the sensitivity and the
        ring holds ``2^(b-1)`` beyond it, see ``plan_user_dp``)."""
        residue = np.subtract(self.ring, self.noise, out=np.empty_like(self.ring), casting="unsafe")  # mod 2^b
        return residue.view(f"<i{self.ring.dtype.itemsize}").astype(np.int64)  # as UserCodec.to_signed reads it


class UserCodec:
    """One cohort's user-level encoding; built once per cohort on each side (signs cached)."""

    def __init__(self, params: UserDPParams, seed: bytes) -> None:
        if len(seed) != 32:
            raise ValueError("rotation seed must be 32 bytes")
        self.params = params
        self.signs = rotation_signs(seed, params.padded_dim)
        self._dtype = np.dtype("<u4") if params.ring_bits == 32 else np.dtype("<u2")
        self._signed = np.int32 if params.ring_bits == 32 else np.int16

    @property
    def length(self) -> int:
        return self.params.padded_dim

    def rotate(self, x: np.ndarray, factor: float = 1.0, dtype: type = np.float64) -> np.ndarray:
        """``factor * H D x / sqrt(d')`` (padded with zeros), the factor folded into one pass, computed
        in ``dtype`` (the device uses float32, see :data:`ROTATION_ERROR`)."""
        p = self.params
        padded = np.empty(p.padded_dim, dtype=dtype)
        np.multiply(x, self.signs[: p.dim], out=padded[: p.dim], casting="same_kind")
        padded[p.dim:] = 0.0
        return _fwht_scaled(padded, factor / math.sqrt(p.padded_dim))

    def unrotate(self, y: np.ndarray) -> np.ndarray:
        out = _fwht_scaled(np.array(y, dtype=np.float64), 1.0 / math.sqrt(self.params.padded_dim))
        out *= self.signs
        return out[: self.params.dim]

    def round(self, y: np.ndarray, rng: SecureRandom) -> np.ndarray:
        """floor(y + u): unbiased (to 2^-32, see :func:`_floor_plus_uniform`), each coordinate within 1
        of y, so ``||q|| < ||y|| + sqrt(d')``.

        The bound the accountant uses is checked on the integers themselves (exact int64
        arithmetic) and a draw over it is redrawn (conditional rounding, as KLS): float error
        in the rotation can never push a contribution past the sensitivity."""
        if not _squared_norm(y) <= self._limit_sq:  # then ||q||^2 < (D + sqrt(d'))^2 < 2^63: no int64 overflow
            raise ValueError("rounding cannot meet the norm bound: the input exceeds the clip")
        return self._round_bounded(y, rng)

    @property
    def _limit_sq(self) -> int:
        return math.floor(self.params.sensitivity) ** 2  # sqrt(N) <= floor(D) <= D, in integers

    def _round_bounded(self, y: np.ndarray, rng: SecureRandom) -> np.ndarray:
        """:meth:`round` for a ``y`` already known to lie within the norm bound."""
        limit_sq = self._limit_sq
        for _ in range(_ROUND_TRIES):
            q, norm_sq = _floor_plus_uniform(y, rng)
            if norm_sq <= limit_sq:
                return q
        raise ValueError("rounding cannot meet the norm bound: the input exceeds the clip")

    def draw_noise(self, rng: SecureRandom) -> np.ndarray:
        """This cohort's noise, drawn ahead of time if the device likes (it depends on nothing
        but sigma and d', so it can be drawn while training); use it once, then forget it."""
        return discrete_gaussian(rng.child("user-dp/noise"), self.params.padded_dim, self.params.sigma, np.int32)

    def encode(self, update: np.ndarray, weight: float, rng: SecureRandom, *,
               noise: bool | np.ndarray = True) -> EncodedUpdate:
        """The device side. ``rng`` is the device's own generator (OS-keyed in deployment): its
        rounding and noise must stay secret from everyone, the server included. ``noise``:
        True draws it now, False adds none (tests), an array is noise from :meth:`draw_noise`."""
        p = self.params
        x = np.asarray(update, dtype=np.float64)
        if x.shape != (p.dim,):
            raise ValueError(f"update must have {p.dim} coordinates, got {x.shape}")
        if not 0.0 < weight <= 1.0:
            raise ValueError(f"weight must lie in (0, 1], got {weight}")
        norm = math.sqrt(_squared_norm(x))
        if not math.isfinite(norm):
            raise ValueError("update contains NaN or infinite values")
        limit = p.clip * _CLIP_MARGIN
        shrink = 1.0 if norm <= limit else limit / norm  # clip_l2, folded into the rotation's one multiply
        if norm * math.sqrt(p.padded_dim) > _FLOAT32_SAFE:
            # the float32 transform sums up to sqrt(d') ||x|| before its last pass scales: an update
            # that large is clipped in float64 first (an extra pass, for absurd inputs only)
            x, shrink = x * shrink, 1.0
        # ||x shrink|| <= C (1 - ROTATION_ERROR), so the float32 rotation is within C s: no need for
        # round()'s own check of y (a float64 pass over the vector)
        y = self.rotate(x, shrink * weight * p.scale, np.float32)
        if isinstance(noise, np.ndarray):
            if noise.shape != (p.padded_dim,) or noise.dtype != np.int32:
                raise ValueError(f"precomputed noise must be {p.padded_dim} int32 values")
            z = noise
        else:
            z = self.draw_noise(rng) if noise else np.zeros(p.padded_dim, dtype=np.int32)
        round_rng = rng.child("user-dp/round")
        if native.enabled():
            return EncodedUpdate(self._round_to_ring_native(y, z, round_rng), z)
        return EncodedUpdate(self.to_ring(self._round_bounded(y, round_rng), z), z)

    def _round_to_ring_native(self, y: np.ndarray, z: np.ndarray, rng: SecureRandom) -> np.ndarray:
        """``to_ring(_round_bounded(y, rng), z)`` by the compiled loop, piece by piece (the same
        keystream words, the same redraws, the same ring), without the int64 rounded vector."""
        limit_sq = self._limit_sq
        ring = np.empty(y.shape[0], dtype=self._dtype)
        for _ in range(_ROUND_TRIES):
            total = 0
            for start in range(0, y.shape[0], _NATIVE_PIECE):
                part = slice(start, start + _NATIVE_PIECE)
                total = native.round_ring(y[part], rng.words(ring[part].shape[0]), z[part], limit_sq, total, ring[part])
                if total < 0:
                    raise ValueError("rounding cannot meet the norm bound: the input exceeds the clip")
            if total <= limit_sq:
                return ring
        raise ValueError("rounding cannot meet the norm bound: the input exceeds the clip")

    def to_ring(self, values: np.ndarray, plus: np.ndarray | None = None) -> np.ndarray:
        """The two's-complement residues of ``values`` (+ ``plus``) mod 2^b: an int64 to uint32/uint16
        cast keeps the low bits; the sum is written straight into the ring array (one pass, no int64
        temporary)."""
        if plus is None:
            return values.astype(self._dtype)
        return np.add(values, plus, out=np.empty(values.shape, dtype=self._dtype), casting="unsafe")

    def to_signed(self, ring: np.ndarray) -> np.ndarray:
        return np.asarray(ring, dtype=self._dtype).view(self._signed).astype(np.int64)

    def decode_sum(self, ring_sum: np.ndarray) -> np.ndarray:
        """The server side: ``sum w clip(Delta)`` plus the survivors' noise, in update units."""
        if ring_sum.shape != (self.params.padded_dim,):
            raise ValueError(f"sum must have {self.params.padded_dim} coordinates")
        return self.unrotate(self.to_signed(ring_sum) / self.params.scale)

    def decoded_norm_bound(self, survivors: int, weight_sum: float, beta: float = 2.0**-40) -> float:
        """The largest L2 norm an honest cohort's decoded sum reaches except with probability
        ``beta``: ``weight_sum * C`` (clipped, weighted updates) plus the rounding bound plus the
        noise, whose squared norm over d' coordinates, each ``survivors sigma^2``-sub-Gaussian, exceeds
        ``v (d' + 2 sqrt(d' t) + 2 t)`` with probability at most ``e^-t`` (Hsu, Kakade, Zhang 2012).
        What the server core's impossible-sum check should use in user mode."""
        p = self.params
        t = math.log(1.0 / beta)
        var = survivors * p.sigma**2 / p.scale**2
        noise = math.sqrt(var * (p.padded_dim + 2.0 * math.sqrt(p.padded_dim * t) + 2.0 * t))
        return weight_sum * p.clip + self.rounding_bound(survivors) + noise

    def rounding_bound(self, survivors: int) -> float:
        """L2 bound of decoded-minus-plain-clipped (at C) with noise off: each survivor's rounding
        error has norm below sqrt(d'), its float32 rotation is off by at most ROTATION_ERROR of its
        norm C s, and the device clips at C (1 - ROTATION_ERROR); undoing the scale and the
        (orthonormal) rotation divides all by s."""
        p = self.params
        return survivors * (math.sqrt(p.padded_dim) / p.scale + 2.0 * ROTATION_ERROR * p.clip)


def decode_user_sum(codec: UserCodec, ring_sum: np.ndarray, weights: dict[int, float],
                    survivors: tuple[int, ...]) -> tuple[np.ndarray, float, str]:
    """The server's one rule for a user-level sum (simulator and deployment): decode, compute
    ``sum w`` from the survivors' public staleness weights, and refuse (a non-empty reason) a sum
    whose norm is beyond what honest members' noisy inputs reach (:meth:`UserCodec.decoded_norm_bound`)."""
    total = codec.decode_sum(ring_sum)
    wsum = float(sum(weights[m] for m in survivors))
    bound = codec.decoded_norm_bound(len(survivors), wsum)
    if not float(np.linalg.norm(total)) <= bound:
        return total, wsum, f"the decoded sum's norm exceeds the {bound:.4g} honest members reach"
    return total, wsum, ""

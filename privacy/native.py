"""The compiled loops of the user-level mechanism (``privacy/_native.c``), when they were built.

Why optional: they are an accelerator, not a second mechanism. Each has a numpy definition it
must equal bit for bit (``tests/privacy/test_native.py``); where the extension could not be
compiled (no C compiler at install time) or ``FTTE_NATIVE=0`` is set, the numpy code runs and
nothing else changes. :func:`enabled` says which is in use; ``ftte bench`` and the user-level
benchmark record it.

Why they exist at all: at a million coordinates the mechanism's numpy passes (the rotation, the
sampler, the rounding, the ring embedding) cost about three times the masking it rides on; as
single loops they cost much less (BENCHMARKS.md, "Compiled loops and a float32 rotation").

One difference in kind: the device's float32 rotation. Compiled, it is the radix-4 butterflies of
``_fwht_inplace``, value for value; with numpy alone it is the BLAS products of ``_fwht_scaled``
(faster than numpy butterflies), which round differently, within ``ROTATION_ERROR`` both. Every
other loop gives exactly the numpy path's values.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

try:
    from . import _native
except ImportError:  # not compiled: the numpy definitions run
    _native = None

if TYPE_CHECKING:
    from .distributed_dp import _Envelope

ENV_SWITCH = "FTTE_NATIVE"  # "0": use the numpy definitions even where the loops are built
_forced_off = False


def built() -> bool:
    """Whether the extension was compiled and imports."""
    return _native is not None


def enabled() -> bool:
    """Whether the compiled loops are used: built, not switched off by ``FTTE_NATIVE=0`` or
    :func:`use`."""
    return _native is not None and not _forced_off and os.environ.get(ENV_SWITCH, "1") != "0"


def use(on: bool) -> bool:
    """Switch the compiled loops on (if built) or off for this process; returns the previous
    state of :func:`enabled`. For tests and side-by-side benchmarks."""
    global _forced_off
    before = enabled()
    _forced_off = not on
    return before


def dg_batch(words: np.ndarray, chunk: int, env: "_Envelope", k: int, exponent_scale: float,
             poly: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The sampler over ``k`` attempts (2 words each): every attempt's signed draw or refusal, as
    :func:`ftte.privacy.distributed_dp._fast_pass` followed by ``_full_test`` decides it, except the
    attempts that need more keystream (tail entries, ties), returned as (value, pending indices)
    for the full test."""
    value = np.empty(k, dtype=np.int32)
    pending = np.empty(k, dtype=np.int64)
    if poly.dtype != np.float64 or not poly.flags.c_contiguous:
        raise TypeError("the polynomial's coefficients are contiguous float64")
    if env.guide.dtype != np.uint16 or env.low.dtype != np.float64 or env.bias.dtype != np.float64:
        raise TypeError("the envelope's guide is uint16, its low and bias float64")
    count = _native.dg_batch(_u32(words, 2 * k), chunk, _u32(env.thr_at, 1 << 16), _u32(env.lo_at, 1 << 16),
                             env.guide, env.low, env.bias, (1 << env.width_bits) - 1, (1 << env.tail_select) - 1,
                             float(exponent_scale),
                             poly, value, pending)
    return value, pending[:count]


def dg_compact(value: np.ndarray, out: np.ndarray) -> int:
    """Accepted draws of a batch (int32, refused = -2^31), in order, into ``out`` (int64 or int32)
    until full."""
    if value.dtype != np.int32 or out.dtype not in (np.int64, np.int32) or not (
            value.flags.c_contiguous and out.flags.c_contiguous):
        raise TypeError("dg_compact takes contiguous int32 values and an int64 or int32 output")
    return _native.dg_compact(value, out, out.itemsize)


def round_ring(y: np.ndarray, words: np.ndarray, noise: np.ndarray, limit_sq: int, total: int,
               ring: np.ndarray) -> int:
    """One piece of the device's rounding, in place into ``ring`` (uint32 or uint16):
    ``ring = (floor(y + words 2^-32) + noise) mod 2^b`` (float32 ``y``, the rounding computed in
    double as :func:`ftte.protocol.user_encoding._floor_plus_uniform` does). Returns ``total`` plus
    the piece's ``||q||^2``, saturated at ``limit_sq + 1``, or -1 if some ``|q|`` reaches 2^31."""
    n = y.shape[0]
    if y.dtype != np.float32 or noise.dtype != np.int32 or ring.dtype not in (np.uint32, np.uint16):
        raise TypeError("round_ring takes float32 y, int32 noise and a uint32 or uint16 ring")
    if noise.shape != (n,) or ring.shape != (n,):
        raise ValueError("noise and ring must match y")
    if not (y.flags.c_contiguous and noise.flags.c_contiguous and ring.flags.c_contiguous):
        raise TypeError("round_ring takes contiguous arrays")
    if not (0 <= limit_sq < 1 << 63 and 0 <= total < 1 << 64):
        raise ValueError("round_ring: limit_sq must lie in [0, 2^63)")
    return _native.round_ring(y, _u32(words, n), noise, int(limit_sq), int(total), ring)


def fwht_f32(y: np.ndarray, factor: float) -> None:
    """In place: ``factor * H y`` for a float32 vector of power-of-two length, with the float32
    operations of :func:`ftte.protocol.user_encoding._fwht_inplace` then ``y *= factor`` (the same
    values, bit for bit; about half the time of the BLAS products the numpy path uses)."""
    if y.dtype != np.float32 or y.ndim != 1 or not y.flags.c_contiguous or not y.flags.writeable:
        raise TypeError("fwht_f32 takes a writable contiguous float32 vector")
    _native.fwht_f32(y, float(factor))


def _u32(a: np.ndarray, n: int) -> np.ndarray:
    if a.dtype != np.uint32 or a.shape != (n,) or not a.flags.c_contiguous:
        raise TypeError(f"expected {n} contiguous uint32 values")
    return a

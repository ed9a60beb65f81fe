"""Fixed-point quantization into the ring Z_(2^m), and back for sums.

A value in [-c, c] maps to an integer in [-L, L] with L = 2^(value_bits-1) - 1 by
stochastic rounding (unbiased: E[q] = x·L/c), then to Z_(2^m) by two's complement. A sum
of K such integers stays exact as long as K·L <= 2^(m-1) - 1; :func:`choose_ring_bits`
picks the smallest m in {16, 32} that guarantees it, so a large positive sum can never
wrap into a negative one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ftte.crypto.prg import ring_dtype

RING_BITS = (16, 32)
_SIGNED = {16: np.int16, 32: np.int32}


class QuantizationError(ValueError):
    """A quantization setting cannot be represented without wrapping."""


def levels(value_bits: int) -> int:
    if not 2 <= value_bits <= 31:
        raise QuantizationError(f"value_bits must be in [2, 31], got {value_bits}")
    return 2 ** (value_bits - 1) - 1


def choose_ring_bits(cohort_size: int, value_bits: int) -> int:
    """The smallest ring (16 or 32 bits) in which ``cohort_size`` values of ``value_bits`` sum without wrapping."""
    if cohort_size < 1:
        raise QuantizationError("cohort size must be >= 1")
    need = cohort_size * levels(value_bits)
    for bits in RING_BITS:
        if need <= 2 ** (bits - 1) - 1:
            return bits
    raise QuantizationError(
        f"{cohort_size} values of {value_bits} bits can reach ±{need}, beyond a 32-bit ring; lower value_bits"
    )


@dataclass(frozen=True)
class Quantizer:
    """Clip norm ``clip`` per coordinate, ``value_bits`` of precision, ring of ``ring_bits``."""

    clip: float
    value_bits: int
    ring_bits: int

    def __post_init__(self) -> None:
        if not self.clip > 0 or not np.isfinite(self.clip):
            raise QuantizationError(f"clip must be a positive finite number, got {self.clip}")
        ring_dtype(self.ring_bits)
        if levels(self.value_bits) > 2 ** (self.ring_bits - 1) - 1:
            raise QuantizationError(f"{self.value_bits}-bit values do not fit a {self.ring_bits}-bit ring")

    @classmethod
    def for_cohort(cls, clip: float, value_bits: int, cohort_size: int) -> "Quantizer":
        return cls(clip, value_bits, choose_ring_bits(cohort_size, value_bits))

    @property
    def scale(self) -> float:
        return levels(self.value_bits) / self.clip

    def max_summands(self) -> int:
        """How many quantized values the ring can sum without wrapping."""
        return (2 ** (self.ring_bits - 1) - 1) // levels(self.value_bits)

    def quantize(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Clip, stochastically round and embed ``x`` into the ring."""
        x = np.asarray(x, dtype=np.float64)
        if not np.all(np.isfinite(x)):
            raise QuantizationError("cannot quantize NaN or infinite values")
        y = np.clip(x, -self.clip, self.clip) * self.scale
        q = np.floor(y + rng.random(y.shape)).astype(np.int64)
        return self.to_ring(q)

    def to_ring(self, q: np.ndarray) -> np.ndarray:
        """Signed integers to ring elements (two's complement, modulo 2^m)."""
        return (np.asarray(q, dtype=np.int64) & (2**self.ring_bits - 1)).astype(ring_dtype(self.ring_bits))

    def to_signed(self, ring: np.ndarray) -> np.ndarray:
        """Ring elements back to signed integers (valid while no sum has wrapped)."""
        return np.asarray(ring, dtype=ring_dtype(self.ring_bits)).view(_SIGNED[self.ring_bits]).astype(np.int64)

    def dequantize_sum(self, ring_sum: np.ndarray, count: int = 1) -> np.ndarray:
        """The float sum behind a ring sum of ``count`` quantized vectors; refuses a count that could wrap."""
        if count > self.max_summands():
            raise QuantizationError(
                f"a sum of {count} values can wrap a {self.ring_bits}-bit ring at {self.value_bits}-bit precision"
            )
        return self.to_signed(ring_sum) / self.scale

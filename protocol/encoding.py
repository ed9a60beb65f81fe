"""Turn a float update into what the device uploads: clip, weight, quantize (and later mask).

Layout of the integer vector handed to secure aggregation (length ``d + 2``):
``[q(w·Δ_1), ..., q(w·Δ_d), q(w), q(σ²)]``. Each part is scaled into the quantizer's
coordinate range: the update by ``range_sigmas·C/√d`` (an L2-clipped vector of norm C
has coordinates around C/√d, so the range loses little to clipping and keeps precision),
the weight as is (it lies in (0, 1]) and the variance as ``σ²·d/C²`` (at most 1 after
clipping). The server's sum then yields ``Σ w·Δ``, ``Σ w`` and ``Σ σ²`` and nothing else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ftte.crypto.quantize import Quantizer
from ftte.protocol.weighting import WeightRule, coordinate_variance, update_weight

EXTRA_COORDINATES = 2


def clip_l2(delta: np.ndarray, clip: float) -> np.ndarray:
    norm = float(np.linalg.norm(delta))
    if not np.isfinite(norm):
        raise ValueError("update contains NaN or infinite values")
    return delta if norm <= clip else delta * (clip / norm)


@dataclass(frozen=True)
class UpdateCodec:
    """Shared by device and server for one cohort: same d, clip, precision and ring."""

    dim: int  # number of update coordinates d (without the extras)
    clip: float  # L2 clip norm C of an update
    value_bits: int
    ring_bits: int
    range_sigmas: float = 4.0

    @property
    def coordinate_range(self) -> float:
        return self.range_sigmas * self.clip / math.sqrt(self.dim)

    @property
    def quantizer(self) -> Quantizer:
        return Quantizer(self.coordinate_range, self.value_bits, self.ring_bits)

    @property
    def length(self) -> int:
        return self.dim + EXTRA_COORDINATES

    def encode(self, weighted_delta: np.ndarray, weight: float, variance: float, rng: np.random.Generator) -> np.ndarray:
        if weighted_delta.shape != (self.dim,):
            raise ValueError(f"update must have {self.dim} coordinates, got {weighted_delta.shape}")
        if not 0 < weight <= 1:
            raise ValueError(f"weight must lie in (0, 1], got {weight}")
        r = self.coordinate_range
        extras = np.array([weight * r, min(1.0, variance * self.dim / self.clip**2) * r])
        return self.quantizer.quantize(np.concatenate([weighted_delta, extras]), rng)

    def decode_sum(self, ring_sum: np.ndarray, count: int) -> tuple[np.ndarray, float, float]:
        """(Σ w·Δ, Σ w, Σ σ²) from the unmasked ring sum of ``count`` encoded updates."""
        if ring_sum.shape != (self.length,):
            raise ValueError(f"sum must have {self.length} coordinates")
        total = self.quantizer.dequantize_sum(ring_sum, count)
        r = self.coordinate_range
        return total[: self.dim], float(total[self.dim] / r), float(total[self.dim + 1] / r * self.clip**2 / self.dim)


@dataclass(frozen=True)
class WeighedUpdate:
    """A device's update ready to encode: clipped, weighted by age and variance."""

    weighted: np.ndarray  # w · clip(Δ), float64
    weight: float  # w in (0, 1]
    variance: float  # σ² of clip(Δ)
    staleness: int  # τ = t_c - v


def weigh_update(delta: np.ndarray, base_version: int, close_version: int, reference_variance: float | None,
                 rule: WeightRule, clip: float) -> WeighedUpdate:
    """On the device, once the cohort's close version is known: clip, measure σ², weight."""
    clipped = clip_l2(np.asarray(delta, dtype=np.float64), clip)
    variance = coordinate_variance(clipped)
    staleness = close_version - base_version
    w = update_weight(staleness, variance, reference_variance, rule)
    return WeighedUpdate(w * clipped, w, variance, staleness)

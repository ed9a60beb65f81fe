"""Aggregation weights and the merge: pure functions, no I/O.

ftte's weight for an update trained from version ``v`` and merged at close version
``t_c`` (staleness ``τ = t_c - v``) with per-coordinate variance ``σ²``:

    s(τ)  = (1 + τ) ** (-a)
    ρ     = σ² / σ²_ref                     (σ²_ref: mean variance of the previous cohort)
    r(ρ)  = max(r_min, 1 / (1 + λ · max(0, ρ - 1)))
    w     = s(τ) · r(ρ)                     in (0, 1]

An update no noisier than the reference keeps its age weight; a noisier one is damped
smoothly, but never below ``r_min`` so that one cohort's odd reference cannot silence a
device. Staleness damping is the FedBuff rule generalised by ``a``; the variance term
is ours. ``w`` is computed on the device and announced by the server (so this lives in
``protocol``) and rides inside the masked sum, so the server learns only ``Σ w`` and ``Σ w·Δ``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np



@dataclass(frozen=True)
class WeightRule:
    """The weighting a cohort announces; built from ``[server]`` (no defaults here: one schema owns them)."""

    staleness_exponent: float  # a
    variance_penalty: float  # λ; 0 turns the variance term off (age-only weighting)
    r_min: float

    def __post_init__(self) -> None:
        if self.staleness_exponent < 0:
            raise ValueError("staleness_exponent must be >= 0")
        if self.variance_penalty < 0:
            raise ValueError("variance_penalty must be >= 0")
        if not 0 < self.r_min <= 1:
            raise ValueError("r_min must be in (0, 1]")


def staleness_factor(staleness: int, exponent: float) -> float:
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    return float((1.0 + staleness) ** (-exponent))


def variance_factor(variance: float, reference: float | None, penalty: float, r_min: float) -> float:
    if penalty == 0 or reference is None or reference <= 0 or not np.isfinite(variance):
        return 1.0
    excess = max(0.0, variance / reference - 1.0)
    return float(max(r_min, 1.0 / (1.0 + penalty * excess)))


def update_weight(staleness: int, variance: float, reference: float | None, rule: WeightRule) -> float:
    w = staleness_factor(staleness, rule.staleness_exponent) * variance_factor(
        variance, reference, rule.variance_penalty, rule.r_min
    )
    return float(min(1.0, max(w, np.finfo(np.float32).tiny)))


def coordinate_variance(delta: np.ndarray) -> float:
    """σ² of an update: the variance of its coordinates (a scale-free measure of its spread)."""
    delta = np.asarray(delta, dtype=np.float64)
    return float(delta.var()) if delta.size else 0.0

"""One step's Rényi-DP curve of the Poisson-subsampled Gaussian mechanism, fast.

Opacus computes the curve one order at a time, and for a fractional order it sums a
series term by term in Python (``_compute_log_a_for_frac_alpha``): ~0.1 s for its 150
default orders, and a target-ε noise search evaluates about a dozen noise values per
sample rate. This module runs the same series, term for term and
with the same stopping rule, but evaluates the two scipy special functions of each term
(the bulk of the cost on scalars) on blocks of terms at once. Integer orders are few and
short; their sums get the same treatment. The curve is bit-for-bit Opacus's (a test
compares curves and ε over a grid of noise multipliers and sample rates).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["rdp_one_step"]

_LOG_HALF = math.log(0.5)
_LOG_TWO = math.log(2)


def _log_add(logx: float, logy: float) -> float:
    a, b = min(logx, logy), max(logx, logy)
    if a == -math.inf:
        return b
    return math.log1p(math.exp(a - b)) + b


def _log_sub(logx: float, logy: float) -> float:
    if logx < logy:
        raise ValueError("The result of subtraction must be non-negative.")
    if logy == -math.inf:
        return logx
    if logx == logy:
        return -math.inf
    try:
        return math.log(math.expm1(logx - logy)) + logy
    except OverflowError:
        return logx


def _log_a_fractional(q: float, sigma: float, alpha: float) -> float:
    """Opacus's series for one fractional order, term for term. The two scipy special
    functions per term (``binom`` and ``log_ndtr``, 2/3 of the cost when called on scalars)
    are evaluated on blocks of indices at once; the same C kernels run elementwise, so
    every term is the float Opacus computes. The rest is Opacus's scalar arithmetic."""
    from scipy import special

    log_a0, log_a1 = -math.inf, -math.inf
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    log_q, log_1q = math.log(q), math.log(1 - q)
    scale = math.sqrt(2) * sigma
    two_var = 2 * (sigma**2)
    log_half, log_two = math.log(0.5), math.log(2)
    start, block = 0, 32
    while True:
        # Every operation below is IEEE-exact arithmetic on the same operands as Opacus's
        # scalar code (numpy's + - * / round like Python's), except log, taken with math.log.
        i = np.arange(start, start + block)
        fi = i.astype(np.float64)
        coefs = special.binom(alpha, fi)
        log_coef = np.array([math.log(abs(c)) for c in coefs.tolist()])
        j = alpha - fi
        log_t0 = log_coef + fi * log_q + j * log_1q
        log_t1 = log_coef + j * log_q + fi * log_1q
        log_e0 = log_half + (log_two + special.log_ndtr(-((fi - z0) / scale) * 2**0.5))
        log_e1 = log_half + (log_two + special.log_ndtr(-((z0 - j) / scale) * 2**0.5))
        s0 = (log_t0 + (i * i - i) / two_var + log_e0).tolist()
        s1 = (log_t1 + (j * j - j) / two_var + log_e1).tolist()
        positive = (coefs > 0).tolist()
        for k in range(block):
            x0, x1 = s0[k], s1[k]
            if positive[k]:  # _log_add inlined (this loop is the cost that is left)
                lo, hi = (x0, log_a0) if x0 < log_a0 else (log_a0, x0)
                log_a0 = hi if lo == -math.inf else math.log1p(math.exp(lo - hi)) + hi
                lo, hi = (x1, log_a1) if x1 < log_a1 else (log_a1, x1)
                log_a1 = hi if lo == -math.inf else math.log1p(math.exp(lo - hi)) + hi
            else:  # _log_sub inlined; its rare branches (a zero term, equal terms, overflow) call it
                d0, d1 = log_a0 - x0, log_a1 - x1
                if d0 > 0.0 and x0 != -math.inf and d0 < 700.0:
                    log_a0 = math.log(math.expm1(d0)) + x0
                else:
                    log_a0 = _log_sub(log_a0, x0)
                if d1 > 0.0 and x1 != -math.inf and d1 < 700.0:
                    log_a1 = math.log(math.expm1(d1)) + x1
                else:
                    log_a1 = _log_sub(log_a1, x1)
            if max(x0, x1) < -30:
                return _log_add(log_a0, log_a1)
        start += block
        block = min(2 * block, 4096)


def _log_a_integer(q: float, sigma: float, alpha: int) -> float:
    """Opacus's finite sum for an integer order (``_compute_log_a_for_int_alpha``), its
    ``binom`` on all indices at once and the same arithmetic per term."""
    from scipy import special

    i = np.arange(alpha + 1)
    log_binom = np.array([math.log(c) for c in special.binom(alpha, i.astype(np.float64)).tolist()])
    terms = (log_binom + i * math.log(q) + (alpha - i) * math.log(1 - q) + (i * i - i) / (2 * (sigma**2))).tolist()
    log_a = -math.inf
    for s in terms:
        log_a = _log_add(log_a, s)
    return float(log_a)


def rdp_one_step(q: float, sigma: float, orders: Sequence[float]) -> np.ndarray:
    """What ``opacus.accountants.analysis.rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=1,
    orders=orders)`` returns, computed with the fractional orders vectorised."""
    from opacus.accountants.analysis import rdp as opacus_rdp

    if q == 0 or sigma == 0 or q == 1.0 or any(np.isinf(a) for a in orders):
        return opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(orders))
    alphas = np.asarray(orders, dtype=np.float64)
    out = np.empty(len(alphas))
    frac = np.array([not float(a).is_integer() for a in orders])
    for k in np.flatnonzero(~frac):
        out[k] = _log_a_integer(q, sigma, int(alphas[k])) / (alphas[k] - 1)
    for k in np.flatnonzero(frac):
        out[k] = _log_a_fractional(q, sigma, float(alphas[k])) / (alphas[k] - 1)
    return out

"""Shamir secret sharing of 32-byte secrets over the prime field GF(2^256 + 297).

Whole secrets live in one field element (the prime exceeds 2^256), so a share is one
33-byte value and reconstruction is a single Lagrange interpolation at zero. Lagrange
coefficients depend only on the set of share indices; :class:`LagrangeCache` reuses them
across the many secrets a server reconstructs from the same holders.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from itertools import combinations
from typing import Callable, Iterable, Sequence

PRIME = 2**256 + 297
SECRET_BYTES = 32
SHARE_BYTES = 33
MAX_INDEX = 2**64  # indices are member ids + 1
MAX_CANDIDATES = 4096  # t-subsets :func:`robust_reconstruct` tries before giving up


class ShamirError(ValueError):
    """Shares are too few, repeated, out of range or inconsistent."""


@dataclass(frozen=True)
class Share:
    index: int  # the x coordinate, 1 <= index <= 2^64
    value: int  # the y coordinate, 0 <= value < PRIME

    def value_bytes(self) -> bytes:
        return self.value.to_bytes(SHARE_BYTES, "big")

    @staticmethod
    def from_bytes(index: int, data: bytes) -> "Share":
        if len(data) != SHARE_BYTES:
            raise ShamirError(f"a share value is {SHARE_BYTES} bytes, got {len(data)}")
        value = int.from_bytes(data, "big")
        if value >= PRIME:
            raise ShamirError("share value out of the field")
        _check_index(index)
        return Share(index, value)


def _check_index(index: int) -> None:
    if not 1 <= index <= MAX_INDEX:
        raise ShamirError(f"share index must be in [1, 2^64], got {index}")


def split(secret: bytes, threshold: int, indices: Sequence[int]) -> list[Share]:
    """Shares of ``secret`` at ``indices``; any ``threshold`` of them reconstruct it, fewer reveal nothing."""
    if len(secret) != SECRET_BYTES:
        raise ShamirError(f"secrets are {SECRET_BYTES} bytes")
    if not 1 <= threshold <= len(indices):
        raise ShamirError(f"threshold {threshold} impossible with {len(indices)} holders")
    if len(set(indices)) != len(indices):
        raise ShamirError("share indices repeat")
    for x in indices:
        _check_index(x)
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in indices:
        acc = 0
        for c in reversed(coeffs):  # Horner
            acc = (acc * x + c) % PRIME
        shares.append(Share(x, acc))
    return shares


def lagrange_at_zero(indices: Sequence[int]) -> list[int]:
    """Coefficients l_i with f(0) = sum l_i f(x_i) for any polynomial of degree < len(indices)."""
    coeffs = []
    for i, xi in enumerate(indices):
        num, den = 1, 1
        for j, xj in enumerate(indices):
            if i != j:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        coeffs.append(num * pow(den, -1, PRIME) % PRIME)
    return coeffs


class LagrangeCache:
    """Remembers coefficient vectors per index set; a cohort reconstructs many secrets from one set."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, ...], list[int]] = {}

    def coefficients(self, indices: tuple[int, ...]) -> list[int]:
        coeffs = self._cache.get(indices)
        if coeffs is None:
            coeffs = self._cache[indices] = lagrange_at_zero(indices)
        return coeffs


def _interpolate(shares: Sequence[Share], x: int) -> int:
    """The polynomial through ``shares`` evaluated at ``x`` (used to check extra shares)."""
    total = 0
    for i, si in enumerate(shares):
        num, den = 1, 1
        for j, sj in enumerate(shares):
            if i != j:
                num = num * (x - sj.index) % PRIME
                den = den * (si.index - sj.index) % PRIME
        total = (total + si.value * num * pow(den, -1, PRIME)) % PRIME
    return total


def reconstruct(
    shares: Iterable[Share],
    threshold: int,
    *,
    check_extra: bool = True,
    cache: LagrangeCache | None = None,
) -> bytes:
    """The secret behind ``shares``.

    Raises :class:`ShamirError` for fewer than ``threshold`` shares, repeated indices, or
    (with ``check_extra``) extra shares that do not lie on the same polynomial. With
    exactly ``threshold`` shares a wrong share cannot be detected here: callers check the
    result against a commitment (the protocol does).
    """
    shares = list(shares)
    if threshold < 1:
        raise ShamirError("threshold must be >= 1")
    if len(shares) < threshold:
        raise ShamirError(f"need {threshold} shares, got {len(shares)}")
    indices = tuple(s.index for s in shares)
    if len(set(indices)) != len(indices):
        raise ShamirError("share indices repeat")
    for s in shares:
        _check_index(s.index)
        if not 0 <= s.value < PRIME:
            raise ShamirError("share value out of the field")
    basis = shares[:threshold]
    key = indices[:threshold]
    coeffs = cache.coefficients(key) if cache is not None else lagrange_at_zero(key)
    secret = sum(c * s.value for c, s in zip(coeffs, basis)) % PRIME
    if check_extra:
        for extra in shares[threshold:]:
            if _interpolate(basis, extra.index) != extra.value:
                raise ShamirError(f"share at index {extra.index} is inconsistent with the others")
    if secret >= 2 ** (8 * SECRET_BYTES):
        raise ShamirError("shares are inconsistent: reconstructed value is not a 32-byte secret")
    return secret.to_bytes(SECRET_BYTES, "big")


def robust_reconstruct(
    shares: Sequence[Share],
    threshold: int,
    verify: Callable[[bytes], bool],
    *,
    cache: LagrangeCache | None = None,
    max_candidates: int = MAX_CANDIDATES,
) -> tuple[bytes, list[Share]]:
    """The secret behind ``shares`` that ``verify`` accepts, despite wrong shares among them.

    ``verify`` checks a candidate against something the dealer committed to (the seed
    commitment, the advertised public key), so a wrong share cannot pass it off as right.
    Candidates are the t-subsets of the first ``t + r`` shares for r = 0, 1, 2, ...: with at
    most ``e`` wrong shares and at least ``t`` right ones, some subset of the first ``t + e``
    is all right, so the search succeeds after at most ``sum(C(t + r, r) for r <= e)``
    candidates; it gives up (:class:`ShamirError`) after ``max_candidates`` of them (4096
    covers one wrong share for t <= 4094, two for t <= 88, three for t <= 27). Put shares
    you trust first: the first candidate is the first ``t``.

    Returns the secret and, when the first ``t`` did not verify, the shares off the
    polynomial that reconstructed it (when they did, the rest are not examined). With several
    colluding wrong shares that happen to reconstruct the right secret together, right
    shares may be listed: treat the list as evidence for ordering, not as proof.
    """
    shares = list(shares)
    t = threshold
    if t < 1:
        raise ShamirError("threshold must be >= 1")
    if len(shares) < t:
        raise ShamirError(f"need {t} shares, got {len(shares)}")
    if len({s.index for s in shares}) != len(shares):
        raise ShamirError("share indices repeat")
    tried = 0
    for r in range(len(shares) - t + 1):
        window = shares[: t + r]
        for left_out in combinations(range(t + r), r):
            if tried >= max_candidates:
                raise ShamirError(f"no {t} of {len(shares)} shares verify within {max_candidates} candidates")
            tried += 1
            skip = set(left_out)
            basis = [s for i, s in enumerate(window) if i not in skip]
            try:
                secret = reconstruct(basis, t, check_extra=False, cache=cache)
            except ShamirError:
                continue
            if verify(secret):
                if r == 0:
                    return secret, []  # the fast path: extra shares are not examined
                chosen = {s.index for s in basis}
                wrong = [s for s in shares if s.index not in chosen and _interpolate(basis, s.index) != s.value]
                return secret, wrong
    raise ShamirError(f"no {t} of {len(shares)} shares reconstruct a secret that verifies")

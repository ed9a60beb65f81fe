"""User-level DP (the unit is the device): distributed discrete Gaussian noise inside the masked sum.

Mechanism. Each device clips its whole update to L2 norm ``C``, rotates it (randomized
Walsh-Hadamard, :mod:`ftte.protocol.user_encoding`), scales by ``s`` and rounds to integers,
then adds ``d'`` independent discrete Gaussians ``N_Z(0, sigma^2)`` and masks the result in
the ring. The server only ever sees the sum: every survivor's rounded update plus every
survivor's noise.

Why the distributed discrete Gaussian and not Skellam. Skellam is attractive because sums
of Skellams stay Skellam, but the scale that keeps rounding negligible puts the Poisson
parameter near 1e12 per device and coordinate (sigma ~ 2.6e6 at d = 1e6, n = 100), and a
vectorised Poisson sampler then evaluates log-probabilities as differences of ~3e13-sized
terms (``k log mu - lgamma(k+1)``): float64 leaves absolute errors of ~1e-2 in the
acceptance test, a real distortion. The Canonne-Kamath-Steinke
sampler of the discrete Gaussian (and our table sampler) only ever evaluates ``exp`` of O(1)..O(100)
arguments, so float64 acceptance is accurate to ~1e-15 relative, and it vectorises (one numpy pass per rejection round). Its price, that a
sum of discrete Gaussians is not a discrete Gaussian, is paid by the Kairouz-Liu-Steinke
bound's ``tau`` term, which is below 1e-300 (0.0 in float64) for the ``sigma`` (>= 1e2)
our scales produce.

Sampler, and its exactness, stated. :func:`discrete_gaussian` is a rejection sampler from a
table envelope (:class:`_Envelope`): magnitudes are cut into bins of width a power of two
(at most sigma/32), a 2^16-entry table picks a bin with an exactly known integer
probability, the offset in the bin and the sign are raw keystream bits, and one Bernoulli
test corrects the proposal to exp(-x^2 / (2 sigma^2)); beyond 14 sigma a discrete-Laplace
tail (CKS's construction) takes over, so every integer keeps its mass. 8 keystream bytes
per attempt (12 from sigma 2^17 * 32 ~ 4.2e6 up) and about 96 % of attempts accepted at large sigma (the reference CKS sampler,
:func:`discrete_gaussian_cks`, kept for tests, spends about 55). The inexact parts: the
acceptance test compares a 53-bit uniform (31 or 32 bits first, the rest only on a tie,
:func:`_bernoulli_lazy`) with float64 ``bias * exp(-y)``, y in [0, 1], exp computed as a
degree-17 polynomial (:func:`_exp_poly`, relative error below 2e-15, so that the optional
compiled sampler, ``privacy/_native.c``, takes the same decisions with the same operations),
and the tail's geometric draw uses ``floor(-log1p(-U))``, cut at 2^-53 (and reached with
probability about 1e-43 per draw). So each coordinate's law is within a total-variation
distance of about 1e-15 of the ideal one; we do not add this to delta (~1e-9 over a
1e6-coordinate release), and say so here.

Privacy notion: zero-out adjacency. Participation is visible to the server (who connects,
when), so user-level DP here protects what a device's data contributes: neighbouring
inputs differ in one device's contribution replaced by the zero vector, the device still
present (and still adding its own noise). The device's integer contribution has
``||q||_2 <= C s + sqrt(d')`` deterministically (:func:`rounded_norm_bound`), so that is the
sensitivity, discretisation included.

Calibration to survivors. Colluding members (``max_corrupt``) can tell the server their own
noise, which it then subtracts. A sum is revealed only with ``T`` survivors, so at least
``m = T - max_corrupt`` honest devices' noise is in every revealed sum; each device adds
``sigma^2`` chosen so that those ``m`` carry the target (``m sigma^2`` total), and
more survivors only add independent noise (post-processing). With ``max_corrupt = 0`` this
is "each device adds sigma_target^2 / T".

Accounting (Kairouz, Liu, Steinke 2021, "The distributed discrete Gaussian mechanism for
federated learning with secure aggregation", Theorem 2 / Prop. 14): for ``m`` summands
``N_Z(0, sigma^2)^d'``, ``sigma >= 1/2``, and an integer shift of L2 norm ``D``,

    D_alpha <= min( alpha D^2 / (2 m sigma^2) + tau d',  alpha/2 (D / (sqrt(m) sigma) + tau sqrt(d'))^2 ),
    tau = 10 sum_{k=1}^{m-1} exp(-2 pi^2 sigma^2 k / (k+1)).

We use the second term: it has exactly the Gaussian form ``alpha / (2 z^2)`` with the
*effective noise multiplier* ``z = 1 / (D / (sqrt(m) sigma) + tau sqrt(d'))``. One
participation is therefore, for the accountant, one Gaussian step at ``z``, sample rate 1,
one step: the ledger row stores ``noise_multiplier = z``, ``sample_rate = 1``, ``steps = 1``,
accountant ``rdp`` (Opacus's RDP of a q = 1 step is exactly ``alpha / (2 z^2)``), and ε
composes over every cohort the device contributed to. No amplification by sampling is
claimed: cohort membership is decided by which devices are online and when, not by a
secret uniform sample, so no subsampling theorem applies.

Central baseline (``noise = "server"``): a trusted server adds continuous Gaussian noise of
std ``z C`` to the float sum of clipped updates (ChaCha20 draws, Opacus-style secure-mode
summation, :meth:`SecureRandom.gaussian`); its row has ``noise_multiplier = z`` directly.

Ring. A device's rounded vector has every coordinate within ``D`` (its L2 norm), so ``n``
members' signal sums within ``n D``; the noise of ``n`` members is ``n sigma^2``-sub-Gaussian
per coordinate (the discrete Gaussian is sigma^2-sub-Gaussian, CKS 2020), so a coordinate's
noise exceeds ``t`` with probability at most ``2 exp(-t^2 / (2 n sigma^2))``. The scale is
chosen so that ``n D + t <= 2^(b-1) - 1`` with ``t`` set for a wrap probability of at most
``beta`` (default 2^-40) over all ``d'`` coordinates (union bound); :func:`wrap_probability`
states it for a given number of survivors. The no-wrap argument does not rely on the rotation.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from . import native
from .accountant import PrivacyStep, compute_epsilon
from .secure_random import SecureRandom

MECH_DISTRIBUTED = "ddg"
MECH_CENTRAL = "central"
MECHANISMS = (MECH_DISTRIBUTED, MECH_CENTRAL)
USER_ACCOUNTANT = "rdp"  # one participation = one q = 1 Gaussian step at the effective multiplier
USER_TAG = "user-dp/1"
DEFAULT_WRAP_PROBABILITY = 2.0 ** -40
MIN_SIGMA = 0.5  # the KLS theorem's condition
_U64 = np.dtype("<u8")


# -- the discrete Gaussian sampler (Canonne, Kamath, Steinke 2020), vectorised ---------------

def _uniform_below(rng: SecureRandom, n: int, t: int) -> np.ndarray:
    """``n`` exact uniform integers in [0, t) by rejection on 64-bit words (t < 2^62)."""
    if not 1 <= t < 2**62:
        raise ValueError("t must lie in [1, 2^62)")
    limit = np.uint64((2**64 // t) * t - 1)  # accept words <= limit: a whole number of periods
    out = np.empty(n, dtype=np.int64)
    todo = np.arange(n)
    while todo.size:
        words = np.frombuffer(rng.random_bytes(8 * todo.size), dtype=_U64)
        ok = words <= limit
        out[todo[ok]] = (words[ok] % np.uint64(t)).astype(np.int64)
        todo = todo[~ok]
    return out


def _sign_bits(rng: SecureRandom, n: int) -> np.ndarray:
    return (np.frombuffer(rng.random_bytes(n), dtype=np.uint8) & 1).astype(bool)


def _geometric(rng: SecureRandom, n: int) -> np.ndarray:
    """P(V >= j) = e^-j: the number of whole units in an Exp(1) draw."""
    return np.floor(-np.log1p(-rng.uniform(n))).astype(np.int64)


def discrete_laplace(rng: SecureRandom, n: int, t: int) -> np.ndarray:
    """``n`` draws with P(x) proportional to exp(-|x|/t) (CKS Algorithm 2, vectorised)."""
    out = np.empty(n, dtype=np.int64)
    todo = np.arange(n)
    while todo.size:
        k = todo.size
        u = _uniform_below(rng, k, t)
        v = _geometric(rng, k)
        negative = _sign_bits(rng, k)
        x = u + t * v
        ok = (rng.uniform(k) < np.exp(-u / t)) & ~(negative & (x == 0))  # "-0" would count zero twice
        out[todo[ok]] = np.where(negative, -x, x)[ok]
        todo = todo[~ok]
    return out


def discrete_gaussian_cks(rng: SecureRandom, n: int, sigma: float) -> np.ndarray:
    """The reference sampler (kept for tests and as the independent second implementation):
    ``n`` draws of N_Z(0, sigma^2), 55 keystream bytes per draw at large sigma.

    CKS Algorithm 3 over Algorithm 2: a discrete Laplace proposal at t = floor(sigma) + 1
    (``U`` uniform in [0, t), ``V`` geometric, a sign), kept with probability exp(-U/t), then
    accepted with probability exp(-(|Y| - sigma^2/t)^2 / (2 sigma^2)). The two Bernoulli
    tests are independent given (U, V, sign), so we run them as one test of the product
    probability: same law, one uniform and one ``exp`` per attempt. int64; sigma 0 gives zeros."""
    if not (sigma >= 0.0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be finite and >= 0, got {sigma}")
    if sigma == 0.0 or n == 0:
        return np.zeros(n, dtype=np.int64)
    t = int(math.floor(sigma)) + 1
    s2 = sigma * sigma
    parts: list[np.ndarray] = []
    need = n
    while need:
        # iid proposals, kept in order: the first `need` accepted ones are iid N_Z(0, sigma^2).
        # About 47 % are accepted at large sigma, so one batch of 2.2x usually suffices.
        k = int(need * 2.2) + 64
        u = _uniform_below(rng, k, t)
        x = u + t * _geometric(rng, k)
        negative = _sign_bits(rng, k)
        gap = x - s2 / t
        gap *= gap
        gap /= 2.0 * s2
        gap += u / t  # the exponent of the product of both Bernoulli tests
        np.negative(gap, out=gap)
        np.exp(gap, out=gap)
        ok = rng.uniform(k) < gap
        ok &= ~(negative & (x == 0))
        np.negative(x, out=x, where=negative)
        kept = x[ok][:need]
        parts.append(kept)
        need -= kept.size
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


# -- the fast sampler: a table envelope over bins, 8 (or 12) keystream bytes per attempt ----------

_GUIDE_BITS = 16  # the bin is read from the top 16 bits of a word: a 2^16-entry table (128 kB, stays in cache)
_BINS_PER_SIGMA = 32  # bin width at most sigma / 32: the envelope is within exp(-1/16) of the mass
_TABLE_SIGMAS = 14  # the table covers |x| < 14 sigma; beyond, a discrete-Laplace tail (about 1e-43)
_TWO32 = 4294967296.0


@dataclass(frozen=True)
class _Envelope:
    """A proposal for N_Z(0, sigma^2) with exactly known probabilities, and what accepting needs.

    Magnitudes are cut into ``bins`` bins of width ``2^width_bits`` starting at 0, plus one tail
    ``|x| >= limit``. A 2^16-entry table gives bin ``i`` exactly ``counts[i]`` entries, so a
    uniform 16-bit index picks it with probability ``counts[i] / 2^16``; the offset in the bin
    is uniform (``width_bits`` bits) and the sign is one bit. With ``S`` a constant,
    ``counts[i] >= S * w * g(lo_i)`` (``g(x) = exp(-x^2 / (2 sigma^2))``, ``lo_i`` the bin's
    smallest magnitude, where ``g`` is largest), so accepting ``x`` with probability
    ``S w g(x) / counts[i] = bias[i] * exp(-off (2 lo_i + off) / (2 sigma^2))`` is at most 1,
    and (proposal x acceptance) is ``S g(x) / 2^17`` for every ``x``: the target, exactly.
    Entries left over after the ceilings (at most ``bins + 1``) map to ``reject``."""

    sigma: float
    width_bits: int
    bins: int
    guide: np.ndarray  # uint16, 2^16 entries: bin index, ``bins`` = tail, ``bins + 1`` = reject
    low: np.ndarray  # float64 per entry index: lo_i (0 for tail and reject)
    bias: np.ndarray  # float64 per entry index: S w g(lo_i) / counts[i] in (0, 1]; 0 for tail, reject
    tail_t: int  # the tail's discrete-Laplace scale, >= sigma^2 / limit
    tail_bias: float  # S t g(limit) 2^tail_select / ((1 - e^-1) counts[tail]) <= 1
    tail_select: int  # a tail entry proposes only when this many spare bits of its first word are zero
    accept: float  # the probability that an attempt is accepted: S theta / 2^17, theta = sum of g over Z
    # per table index (2^16 entries), for :func:`_full_test` and :func:`_attempts`'s fast path:
    low_at: np.ndarray  # float64: low[guide]
    bias_at: np.ndarray  # float64: bias[guide]
    thr_at: np.ndarray  # uint32: 2 h, h from :func:`_sure_heads` (0 for bin 0, tail, reject)
    lo_at: np.ndarray  # uint32: low[guide] (used with 2 words per attempt, where it is below 2^31)

    @property
    def limit(self) -> int:
        return self.bins << self.width_bits


@functools.lru_cache(maxsize=8)
def _envelope(sigma: float, table_sigmas: float = _TABLE_SIGMAS) -> _Envelope:
    width_bits = int(math.floor(math.log2(sigma / _BINS_PER_SIGMA))) if sigma >= _BINS_PER_SIGMA else 0
    if width_bits > 31:
        raise ValueError(f"sigma {sigma} is too large for the table sampler")
    w = 1 << width_bits
    bins = max(2, int(math.ceil(table_sigmas * sigma / w)))
    limit = bins * w
    inv2s2 = 1.0 / (2.0 * sigma * sigma)
    lo = np.arange(bins, dtype=np.float64) * w
    mass = w * np.exp(-(lo * lo) * inv2s2)  # envelope per bin, per sign, up to S
    t = max(1, int(math.ceil(sigma * sigma / limit)))
    tail_mass = t * math.exp(-float(limit) ** 2 * inv2s2) / (1.0 - math.exp(-1.0))
    total_entries = 1 << _GUIDE_BITS
    scale = (total_entries - (bins + 1)) / (float(mass.sum()) + tail_mass)  # S: ceilings then fit the table
    counts = np.ceil(mass * scale).astype(np.int64)
    tail_count = max(1, int(math.ceil(tail_mass * scale)))
    spare = total_entries - int(counts.sum()) - tail_count
    if spare < 0 or np.any(counts < 1):
        raise AssertionError("internal: the envelope table does not fit")
    guide = np.repeat(np.arange(bins + 2, dtype=np.uint16), np.concatenate([counts, [tail_count, spare]]))
    low = np.concatenate([lo, [0.0, 0.0]])
    bias = np.concatenate([mass * scale / counts, [0.0, 0.0]])
    tail_bias = scale * t * math.exp(-float(limit) ** 2 * inv2s2) / ((1.0 - math.exp(-1.0)) * tail_count)
    # Why select: the tail's table entry is drawn 2^-16 of the time, and each such attempt needs more
    # keystream (the tail proposal), which the compiled sampler leaves to the numpy full test: one
    # call per batch. Proposing from it only when 16 spare bits of the first word (bits the tail
    # does not use as an offset) are zero, with its acceptance 2^16 times larger, keeps the law
    # (proposal x acceptance is unchanged for every tail value) and makes those calls rare.
    # Possible wherever the larger acceptance stays <= 1: always at 14 sigma (g(limit) = e^-98).
    tail_select = _TAIL_SELECT_BITS if tail_bias * 2.0**_TAIL_SELECT_BITS <= 1.0 else 0
    tail_bias *= 2.0**tail_select
    if not (np.all(bias <= 1.0) and tail_bias <= 1.0):
        raise AssertionError("internal: an acceptance probability above 1")
    # the fast path compares the second word (2 head + sign) with 2h: head < h, see _attempts
    sure = np.concatenate([_sure_heads(bias[:bins], lo, w, inv2s2, 31).astype(np.uint64) * 2, [0, 0]])
    if width_bits <= 32 - _GUIDE_BITS and limit + _TAIL_REACH * t >= 1 << 31:
        raise AssertionError("internal: the table's draws do not fit 31 bits")
    lo_u32 = np.concatenate([np.minimum(lo, 2.0**32 - 1), [0.0, 0.0]]).astype(np.uint32)
    # every signed x is proposed-and-accepted with probability S g(x) / 2^17 ("-0" refused)
    span = np.arange(-int(40 * sigma) - 2, int(40 * sigma) + 3, dtype=np.float64) if sigma < 8.0 else None
    theta = sigma * math.sqrt(2.0 * math.pi) if span is None else float(np.exp(-(span * span) * inv2s2).sum())
    accept = min(1.0, scale * theta / 2.0 ** (_GUIDE_BITS + 1))
    # the full test's exponent off (2 lo + off) / (2 sigma^2) stays within what _exp_poly covers
    if (w - 1) * (2.0 * (bins - 1) * w + w - 1) * inv2s2 > _EXP_POLY_RANGE:
        raise AssertionError("internal: the acceptance exponent leaves the polynomial's range")
    env = _Envelope(sigma, width_bits, bins, guide, low, bias, t, tail_bias, tail_select, accept, low[guide], bias[guide],
                    sure.astype(np.uint32)[guide], lo_u32[guide])
    for table in (env.guide, env.low, env.bias, env.low_at, env.bias_at, env.thr_at, env.lo_at):
        table.setflags(write=False)  # shared by every caller (cached), and read by compiled loops without the GIL
    return env


# exp(x) for x in [-1, 0] as the degree-17 Taylor polynomial, evaluated by Horner (highest degree
# first). Why not np.exp: the compiled loops (privacy/_native.c) run the same acceptance test, and
# numpy's and the C library's exp may differ in the last bit; this polynomial is the same sequence
# of float64 operations in both, so both take the same decision on every attempt. Its error on
# [-1, 0] is below 1e-16 (remainder 1/18! = 1.6e-16 at x = -1) plus the rounding of 17 steps,
# about 1e-15 relative in all: what np.exp's error was (tests/privacy/test_distributed_dp.py).
_EXP_POLY_RANGE = 1.0
_EXP_POLY = np.array([1.0 / math.factorial(k) for k in range(17, -1, -1)])
_EXP_POLY.setflags(write=False)


def _exp_poly(x: np.ndarray) -> np.ndarray:
    """exp(x) for float64 x in [-1, 0] (see _EXP_POLY), a new array."""
    r = np.full(x.shape, _EXP_POLY[0])
    for c in _EXP_POLY[1:]:
        r *= x
        r += c
    return r


_TAIL_SELECT_BITS = 16  # the low half of the first word: the offset uses at most width_bits <= 16 of it
_TAIL_REACH = 40  # tail draws are below limit + 37 t: the geometric part is floor(-log(U)) <= 36 for U >= 2^-53
_SURE_MARGIN = 1.0 - 2.0**-30  # far above float64's error in exp and in the products (~1e-15 relative)


def _sure_heads(bias: np.ndarray, lo: np.ndarray, w: int, inv2s2: float, bits: int) -> np.ndarray:
    """Per bin, an integer ``h`` with ``h <= floor(p 2^bits)`` for every offset's acceptance ``p``.

    ``p = bias exp(-off (2 lo + off) / (2 sigma^2))`` falls with the offset, so its smallest value is
    at ``off = w - 1``; shrunk by :data:`_SURE_MARGIN` (which dwarfs float64's error in computing
    either side) and floored, it is below the ``floor(p 2^bits)`` :func:`_bernoulli_lazy` computes for
    any offset. A head below ``h`` is therefore accepted by the full test too, and never a tie: the
    fast path changes no decision and draws no keystream. Bin 0 gets 0 (always the full test) so
    that its "-0" is refused in one place."""
    last = float(w - 1)
    least = bias * np.exp(-last * (2.0 * lo + last) * inv2s2) * _SURE_MARGIN
    sure = np.floor(least * float(1 << bits)) - 1.0
    sure = np.maximum(sure, 0.0)
    sure[0] = 0.0
    return sure.astype(np.uint32)


def _bernoulli_lazy(rng: SecureRandom, p: np.ndarray, first: np.ndarray, bits: int = 32) -> np.ndarray:
    """``U < p`` for a 53-bit uniform ``U`` whose top ``bits`` bits are ``first``: decided by those
    bits except when they equal ``floor(p 2^bits)`` (probability 2^-bits), when ``53 - bits`` more
    are drawn. The same booleans, bit for bit, as drawing all 53 bits at once."""
    head = np.floor(p * float(1 << bits))
    out = first < head
    tie = np.flatnonzero(first == head)
    if tie.size:
        rest = 53 - bits
        extra = np.frombuffer(rng.random_bytes(8 * tie.size), dtype=_U64) >> np.uint64(64 - rest)
        u53 = first[tie].astype(np.float64) * float(1 << rest) + extra.astype(np.float64)
        out[tie] = u53 < p[tie] * 2.0**53
    return out


def _tail_attempts(rng: SecureRandom, env: _Envelope, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` attempts of the tail proposal ``|x| = limit + U + t V`` (CKS's discrete Laplace) with its
    acceptance: returns (accepted, |x|)."""
    t = env.tail_t
    u = _uniform_below(rng, n, t)
    k = u + t * _geometric(rng, n)
    x = k + env.limit
    xf = x.astype(np.float64)
    if env.tail_bias <= 0.0:  # cannot happen at 14 sigma (g = e^-98); refuse rather than bias the law
        raise AssertionError("internal: the tail's acceptance underflowed")
    log_p = (math.log(env.tail_bias) - u / t + k / t
             - (xf * xf - float(env.limit) ** 2) / (2.0 * env.sigma**2))
    ok = rng.uniform(n) < np.exp(log_p)
    return ok, x


def discrete_gaussian(rng: SecureRandom, n: int, sigma: float, dtype: type = np.int64) -> np.ndarray:
    """``n`` draws of N_Z(0, sigma^2): P(x) proportional to exp(-x^2 / (2 sigma^2)) on the integers.

    Rejection from :class:`_Envelope` (a bin table with exactly known probabilities): per
    attempt 8 keystream bytes (16 bits pick the bin, ``width_bits`` <= 16 the offset, 1 the sign,
    31 start the acceptance uniform; 12 bytes from sigma ~ 4.2e6 up, :func:`_attempt_words`),
    accepted about 96 % of the time at large sigma; the CKS discrete
    Laplace handles the tail beyond 14 sigma. Attempts are iid and each accepted one has
    exactly the target law (up to float64 ``exp`` in the acceptance test), so the first
    ``n`` accepted are iid N_Z(0, sigma^2). Most attempts are accepted from their table index and
    head alone, without the float test, which would have accepted them too (:func:`_attempts_into`):
    a shortcut that changes no draw. ``dtype`` int64, or int32 where every draw fits (sigma below
    about 1e8, far above what a 32-bit ring's plan allows: the device's noise then takes half the
    memory); the same values either way. Sigma 0 gives zeros."""
    if not (sigma >= 0.0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be finite and >= 0, got {sigma}")
    if np.dtype(dtype) not in (np.int64, np.int32):
        raise TypeError(f"draws are int64 or int32, got {np.dtype(dtype)}")
    if sigma == 0.0 or n == 0:
        return np.zeros(n, dtype=dtype)
    env = _envelope(float(sigma))
    if np.dtype(dtype) == np.int32 and env.limit + _TAIL_REACH * env.tail_t >= 1 << 31:
        raise ValueError(f"draws at sigma {sigma} do not all fit int32")
    return _sample(rng, n, env, dtype)


def _words_per_attempt(env: _Envelope) -> int:
    """Keystream words (32 bits) per attempt: 2 while the offset fits 16 bits (sigma < 2^17 * 32
    ~ 4.2e6), else 3."""
    return 2 if env.width_bits <= 32 - _GUIDE_BITS else 3


def _attempt_words(words: np.ndarray, env: _Envelope) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                  np.ndarray, int, np.ndarray]:
    """What ``k`` attempts' keystream words (a (2, k) or (3, k) uint32 array: row ``j`` holds every
    attempt's word ``j``) say: (table index, offset, sign bit, acceptance head, head bits, spare).

    2 words: the first holds the 16-bit table index (top) and the offset (bottom), the second
    the sign (bit 0) and a 31-bit head of the acceptance uniform. 3 words: index, then offset
    (above bit 0) and sign (bit 0), then a 32-bit head. Either way the sign is bit 0 of the
    second word and the head the top of the last, which the fast path relies on; ``spare`` is the
    low 16 bits of the first word, which the tail entry reads (see ``tail_select``)."""
    mask = np.uint32((1 << env.width_bits) - 1)
    index = words[0] >> np.uint32(32 - _GUIDE_BITS)
    sign = words[1] & np.uint32(1)
    spare = words[0] & np.uint32((1 << _TAIL_SELECT_BITS) - 1)
    if words.shape[0] == 2:
        return index, words[0] & mask, sign, words[1] >> np.uint32(1), 31, spare
    return index, (words[1] >> np.uint32(1)) & mask, sign, words[2], 32, spare


_CHUNK = 1 << 16  # attempts per block of keystream words: one block's temporaries stay in cache
_BATCH = 1 << 17  # attempts per batch: its words (1 MB) and scratch stay in cache and are reused batch to batch
# (2^15 to 2^20 timed for 2^20 draws: 2^17 fastest, 2^19 and 2^20 about 1.5x to 2x slower)
_REJECTED = np.int32(np.iinfo(np.int32).min)  # marks a refused attempt: every draw is above -2^31


def _batch_attempts(need: int, env: _Envelope) -> int:
    """Attempts drawn for ``need`` more draws: the expected count plus five standard deviations, so
    that one batch almost always suffices (a short batch is followed by another)."""
    mean = need / env.accept
    return int(math.ceil(mean + 5.0 * math.sqrt(mean * (1.0 - env.accept)))) + 64


def _sample(rng: SecureRandom, n: int, env: _Envelope, dtype: type = np.int64) -> np.ndarray:
    """``n`` draws: batches of at most ``_BATCH`` attempts (the last one sized by
    :func:`_batch_attempts`), each batch's accepted draws kept in attempt order, so the output is
    the first ``n`` accepted attempts of one iid sequence."""
    out = np.empty(n, dtype=dtype)
    done = 0
    while done < n:
        done += _attempts_into(rng, min(_BATCH, _batch_attempts(n - done, env)), env, out[done:])
    return out


def _word_positions(attempts: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Where the first and second words of the given attempts lie in a batch of ``k`` attempts'
    words (:func:`_attempts_into`'s layout)."""
    block = attempts // _CHUNK
    base = 2 * _CHUNK * block
    width = np.minimum(_CHUNK, k - _CHUNK * block)
    first = base + (attempts - _CHUNK * block)
    return first, first + width


def _fast_pass(words: np.ndarray, k: int, env: _Envelope) -> tuple[np.ndarray, np.ndarray]:
    """The fast path over a batch (numpy): every attempt's signed draw, or ``_REJECTED`` where the
    full test must decide, and the indices of those attempts. The compiled twin is
    :func:`ftte.privacy.native.dg_fast`."""
    value = np.empty(k, dtype=np.uint32)  # two's complement of the signed draw
    slow: list[np.ndarray] = []
    mask = np.uint32((1 << env.width_bits) - 1)
    for start in range(0, k, _CHUNK):
        c = min(_CHUNK, k - start)
        first = words[2 * start:2 * start + c]
        second = words[2 * start + c:2 * start + 2 * c]
        index = first >> np.uint32(32 - _GUIDE_BITS)
        ok = np.less(second, np.take(env.thr_at, index, mode="clip"))  # indices are below 2^16, the table's size
        v = np.take(env.lo_at, index, out=value[start:start + c], mode="clip")
        v += first & mask
        negative = second & np.uint32(1)
        np.negative(negative, out=negative)  # 0 or all ones (uint32 wraps)
        v ^= negative
        v -= negative  # (v ^ all ones) + 1 = -v: two's complement
        here = np.flatnonzero(~ok)
        v[here] = np.uint32(1 << 31)  # _REJECTED's bits
        slow.append(here + start)
    return value.view(np.int32), np.concatenate(slow)


def _attempts_into(rng: SecureRandom, k: int, env: _Envelope, out: np.ndarray) -> int:
    """Run ``k`` attempts and write their accepted draws, in attempt order, to ``out`` (int64, or
    int32 with 2 words per attempt) until it is full; returns how many were written.

    Keystream: the attempts' words, in blocks of ``c <= _CHUNK`` attempts (``c`` first words, then
    ``c`` second words (a third block with 3 words): contiguous rows are what makes the fast path
    cheap), then whatever the full test draws (tie bits, tail proposals) for the attempts it
    decides, in attempt order.

    With 2 words per attempt, most attempts are settled by their table index and head alone
    (see :func:`_sure_heads`): accepted, with no float arithmetic, in 32-bit integers
    (``thr_at`` holds ``2h`` for the second word, which is ``2 head + sign``, so "head < h" is
    "second < 2h"; ``lo_at`` holds the bin's smallest magnitude; the sign is applied in two's
    complement), by :func:`_fast_pass` or its compiled twin. The rest (bin 0, the tail, the
    reject entries, and heads near the acceptance probability: about 5 % at large sigma, mostly
    rejections) take the full test, :func:`_full_test`, once per batch. Both paths take the same
    decision for every attempt and draw the same keystream as the full test run on all ``k``:
    the output is the same integers, bit for bit (pinned by
    ``tests/privacy/test_distributed_dp.py``). With 3 words (sigma from ~4.2e6 up) every attempt
    takes the full test."""
    per = _words_per_attempt(env)
    if per == 3:
        words = np.concatenate([rng.words(3 * c).reshape(3, c)
                                for c in (min(_CHUNK, k - s) for s in range(0, k, _CHUNK))], axis=1)
        index, off, sign, head, head_bits, spare = _attempt_words(words, env)
        ok, magnitude = _full_test(rng, env, index, off, sign, head, head_bits, spare)
        magnitude[sign.astype(bool)] *= -1
        accepted = magnitude[ok][: out.shape[0]]
        out[: accepted.size] = accepted
        return accepted.size
    words = rng.words(2 * k)
    compiled = native.enabled()
    # numpy: the fast path, then the full test for the rest; compiled: both in one loop, except
    # the attempts that need more keystream (tail entries, ties), which the full test below takes
    value, slow = (native.dg_batch(words, _CHUNK, env, k, _exponent_scale(env), _EXP_POLY) if compiled
                   else _fast_pass(words, k, env))
    if slow.size:
        at_first, at_second = _word_positions(slow, k)
        s_index, s_off, s_sign, s_head, head_bits, s_spare = _attempt_words(
            np.stack((words[at_first], words[at_second])), env)
        s_ok, s_magnitude = _full_test(rng, env, s_index, s_off, s_sign, s_head, head_bits, s_spare)
        s_magnitude[s_sign.astype(bool)] *= -1
        value[slow] = np.where(s_ok, s_magnitude, _REJECTED)  # |x| < 2^31 (checked when the table is built)
    if compiled:
        return native.dg_compact(value, out)
    accepted = value[value != _REJECTED][: out.shape[0]]
    out[: accepted.size] = accepted
    return accepted.size


def _exponent_scale(env: _Envelope) -> float:
    return -1.0 / (2.0 * env.sigma * env.sigma)


def _full_test(rng: SecureRandom, env: _Envelope, index: np.ndarray, off: np.ndarray, sign: np.ndarray,
               head: np.ndarray, head_bits: int, spare: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The acceptance test of the attempts given (in attempt order): (accepted, magnitude int64)."""
    low = np.take(env.low_at, index)
    magnitude = low + off  # float64, exact (< 2^53)
    p = magnitude + low  # the exponent off (2 lo + off): exact too
    p *= off
    p *= _exponent_scale(env)
    p = _exp_poly(p)
    p *= np.take(env.bias_at, index)
    is_tail = np.take(env.guide, index) == env.bins
    if not is_tail.any():
        ok = _bernoulli_lazy(rng, p, head, head_bits)
    else:  # a tail attempt is decided by its own proposal: no Bernoulli test (nor its tie bits) for it
        ok = np.zeros(index.shape[0], dtype=bool)
        body = np.flatnonzero(~is_tail)
        ok[body] = _bernoulli_lazy(rng, p[body], head[body], head_bits)
        tail = np.flatnonzero(is_tail)
        if env.tail_select:  # proposed only when the spare bits are zero (see _envelope)
            tail = tail[(spare[tail] & np.uint32((1 << env.tail_select) - 1)) == 0]
        if tail.size:
            t_ok, t_x = _tail_attempts(rng, env, tail.size)
            ok[tail] = t_ok
            magnitude[tail] = t_x
    zero = np.flatnonzero(magnitude == 0.0)
    ok[zero[sign[zero].astype(bool)]] = False  # "-0" would count zero twice
    return ok, magnitude.astype(np.int64)


def discrete_gaussian_variance(sigma: float) -> float:
    """The variance of N_Z(0, sigma^2), by summing its mass (independent of the sampler).

    Above sigma = 50 it is sigma^2 to within a relative 4 pi^2 sigma^2 exp(-2 pi^2 sigma^2)
    (Poisson summation; below 1e-300), so sigma^2 is returned."""
    if sigma <= 0:
        return 0.0
    if sigma > 50:
        return sigma * sigma
    k = np.arange(1, int(math.ceil(40 * sigma)) + 2, dtype=np.float64)
    w = np.exp(-(k * k) / (2.0 * sigma * sigma))
    return float(2.0 * np.sum(k * k * w) / (1.0 + 2.0 * np.sum(w)))


# -- the accountant ----------------------------------------------------------------------------

def kls_tau(sigma: float, summands: int) -> float:
    """The KLS ``tau``: how far a sum of ``summands`` discrete Gaussians is from one."""
    return 10.0 * sum(math.exp(-2.0 * math.pi**2 * sigma**2 * k / (k + 1)) for k in range(1, summands))


def effective_noise_multiplier(sensitivity: float, sigma: float, summands: int, padded_dim: int) -> float:
    """``z`` with D_alpha <= alpha / (2 z^2) for the sum of ``summands`` N_Z(0, sigma^2)^d' shifted
    by an integer vector of L2 norm at most ``sensitivity`` (KLS, second term of the min)."""
    if sigma < MIN_SIGMA:
        raise ValueError(f"the KLS bound needs sigma >= {MIN_SIGMA}, got {sigma}")
    if summands < 1 or sensitivity <= 0:
        raise ValueError("summands >= 1 and sensitivity > 0 are required")
    inv = sensitivity / (math.sqrt(summands) * sigma) + kls_tau(sigma, summands) * math.sqrt(padded_dim)
    return 1.0 / inv


def ddg_rdp(alpha: float, sensitivity: float, sigma: float, summands: int, padded_dim: int) -> float:
    """The full KLS bound (min of its two L2 terms) at order ``alpha``: never above
    ``alpha / (2 z^2)`` with ``z`` from :func:`effective_noise_multiplier`."""
    tau = kls_tau(sigma, summands)
    ratio2 = sensitivity**2 / (summands * sigma**2)
    first = alpha * ratio2 / 2.0 + tau * padded_dim
    second = alpha / 2.0 * (math.sqrt(ratio2) + tau * math.sqrt(padded_dim)) ** 2
    return min(first, second)


def user_epsilon(multipliers: list[float], delta: float) -> float:
    """Cumulative ε at ``delta`` of a device that took part in cohorts with these effective
    multipliers: the same computation the ledger and the audit make for its rows."""
    return compute_epsilon([PrivacyStep(z, 1.0, 1) for z in multipliers], delta, USER_ACCOUNTANT)


def multiplier_for_budget(epsilon: float, delta: float, participations: int) -> float:
    """The smallest effective multiplier (to 1e-4 relative) whose ``participations``-fold
    composition stays within (epsilon, delta)."""
    if not (epsilon > 0 and 0 < delta < 1 and participations >= 1):
        raise ValueError("epsilon > 0, delta in (0, 1) and participations >= 1 are required")
    lo, hi = 1e-2, 1.0
    while user_epsilon([hi] * participations, delta) > epsilon:
        lo, hi = hi, hi * 2.0
        if hi > 1e6:
            raise ValueError("no multiplier below 1e6 meets this budget")
    while hi / lo > 1.0 + 1e-4:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if user_epsilon([mid] * participations, delta) <= epsilon else (mid, hi)
    return hi


# -- the per-cohort parameters ----------------------------------------------------------------

def padded_dim(dim: int) -> int:
    """The Walsh-Hadamard length: the next power of two."""
    if dim < 1:
        raise ValueError("dim must be >= 1")
    return 1 << (dim - 1).bit_length()


def rounded_norm_bound(clip: float, scale: float, padded: int) -> float:
    """Deterministic L2 bound of a rounded contribution: ``||y|| <= C s`` before rounding and each
    coordinate moves by less than 1 (floor(y + u), u in [0, 1)), so ``||q|| < C s + sqrt(d')``;
    the encoder also checks ``||q|| <= floor(C s + sqrt(d'))`` exactly on the integers."""
    return clip * scale + math.sqrt(padded)


@dataclass(frozen=True)
class UserDPParams:
    """What every member of a cohort (and the server) uses for the user-level mechanism.

    ``sigma`` is each device's discrete-Gaussian parameter in integer units; ``calibrated_for``
    is ``m = T - max_corrupt``, the honest survivors the target noise is calibrated to;
    ``members`` the cohort size ``n`` (the most survivors a sum can hold).
    """

    dim: int
    clip: float
    scale: float
    sigma: float
    calibrated_for: int
    members: int
    ring_bits: int = 32

    def __post_init__(self) -> None:
        if not (self.clip > 0 and self.scale > 0 and math.isfinite(self.clip * self.scale)):
            raise ValueError("clip and scale must be positive and finite")
        if not 1 <= self.calibrated_for <= self.members:
            raise ValueError("calibrated_for must lie in [1, members]")
        if self.ring_bits not in (16, 32):
            raise ValueError("ring_bits must be 16 or 32")
        if self.sigma != 0.0 and self.sigma < MIN_SIGMA:
            raise ValueError(f"sigma must be 0 (noise off) or >= {MIN_SIGMA}")
        if not self.members * self.sensitivity < 2 ** (self.ring_bits - 1):
            raise ValueError(f"{self.members} contributions of norm up to {self.sensitivity:.4g} do not fit a "
                             f"{self.ring_bits}-bit ring")

    @property
    def padded_dim(self) -> int:
        return padded_dim(self.dim)

    @property
    def sensitivity(self) -> float:
        return rounded_norm_bound(self.clip, self.scale, self.padded_dim)

    @property
    def noise_multiplier(self) -> float:
        """The effective multiplier one participation is charged at (0 with noise off)."""
        if self.sigma == 0.0:
            return 0.0
        return effective_noise_multiplier(self.sensitivity, self.sigma, self.calibrated_for, self.padded_dim)

    def wrap_probability(self, survivors: int | None = None) -> float:
        return wrap_probability(self, self.members if survivors is None else survivors)


def _tail(survivors: int, sigma: float, padded: int, beta: float) -> float:
    """Per-coordinate noise level exceeded with probability <= beta over all d' coordinates."""
    if sigma == 0.0:
        return 0.0
    return math.sqrt(2.0 * survivors * sigma**2 * math.log(2.0 * padded / beta))


def wrap_probability(params: UserDPParams, survivors: int) -> float:
    """Upper bound on P(some coordinate of the noisy sum of ``survivors`` members leaves the
    signed ring range): union bound over coordinates of the sub-Gaussian tail, after the
    deterministic signal bound ``survivors * D``. 1.0 when the signal alone may not fit."""
    half = 2 ** (params.ring_bits - 1) - 1
    room = half - survivors * params.sensitivity
    if room <= 0:
        return 1.0
    if params.sigma == 0.0:
        return 0.0
    return min(1.0, 2.0 * params.padded_dim * math.exp(-room**2 / (2.0 * survivors * params.sigma**2)))


def plan_user_dp(*, dim: int, clip: float, noise_multiplier: float, members: int, threshold: int,
                 max_corrupt: int = 0, ring_bits: int = 32,
                 wrap_beta: float = DEFAULT_WRAP_PROBABILITY, min_resolution: float = 64.0) -> UserDPParams:
    """The largest scale at which ``members`` noisy contributions fit the ring (wrap probability
    <= ``wrap_beta``), with per-device ``sigma`` such that ``T - max_corrupt`` honest survivors
    give an effective multiplier of at least ``noise_multiplier`` (0: noise off).

    Refuses a ring too small for ``C s >= min_resolution * sqrt(d')`` (rounding would then
    inflate the sensitivity by more than 1/min_resolution).
    """
    if not 1 <= threshold <= members or max_corrupt < 0 or threshold - max_corrupt < 1:
        raise ValueError("need 1 <= threshold <= members and threshold - max_corrupt >= 1")
    if noise_multiplier < 0 or not math.isfinite(noise_multiplier):
        raise ValueError("noise_multiplier must be finite and >= 0")
    m = threshold - max_corrupt
    dp = padded_dim(dim)
    half = 2 ** (ring_bits - 1) - 1
    # sigma = k * D with k = z / sqrt(m): signal n D plus tail sqrt(2 n k^2 D^2 log(2d'/beta)) <= half.
    k = noise_multiplier / math.sqrt(m)
    per_d = members + k * math.sqrt(2.0 * members * math.log(2.0 * dp / wrap_beta))
    sens = half / per_d * (1.0 - 1e-9)
    scale = (sens - math.sqrt(dp)) / clip
    if clip * scale < min_resolution * math.sqrt(dp):
        raise ValueError(f"a {ring_bits}-bit ring leaves C*s = {clip * scale:.3g} for {members} members at "
                         f"d' = {dp}: below {min_resolution} * sqrt(d'); use fewer members or coordinates")
    sigma = 0.0
    if noise_multiplier > 0:
        sigma = max(MIN_SIGMA, k * rounded_norm_bound(clip, scale, dp))
        while effective_noise_multiplier(rounded_norm_bound(clip, scale, dp), sigma, m, dp) < noise_multiplier:
            sigma *= 1.0 + 1e-9
    params = UserDPParams(dim, clip, scale, sigma, m, members, ring_bits)
    if params.wrap_probability() > wrap_beta * (1.0 + 1e-6):
        raise AssertionError("internal: the planned scale does not meet the wrap bound")
    return params


# -- the central baseline -------------------------------------------------------------------

def central_noise(rng: SecureRandom, dim: int, clip: float, noise_multiplier: float) -> np.ndarray:
    """Gaussian noise of std ``z C`` a trusted server adds to the float sum of clipped updates."""
    return rng.gaussian(dim, noise_multiplier * clip)


# -- ledger rows ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class UserMechanism:
    """What a user-level ledger row records about its mechanism, beyond the standard columns:
    enough to recompute the effective multiplier the row is charged at."""

    mechanism: str
    padded_dim: int = 0
    scale: float = 0.0
    sigma: float = 0.0
    calibrated_for: int = 0

    def encode(self) -> str:
        if self.mechanism == MECH_CENTRAL:
            return f"{USER_TAG} mech={MECH_CENTRAL}"
        return (f"{USER_TAG} mech={MECH_DISTRIBUTED} dprime={self.padded_dim} scale={self.scale!r} "
                f"sigma={self.sigma!r} m={self.calibrated_for}")

    def multiplier(self, clip: float, stated: float) -> float:
        """The effective multiplier these parameters give (the central baseline: as stated)."""
        if self.mechanism == MECH_CENTRAL:
            return stated
        return effective_noise_multiplier(rounded_norm_bound(clip, self.scale, self.padded_dim), self.sigma,
                                          self.calibrated_for, self.padded_dim)

    @classmethod
    def of(cls, params: UserDPParams) -> "UserMechanism":
        return cls(MECH_DISTRIBUTED, params.padded_dim, params.scale, params.sigma, params.calibrated_for)


def user_rng_source(source: str, mechanism: UserMechanism) -> str:
    """The ``rng_source`` column of a user-level row: the generator, then ``; `` and the tag.

    The row schema has no unit column; the unit and the mechanism parameters ride in this
    text column, which the device's spend claim signs like every other column."""
    if ";" in source:
        raise ValueError("rng source must not contain ';'")
    return f"{source}; {mechanism.encode()}"


def parse_user_mechanism(rng_source: str) -> UserMechanism | None:
    """The mechanism of a user-level row, None for an example-level row; raises ValueError on
    a malformed tag."""
    if "; " + USER_TAG not in rng_source:
        return None
    tag = rng_source.split("; ", 1)[1]
    parts = tag.split(" ")
    if parts[0] != USER_TAG:
        raise ValueError(f"malformed user-level tag {tag!r}")
    fields = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    mech = fields.get("mech")
    if mech == MECH_CENTRAL:
        return UserMechanism(MECH_CENTRAL)
    if mech != MECH_DISTRIBUTED:
        raise ValueError(f"unknown user-level mechanism {mech!r}")
    try:
        return UserMechanism(MECH_DISTRIBUTED, int(fields["dprime"]), float(fields["scale"]), float(fields["sigma"]),
                             int(fields["m"]))
    except (KeyError, ValueError) as exc:
        raise ValueError(f"malformed user-level tag {tag!r}: {exc}") from None


def user_row_problems(row_noise_multiplier: float, sample_rate: float, steps: int, accountant: str,
                      max_grad_norm: float, rng_source: str) -> list[str]:
    """Why a user-level row's columns do not describe one participation of its mechanism."""
    try:
        mech = parse_user_mechanism(rng_source)
    except ValueError as exc:
        return [str(exc)]
    if mech is None:
        return ["not a user-level row"]
    out = []
    if sample_rate != 1.0 or steps != 1:
        out.append(f"a user-level row is one unsampled participation (sample_rate 1, steps 1), got "
                   f"{sample_rate!r}, {steps!r}")
    if accountant != USER_ACCOUNTANT:
        out.append(f"user-level rows use the {USER_ACCOUNTANT!r} accountant, got {accountant!r}")
    if mech.mechanism == MECH_DISTRIBUTED:
        try:
            z = mech.multiplier(max_grad_norm, row_noise_multiplier)
        except ValueError as exc:
            return out + [f"mechanism parameters: {exc}"]
        if not row_noise_multiplier <= z * (1.0 + 1e-12):
            out.append(f"noise multiplier {row_noise_multiplier!r} is above the {z!r} its mechanism parameters give")
    return out


def user_step(params: UserDPParams) -> PrivacyStep:
    """What the device's accountant store is charged for one participation."""
    return PrivacyStep(params.noise_multiplier, 1.0, 1)


# -- what the noise costs a plan: noise-to-signal on the cohort mean --------------------------

def mean_noise_ratio(dim: int, *, noise_multiplier: float, members: int, threshold: int, max_corrupt: int = 0,
                     central: bool = False) -> float:
    """Noise std per coordinate on the mean of ``members`` clipped updates of ``dim`` values,
    relative to ``C / sqrt(dim)``, the per-coordinate RMS of one clipped update (the most signal
    a coordinate of the mean can carry on average).

    ``central``: a trusted server's ``N(0, (z C)^2)`` on the sum, so ``z sqrt(dim) / members``.
    Otherwise the devices' discrete Gaussians as :func:`plan_user_dp` calibrates them (``T -
    max_corrupt`` honest survivors carry the target), with all ``members`` surviving: about
    ``z sqrt(dim) / sqrt(members (T - max_corrupt))``, a little more for the rounding. The ratio
    does not depend on the clip. It grows with ``dim`` (``sqrt(dim)``, and the scale shrinks as
    ``d'`` grows), which is what lets :func:`max_coordinates_for_ratio` bisect on it. ``inf``
    when the ring cannot hold ``members`` contributions of ``dim`` values.
    """
    if central:
        return noise_multiplier * math.sqrt(dim) / members
    try:
        params = plan_user_dp(dim=dim, clip=1.0, noise_multiplier=noise_multiplier, members=members,
                              threshold=threshold, max_corrupt=max_corrupt)
    except ValueError:
        return math.inf
    return params_noise_ratio(params)


def params_noise_ratio(params: UserDPParams) -> float:
    """:func:`mean_noise_ratio` of a planned mechanism, every one of its ``members`` surviving: the
    noise std per coordinate on the decoded mean over ``C / sqrt(dim)``. A device computes it for
    the task's own mechanism (its ``max_user_noise_ratio`` ceiling)."""
    noise = math.sqrt(params.members * discrete_gaussian_variance(params.sigma)) / params.scale / params.members
    return noise * math.sqrt(params.dim) / params.clip


def max_coordinates_for_ratio(ratio: float, *, noise_multiplier: float, members: int, threshold: int,
                              max_corrupt: int = 0, central: bool = False, upper: int = 1 << 24) -> int:
    """The largest ``dim`` in ``[0, upper]`` whose :func:`mean_noise_ratio` is at most ``ratio``
    (0: not even one coordinate). Bisection: the ratio is nondecreasing in ``dim``."""
    if not ratio > 0:
        raise ValueError(f"ratio must be > 0, got {ratio}")

    def ok(d: int) -> bool:
        return mean_noise_ratio(d, noise_multiplier=noise_multiplier, members=members, threshold=threshold,
                                max_corrupt=max_corrupt, central=central) <= ratio

    if upper < 1 or not ok(1):
        return 0
    if ok(upper):
        return upper
    lo, hi = 1, upper  # ok(lo), not ok(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo

"""User-level DP: the discrete Gaussian sampler, the distributed-DG accountant against an
independent Gaussian computation, ring planning, and user-level ledger rows through the audit."""

from __future__ import annotations

import math

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from ftte.privacy.accountant import AccountantStore, PrivacyStep, compute_epsilon
from ftte.privacy.audit import verify_ledger
from ftte.privacy.budget import BudgetExceededError
from ftte.privacy.distributed_dp import (
    MECH_CENTRAL,
    USER_ACCOUNTANT,
    UserMechanism,
    ddg_rdp,
    discrete_gaussian,
    discrete_gaussian_variance,
    effective_noise_multiplier,
    kls_tau,
    multiplier_for_budget,
    parse_user_mechanism,
    plan_user_dp,
    rounded_norm_bound,
    user_epsilon,
    user_rng_source,
    user_step,
    wrap_probability,
)
from ftte.privacy.ledger import Ledger
from ftte.privacy.policy import PrivacyPolicy
from ftte.privacy.secure_random import SOURCE_SEED, SecureRandom
from ftte.privacy.spend import RoundOutcome, SpendRecord, ledger_rows


# -- sampler -------------------------------------------------------------------------------------

def _exact_pmf(sigma: float, support: np.ndarray) -> np.ndarray:
    k = np.arange(-int(40 * sigma) - 2, int(40 * sigma) + 3)
    z = np.exp(-(k.astype(float) ** 2) / (2 * sigma**2)).sum()
    return np.exp(-(support.astype(float) ** 2) / (2 * sigma**2)) / z


@pytest.mark.parametrize("sigma", [0.7, 1.5, 4.0])
def test_discrete_gaussian_matches_its_pmf(sigma):
    """Chi-square goodness of fit of 200k ChaCha20 draws against the exact mass function."""
    n = 200_000
    draws = discrete_gaussian(SecureRandom.from_seed(11, "dg", str(sigma)), n, sigma)
    assert draws.dtype == np.int64
    lim = int(3 * sigma) + 1
    support = np.arange(-lim, lim + 1)
    expected = _exact_pmf(sigma, support) * n
    observed = np.array([(draws == k).sum() for k in support])
    tail_expected = n - expected.sum()
    tail_observed = n - observed.sum()
    chi2 = float(((observed - expected) ** 2 / expected).sum() + (tail_observed - tail_expected) ** 2 / tail_expected)
    dof = len(support)
    # mean + 5 std of a chi-square with `dof` degrees of freedom: fails only on a wrong law
    assert chi2 < dof + 5 * math.sqrt(2 * dof), chi2


@pytest.mark.parametrize("sigma", [0.6, 3.0, 1e5])
def test_discrete_gaussian_variance(sigma):
    n = 400_000
    draws = discrete_gaussian(SecureRandom.from_seed(5, "var", str(sigma)), n, sigma).astype(np.float64)
    exact = discrete_gaussian_variance(sigma)
    assert exact == pytest.approx(sigma**2, rel=0.03)
    # sample variance of n draws: relative standard error sqrt(2/n) ~ 0.22 %; allow 5 of them
    assert draws.var() == pytest.approx(exact, rel=5 * math.sqrt(2 / n))
    assert abs(draws.mean()) < 5 * math.sqrt(exact / n)


def test_sampler_uses_only_the_given_generator():
    a = discrete_gaussian(SecureRandom.from_key(bytes(32)), 1000, 50.0)
    b = discrete_gaussian(SecureRandom.from_key(bytes(32)), 1000, 50.0)
    c = discrete_gaussian(SecureRandom.from_key(bytes([1]) * 32), 1000, 50.0)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


# -- accountant vs an independent computation ----------------------------------------------------

def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def _exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact ε at δ of a Gaussian mechanism with sensitivity/std = mu (Balle-Wang; Dong-Roth-Su:
    R compositions of ratio r give mu = sqrt(R) r). Bisection on the exact δ(ε) curve."""
    def d(eps: float) -> float:
        return _phi(-eps / mu + mu / 2) - math.exp(eps) * _phi(-eps / mu - mu / 2)

    lo, hi = 0.0, 1.0
    while d(hi) > delta:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if d(mid) > delta else (lo, mid)
    return hi


CASES = [
    # (clip, scale, padded dim, sigma per device, honest summands): planned-size and tiny-sigma cases
    (1.0, 1.9e7, 2**20, 2.66e6, 51),
    (0.5, 4.0e5, 2**14, 3.0e4, 10),
    (1.0, 3.0, 16, 0.8, 3),  # tau is far from 0 here
    (1.0, 6.0, 64, 0.55, 8),
]


@pytest.mark.parametrize("clip,scale,dp,sigma,m", CASES)
def test_bound_is_no_smaller_than_continuous_gaussian_of_same_variance(clip, scale, dp, sigma, m):
    sens = rounded_norm_bound(clip, scale, dp)
    z_eff = effective_noise_multiplier(sens, sigma, m, dp)
    # independent: the true variance of the noise (exact sum), the unrounded sensitivity C s
    total_var = m * discrete_gaussian_variance(sigma)
    z_cont = math.sqrt(total_var) / (clip * scale)
    for alpha in (1.01, 1.5, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0):
        continuous = alpha / (2 * z_cont**2)
        full = ddg_rdp(alpha, sens, sigma, m, dp)
        charged = alpha / (2 * z_eff**2)
        assert continuous <= full <= charged * (1 + 1e-12)
    for participations, delta in ((1, 1e-6), (20, 1e-6), (100, 1e-5)):
        ours = user_epsilon([z_eff] * participations, delta)
        if ours > 200:  # tiny-sigma cases: nothing meaningful to compare (the RDP check above covers them)
            continue
        exact = _exact_gaussian_epsilon(math.sqrt(participations) / z_cont, delta)
        assert ours >= exact
        if sigma > 100:  # tau = 0: the slack is the RDP-to-(ε, δ) conversion and the rounding term only
            assert ours <= 1.35 * exact, (ours, exact)


def test_tau_is_the_kls_sum():
    sigma, m = 0.8, 4
    by_hand = 10 * (math.exp(-2 * math.pi**2 * 0.64 * 1 / 2) + math.exp(-2 * math.pi**2 * 0.64 * 2 / 3)
                    + math.exp(-2 * math.pi**2 * 0.64 * 3 / 4))
    assert kls_tau(sigma, m) == pytest.approx(by_hand, rel=1e-12)
    assert kls_tau(sigma, 1) == 0.0 and kls_tau(200.0, 1000) == 0.0
    z = effective_noise_multiplier(5.0, sigma, m, 16)
    assert 1 / z == pytest.approx(5.0 / (2 * sigma) + by_hand * 4, rel=1e-12)


def test_multiplier_for_budget_is_tight():
    for eps in (2.0, 4.0, 8.0):
        z = multiplier_for_budget(eps, 1e-6, 10)
        assert user_epsilon([z] * 10, 1e-6) <= eps
        assert user_epsilon([z * (1 - 1e-3)] * 10, 1e-6) > eps


# -- planning and the ring -------------------------------------------------------------------------

def test_plan_calibrates_honest_survivors_and_bounds_wrap():
    z = 1.3
    p = plan_user_dp(dim=1_000_000, clip=0.7, noise_multiplier=z, members=100, threshold=60, max_corrupt=5)
    assert p.calibrated_for == 55 and p.padded_dim == 2**20
    assert p.noise_multiplier >= z and p.noise_multiplier == pytest.approx(z, rel=1e-6)
    # 55 honest devices at sigma each carry the target: 55 sigma^2 = (z * sensitivity)^2
    assert 55 * p.sigma**2 == pytest.approx((z * p.sensitivity) ** 2, rel=1e-6)
    assert p.wrap_probability() <= 2.0**-40 * (1 + 1e-6)
    assert wrap_probability(p, 60) < p.wrap_probability()
    assert p.sensitivity / (p.clip * p.scale) - 1 < 1e-3  # rounding inflates the sensitivity by < 0.1 %


def test_plan_refuses_a_ring_too_small():
    with pytest.raises(ValueError, match="below"):
        plan_user_dp(dim=1_000_000, clip=1.0, noise_multiplier=1.0, members=30, threshold=16, ring_bits=16)
    with pytest.raises(ValueError):
        plan_user_dp(dim=10, clip=1.0, noise_multiplier=1.0, members=5, threshold=2, max_corrupt=2)


# -- ledger rows and the audit -------------------------------------------------------------------

def _user_spend(dev: str, version: int, params, *, epsilon_max: float = 8.0, stated: float | None = None,
                source: str | None = None) -> SpendRecord:
    step = user_step(params) if stated is None else PrivacyStep(stated, 1.0, 1)
    return SpendRecord(device_id=dev, plan_id="plan-U", version=version, step=step, max_grad_norm=params.clip,
                       delta=1e-6, accountant=USER_ACCOUNTANT, epsilon_max=epsilon_max,
                       rng_source=source or user_rng_source(SOURCE_SEED, UserMechanism.of(params)))


@pytest.fixture
def user_params():
    return plan_user_dp(dim=5000, clip=1.0, noise_multiplier=3.0, members=20, threshold=11)


def test_user_rows_round_trip_through_ledger_and_audit(tmp_path, user_params, capsys):
    path = tmp_path / "ledger.db"
    with Ledger(path, Ed25519PrivateKey.generate()) as ledger:
        ledger.set_policy(PrivacyPolicy(delta=1e-6, epsilon_cap=8.0, min_noise_multiplier=1.0, unit="user"))
        for version in range(4):
            spends = [(_user_spend(dev, version, user_params), RoundOutcome.MERGED, f"c{version}")
                      for dev in ("a", "b")]
            ledger.append_many(ledger_rows(ledger, spends))
        rows = [e.row for e in ledger.rows_for("a")]
    assert parse_user_mechanism(rows[0].rng_source) == UserMechanism.of(user_params)
    assert rows[-1].epsilon_total == pytest.approx(user_epsilon([user_params.noise_multiplier] * 4, 1e-6), rel=1e-12)
    result = verify_ledger(path)
    assert result.ok, result.summary()
    assert result.devices["a"].epsilon_total_recomputed == rows[-1].epsilon_total
    assert result.user_rows == 8 and "8 user-level rows, 0 record-level" in result.summary()
    assert result.to_json()["units"] == {"user": 8, "record": 0}
    from ftte import cli

    assert cli.main(["audit", str(path)]) == 0
    assert "8 user-level rows" in capsys.readouterr().out


def test_audit_flags_an_overstated_multiplier_and_a_unit_mismatch(tmp_path, user_params):
    path = tmp_path / "ledger.db"
    with Ledger(path, Ed25519PrivateKey.generate()) as ledger:
        ledger.set_policy(PrivacyPolicy(delta=1e-6, epsilon_cap=8.0, min_noise_multiplier=1.0, unit="record"))
        honest = _user_spend("a", 0, user_params)
        inflated = _user_spend("b", 0, user_params, stated=user_params.noise_multiplier * 1.5)
        central = _user_spend("c", 0, user_params, stated=2.0,
                              source=user_rng_source(SOURCE_SEED, UserMechanism(MECH_CENTRAL)))
        ledger.append_many(ledger_rows(ledger, [(s, RoundOutcome.MERGED, "c0") for s in (honest, inflated, central)]))
    result = verify_ledger(path)
    assert result.integrity_ok  # the ledger key signed every row: only the content is wrong
    eps = [i for i in result.issues if i.kind == "epsilon"]
    assert [i.device_id for i in eps] == ["b"] and "above" in eps[0].message
    policy = [i for i in result.issues if i.kind == "policy"]
    assert {i.device_id for i in policy} == {"a", "b", "c"}  # user rows under a record-level policy


def test_malformed_user_tag_is_flagged(tmp_path, user_params):
    path = tmp_path / "ledger.db"
    with Ledger(path, Ed25519PrivateKey.generate()) as ledger:
        bad = _user_spend("a", 0, user_params, source=SOURCE_SEED + "; user-dp/1 mech=ddg dprime=8")
        ledger.append_many(ledger_rows(ledger, [(bad, RoundOutcome.MERGED, "c0")]))
    result = verify_ledger(path)
    assert not result.epsilon_ok
    assert any(i.kind == "epsilon" and "malformed" in i.message for i in result.issues)


def test_store_refuses_the_participation_past_the_budget(tmp_path, user_params):
    z = user_params.noise_multiplier
    allowed = max(k for k in range(1, 200) if user_epsilon([z] * k, 1e-6) <= 2.0)
    with AccountantStore(tmp_path / "acc.db") as store:
        for _ in range(allowed):
            store.charge("dev", user_step(user_params), accountant=USER_ACCOUNTANT, delta=1e-6, epsilon_max=2.0)
        with pytest.raises(BudgetExceededError):
            store.charge("dev", user_step(user_params), accountant=USER_ACCOUNTANT, delta=1e-6, epsilon_max=2.0)
        assert len(store.history("dev")) == allowed
        assert store.epsilon("dev") == pytest.approx(
            compute_epsilon([PrivacyStep(z, 1.0, 1)] * allowed, 1e-6, "rdp"), rel=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=1, max_value=300), st.floats(min_value=0.01, max_value=100.0),
       st.floats(min_value=1.0, max_value=1e6), st.integers(min_value=0, max_value=2**32 - 1))
def test_rounding_never_exceeds_the_sensitivity(dim, clip, scale, seed):
    from ftte.protocol.user_encoding import UserCodec, rotation_seed
    from ftte.privacy.distributed_dp import UserDPParams

    params = UserDPParams(dim=dim, clip=clip, scale=scale, sigma=0.0, calibrated_for=1, members=1)
    codec = UserCodec(params, rotation_seed(f"h{seed}"))
    x = np.random.default_rng(seed).normal(size=dim) * 10 * clip
    enc = codec.encode(x, 1.0, SecureRandom.from_seed(seed, "round"), noise=False)
    assert float(np.linalg.norm(enc.rounded)) <= params.sensitivity


def test_central_baseline_noise_has_the_stated_std():
    from ftte.privacy.distributed_dp import central_noise

    z, clip, n = 1.7, 0.4, 200_000
    noise = central_noise(SecureRandom.from_seed(3, "central"), n, clip, z)
    assert noise.var() == pytest.approx((z * clip) ** 2, rel=5 * math.sqrt(2 / n))
    mech = UserMechanism(MECH_CENTRAL)
    assert parse_user_mechanism(user_rng_source(SOURCE_SEED, mech)) == mech
    assert mech.multiplier(clip, z) == z


def test_distributed_costs_sqrt_n_over_m_more_noise_than_central_for_the_same_epsilon():
    """The price of calibrating to T - max_corrupt survivors: with all n surviving, the sum carries
    n/m times the variance a trusted server would add for the same guarantee."""
    z = multiplier_for_budget(4.0, 1e-6, 8)
    p = plan_user_dp(dim=490, clip=1.0, noise_multiplier=z, members=100, threshold=51)
    distributed_var = 100 * discrete_gaussian_variance(p.sigma) / p.scale**2
    central_var = (z * 1.0) ** 2
    assert distributed_var / central_var == pytest.approx(100 / 51 * (p.sensitivity / p.scale) ** 2, rel=1e-6)


def test_params_refuse_a_signal_that_cannot_fit_the_ring():
    from ftte.privacy.distributed_dp import UserDPParams

    with pytest.raises(ValueError, match="do not fit"):
        UserDPParams(dim=1000, clip=1.0, scale=1e8, sigma=0.0, calibrated_for=1, members=30)


# -- the table sampler: exact envelope, goodness of fit at binned scales, the tail, lazy Bernoulli ---

from ftte.privacy.distributed_dp import (  # noqa: E402
    _CHUNK,
    _GUIDE_BITS,
    _batch_attempts,
    _exp_poly,
    _bernoulli_lazy,
    _envelope,
    _sample,
    _tail_attempts,
    discrete_gaussian_cks,
)


@pytest.mark.parametrize("sigma", [0.5, 3.0, 40.0, 100.0, 3000.0, 3e5])
def test_envelope_times_acceptance_is_the_gaussian_on_every_integer(sigma):
    """For every magnitude in the table, P(propose x) * P(accept x) / exp(-x^2 / 2 sigma^2) is one
    constant (computed from the table itself), and no acceptance exceeds 1: the law is exact."""
    env = _envelope(sigma)
    w = 1 << env.width_bits
    counts = np.bincount(env.guide, minlength=env.bins + 2)
    assert counts.sum() == 1 << _GUIDE_BITS and np.all(counts[: env.bins + 1] >= 1)
    x = np.arange(env.limit, dtype=np.float64)
    b = (x // w).astype(np.int64)
    off = x - b * w
    accept = env.bias[b] * np.exp(-off * (2 * env.low[b] + off) / (2 * sigma**2))
    assert np.all(accept <= 1.0) and np.all(env.low[b] == b * w)
    ratio = (counts[b] / 2.0**_GUIDE_BITS / w) * accept / np.exp(-(x * x) / (2 * sigma**2))
    assert np.allclose(ratio, ratio[0], rtol=1e-9, atol=0)
    # the tail's acceptance at its start continues the same constant
    t = env.tail_t
    # the tail entry proposes only when tail_select spare bits are zero (2^-tail_select of the time)
    tail0 = counts[env.bins] / 2.0**_GUIDE_BITS / 2.0**env.tail_select * (1 - math.exp(-1)) / t * env.tail_bias
    assert tail0 / math.exp(-float(env.limit) ** 2 / (2 * sigma**2)) == pytest.approx(ratio[0], rel=1e-9)
    assert env.tail_bias <= 1.0 and t * env.limit >= sigma**2
    assert env.tail_select == 16  # at 14 sigma the tail's acceptance leaves room for 16 bits of selection
    # and the envelope is tight: at least 95 % of attempts accepted at large sigma
    if sigma >= 40:
        assert float((counts[b] / 2.0**_GUIDE_BITS / w * accept).sum()) * 2 > 0.95


def _binned_chi2(draws: np.ndarray, sigma: float, edges: np.ndarray) -> tuple[float, int]:
    """Chi-square of draws against the exact discrete Gaussian over integer bins [edges[i], edges[i+1]).

    Up to sigma 1e4 the bin masses are summed from the exact mass function; above, the mass of
    the integers in [a, b) is Phi((b - 1/2)/sigma) - Phi((a - 1/2)/sigma) (Euler-Maclaurin: the
    error is O(sigma^-2) relative, far below what 1e5 draws can see)."""
    if sigma > 1e4:
        from scipy.special import ndtr

        cdf_at = ndtr((np.asarray(edges, dtype=np.float64) - 0.5) / sigma)
        expected = np.diff(cdf_at) * draws.size
    else:
        k = np.arange(-int(40 * sigma) - 2, int(40 * sigma) + 3)
        pmf = np.exp(-(k.astype(float) ** 2) / (2 * sigma**2))
        pmf /= pmf.sum()
        cdf = np.concatenate([[0.0], np.cumsum(pmf)])
        idx = np.clip(np.searchsorted(k, edges), 0, len(k))
        expected = np.diff(cdf[idx]) * draws.size
    observed = np.histogram(draws, bins=edges)[0]
    keep = expected > 5
    chi2 = float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    return chi2, int(keep.sum())


@pytest.mark.parametrize("sigma", [40.0, 100.0, 3000.0, 2.66e6, 1e8])
def test_table_sampler_matches_its_pmf_at_binned_scales(sigma):
    """Goodness of fit where bins are wider than one integer; the edges cut bins and offsets
    at odd places (sigma/7) so a wrong within-bin law or bin mass would show."""
    n = 300_000
    draws = discrete_gaussian(SecureRandom.from_seed(3, "dg-table", str(sigma)), n, sigma)
    step = max(1, int(sigma / 7))
    edges = np.arange(-int(4.5 * sigma) - 1, int(4.5 * sigma) + 2, step)
    chi2, dof = _binned_chi2(draws, sigma, edges)
    assert chi2 < dof + 5 * math.sqrt(2 * dof), (chi2, dof)
    assert abs(draws.mean()) < 5 * sigma / math.sqrt(n)
    assert draws.var() == pytest.approx(sigma**2, rel=5 * math.sqrt(2 / n))


def test_table_sampler_parity_and_low_bits_are_uniform_at_large_sigma():
    """The offset bits inside a bin: at sigma 1e5 the residues mod 8 are uniform."""
    draws = discrete_gaussian(SecureRandom.from_seed(4, "low-bits"), 400_000, 1e5)
    counts = np.bincount(draws % 8, minlength=8)
    expected = draws.size / 8
    assert float(((counts - expected) ** 2 / expected).sum()) < 7 + 5 * math.sqrt(14)


@pytest.mark.parametrize("sigma,table_sigmas", [(3.0, 1.5), (50.0, 0.6)])
def test_tail_path_is_exact_when_the_table_is_short(sigma, table_sigmas):
    """A table covering only 1.5 (0.6) sigma sends 13 % (55 %) of draws through the discrete-Laplace
    tail: the law must still be the discrete Gaussian."""
    env = _envelope(sigma, table_sigmas)
    n = 200_000
    draws = _sample(SecureRandom.from_seed(9, "tail", str(sigma)), n, env)
    assert (np.abs(draws) >= env.limit).mean() > 0.1
    edges = np.arange(-int(5 * sigma) - 1, int(5 * sigma) + 2, max(1, int(sigma / 5)))
    chi2, dof = _binned_chi2(draws, sigma, edges)
    assert chi2 < dof + 5 * math.sqrt(2 * dof), (chi2, dof)


def test_table_and_reference_samplers_agree():
    """Two-sample chi-square of the table sampler against the CKS reference at sigma 20."""
    n, sigma = 200_000, 20.0
    a = discrete_gaussian(SecureRandom.from_seed(1, "a"), n, sigma)
    b = discrete_gaussian_cks(SecureRandom.from_seed(1, "b"), n, sigma)
    edges = np.arange(-80, 82, 4)
    ca, cb = np.histogram(a, edges)[0], np.histogram(b, edges)[0]
    keep = (ca + cb) > 10
    chi2 = float(((ca[keep] - cb[keep]) ** 2 / (ca[keep] + cb[keep])).sum())
    dof = int(keep.sum())
    assert chi2 < dof + 5 * math.sqrt(2 * dof)


@pytest.mark.parametrize("sigma,per_draw", [(2.66e6, 8.7), (1e8, 13.0)])
def test_table_sampler_spends_about_8_bytes_per_draw(sigma, per_draw):
    """8 bytes per attempt while the offset fits 16 bits, 12 above; about 96 % accepted."""
    rng = SecureRandom.from_seed(2, "bytes")
    z = discrete_gaussian(rng, 100_000, sigma)
    assert rng.bytes_drawn < per_draw * 100_000
    assert z.var() == pytest.approx(sigma**2, rel=0.02)
    ref = SecureRandom.from_seed(2, "bytes-ref")
    discrete_gaussian_cks(ref, 100_000, sigma)
    assert ref.bytes_drawn > 4 * rng.bytes_drawn


@pytest.mark.parametrize("bits", [31, 32])
def test_lazy_bernoulli_is_the_53_bit_comparison(bits):
    """Forced ties included: the result equals drawing 53 bits and comparing with p * 2^53."""
    g = np.random.default_rng(bits)
    p = g.random(20_000)
    first = g.integers(0, 2**bits, 20_000).astype(np.uint32)
    first[::3] = np.floor(p[::3] * 2.0**bits).astype(np.uint32)  # a tie on every third
    key = bytes(range(32))
    got = _bernoulli_lazy(SecureRandom.from_key(key), p, first, bits)
    extra_rng = SecureRandom.from_key(key)
    tie = np.flatnonzero(first == np.floor(p * 2.0**bits))
    extra = np.frombuffer(extra_rng.random_bytes(8 * tie.size), dtype="<u8") >> np.uint64(64 - (53 - bits))
    u53 = first.astype(np.uint64) << np.uint64(53 - bits)
    u53[tie] += extra
    want = u53.astype(np.float64) < p * 2.0**53
    assert tie.size >= 6000 and np.array_equal(got, want)
    top = np.full(5, 2**bits - 1, np.uint32)
    assert np.array_equal(_bernoulli_lazy(SecureRandom.from_key(key), np.ones(5), top, bits), np.ones(5, bool))
    assert not _bernoulli_lazy(SecureRandom.from_key(key), np.zeros(5), np.zeros(5, np.uint32), bits).any()


# -- the fast path of the table sampler changes no draw --------------------------------------------

def _reference_attempts(rng: SecureRandom, k: int, env) -> np.ndarray:
    """The table sampler's attempts as first written (before the fast path): every attempt through
    the float acceptance test, from the envelope's bin table (guide, low, bias) alone."""
    per = 2 if env.width_bits <= 32 - _GUIDE_BITS else 3
    # blocks of at most _CHUNK attempts: word j of every attempt of the block, for j = 0 .. per - 1
    words = np.concatenate([np.frombuffer(rng.random_bytes(4 * per * c), dtype="<u4").reshape(per, c)
                            for c in (min(_CHUNK, k - s) for s in range(0, k, _CHUNK))], axis=1)
    index = words[0] >> np.uint32(32 - _GUIDE_BITS)
    mask = np.uint32((1 << env.width_bits) - 1)
    if per == 2:
        off, head, bits = words[0] & mask, words[1] >> np.uint32(1), 31
    else:
        off, head, bits = (words[1] >> np.uint32(1)) & mask, words[2], 32
    negative = (words[1] & np.uint32(1)).astype(bool)
    entry = env.guide[index]
    low = env.low[entry]
    magnitude = low + off
    p = _exp_poly((magnitude + low) * off * (-1.0 / (2.0 * env.sigma * env.sigma))) * env.bias[entry]
    tail_entry = entry == env.bins
    body = np.flatnonzero(~tail_entry)
    ok = np.zeros(k, dtype=bool)
    ok[body] = _bernoulli_lazy(rng, p[body], head[body], bits)  # a tail entry takes no Bernoulli test
    selected = (words[0] & np.uint32((1 << env.tail_select) - 1)) == 0  # its spare bits all zero
    tail = np.flatnonzero(tail_entry & selected)
    if tail.size:
        t_ok, t_x = _tail_attempts(rng, env, tail.size)
        ok[tail] = t_ok
        magnitude[tail] = t_x
    ok &= ~(negative & (magnitude == 0.0))
    signed = np.where(negative, -magnitude, magnitude)[ok]
    return signed.astype(np.int64)


def _reference_sample(rng: SecureRandom, n: int, env) -> np.ndarray:
    parts, done = [], 0
    while done < n:
        need = n - done
        x = _reference_attempts(rng, _batch_attempts(need, env), env)[:need]
        parts.append(x)
        done += x.size
    return np.concatenate(parts)


@pytest.mark.parametrize("sigma,table_sigmas", [(0.5, 14), (3.0, 14), (40.0, 14), (3000.0, 14), (2.66e6, 14),
                                                (1e8, 14), (3.0, 1.5), (50.0, 0.6), (1e5, 3.0)])
def test_fast_path_draws_the_same_integers_as_the_full_test(sigma, table_sigmas):
    """The sampler settles most attempts without the float test (``fast_at``); on the same keystream
    it must return exactly the draws, and consume exactly the keystream, of running the full test
    on every attempt. Short tables (1.5, 0.6, 3 sigma) send many attempts through the tail."""
    env = _envelope(sigma, table_sigmas)
    n = 40_000
    fast_rng = SecureRandom.from_seed(11, "same-draws", str(sigma), str(table_sigmas))
    ref_rng = SecureRandom.from_seed(11, "same-draws", str(sigma), str(table_sigmas))
    fast = _sample(fast_rng, n, env)
    ref = _reference_sample(ref_rng, n, env)
    assert fast.dtype == np.int64 and np.array_equal(fast, ref)
    assert fast_rng.bytes_drawn == ref_rng.bytes_drawn


@pytest.mark.parametrize("sigma", [0.5, 3.0, 40.0, 100.0, 3000.0, 3e5, 2.66e6])
def test_sure_bound_never_exceeds_the_acceptance(sigma):
    """For every bin and offset, a head below the fast path's bound is below floor(p 2^31), the full
    test's acceptance threshold; and the bound settles most attempts at large sigma (else the
    fast path would be a no-op)."""
    env = _envelope(sigma)
    w = 1 << env.width_bits
    counts = np.bincount(env.guide, minlength=env.bins + 2)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])  # the first table index of every bin
    sure = env.thr_at[first[: env.bins]].astype(np.int64) // 2  # the bound in head units, per bin
    assert np.all(env.thr_at[first[env.bins]:] == 0)  # the tail and the reject entries: always the full test
    for b in range(env.bins):  # every entry of a bin carries its bound and its lo
        entries = slice(first[b], first[b] + counts[b])
        assert np.all(env.thr_at[entries] == 2 * sure[b])
        if env.width_bits <= 32 - _GUIDE_BITS:
            assert np.all(env.lo_at[entries] == b * w)
    assert sure[0] == 0  # bin 0: always the full test ("-0")
    offs = np.unique(np.concatenate([[0, w - 1], np.random.default_rng(0).integers(0, w, 64)]))
    for off in offs.astype(np.float64):
        low = env.low[: env.bins]
        p = np.exp(-(low + off + low) * off / (2.0 * sigma * sigma)) * env.bias[: env.bins]
        assert np.all(sure.astype(np.float64) <= np.floor(p * 2.0**31))
    if sigma >= 100:
        settled = float((counts[: env.bins] * sure.astype(np.float64)).sum()) / 2.0**_GUIDE_BITS / 2.0**31
        assert settled > 0.9


def test_the_acceptance_exponential_is_exp_to_float64_accuracy():
    """The full test's exp (a polynomial both the numpy and the compiled sampler evaluate with the
    same operations) against numpy's exp over its range [-1, 0]: relative error below 2e-15, and
    exactly 1 at 0 (bin 0's offset 0, every table of sigma below 32)."""
    x = np.concatenate([np.linspace(-1.0, 0.0, 200_001), -np.logspace(-300, 0, 2001)])
    rel = np.abs(_exp_poly(x) / np.exp(x) - 1.0)
    assert float(rel.max()) < 2e-15
    assert _exp_poly(np.zeros(3)).tolist() == [1.0, 1.0, 1.0]


def test_a_tail_entry_proposes_only_when_its_spare_bits_are_zero():
    """At 14 sigma the tail entry (drawn 2^-16 of the time) proposes a tail value only when the 16
    spare bits of its first word are zero, with a 2^16 times larger acceptance (the envelope test
    checks the product): otherwise it is refused without drawing keystream."""
    from ftte.privacy.distributed_dp import _full_test

    env = _envelope(2.66e6)
    tail_index = int(np.flatnonzero(env.guide == env.bins)[0])
    n = 6
    index = np.full(n, tail_index, dtype=np.uint32)
    zeros = np.zeros(n, dtype=np.uint32)
    spare = np.array([0, 1, 0, 0x8000, 0xFFFF, 0], dtype=np.uint32)
    rng = SecureRandom.from_seed(3, "tail-select")
    ok, magnitude = _full_test(rng, env, index, zeros, zeros, zeros, 31, spare)
    assert rng.bytes_drawn > 0  # the three selected attempts drew their proposals
    assert not ok[[1, 3, 4]].any()
    assert np.all(magnitude[[0, 2, 5]] >= env.limit)  # proposals from the tail
    quiet = SecureRandom.from_seed(3, "tail-select")
    _full_test(quiet, env, index[[1, 3, 4]], zeros[:3], zeros[:3], zeros[:3], 31, spare[[1, 3, 4]])
    assert quiet.bytes_drawn == 0  # unselected: refused, no keystream

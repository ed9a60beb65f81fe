"""Meaningful δ defaults, noise from a target ε, and a recorded policy the audit enforces."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from torch import nn

from ftte.privacy.accountant import PrivacyStep, compute_epsilon
from ftte.privacy.audit import verify_ledger
from ftte.privacy.dpsgd import DPConfig, PrivateTrainer
from ftte.privacy.ledger import Ledger, LedgerError
from ftte.privacy.policy import PrivacyPolicy, check_delta, default_delta, noise_multiplier_for_target
from ftte.privacy.spend import RoundOutcome, SpendRecord, ledger_rows

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")


def test_default_delta_is_far_below_one_over_n():
    assert default_delta(10) == 1e-5  # 1/(10 n) = 0.01 would be far too weak
    assert default_delta(1_000_000) == 1e-7
    for n in (1, 7, 100, 10**5, 10**8):
        assert default_delta(n) <= min(1e-5, 1 / (10 * n))


def test_delta_at_or_above_one_over_n_is_refused_naming_the_key():
    assert check_delta(1e-3, 100) == 1e-3
    with pytest.raises(ValueError, match=r"privacy\.delta=0\.01 is >= 1/n"):
        check_delta(0.01, 100)
    with pytest.raises(ValueError, match=r"privacy\.delta"):
        check_delta(0.05, 20)
    x, y = torch.randn(20, 4), torch.randint(0, 2, (20,))
    trainer = PrivateTrainer(nn.Linear(4, 2), DPConfig(delta=0.05, accountant="rdp"))
    with pytest.raises(ValueError, match=r"privacy\.delta"):
        trainer.train_round((x, y), loss_fn=nn.functional.cross_entropy, lr=0.1, batch_size=4, steps=1)
    assert trainer.store.state("local") is None
    default = PrivateTrainer(nn.Linear(4, 2), DPConfig(accountant="rdp", epsilon_max=1e3))
    assert default.plan_round(20, batch_size=4, steps=1).delta == 1e-5


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_noise_multiplier_for_target_meets_the_target_tightly(accountant):
    q, steps, rounds, delta, target = 0.05, 5, 20, 1e-5, 3.0
    sigma = noise_multiplier_for_target(target, delta, q, steps, rounds, accountant=accountant)
    spent = compute_epsilon([PrivacyStep(sigma, q, steps)] * rounds, delta, accountant)
    assert target - 0.01 <= spent <= target
    assert compute_epsilon([PrivacyStep(sigma * 0.97, q, steps)] * rounds, delta, accountant) > target


def test_noise_multiplier_for_target_agrees_with_opacus():
    from opacus.accountants.utils import get_noise_multiplier

    ours = noise_multiplier_for_target(2.0, 1e-5, 0.02, 10, 30, accountant="rdp")
    theirs = get_noise_multiplier(target_epsilon=2.0, target_delta=1e-5, sample_rate=0.02, steps=300,
                                  accountant="rdp")
    assert ours == pytest.approx(theirs, rel=0.02)


POLICY = PrivacyPolicy(delta=1e-5, epsilon_cap=5.0, min_noise_multiplier=0.8, accountant="rdp")


def _spend(dev: str, **over) -> SpendRecord:
    base = dict(device_id=dev, plan_id="p", version=0, step=PrivacyStep(1.0, 0.05, 5), max_grad_norm=1.0,
                delta=1e-5, accountant="rdp", epsilon_max=5.0, rng_source="chacha20:os")
    base.update(over)
    return SpendRecord(**base)


def _ledger(tmp_path, spends: list[SpendRecord]):
    path = tmp_path / "ledger.db"
    with Ledger(path, Ed25519PrivateKey.generate()) as led:
        led.set_policy(POLICY)
        for i, s in enumerate(spends):
            led.append_many(ledger_rows(led, [(s, RoundOutcome.MERGED, f"c{i}")]))
        assert led.policy() == POLICY
    return verify_ledger(path)


def test_rows_within_the_policy_pass(tmp_path):
    result = _ledger(tmp_path, [_spend("a"), _spend("b", delta=1e-6), _spend("a")])
    assert result.ok, result.summary()
    assert result.policy == POLICY and result.to_json()["policy"]["epsilon_cap"] == 5.0


@pytest.mark.parametrize("spends, needle", [
    ([_spend("a", delta=1e-4)], "delta 0.0001 exceeds"),
    ([_spend("a", step=PrivacyStep(0.5, 0.05, 5))], "below the floor"),
    ([_spend("a", epsilon_max=50.0)], "epsilon_max 50.0 exceeds the cap"),
    ([_spend("a", accountant="prv")], "accountant 'prv'"),
    ([_spend("a", delta=1e-6), _spend("a", delta=1e-7)], "several deltas"),
    ([_spend("a", step=PrivacyStep(1.0, 0.5, 50), epsilon_max=5.0)], "exceeds the cap 5.0"),
])
def test_each_policy_violation_fails_the_audit(tmp_path, spends, needle):
    result = _ledger(tmp_path, spends)
    policy_issues = [i for i in result.issues if i.kind == "policy"]
    assert not result.ok
    assert any(needle in i.message for i in policy_issues), [i.message for i in result.issues]


def test_policy_is_written_once(tmp_path):
    with Ledger(tmp_path / "l.db", Ed25519PrivateKey.generate()) as led:
        led.set_policy(POLICY)
        led.set_policy(POLICY)  # the same policy again is fine
        with pytest.raises(LedgerError, match="already records policy"):
            led.set_policy(dataclasses.replace(POLICY, epsilon_cap=50.0))


def test_policy_validates_its_fields():
    with pytest.raises(ValueError, match="privacy.delta"):
        PrivacyPolicy(delta=0.0, epsilon_cap=1.0, min_noise_multiplier=1.0)
    with pytest.raises(ValueError):
        PrivacyPolicy(delta=1e-5, epsilon_cap=float("inf"), min_noise_multiplier=1.0)
    with pytest.raises(ValueError):
        PrivacyPolicy(delta=1e-5, epsilon_cap=1.0, min_noise_multiplier=1.0, unit="household")
    assert PrivacyPolicy(delta=1e-5, epsilon_cap=1.0, min_noise_multiplier=1.0, unit="user").unit == "user"
    assert PrivacyPolicy.from_json(POLICY.to_json()) == POLICY
    with pytest.raises(ValueError, match="unknown policy keys"):
        PrivacyPolicy.from_json('{"delta": 1e-5, "epsilon_cap": 1, "min_noise_multiplier": 1, "x": 2}')


def test_policy_check_before_a_round():
    ok = POLICY.violations(delta=1e-6, noise_multiplier=1.0, accountant="rdp", epsilon_max=5.0, epsilon_total=4.9)
    assert ok == []
    bad = POLICY.violations(delta=0.5, noise_multiplier=0.1, accountant="rdp", epsilon_total=5.1)
    assert len(bad) == 3 and "delta 0.5" in bad[0] and "below the floor" in bad[1] and "exceeds the cap" in bad[2]


def test_a_derived_noise_multiplier_never_falls_below_the_floor():
    """Review F6: a task asking for epsilon 10 over one round would derive sigma ~0.4 on a device with
    many records; the device's floor holds the noise at 0.5 (and the cost is accounted at 0.5)."""
    import torch
    from torch import nn

    from ftte.privacy.dpsgd import DPConfig, PrivateTrainer

    x = torch.randn(800, 4)
    y = (x[:, 0] > 0).long()
    free = PrivateTrainer(nn.Linear(4, 2), DPConfig(target_epsilon=10.0, planned_rounds=1, accountant="rdp"))
    floored = PrivateTrainer(nn.Linear(4, 2), DPConfig(target_epsilon=10.0, planned_rounds=1, accountant="rdp",
                                                       min_noise_multiplier=0.5))
    sigma_free = free.plan_round(800, batch_size=8, steps=10).noise_multiplier
    sigma_floor = floored.plan_round(800, batch_size=8, steps=10).noise_multiplier
    assert sigma_free < 0.5 <= sigma_floor

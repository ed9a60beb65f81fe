"""Recorded ε equals Opacus's own accounting, and accountant state survives restarts."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from opacus import PrivacyEngine
from opacus.accountants import PRVAccountant, RDPAccountant
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ftte.privacy.secure_random import SecureRandom
from ftte.privacy.accountant import AccountantStore, PrivacyStep, compute_epsilon, opacus_history
from ftte.privacy.dpsgd import DPConfig, PrivateTrainer, default_delta

ce = nn.functional.cross_entropy


def _opacus_stepwise(mechanism: str, schedule: list[tuple[float, float, int]], delta: float) -> float:
    """ε from an Opacus accountant fed one step at a time, the way DPOptimizer's hook does."""
    acc = PRVAccountant() if mechanism == "prv" else RDPAccountant()
    for nm, q, steps in schedule:
        for _ in range(steps):
            acc.step(noise_multiplier=nm, sample_rate=q)
    return acc.get_epsilon(delta=delta)


def test_history_merge_matches_opacus_step_by_step():
    hist = [PrivacyStep(1.0, 0.1, 3), PrivacyStep(1.0, 0.1, 2), PrivacyStep(1.2, 0.1, 4), PrivacyStep(1.0, 0.1, 1)]
    acc = PRVAccountant()
    for s in hist:
        for _ in range(s.steps):
            acc.step(noise_multiplier=s.noise_multiplier, sample_rate=s.sample_rate)
    assert opacus_history(hist) == acc.history == [(1.0, 0.1, 5), (1.2, 0.1, 4), (1.0, 0.1, 1)]


def test_compute_epsilon_edge_cases():
    assert compute_epsilon([], 1e-5) == 0.0
    assert compute_epsilon([PrivacyStep(0.0, 0.1, 3)], 1e-5) == math.inf
    with pytest.raises(ValueError):
        compute_epsilon([PrivacyStep(1.0, 0.1, 3)], 1e-5, "gdp")
    # Opacus's RDP conversion goes negative for tiny sample rates; ε is reported as >= 0
    raw = RDPAccountant()
    raw.history = [(1.0, 1e-5, 12)]
    assert raw.get_epsilon(delta=0.02) < 0
    assert compute_epsilon([PrivacyStep(1.0, 1e-5, 12)], 0.02, "rdp") == 0.0
    with pytest.raises(ValueError):
        PrivacyStep(1.0, 0.0, 3)
    with pytest.raises(ValueError):
        PrivacyStep(1.0, 0.5, 0)


@pytest.mark.filterwarnings("ignore:Secure RNG turned off", "ignore:Full backward hook is firing")
@pytest.mark.parametrize("mechanism", ["prv", "rdp"])
def test_recorded_epsilon_equals_opacus_privacy_engine(easy_task, mechanism):
    """Train three rounds with a changing noise multiplier through PrivateTrainer, and the
    same number of steps through Opacus's PrivacyEngine.make_private; the ε we record must
    be the ε Opacus reports."""
    x, y = easy_task  # 64 records; batch 2 -> sample rate exactly 1/32 in both
    schedule = [2.0, 2.5, 2.0]
    delta = 1e-3
    cfg = DPConfig(noise_multiplier=schedule[0], accountant=mechanism, delta=delta, epsilon_max=100.0)
    trainer = PrivateTrainer(nn.Linear(4, 2), cfg, rng=SecureRandom.from_seed(0))
    totals = []
    for nm in schedule:
        trainer.config = replace(cfg, noise_multiplier=nm)
        stats = trainer.train_round((x, y), loss_fn=ce, lr=0.1, batch_size=2, steps=5)
        totals.append(stats.epsilon_total)
        assert stats.sample_rate == 1 / 32 and stats.steps == 5 and stats.delta == delta

    engine = PrivacyEngine(accountant=mechanism)
    model = nn.Linear(4, 2)
    model, opt, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=2), noise_multiplier=2.0, max_grad_norm=1.0,
    )
    assert loader.sample_rate == 1 / 32
    for nm in schedule:
        opt.noise_multiplier = nm
        batches = iter(loader)
        for _ in range(5):
            xb, yb = next(batches)
            opt.zero_grad()
            ce(model(xb), yb).backward()
            opt.step()
    assert engine.accountant.history == [(2.0, 1 / 32, 5), (2.5, 1 / 32, 5), (2.0, 1 / 32, 5)]
    assert totals[-1] == pytest.approx(engine.get_epsilon(delta), rel=1e-12)
    # the first round alone equals an independent, step-by-step Opacus accountant
    assert totals[0] == pytest.approx(_opacus_stepwise(mechanism, [(2.0, 1 / 32, 5)], delta), rel=1e-12)
    assert totals[0] < totals[1] < totals[2]


def test_restarted_device_continues_history(tmp_path, easy_task):
    x, y = easy_task
    path = tmp_path / "acc.db"
    cfg = DPConfig(noise_multiplier=2.0, epsilon_max=50.0, accountant="prv")  # delta from n at first round

    store = AccountantStore(path)
    t1 = PrivateTrainer(nn.Linear(4, 2), cfg, device_id="dev-7", store=store)
    s1 = t1.train_round((x, y), loss_fn=ce, lr=0.1, batch_size=4, steps=4)
    s2 = t1.train_round((x, y), loss_fn=ce, lr=0.1, batch_size=4, steps=4)
    t1.close()
    store.close()
    assert s1.delta == default_delta(64)

    # "reboot": new store object and trainer on the same file; the local dataset grew,
    # but the device keeps the delta fixed at registration.
    store2 = AccountantStore(path)
    assert store2.history("dev-7") == (PrivacyStep(2.0, 1 / 16, 4),) * 2
    assert store2.state("dev-7").epsilon_total == s2.epsilon_total
    t2 = PrivateTrainer(nn.Linear(4, 2), cfg, device_id="dev-7", store=store2)
    assert t2.epsilon() == pytest.approx(s2.epsilon_total, rel=1e-12)
    x2, y2 = torch.cat([x, x[:16]]), torch.cat([y, y[:16]])
    s3 = t2.train_round((x2, y2), loss_fn=ce, lr=0.1, batch_size=4, steps=4)  # q = 4/80
    assert s3.delta == s1.delta
    expected = _opacus_stepwise("prv", [(2.0, 1 / 16, 8), (2.0, 0.05, 4)], s1.delta)
    assert s3.epsilon_total == pytest.approx(expected, rel=1e-12)
    assert s3.epsilon_total > s2.epsilon_total > s1.epsilon_total
    assert s3.epsilon_round == pytest.approx(s3.epsilon_total - s2.epsilon_total, rel=1e-12)
    assert len(store2.history("dev-7")) == 3
    # the store's opacus accountant is usable directly and agrees
    assert store2.accountant("dev-7").get_epsilon(delta=s1.delta) == pytest.approx(expected, rel=1e-12)
    # a device that restarted from zero would have reported far less
    fresh = _opacus_stepwise("prv", [(2.0, 0.05, 4)], s1.delta)
    assert s3.epsilon_total > fresh
    store2.close()


def test_register_refuses_changed_settings(tmp_path):
    with AccountantStore(tmp_path / "a.db") as store:
        store.register("d", accountant="prv", delta=1e-5)
        store.register("d", accountant="prv", delta=1e-5)  # idempotent
        with pytest.raises(ValueError, match="registered with"):
            store.register("d", accountant="rdp", delta=1e-5)
        with pytest.raises(ValueError, match="registered with"):
            store.register("d", accountant="prv", delta=1e-6)
        with pytest.raises(KeyError):
            store.record("unknown", PrivacyStep(1.0, 0.1, 1))
        store.record("d", PrivacyStep(2.0, 0.01, 1))
        with pytest.raises(RuntimeError, match="concurrently"):
            store.record("d", PrivacyStep(2.0, 0.01, 1), expected_rounds=0)
        assert len(store.history("d")) == 1

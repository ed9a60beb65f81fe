"""The driver/worker split of a round without Ray: budget first, worker handed the history."""

from __future__ import annotations

import pytest

from ray_helpers import tiny

from ftte.pipeline.backends import BackendUnavailable, LocalBackend, make_backend, seeded_store
from ftte.pipeline.config import ConfigError
from ftte.pipeline.simulator import Simulation
from ftte.privacy.accountant import PrivacyStep


def test_seeded_store_holds_the_history_it_was_handed():
    from ftte.privacy.accountant import AccountantStore

    src = AccountantStore(":memory:")
    src.register("7", accountant="rdp", delta=1e-3)
    for _ in range(3):
        src.record("7", PrivacyStep(1.0, 0.25, 2))
    state = src.state("7")
    copy = seeded_store(state)
    assert copy.state("7") == state
    assert seeded_store(None).devices() == []


def test_over_budget_devices_retire_before_any_training():
    cfg = tiny(**{"run.strategy": "fedbuff", "run.max_versions": 8, "privacy.epsilon_max": 0.5})
    sim = Simulation(cfg)
    trained: list[int] = []
    real_submit = sim.backend.submit
    sim.backend.submit = lambda task, pull: (trained.append(task.device_id), real_submit(task, pull))[1]
    try:
        sim.run()
        assert sim.retired
        # every submitted round was recorded by the driver first, and none went past the budget
        for dev in sim.store.devices():
            assert len(sim.store.history(dev)) == trained.count(int(dev))
            assert sim.store.epsilon(dev) <= 0.5
    finally:
        sim.close()


def test_backend_config_keys():
    assert isinstance(make_backend(tiny().run), LocalBackend)
    cfg = tiny(**{"run.backend": "ray", "run.ray_workers": 2, "run.ray_address": "auto"})
    assert (cfg.run.backend, cfg.run.ray_workers, cfg.run.ray_address) == ("ray", 2, "auto")
    with pytest.raises(ConfigError, match="ray_workers"):
        tiny(**{"run.ray_workers": -1})
    with pytest.raises(ConfigError, match="backend"):
        tiny(**{"run.backend": "dask"})
    assert issubclass(BackendUnavailable, ValueError)


def test_train_round_under_a_checked_plan_equals_the_ordinary_round():
    import torch
    from torch import nn

    from ftte.privacy.accountant import AccountantStore
    from ftte.privacy.dpsgd import DPConfig, PrivateTrainer
    from ftte.privacy.secure_random import SecureRandom

    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(40, 4, generator=g), torch.randint(0, 2, (40,), generator=g)
    results = []
    for given in (False, True):
        torch.manual_seed(0)
        module = nn.Linear(4, 2)
        store = AccountantStore(":memory:")
        trainer = PrivateTrainer(module, DPConfig(accountant="rdp"), device_id="d", store=store)
        plan = trainer.plan_round(40, batch_size=8, steps=3) if given else None
        stats = trainer.train_round((x, y), loss_fn=nn.functional.cross_entropy, lr=0.5, batch_size=8, steps=3,
                                    plan=plan, rng=SecureRandom.from_seed(1))  # same key: same sampling and noise
        results.append((stats.epsilon_total, stats.steps, store.history("d"), module.weight.detach().clone()))
        if given:
            with pytest.raises(ValueError, match="records"):
                trainer.train_round((x[:20], y[:20]), loss_fn=nn.functional.cross_entropy, lr=0.5, batch_size=8,
                                    steps=3, plan=plan)
        trainer.close()
        store.close()
    (e0, s0, h0, w0), (e1, s1, h1, w1) = results
    assert (e0, s0, h0) == (e1, s1, h1)
    assert torch.equal(w0, w1)


def test_local_cohorts_play_their_members_on_the_backend_workers_host(monkeypatch):
    """The local backend runs each secure-aggregation member through the same
    ``MemberHost.stage`` a Ray worker runs, on its worker's host, and closes every session."""
    from ftte.crypto.secagg_member import MemberHost

    calls: list[tuple[int, int]] = []
    real_stage = MemberHost.stage

    def counting(self, key, stage, inbound):
        calls.append((id(self), int(stage)))
        return real_stage(self, key, stage, inbound)

    monkeypatch.setattr(MemberHost, "stage", counting)
    cfg = tiny(**{"run.strategy": "fedbuff", "run.max_versions": 2})
    assert cfg.secagg.enabled
    sim = Simulation(cfg)
    try:
        result = sim.run()
        host = sim.backend._worker.members
        assert result.summary["versions"] == 2
        assert calls and {h for h, _ in calls} == {id(host)}  # every member stage ran on the worker's host
        assert {s for _, s in calls} == {0, 1, 2, 3, 4}
        assert host.open_sessions == 0
    finally:
        sim.close()

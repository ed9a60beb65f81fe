"""The comparison's stop rule and FedAvg on the devices that hold the model: real (tiny) runs.

A run with no version limit stops at the common virtual-time horizon or when its devices'
budgets are spent, whichever comes first; nothing merged after the horizon counts."""

from __future__ import annotations

import pytest

from ftte.pipeline.simulator import Simulation
from sim_helpers import NO_DROPOUT, tiny


def run(cfg):
    sim = Simulation(cfg)
    try:
        result = sim.run()
        return sim, result
    finally:
        sim.close()


@pytest.mark.parametrize("strategy", ["ftte", "fedavg"])
def test_a_run_to_the_horizon_is_the_prefix_of_a_longer_one(strategy):
    """Same seed, horizon H against 2H: every version merged by H is in both, none after H in the first."""
    horizon = 150.0 if strategy == "ftte" else 200.0
    short_sim, short = run(tiny(**{"run.strategy": strategy, "run.max_versions": 0, "run.max_virtual_time_s": horizon}))
    _, long = run(tiny(**{"run.strategy": strategy, "run.max_versions": 0, "run.max_virtual_time_s": 2 * horizon}))
    assert short.history and all(h["virtual_time_s"] <= horizon for h in short.history)
    assert short.summary["devices_out_of_budget"] == 0  # the horizon, not the budgets, ended it
    within = [h for h in long.history if h["virtual_time_s"] <= horizon]
    assert [(h["version"], h["virtual_time_s"], h["accuracy"]) for h in short.history] == [
        (h["version"], h["virtual_time_s"], h["accuracy"]) for h in within]
    assert len(long.history) > len(short.history)


@pytest.mark.parametrize("strategy", ["ftte", "fedavg"])
def test_spent_budgets_end_a_run_before_the_horizon(strategy):
    cfg = tiny(**{"run.strategy": strategy, "run.max_versions": 0, "run.max_virtual_time_s": 1e7,
                  "privacy.epsilon_max": 0.6})
    _, result = run(cfg)
    assert result.summary["devices_out_of_budget"] > 0
    assert result.history and result.history[-1]["virtual_time_s"] < 1e7


def test_fedavg_fit_trains_only_on_devices_that_hold_the_full_model():
    classes = [
        {"name": "big", "fraction": 0.5, "compute_speed": 1.0, "memory_bytes": 64 << 20, "uplink_bps": 2e6,
         "downlink_bps": 1e7, "availability": 1.0, "dropout": NO_DROPOUT},
        {"name": "tiny", "fraction": 0.5, "compute_speed": 1.0, "memory_bytes": 1024, "uplink_bps": 2e6,
         "downlink_bps": 1e7, "availability": 1.0, "dropout": NO_DROPOUT},
    ]
    cfg = tiny(**{"run.strategy": "fedavg", "server.fedavg_fit_only": True, "fleet.classes": classes,
                  "run.max_versions": 3})
    sim = Simulation(cfg)
    try:
        big = {d.device_id for d in sim.fleet if d.profile.memory_bytes == 64 << 20}
        assert sim.admitted == frozenset(big)
        result = sim.run()
        trained = {int(d) for d in sim.store.devices()}
    finally:
        sim.close()
    assert result.summary["versions"] == 3
    assert trained and trained <= big
    # without the restriction, the small devices train too
    sim_all, _ = run(cfg.with_overrides(**{"server.fedavg_fit_only": False}))
    assert sim_all.admitted == frozenset(d.device_id for d in sim_all.fleet)

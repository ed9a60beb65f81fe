"""Lazy device work: rounds are trained and cohorts aggregated only when a merge needs them,
with the same history, ledger, accountants and weights as computing each when it happens."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ftte.crypto.primitives import Signer
from ftte.edge.profile import DeviceProfile
from ftte.edge.runtime import LocalUpdate
from ftte.pipeline.cohort import run_cohort
from ftte.pipeline.cohort_time import model_cohort
from ftte.pipeline.config import load_config
from ftte.pipeline.fleet import SimDevice
from ftte.pipeline.partition import derive_rng
from ftte.pipeline.simulator import Simulation
from ftte.protocol.cohort import CohortPolicy, plan_cohort

from sim_helpers import tiny

LEDGER_FIELDS = ("seq, device_id, plan_id, version, sample_rate, steps, noise_multiplier, max_grad_norm, accountant, "
                 "rng_source, epsilon_round, epsilon_total, delta, epsilon_max, cohort_id, outcome")


def run(cfg, out, lazy):
    sim = Simulation(cfg, out, lazy=lazy)
    try:
        return sim.run()
    finally:
        sim.close()


def on_disk(out):
    conn = sqlite3.connect(out / "accountants.db")
    try:
        steps = conn.execute("SELECT device_id, seq, noise_multiplier, sample_rate, steps, epsilon_total "
                             "FROM accountant_steps ORDER BY device_id, seq").fetchall()
    finally:
        conn.close()
    conn = sqlite3.connect(out / "ledger.db")
    try:
        rows = conn.execute(f"SELECT {LEDGER_FIELDS} FROM privacy_ledger_rows ORDER BY seq").fetchall()
    finally:
        conn.close()
    return steps, rows


CASES = {
    # the digits preset's own privacy (target epsilon 10 over 10 rounds) and fleet (dropouts at every stage)
    "target-epsilon": {"privacy.target_epsilon": 10.0, "run.max_versions": 4},
    # target epsilon over 2 planned rounds: a device's third round is refused (budgets run out)
    "budgets-run-out": {"privacy.target_epsilon": 10.0, "privacy.planned_rounds": 2, "privacy.epsilon_max": 10.0,
                        "fleet.devices": 8, "server.buffer_size": 3, "run.max_versions": 8},
    # a fixed noise multiplier and a small cap: every round is planned when it starts
    "fixed-noise": {"privacy.epsilon_max": 6.0, "fleet.devices": 8, "server.buffer_size": 3, "run.max_versions": 8},
    "no-secagg": {"secagg.enabled": False, "privacy.target_epsilon": 10.0, "run.max_versions": 4},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_lazy_and_eager_runs_are_identical(tmp_path, case):
    cfg = tiny(**CASES[case])
    eager = run(cfg, tmp_path / "eager", lazy=False)
    lazy = run(cfg, tmp_path / "lazy", lazy=True)
    assert eager.summary["lazy_device_work"] is False and lazy.summary["lazy_device_work"] is True
    assert eager.history and lazy.history == eager.history
    assert np.array_equal(lazy.weights, eager.weights)
    for key in ("versions", "virtual_time_s", "epsilon_max", "train_rounds", "updates_applied", "aborted_cohorts",
                "devices_out_of_budget", "noise_multiplier", "bytes_up_per_update", "bytes_down_per_update"):
        assert lazy.summary[key] == eager.summary[key], key
    e_steps, e_rows = on_disk(tmp_path / "eager")
    l_steps, l_rows = on_disk(tmp_path / "lazy")
    assert e_rows and l_rows == e_rows
    assert l_steps == e_steps
    # every charged round has its row, and nothing is charged twice
    assert len(l_steps) == len(l_rows)
    assert lazy.summary["rounds_computed"] <= eager.summary["rounds_computed"] == eager.summary["train_rounds"]
    if case == "budgets-run-out":
        assert eager.summary["devices_out_of_budget"] > 0


def test_rounds_whose_updates_are_never_used_are_never_trained(tmp_path):
    cfg = tiny(**{"fleet.devices": 300, "data.name": "synthetic", "data.synthetic_samples": 30,
                  "privacy.target_epsilon": 10.0, "run.max_versions": 2})
    result = run(cfg, tmp_path, lazy=None)  # the default where it is supported
    s = result.summary
    assert s["lazy_device_work"] is True and s["versions"] == 2
    steps, rows = on_disk(tmp_path)
    # what was trained is exactly what reached a cohort that ended: each has one charge and one row
    assert s["rounds_computed"] == len(rows) == len(steps)
    assert s["train_rounds"] > 100  # every online device started a round at t = 0 ...
    assert s["rounds_computed"] <= 4 * 4  # ... and only the few cohorts that ended before the stop were trained


def device(i: int, p: float) -> SimDevice:
    prof = DeviceProfile(name="x", memory_bytes=1 << 20, compute_speed=1.0, uplink_bps=1e5 + 1e3 * (i % 7),
                         downlink_bps=5e5 + 1e4 * (i % 5), availability=1.0)
    stages = ("train", "advertise", "share", "upload", "consistency", "unmask")
    return SimDevice(i, prof, "x", {s: (0.0 if s == "train" else p) for s in stages})


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ids=st.lists(st.integers(0, 200_000), min_size=3, max_size=7, unique=True), p=st.sampled_from([0.0, 0.1, 0.3]),
       secure=st.booleans(), seed=st.integers(0, 2**16))
def test_modelled_cohort_matches_the_real_run(ids, p, secure, seed):
    """Drops and duration are known before any update exists, and equal the real session's."""
    cfg = load_config(None, preset="digits")
    from ftte.pipeline.strategies import cohort_policy

    policy: CohortPolicy = cohort_policy(cfg)
    ids = sorted(ids)
    idents = {m: Signer() for m in ids}
    coords = 40
    start = plan_cohort(policy, cohort_id=f"c{seed}", plan_id="p", model_hash=bytes(32), close_version=5,
                        members=tuple(ids), identity_keys=tuple(idents[m].public_key for m in ids),
                        coordinates=coords, reference_variance=0.0)
    devices = [device(m, p) for m in ids]
    rng = np.random.default_rng(seed)
    updates = [(d, LocalUpdate(d.device_id, int(rng.integers(3, 6)), rng.normal(0, 0.1, coords).astype(np.float32), None))
               for d in devices]
    modelled = model_cohort(start, devices, {d.device_id: u.base_version for d, u in updates},
                            derive_rng(seed, "cohort", start.cohort_id), secure=secure, latency_s=0.05)
    real = run_cohort(start, updates, idents, derive_rng(seed, "cohort", start.cohort_id), secure=secure, latency_s=0.05)
    assert dict(real.result.dropped) == modelled.drops
    assert real.duration_s == modelled.duration_s

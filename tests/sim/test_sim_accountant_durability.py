"""The simulator's accountants are written once per applied buffer (``flush`` durability), yet a
stopped run resumes with the accountant state and ledger an eager (``each_write``) run gives."""

from __future__ import annotations

import sqlite3

import numpy as np

from ftte.pipeline.simulator import Simulation

from sim_helpers import tiny

LEDGER_FIELDS = ("seq, device_id, plan_id, version, sample_rate, steps, noise_multiplier, max_grad_norm, accountant, "
                 "rng_source, epsilon_round, epsilon_total, delta, epsilon_max, cohort_id, outcome")


class EagerSimulation(Simulation):
    store_durability = "each_write"  # one committed transaction per trained round, as before


def run(cls, cfg, out):
    sim = cls(cfg, out)
    try:
        return sim.run()
    finally:
        sim.close()


def snapshot(out):
    conn = sqlite3.connect(out / "accountants.db")
    try:
        devices = conn.execute("SELECT device_id, accountant, delta FROM accountant_devices ORDER BY device_id").fetchall()
        steps = conn.execute("SELECT device_id, seq, noise_multiplier, sample_rate, steps, epsilon_total "
                             "FROM accountant_steps ORDER BY device_id, seq").fetchall()
    finally:
        conn.close()
    conn = sqlite3.connect(out / "ledger.db")
    try:
        rows = conn.execute(f"SELECT {LEDGER_FIELDS} FROM privacy_ledger_rows ORDER BY seq").fetchall()
    finally:
        conn.close()
    return devices, steps, rows


def test_stopped_run_resumes_to_the_eager_runs_accountants_and_ledger(tmp_path):
    results = {}
    for name, cls in (("eager", EagerSimulation), ("flush", Simulation)):
        out = tmp_path / name
        first = run(cls, tiny(**{"run.max_versions": 2}), out)
        after_stop = snapshot(out)
        second = run(cls, tiny(**{"run.max_versions": 4}), out)
        assert second.summary["resumed_from_version"] == 2
        results[name] = (first, second, after_stop, snapshot(out))
    (e1, e2, e_stop, e_end), (f1, f2, f_stop, f_end) = results["eager"], results["flush"]
    assert e_stop == f_stop  # what a stopped run leaves on disk
    assert e_end == f_end  # and after resuming
    assert e_end[1] and e_end[2]  # rounds were spent and recorded
    assert e1.history == f1.history and e2.history == f2.history
    assert np.array_equal(e2.weights, f2.weights)
    for key in ("epsilon_max", "train_rounds", "updates_applied", "aborted_cohorts", "devices_out_of_budget"):
        assert e2.summary[key] == f2.summary[key], key
    # every spent round has exactly one ledger row
    spent = {}
    for device, *_ in f_end[1]:
        spent[device] = spent.get(device, 0) + 1
    rows = {}
    for row in f_end[2]:
        rows[row[1]] = rows.get(row[1], 0) + 1
    assert spent == rows

"""End-to-end behaviour of the simulator: reproducibility, secure aggregation on/off, resume, audit."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest

from ftte.cli import main as cli_main
from ftte.pipeline.config import load_config
from ftte.pipeline.simulator import Simulation
from ftte.pipeline.state import ServerState
from ftte.privacy.accountant import AccountantStore

from sim_helpers import reliable as no_dropout_fleet, tiny


def run(cfg, out=None):
    sim = Simulation(cfg, out)
    try:
        return sim.run()
    finally:
        sim.close()


@pytest.mark.parametrize("strategy", ["ftte", "fedbuff", "fedavg"])
def test_seeded_runs_are_reproducible(strategy):
    cfg = tiny(**{"run.strategy": strategy})
    a, b = run(cfg), run(cfg)
    assert a.history == b.history
    assert np.array_equal(a.weights, b.weights)
    assert a.summary["versions"] == 3
    c = run(tiny(**{"run.strategy": strategy, "run.seed": 1}))
    assert not np.array_equal(a.weights, c.weights)


@pytest.mark.parametrize("strategy", ["ftte", "fedavg"])
def test_secure_aggregation_changes_the_model_only_by_quantization(strategy):
    secure = run(no_dropout_fleet(**{"run.strategy": strategy}))
    plain = run(no_dropout_fleet(**{"run.strategy": strategy, "secagg.enabled": False}))
    assert [h["cohort_size"] for h in secure.history] == [h["cohort_size"] for h in plain.history]
    diff = np.abs(secure.weights - plain.weights)
    assert diff.max() > 0  # quantization really happened
    # per version, the mean update moves each coordinate by at most one quantization step
    # (ranges are 4·clip/√d over 2^11 levels) times a few; three versions stay far below 1e-2
    assert diff.max() < 1e-2
    assert abs(secure.history[-1]["accuracy"] - plain.history[-1]["accuracy"]) <= 0.02


def test_resume_loses_no_applied_buffer_and_ledger_verifies(tmp_path):
    out = tmp_path / "run"
    first = run(tiny(**{"run.max_versions": 2}), out)
    assert first.summary["versions"] == 2
    second = run(tiny(**{"run.max_versions": 4}), out)
    assert second.summary["versions"] == 4
    assert second.summary["resumed_from_version"] == 2
    state = ServerState(out / "ledger.db")
    try:
        assert state.versions() == [1, 2, 3, 4]
        applied = [r["applied_version"] for r in state.cohort_records() if r.get("applied_version")]
        assert applied == [1, 2, 3, 4]
    finally:
        state.close()
    assert [h["version"] for h in second.history] == [1, 2, 3, 4]
    assert cli_main(["audit", str(out / "ledger.db")]) == 0


def test_ledger_rows_commit_with_their_buffer(tmp_path):
    out = tmp_path / "run"
    run(tiny(), out)
    conn = sqlite3.connect(out / "ledger.db")
    try:
        cohorts = [json.loads(r[0]) for r in conn.execute("SELECT record FROM server_cohorts")]
        ledger_cohorts = {r[0] for r in conn.execute("SELECT cohort_id FROM privacy_ledger_rows")}
        rows_per_device = dict(conn.execute("SELECT device_id, COUNT(*) FROM privacy_ledger_rows GROUP BY device_id"))
    finally:
        conn.close()
    # every applied or aborted buffer's members are in the ledger; rounds still in flight
    # at the end are recorded as "unmerged", so every spent round has exactly one row
    assert {c["cohort_id"] for c in cohorts} == ledger_cohorts - {"unmerged"}
    store = AccountantStore(out / "accountants.db")
    try:
        spent = {d: len(store.history(d)) for d in store.devices()}
    finally:
        store.close()
    assert spent == rows_per_device


def test_simulate_cli_writes_outputs_and_rejects_bad_config(tmp_path, capsys):
    out = tmp_path / "sim"
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nbuffer_sizee = 3\n")
    assert cli_main(["simulate", "--config", str(bad), "--out", str(out)]) == 2
    assert "buffer_sizee" in capsys.readouterr().err
    assert not out.exists()
    cfg = tmp_path / "ok.toml"
    cfg.write_text(tiny(**{"run.max_versions": 2}).to_toml())
    assert cli_main(["simulate", "--config", str(cfg), "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("strategy", "devices", "target_accuracy", "time_to_target_s", "final_accuracy", "virtual_time_s",
                "wall_time_s", "versions", "bytes_up_per_update", "bytes_down_per_update",
                "peak_client_memory_bytes", "epsilon_max", "delta"):
        assert key in summary
    assert summary["versions"] == 2
    for name in ("history.csv", "ledger.db", "report.md", "accuracy.png"):
        assert (out / name).exists()


def test_impossible_threshold_is_refused_before_running(tmp_path):
    with pytest.raises(Exception, match="threshold"):
        tiny(**{"secagg.threshold": 9})


def test_digits_preset_finishes_and_reaches_its_target(tmp_path):
    """`ftte simulate --preset digits`, the quick scenario: 100 devices, 90% stragglers, non-IID
    digits, a CNN, ftte with DP-SGD and secure aggregation (about a minute on 2 cores)."""
    out = tmp_path / "default"
    assert cli_main(["simulate", "--preset", "digits", "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    cfg = load_config(None, preset="digits")
    assert summary["devices"] == 100 and summary["strategy"] == "ftte"
    assert summary["secure_aggregation"] and summary["differential_privacy"]
    assert summary["versions"] == cfg.run.max_versions
    assert summary["time_to_target_s"] is not None and summary["final_accuracy"] >= cfg.run.target_accuracy
    assert summary["epsilon_max"] <= cfg.privacy.epsilon_max
    assert summary["trainable_coordinates"] < summary["model_coordinates"]
    # the plan is named, not only counted: its tensors hold exactly the trained coordinates
    from ftte.edge.plan import SubsetPlan
    from ftte.pipeline.model_builder import build_global_model

    model = build_global_model(cfg.model.name, cfg.run.seed, (1, 8, 8), 10)  # the digits preset's cnn8
    plan = SubsetPlan.from_names(model, summary["trainable_parameters"])
    assert plan.num_coordinates == summary["trainable_coordinates"] and summary["trainable_slices"] == {}


@pytest.mark.parametrize("strategy", ["ftte", "fedbuff", "fedavg"])
def test_every_strategy_leaves_a_ledger_that_audits(tmp_path, strategy):
    """Rounds that never merge (aborted cohorts, late or failed fedavg rounds) spent budget too."""
    out = tmp_path / strategy
    # a flaky fleet with a high threshold, so that some cohorts and rounds fail
    cfg = tiny(**{"run.strategy": strategy, "run.max_versions": 4, "fleet.stragglers": 0.75,
                  "server.buffer_size": 4, "server.fedavg_clients_per_round": 4, "secagg.threshold": 4})
    run(cfg, out)
    assert cli_main(["audit", str(out / "ledger.db")]) == 0


def test_impossible_memory_budget_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "never"
    assert cli_main(["simulate", "--out", str(out), "--quiet", "--set", "train.memory_budget_fraction=0.01"]) == 2
    assert "no subset plan fits" in capsys.readouterr().err
    assert not out.exists()

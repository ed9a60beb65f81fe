"""Run folders keep their results: a folder resumes only with its own configuration, a
re-run never overwrites the figures with empty ones, and Ctrl-C saves and says how to resume.

Real runs of the simulator on tiny fleets, through the real command line."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftte.cli import main as cli_main
from ftte.pipeline.config import load_config
from ftte.pipeline.state import ServerState

TINY = ["--preset", "digits", "--set", "fleet.devices=10", "--set", "model.name=logistic", "--set", "server.buffer_size=4",
        "--set", "server.fedavg_clients_per_round=4", "--set", "train.batch_size=4", "--quiet"]

FIGURES = ("versions", "final_accuracy", "updates_applied", "aborted_cohorts", "train_rounds", "bytes_up_per_update",
           "bytes_down_per_update", "wall_time_s", "epsilon_max", "sittings", "virtual_time_s")


def simulate(out: Path, *extra: str) -> int:
    return cli_main(["simulate", "--out", str(out), *TINY, *extra])


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and modification time (ns)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


def applied_updates(folder: Path) -> int:
    state = ServerState(folder / "ledger.db")
    try:
        return sum(len(r["included"]) for r in state.cohort_records() if r.get("applied_version"))
    finally:
        state.close()


def test_a_different_config_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    assert simulate(out, "--set", "run.max_versions=2") == 0
    before = snapshot(out)
    capsys.readouterr()
    assert simulate(out, "--set", "run.max_versions=2", "--set", "train.lr=0.5", "--set", "run.seed=3") == 2
    err = capsys.readouterr().err
    assert "train.lr: 1.0 -> 0.5" in err and "run.seed: 0 -> 3" in err and "--fresh" in err
    assert snapshot(out) == before  # nothing written, config.toml included
    assert "lr = 1.0" in (out / "config.toml").read_text()


def test_extending_keys_resume_and_the_summary_covers_the_whole_run(tmp_path):
    out = tmp_path / "run"
    assert simulate(out, "--set", "run.max_versions=2") == 0
    first = summary(out)
    # more versions and another target (display only) resume the same run
    assert simulate(out, "--set", "run.max_versions=4", "--set", "run.target_accuracy=0.3") == 0
    whole = summary(out)
    assert whole["versions"] == 4 and whole["resumed_from_version"] == 2 and whole["sittings"] == 2
    assert whole["updates_applied"] == applied_updates(out) > first["updates_applied"]
    assert whole["train_rounds"] > first["train_rounds"]
    assert whole["wall_time_s"] > first["wall_time_s"]
    assert len((out / "history.csv").read_text().splitlines()) == 1 + 4
    # a re-run of the finished folder keeps every figure (it used to write updates_applied 0, bytes null)
    assert simulate(out, "--set", "run.max_versions=4") == 0
    again = summary(out)
    assert {k: again[k] for k in FIGURES} == {k: whole[k] for k in FIGURES}
    assert again["bytes_up_per_update"] is not None and again["updates_applied"] > 0
    assert cli_main(["audit", str(out / "ledger.db")]) == 0


def test_fresh_discards_the_old_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert simulate(out, "--set", "run.max_versions=3") == 0
    assert simulate(out, "--set", "run.max_versions=2", "--set", "run.seed=5", "--fresh") == 0
    s = summary(out)
    assert s["versions"] == 2 and s["sittings"] == 1 and s["resumed_from_version"] is None
    assert load_config(out / "config.toml").run.seed == 5
    assert [p.name for p in out.iterdir() if p.name.startswith(".discarded")] == []
    assert cli_main(["audit", str(out / "ledger.db")]) == 0


def test_fresh_keeps_the_old_run_when_the_new_one_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert simulate(out, "--set", "run.max_versions=2") == 0
    before = summary(out)
    assert simulate(out, "--set", "train.memory_budget_fraction=0.01", "--fresh") == 2
    assert "no subset plan fits" in capsys.readouterr().err
    assert summary(out) == before and (out / "ledger.db").exists()
    assert [p.name for p in out.iterdir() if p.name.startswith(".discarded")] == []


def test_compare_checks_every_strategy_folder_first_and_keeps_its_figures(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--out", str(out), *TINY, "--set", "run.max_virtual_time_s=300", "--no-tune"]
    assert cli_main(args) == 0
    report = json.loads((out / "compare.json").read_text())
    before = snapshot(out)
    capsys.readouterr()
    assert cli_main([*args, "--set", "fleet.stragglers=0.2"]) == 2
    assert "fleet.stragglers: 0.9 -> 0.2" in capsys.readouterr().err
    assert snapshot(out) == before
    assert cli_main(args) == 0  # the finished comparison, re-run: same figures, not empty ones
    again = json.loads((out / "compare.json").read_text())
    for name, s in report["strategies"].items():
        assert {k: again["strategies"][name][k] for k in FIGURES} == {k: s[k] for k in FIGURES}
        assert s["updates_applied"] > 0 and s["bytes_up_per_update"] is not None
    assert again["ratios_vs_fedavg"] == report["ratios_vs_fedavg"]


def _versions(ledger: Path) -> int:
    try:
        conn = sqlite3.connect(f"{ledger.resolve().as_uri()}?mode=ro", uri=True, timeout=1.0)
        try:
            return conn.execute("SELECT COUNT(*) FROM server_versions").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


@pytest.mark.slow
def test_ctrl_c_saves_prints_one_line_and_exits_130(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ftte.cli", "simulate", "--out", str(out), *TINY, "--set", "privacy.epsilon_max=1000",
           "--set", "run.max_versions=400"]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    # a child started from a background job inherits SIGINT ignored: restore the default, so
    # that Python turns the signal into KeyboardInterrupt as it does at a terminal
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while _versions(out / "ledger.db") < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr and "ledger.db" in lines[0] and "again to resume" in lines[0]
    saved = _versions(out / "ledger.db")
    assert f"versions 1-{saved} are saved" in lines[0]
    # the same command, with a nearer end, resumes where it stopped and the ledger verifies
    done = subprocess.run([*cmd[:-1], f"run.max_versions={saved + 1}"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    s = summary(out)
    assert s["versions"] == saved + 1 and s["resumed_from_version"] == saved and s["sittings"] == 2
    assert s["updates_applied"] == applied_updates(out)
    assert cli_main(["audit", str(out / "ledger.db")]) == 0

"""What a person sees: help without markup, `ftte config show`, JSON-valued summaries, the
majority-class warning, a clean stderr, and an audit plot that stays readable for many devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ftte.cli import COMMANDS, main as cli_main
from ftte.pipeline.config import load_config, parse_config

TINY = ["--preset", "digits", "--set", "fleet.devices=10", "--set", "model.name=logistic", "--set", "server.buffer_size=4",
        "--set", "server.fedavg_clients_per_round=4", "--set", "train.batch_size=4", "--set", "run.max_versions=2"]


def help_text(capsys, *words: str) -> str:
    with pytest.raises(SystemExit):
        cli_main([*words, "--help"])
    return capsys.readouterr().out


def test_help_has_no_inline_literal_markup(capsys):
    pages = {(): help_text(capsys)}
    for path in COMMANDS:
        pages[path] = help_text(capsys, *path)
    pages[("bench",)] = help_text(capsys, "bench")
    for path, text in pages.items():
        assert "`" not in text, (path, text)
    assert "ftte server" in pages[("edge",)]  # the words stay, only the quotes go


def test_config_show_prints_the_configuration_in_force(tmp_path, capsys):
    assert cli_main(["config", "show"]) == 0
    assert parse_config(capsys.readouterr().out) == load_config(None)
    user = tmp_path / "mine.toml"
    user.write_text("[fleet]\ndevices = 30\n[run]\nseed = 4\n")
    assert cli_main(["config", "show", "--config", str(user), "--set", "server.buffer_size=5"]) == 0
    shown = parse_config(capsys.readouterr().out)
    assert shown == load_config(user).with_overrides(**{"server.buffer_size": 5})
    assert (shown.fleet.devices, shown.run.seed, shown.server.buffer_size) == (30, 4, 5)
    assert cli_main(["config", "show", "--set", "fleet.devicez=3"]) == 2
    assert "did you mean devices" in capsys.readouterr().err


def test_summary_values_are_json_and_a_trivial_target_is_flagged(tmp_path, capsys):
    # digits' commonest label is ~10% of the test set: a target of 0.05 needs no learning
    out = tmp_path / "low"
    assert cli_main(["simulate", "--out", str(out), "--quiet", *TINY, "--set", "run.target_accuracy=0.05"]) == 0
    captured = capsys.readouterr()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["target_below_majority_rate"] is True
    assert 0.05 < summary["majority_class_rate"] < 0.2
    assert "majority-class rate" in captured.err and "0.05" in captured.err
    printed = dict(line.strip().split(": ", 1) for line in captured.out.splitlines() if ": " in line)
    for key in ("strategy", "versions", "time_to_target_s", "bytes_up_per_update", "epsilon_max"):
        json.loads(printed[key])  # every printed value is a JSON value
    assert printed["strategy"] == '"ftte"'

    # an unreachable target: no warning, and the missing time is null (not Python's None)
    out = tmp_path / "high"
    assert cli_main(["simulate", "--out", str(out), "--quiet", *TINY, "--set", "run.target_accuracy=0.99"]) == 0
    captured = capsys.readouterr()
    assert "majority-class" not in captured.err
    assert "None" not in captured.out
    assert "time_to_target_s: null" in captured.out
    assert json.loads((out / "summary.json").read_text())["target_below_majority_rate"] is False


def test_a_normal_run_keeps_stderr_to_the_progress_bar(tmp_path):
    """No profiler "USDT" lines and no library warnings: fedbuff trains the full model, which
    used to print torch's full-backward-hook warning; every strategy measures memory under
    the profiler, which used to print kineto's USDT lines."""
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    env.update(FLWR_TELEMETRY_ENABLED="0", RAY_USAGE_STATS_ENABLED="0")
    done = subprocess.run(
        [sys.executable, "-m", "ftte.cli", "simulate", "--out", str(tmp_path / "run"), *TINY, "--strategy", "fedbuff"],
        capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines and all(line.startswith("fedbuff [") for line in lines), done.stderr
    assert sum("2/2 100%" in line for line in lines) == 1


def test_accuracy_plot_names_its_strategy(tmp_path):
    from PIL import Image

    out = tmp_path / "run"
    assert cli_main(["simulate", "--out", str(out), "--quiet", *TINY, "--strategy", "fedavg"]) == 0
    with Image.open(out / "accuracy.png") as png:  # the title drawn is also stored as PNG metadata
        assert png.text["Title"].startswith("fedavg:")
    assert "# ftte report: fedavg" in (out / "report.md").read_text()


def test_audit_plot_shows_a_distribution_not_a_legend_per_device(tmp_path):
    from ftte.privacy.audit import _epsilon_quantiles, _figure, verify_ledger, write_report

    out = tmp_path / "run"
    assert cli_main(["simulate", "--out", str(out), "--quiet", *TINY, "--set", "fleet.devices=24",
                    "--set", "run.max_versions=4"]) == 0
    result = verify_ledger(out / "ledger.db")
    # the devices with a released round (the simulator trains only rounds whose cohort ends)
    assert result.ok and len(result.devices) >= 10
    fig = _figure(result)
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    labels = [t.get_text() for legend in legends for t in legend.get_texts()]
    assert "min-max" in labels and "median" in labels and "budget" in labels
    assert not any(dev in labels for dev in result.devices)
    assert len(labels) <= 6
    # the band at the last ledger row spans exactly the devices' final recorded epsilons
    seqs, q = _epsilon_quantiles(result)
    finals = sorted(a.epsilon_total_recorded for a in result.devices.values())
    assert seqs[-1] == result.n_rows
    assert q[-1, 0] == pytest.approx(finals[0]) and q[-1, 4] == pytest.approx(finals[-1])
    assert all(a <= b for a, b in zip(q[:, 2], q[1:, 2]))  # cumulative: the median never falls
    files = write_report(result, tmp_path / "audit")
    assert files.plot.stat().st_size > 0 and "epsilon.png" in files.markdown.read_text()


def test_a_run_that_never_beats_the_majority_class_says_what_to_change():
    from ftte.pipeline.run_outputs import target_warning

    stuck = {"majority_class_rate": 0.63, "target_accuracy": 0.8, "best_accuracy": 0.62,
             "target_below_majority_rate": False}
    warning = target_warning(stuck)
    assert warning is not None and "train.lr=0.1" in warning and "standardize" in warning
    assert target_warning({**stuck, "best_accuracy": 0.9}) is None

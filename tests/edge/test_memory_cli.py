"""``ftte bench memory`` end to end (real measurement, real plan search)."""

from __future__ import annotations

import json

import pytest

from ftte.cli import main


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = main(["bench", "memory", *argv])
    return code, capsys.readouterr().out


def test_memory_command_json(capsys) -> None:
    code, out = _run(capsys, "--model", "cnn8", "--batch-size", "16", "--budget-fraction", "0.3", "--json")
    assert code == 0
    result = json.loads(out)
    keys = ("model", "full_bytes", "subset_bytes", "ratio", "budget_bytes", "estimate_error", "plan_id", "trainable")
    for key in keys:
        assert key in result
    assert result["subset_bytes"] <= result["budget_bytes"] == int(0.3 * result["full_bytes"])
    assert result["ratio"] == pytest.approx(result["subset_bytes"] / result["full_bytes"], abs=1e-4)
    assert result["fits_budget"] is True
    assert abs(result["estimate_error"]) <= 0.15
    assert result["plan_id"].startswith("plan-") and result["trainable"]


def test_memory_command_reports_errors(capsys) -> None:
    code, out = _run(capsys, "--model", "cnn8", "--batch-size", "16", "--budget-fraction", "0.01", "--json")
    assert code == 1 and "no subset plan fits" in json.loads(out)["error"]
    assert _run(capsys, "--model", "nosuchmodel", "--json")[0] == 2
    assert _run(capsys, "--model", "nosuchmodule_xyz:factory", "--json")[0] == 2


@pytest.mark.slow
def test_memory_command_cnn28_meets_the_ratio_target(capsys) -> None:
    code, out = _run(capsys, "--model", "cnn28", "--json")
    result = json.loads(out)
    assert code == 0 and result["ratio"] <= 0.20

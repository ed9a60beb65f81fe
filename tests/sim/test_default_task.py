"""The default task end to end (slow: about 4 minutes on 2 cores): `ftte simulate` with no config."""

from __future__ import annotations

import json

import pytest

from ftte.cli import main as cli_main
from ftte.pipeline.config import load_config


@pytest.mark.slow
def test_default_task_runs_ftte_on_mnist_to_its_budgets_or_the_horizon(tmp_path):
    out = tmp_path / "default"
    assert cli_main(["simulate", "--out", str(out), "--quiet"]) == 0
    s = json.loads((out / "summary.json").read_text())
    cfg = load_config(out / "config.toml")
    assert (cfg.data.name, cfg.model.name, cfg.fleet.devices, cfg.fleet.stragglers) == ("mnist", "cnn28", 100, 0.9)
    assert s["secure_aggregation"] and s["differential_privacy"]
    assert s["virtual_time_s"] <= cfg.run.max_virtual_time_s
    assert s["devices_out_of_budget"] > 0 or s["virtual_time_s"] > 0.9 * cfg.run.max_virtual_time_s
    budget = cfg.train.memory_budget_fraction * cfg.fleet.straggler_memory_bytes
    assert s["peak_client_memory_bytes"] <= budget  # measured, under the straggler class's budget
    assert s["trainable_coordinates"] < s["model_coordinates"]
    assert s["epsilon_max"] <= cfg.privacy.target_epsilon + 1e-6
    assert s["best_accuracy"] > s["majority_class_rate"] + 0.1  # it learns, well above always-the-commonest-label

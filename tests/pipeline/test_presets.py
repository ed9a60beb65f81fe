"""Packaged presets: the quick digits scenario kept for tests and smoke runs, and the 500-device task."""

from __future__ import annotations

import pytest

from ftte.cli import main as cli_main
from ftte.pipeline.config import MiB, ConfigError, load_config, parse_config, preset_names
from sim_helpers import tiny


def test_packaged_presets_load_and_validate():
    assert {"digits", "mnist500"} <= set(preset_names())
    for name in preset_names():
        load_config(None, preset=name)  # strict: an unknown key or bad value in a preset raises


def test_digits_preset_is_the_former_quick_scenario():
    cfg = load_config(None, preset="digits")
    assert (cfg.data.name, cfg.model.name, cfg.data.calibration_fraction) == ("digits", "cnn8", 0.0)
    assert cfg.fleet.device_classes()[1].memory_bytes == 2 * MiB and cfg.train.memory_budget_fraction == 0.25
    assert cfg.train.clipping == "per_sample" and cfg.run.max_versions == 80
    # everything else is the default scenario: same fleet size, stragglers, privacy and secagg
    default = load_config(None)
    assert (cfg.fleet.devices, cfg.fleet.stragglers, cfg.privacy, cfg.secagg) == (
        default.fleet.devices, default.fleet.stragglers, default.privacy, default.secagg)


def test_mnist500_is_the_default_task_on_500_devices():
    cfg, default = load_config(None, preset="mnist500"), load_config(None)
    assert cfg.fleet.devices == 500 and cfg.fleet.stragglers == 0.9
    assert cfg.with_overrides(**{"fleet.devices": 100}) == default


def test_tests_use_the_quick_preset():
    cfg = tiny()
    assert cfg.data.name == "digits" and cfg.model.name == "logistic" and cfg.fleet.devices == 16


def test_unknown_preset_is_refused_naming_the_choices(capsys):
    with pytest.raises(ConfigError, match="unknown preset 'nope'; choose from .*digits"):
        load_config(None, preset="nope")
    assert cli_main(["simulate", "--preset", "nope", "--out", "unused"]) == 2
    assert "unknown preset" in capsys.readouterr().err


def test_a_config_file_applies_on_top_of_a_preset(tmp_path, capsys):
    user = tmp_path / "mine.toml"
    user.write_text("[fleet]\ndevices = 30\n[run]\nseed = 4\n")
    cfg = load_config(user, preset="digits")
    assert cfg.fleet.devices == 30 and cfg.run.seed == 4 and cfg.data.name == "digits"
    assert cli_main(["config", "show", "--preset", "digits", "--config", str(user)]) == 0
    assert parse_config(capsys.readouterr().out) == cfg
    user.write_text("[fleet]\ndevicez = 3\n")
    with pytest.raises(ConfigError, match="devicez"):
        load_config(user, preset="digits")

"""The Python API: the README's examples run as written, and ``import ftte`` stays light."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_python_examples() -> list[str]:
    text = README.read_text(encoding="utf-8")
    start = text.index("\n## Python API")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


def test_readme_python_examples_run_as_written(tmp_path, monkeypatch, capsys):
    import ftte

    blocks = readme_python_examples()
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)  # the examples write runs/… relative to the working directory
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    out = capsys.readouterr().out
    # what the examples claim, checked against the files they wrote
    assert namespace["summary"]["versions"] == 3 and namespace["more"]["versions"] == 5
    assert "['fleet.devices: 10 -> 12']" in out
    assert namespace["result"].ok
    assert (tmp_path / "runs/quick/audit/epsilon.png").is_file()
    assert (tmp_path / "runs/cmp/compare.json").is_file()
    assert set(namespace["report"]["strategies"]) == {"ftte", "fedavg"}
    assert ftte.load_config("runs/quick/config.toml").run.max_versions == 5  # the refused call wrote nothing
    assert namespace["client"].member == int(out.splitlines()[-1])
    assert (tmp_path / "device.key").stat().st_mode & 0o077 == 0


def test_import_ftte_loads_no_heavy_stack():
    code = ("import sys, ftte; print(sorted(m for m in ('torch', 'opacus', 'ftte.pipeline', 'ftte.edge', 'httpx', "
            "'matplotlib') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})
    assert done.stdout.strip() == "[]"


def test_lazy_names_are_the_real_classes():
    import ftte
    from ftte.edge.http_client import EdgeClient
    from ftte.pipeline.config import ConfigError

    assert ftte.EdgeClient is EdgeClient
    assert ftte.ConfigError is ConfigError and issubclass(ftte.RunFolderMismatch, ConfigError)
    assert issubclass(ftte.RunInterrupted, KeyboardInterrupt)
    with pytest.raises(AttributeError):
        ftte.no_such_name  # noqa: B018


def test_config_forms_agree(tmp_path):
    import ftte

    nested = ftte.load_config(fleet={"devices": 20}, run={"seed": 2})
    dotted = ftte.load_config(**{"fleet.devices": 20, "run.seed": 2})
    mapping = ftte.load_config({"fleet": {"devices": 20}, "run": {"seed": 2}})
    path = tmp_path / "c.toml"
    path.write_text(nested.to_toml())
    assert nested == dotted == mapping == ftte.load_config(path) == ftte.load_config(nested)
    with pytest.raises(ftte.ConfigError, match="devicez"):
        ftte.load_config(fleet={"devicez": 3})


def test_in_memory_run_writes_nothing(tmp_path, monkeypatch):
    import ftte

    monkeypatch.chdir(tmp_path)
    s = ftte.simulate(fleet={"devices": 10}, model={"name": "logistic"}, run={"max_versions": 2})
    assert s["versions"] == 2 and s["updates_applied"] > 0
    assert list(tmp_path.iterdir()) == []

"""``ftte simulate --backend ray``: starts its own local Ray and shuts it down; --address joins a cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ray = pytest.importorskip("ray")

from ray_helpers import tiny  # noqa: E402

from ftte.cli import main as cli_main  # noqa: E402

SMALL = ["--set", "run.max_versions=2", "--set", "run.ray_workers=2", "--quiet"]


@pytest.mark.slow
def test_simulate_backend_ray_starts_and_stops_its_own_ray(tmp_path, capsys):
    assert not ray.is_initialized()
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(tiny(**{"run.strategy": "fedavg"}).to_toml())
    local_out, ray_out = tmp_path / "local", tmp_path / "ray"
    assert cli_main(["simulate", "--config", str(cfg), "--out", str(local_out), *SMALL]) == 0
    assert cli_main(["simulate", "--config", str(cfg), "--out", str(ray_out), "--backend", "ray", *SMALL]) == 0
    assert not ray.is_initialized()  # shut down at the end
    assert "backend = \"ray\"" in (ray_out / "config.toml").read_text()
    hist_local = (local_out / "history.csv").read_text()
    assert (ray_out / "history.csv").read_text() == hist_local


@pytest.mark.slow
def test_simulate_address_joins_a_running_cluster_and_leaves_it_running(tmp_path):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(tiny(**{"run.strategy": "fedavg"}).to_toml())
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        address = ray.get_runtime_context().gcs_address
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        proc = subprocess.run(
            [sys.executable, "-m", "ftte.cli", "simulate", "--config", str(cfg), "--out", str(tmp_path / "joined"),
             "--address", address, *SMALL],
            env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads((tmp_path / "joined" / "summary.json").read_text())["versions"] == 2
        assert ray.cluster_resources().get("CPU") == 2.0  # the cluster is still up
    finally:
        ray.shutdown()


def test_backend_flags_map_to_config_keys():
    from ftte.cli import build_parser
    from ftte.pipeline.simulate_cli import cli_overrides

    parse = build_parser().parse_args
    assert cli_overrides(parse(["simulate"])) == {}
    assert cli_overrides(parse(["simulate", "--backend", "ray"])) == {"run.backend": "ray"}
    assert cli_overrides(parse(["simulate", "--address", "10.0.0.5:6379"])) == {
        "run.backend": "ray", "run.ray_address": "10.0.0.5:6379"}
    assert tiny().with_overrides(**cli_overrides(parse(["simulate", "--backend", "ray"]))).run.backend == "ray"

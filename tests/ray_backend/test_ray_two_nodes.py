"""A real two-node Ray cluster on this machine (``ray start --head``, then a second node joining on
loopback, one CPU each): ``ftte simulate --address`` runs on it and gives the local backend's result.

Cleanup stops only this test's cluster: every process whose command line names this test's own
Ray temporary directory (``ray stop`` would stop every Ray instance on the machine, other users'
included).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

from ray_helpers import tiny  # noqa: E402

RAY = str(Path(sys.executable).with_name("ray"))
SMALL = ["--set", "run.max_versions=2", "--set", "run.ray_workers=2", "--quiet"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_naming(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            pids.append(int(entry.name))
    return pids


def stop_cluster(marker: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in processes_naming(marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while processes_naming(marker) and time.monotonic() < deadline:
            time.sleep(0.2)


@pytest.mark.slow
def test_simulation_on_a_two_node_cluster_equals_the_local_backend(tmp_path):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(tiny(**{"run.strategy": "fedavg"}).to_toml())
    # One auth mode for every process of this cluster (a token file left in ~/.ray by another
    # cluster would otherwise switch the head to token mode and lock the second node out).
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    temp_dir = tempfile.mkdtemp(prefix="ftte-ray2n-", dir="/tmp")  # short: Ray's socket paths must fit
    port = free_port()
    address = f"127.0.0.1:{port}"
    try:
        head = subprocess.run([RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                               "--num-cpus", "1", "--temp-dir", temp_dir, "--include-dashboard", "false",
                               "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=180)
        assert head.returncode == 0, head.stderr[-3000:]
        node = subprocess.run([RAY, "start", "--address", address, "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
                               "--temp-dir", temp_dir, "--disable-usage-stats"],
                              env=env, capture_output=True, text=True, timeout=180)
        assert node.returncode == 0, node.stderr[-3000:]
        probe = subprocess.run([sys.executable, "-c", (
            "import ray, json; ray.init(address=%r, log_to_driver=False); "
            "print(json.dumps([len([n for n in ray.nodes() if n['Alive']]), ray.cluster_resources().get('CPU')]))"
        ) % address], env=env, capture_output=True, text=True, timeout=180)
        assert probe.returncode == 0, probe.stderr[-3000:]
        assert json.loads(probe.stdout.strip().splitlines()[-1]) == [2, 2.0]  # two nodes, one CPU each

        ray_out, local_out = tmp_path / "cluster", tmp_path / "local"
        proc = subprocess.run([sys.executable, "-m", "ftte.cli", "simulate", "--config", str(cfg), "--out", str(ray_out),
                               "--address", address, *SMALL], env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        local = subprocess.run([sys.executable, "-m", "ftte.cli", "simulate", "--config", str(cfg), "--out",
                                str(local_out), *SMALL], env=env, capture_output=True, text=True, timeout=900)
        assert local.returncode == 0, local.stderr[-3000:]
        assert (ray_out / "history.csv").read_text() == (local_out / "history.csv").read_text()
        a = json.loads((ray_out / "summary.json").read_text())
        b = json.loads((local_out / "summary.json").read_text())
        assert a["backend"] == "ray" and b["backend"] == "local"
        for key in ("versions", "final_accuracy", "updates_applied", "train_rounds", "epsilon_max"):
            assert a[key] == b[key], key
    finally:
        stop_cluster(temp_dir)
    assert processes_naming(temp_dir) == []

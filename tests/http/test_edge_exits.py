"""What ``ftte edge`` does when it cannot go on: it says so at once, with a distinct exit status.

A real ``ftte server`` (TLS with a throwaway CA) on 127.0.0.1 and real ``ftte edge``
processes: a wrong CA is a certificate failure (6, never retried), a key not on the
allow-list is refused (4, no retry), a port nobody listens on is unreachable within
``--patience`` (5, not the 300 s the first contact used to take), and a device whose budget
is spent exits 3 and reports the epsilon it spent, not 0.0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from deploy_helpers import (
    CHILD_ENV,
    ServerProcess,
    digits_split,
    free_port,
    make_devices,
    make_pki,
    write_server_config,
)

pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from ftte.crypto.primitives import Signer  # noqa: E402


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    root = tmp_path_factory.mktemp("edge_exits")
    pki = make_pki(root / "pki")
    csvs, test_file, _, _ = digits_split(root / "data", 3)
    devices, allow = make_devices(root / "keys", csvs)
    port = free_port()
    config = write_server_config(root / "server.toml", pki=pki, allow=allow, state=root / "state" / "server.db",
                                 port=port, test_data=None, buffer_size=3)
    server = ServerProcess(config, port, root / "server.log", pki.ca_cert)
    server.start()
    try:
        yield root, server, devices
    finally:
        server.stop()


def run_edge(args: list[str], timeout: float = 180.0) -> tuple[int, str, str, float]:
    env = dict(os.environ)
    env.update(CHILD_ENV)
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "ftte.cli", "edge", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    return done.returncode, done.stdout, done.stderr, time.monotonic() - t0


def base_args(server: ServerProcess, key: Path, data: Path, state: Path, ca: Path) -> list[str]:
    return ["--server", server.url, "--key", str(key), "--data", str(data), "--target", "label",
            "--state", str(state), "--ca", str(ca)]


def test_wrong_ca_fails_at_once_with_the_certificate_status(deployment, tmp_path):
    root, server, devices = deployment
    other = make_pki(tmp_path / "other-ca")
    code, _, err, elapsed = run_edge(base_args(server, devices[0].key_file, devices[0].data_file, tmp_path / "s",
                                               other.ca_cert) + ["--patience", "120", "--rounds", "1"])
    assert code == 6, err
    assert "certificate" in err and "verif" in err
    assert elapsed < 60, f"retried a certificate failure for {elapsed:.0f} s"  # patience was 120 s


def test_key_not_on_the_allow_list_is_refused_at_once(deployment, tmp_path):
    root, server, devices = deployment
    key = tmp_path / "stranger.key"
    key.write_bytes(Signer().private_bytes())
    code, _, err, elapsed = run_edge(base_args(server, key, devices[0].data_file, tmp_path / "s", server.ca)
                                     + ["--patience", "120", "--rounds", "1"])
    assert code == 4, err
    assert "refused" in err and "401" in err
    assert elapsed < 60, f"retried a 401 for {elapsed:.0f} s"


def test_unreachable_server_gives_up_after_patience(deployment, tmp_path):
    root, server, devices = deployment
    url = f"https://127.0.0.1:{free_port()}"  # nobody listens there
    args = ["--server", url, "--key", str(devices[0].key_file), "--data", str(devices[0].data_file),
            "--target", "label", "--state", str(tmp_path / "s"), "--ca", str(server.ca), "--patience", "3",
            "--rounds", "1"]
    code, _, err, elapsed = run_edge(args)
    assert code == 5, err
    assert "unreachable within --patience 3 s" in err
    assert elapsed < 60, f"first contact took {elapsed:.0f} s with --patience 3"


@pytest.mark.slow
def test_spent_budget_exits_3_and_reports_the_epsilon_spent(deployment, tmp_path):
    root, server, devices = deployment
    dev = devices[1]
    args = base_args(server, dev.key_file, dev.data_file, tmp_path / "state", server.ca) + [
        "--patience", "30", "--join-patience", "3", "--rounds", "1", "--epsilon", "1000", "--seed", "1"]
    # alone, its cohort never fills: it leaves after 3 s, but the round was spent
    code, out, err, _ = run_edge(args)
    assert code == 0, err
    first = json.loads(out.strip().splitlines()[-1])
    assert first["statuses"] == ["dropped"] and first["epsilon"] > 0.0
    spent = first["epsilon"]
    again = [a if a != "1000" else f"{spent * 1.001:.6f}" for a in args]
    code, out, err, _ = run_edge(again)
    assert code == 3, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["statuses"] == ["budget_exhausted"]
    assert summary["epsilon"] == pytest.approx(spent, rel=1e-9)
    assert "privacy budget spent" in err


@pytest.mark.parametrize("flag, value, says", [("--max-user-noise-ratio", "0", "--max-user-noise-ratio must be > 0"),
                                               ("--min-cohort", "1", "--min-cohort must be at least 2"),
                                               ("--max-corrupt", "-1", "--max-corrupt must be 0 or more")])
def test_an_impossible_device_policy_is_refused_before_any_contact(tmp_path, flag, value, says):
    key = tmp_path / "device.key"
    data = tmp_path / "records.csv"
    data.write_text("a,label\n1,0\n2,1\n")
    assert subprocess.run([sys.executable, "-m", "ftte.cli", "keygen", str(key)], capture_output=True).returncode == 0
    # a port nobody listens on: the refusal must come before any attempt to reach it
    code, _, err, seconds = run_edge(["--server", f"https://127.0.0.1:{free_port()}", "--key", str(key), "--data",
                                      str(data), "--target", "label", "--patience", "30", flag, value])
    assert code == 2, err
    assert says in err and "Traceback" not in err
    assert seconds < 30

"""The README's deployment quickstart, run exactly as written, on loopback.

The ``bash`` block under "### Quickstart" is parsed from README.md and each line run as its
own process, in a fresh folder: ``ftte deploy init`` (whose printed commands must be the
rest of the block), ``ftte server`` in the background, every ``ftte edge`` at once, then
``ftte audit`` on the server's ledger. Everything is real: TLS with the CA ``deploy init``
made, DP-SGD, secure aggregation, SQLite. The same run then serves the checks of the
server's progress lines, the device's stage lines and ``ftte export``.
"""

from __future__ import annotations

import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from deploy_helpers import CHILD_ENV, read_state

pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

README = Path(__file__).resolve().parents[2] / "README.md"


def quickstart_block() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Quickstart"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None, "no bash block under ### Quickstart"
    return [ln.strip() for ln in block.group(1).splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def argv(line: str) -> list[str]:
    words = shlex.split(line)
    assert words[0] == "ftte", line
    return [sys.executable, "-m", "ftte.cli", *words[1:]]


def env() -> dict[str, str]:
    import os

    e = dict(os.environ)
    e.update(CHILD_ENV)
    return e


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class Run:
    def __init__(self, cwd: Path, lines: list[str]) -> None:
        self.cwd, self.lines = cwd, lines
        self.printed: list[str] = []
        self.edge_codes: list[int] = []
        self.edge_out: list[str] = []
        self.edge_err: list[str] = []
        self.audit_code = -1
        self.audit_out = ""
        self.server_log = ""
        self.wall_s = 0.0


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> Run:
    lines = quickstart_block()
    init, server_line, edges, audit_line = lines[0], lines[1], lines[2:-1], lines[-1]
    assert init.startswith("ftte deploy init") and server_line.startswith("ftte server")
    assert edges and all(e.startswith("ftte edge") for e in edges) and audit_line.startswith("ftte audit")
    port = int(re.search(r"https://127\.0\.0\.1:(\d+)", edges[0]).group(1))
    if port_in_use(port):
        pytest.skip(f"port {port} of the README's quickstart is in use on this machine")
    cwd = tmp_path_factory.mktemp("quickstart")
    run = Run(cwd, lines)
    t0 = time.monotonic()
    done = subprocess.run(argv(init), cwd=cwd, env=env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    run.printed = [ln for ln in done.stdout.splitlines() if ln.strip() and not ln.startswith("#")]
    log = open(cwd / "server.log", "wb")
    server = subprocess.Popen(argv(server_line), cwd=cwd, env=env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        procs = [subprocess.Popen(argv(e), cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for e in edges]
        for p in procs:
            out, err = p.communicate(timeout=600)
            run.edge_codes.append(p.returncode)
            run.edge_out.append(out)
            run.edge_err.append(err)
        done = subprocess.run(argv(audit_line), cwd=cwd, env=env(), capture_output=True, text=True, timeout=300)
        run.audit_code, run.audit_out = done.returncode, done.stdout + done.stderr
        run.wall_s = time.monotonic() - t0
        print(f"quickstart wall time {run.wall_s:.1f} s")
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=30)
        log.close()
    run.server_log = (cwd / "server.log").read_text()
    return run


@pytest.mark.slow
def test_readme_quickstart_runs_as_written(quickstart):
    assert quickstart.printed == quickstart.lines[1:], "deploy init prints other commands than the README shows"
    assert quickstart.edge_codes == [0] * len(quickstart.edge_codes), quickstart.edge_err
    versions, cohorts, history = read_state(quickstart.cwd / "quickstart" / "state" / "server.db")
    assert versions[-1] >= 1, "the model version never advanced"
    assert quickstart.audit_code == 0, quickstart.audit_out
    assert "integrity ok, epsilon ok, budgets ok" in quickstart.audit_out
    # the ledger key lives outside the state folder, where deploy init put its directory
    assert (quickstart.cwd / "quickstart" / "keys" / "ledger.key").is_file()
    assert not list((quickstart.cwd / "quickstart" / "state").glob("*.key"))


@pytest.mark.slow
def test_server_prints_one_progress_line_per_cohort(quickstart):
    _, cohorts, history = read_state(quickstart.cwd / "quickstart" / "state" / "server.db")
    lines = [ln for ln in quickstart.server_log.splitlines() if re.match(r"ftte server: cohort c-\S+ (applied|aborted)", ln)]
    assert len(lines) == len(cohorts), quickstart.server_log
    accuracy = {row["version"]: row["accuracy"] for row in history if "accuracy" in row}
    for ln in lines:
        m = re.search(r"applied \((\d+) members\): version (\d+), test accuracy ([0-9.]+); cohorts applied (\d+), "
                      r"aborted (\d+); devices active (\d+)", ln)
        assert m is not None, ln
        assert float(m.group(3)) == pytest.approx(accuracy[int(m.group(2))], abs=6e-5)
        assert int(m.group(6)) >= 1


@pytest.mark.slow
def test_edge_prints_a_line_per_stage_and_a_truthful_summary(quickstart):
    import json

    for err, out in zip(quickstart.edge_err, quickstart.edge_out):
        for stage in ("task received", "pulled model version 0", "trained locally", "joined cohort",
                      "uploaded masked update", "sent unmasking shares", "applied: model version"):
            assert stage in err, (stage, err)
        assert "standardised with the task's statistics" in err
        summary = json.loads(out.strip().splitlines()[-1])
        assert summary["event"] == "summary" and summary["epsilon"] > 0.0


@pytest.mark.slow
def test_export_writes_a_model_pytorch_loads_and_it_scores_like_the_server(quickstart, tmp_path):
    import torch
    from ftte.pipeline.evaluation import evaluate
    from ftte.pipeline.model_export import load_model
    from ftte.protocol.features import standardise

    folder = quickstart.cwd / "quickstart"
    out = tmp_path / "model.pt"
    done = subprocess.run([sys.executable, "-m", "ftte.cli", "export", "--config", str(folder / "server.toml"),
                           "--out", str(out)], env=env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    raw = torch.load(out, weights_only=True)  # plain tensors and values: no pickled code
    assert raw["format"] == "ftte-model/1" and raw["model_name"] == "logistic"
    versions, _, history = read_state(folder / "state" / "server.db")
    assert raw["version"] == versions[-1]
    model, info = load_model(out)
    with np.load(folder / "data" / "test.npz") as data:
        x = standardise(data["x"], info["feature_mean"].numpy(), info["feature_std"].numpy())
        y = data["y"]
    acc, _ = evaluate(model, x, y)
    server_acc = [row["accuracy"] for row in history if row["version"] == raw["version"]][0]
    assert acc == pytest.approx(server_acc, abs=1e-9)
    assert acc > 0.3  # ten classes: well above chance after a few cohorts

"""End to end: `ftte server` and eight `ftte edge` processes over HTTPS on 127.0.0.1.

Seven devices are forked from one process that imported torch once (``edge_zygote.py``;
each child runs the `ftte edge` command path), the eighth is a plain
``python -m ftte.cli edge`` process: the same code, without the shared import.

Logistic regression on sklearn digits split over the devices by the test, DP-SGD on with
a generous budget, secure aggregation in cohorts of four. Afterwards: versions are
contiguous, every acknowledged upload is in an applied sum (or its cohort aborted
cleanly), ``ftte audit`` verifies the ledger, and the accuracy is in line with the
simulator trained on the same data with the same settings.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from deploy_helpers import (
    EdgeFleet,
    ServerProcess,
    check_run,
    digits_split,
    epsilons,
    free_port,
    make_devices,
    make_pki,
    start_edge,
    wait_for,
    write_server_config,
)

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

N_DEVICES = 8
ROUNDS = 3
TRAIN = {"local_steps": 5, "batch_size": 32, "lr": 1.0, "noise_multiplier": 0.7}


def simulator_accuracy(versions: int, x_test: np.ndarray, y_test: np.ndarray) -> float:
    """The simulator with the same model, training, privacy, secagg and buffer settings, on the test's test set."""
    from ftte.pipeline.config import load_config
    from ftte.pipeline.evaluation import Evaluator
    from ftte.pipeline.simulator import Simulation

    stages = {s: 0.0 for s in ("train", "advertise", "share", "upload", "consistency", "unmask")}
    fleet = [{"name": "edge", "fraction": 1.0, "compute_speed": 1.0, "memory_bytes": 64 << 20, "uplink_bps": 2e6,
              "downlink_bps": 1e7, "availability": 1.0, "dropout": stages}]
    cfg = load_config(None, preset="digits").with_overrides(**{
        "fleet.devices": N_DEVICES, "fleet.classes": fleet, "model.name": "logistic", "data.partition": "iid",
        "server.buffer_size": 4, "server.deadline_s": 5.0, "run.max_versions": versions, "run.strategy": "ftte",
        "train.local_steps": TRAIN["local_steps"], "train.batch_size": TRAIN["batch_size"], "train.lr": TRAIN["lr"],
        "privacy.noise_multiplier": TRAIN["noise_multiplier"], "privacy.epsilon_max": 1000.0, "privacy.target_epsilon": 0.0,
        "privacy.accountant": "rdp", "secagg.clip": 2.0, "secagg.value_bits": 12,
    })
    sim = Simulation(cfg)
    try:
        result = sim.run()
        return Evaluator(sim.model, sim.plan, x_test, y_test)(result.weights)[0]
    finally:
        sim.close()


def test_eight_devices_train_through_several_buffers(tmp_path):
    t0 = time.monotonic()
    pki = make_pki(tmp_path / "pki")
    files, test_file, _, (x_test, y_test) = digits_split(tmp_path / "data", N_DEVICES)
    devices, allow = make_devices(tmp_path / "keys", files)
    port = free_port()
    db = tmp_path / "state" / "server.db"
    config = write_server_config(
        tmp_path / "server.toml", pki=pki, allow=allow, state=db, port=port, test_data=test_file,
        local_steps=TRAIN["local_steps"], batch_size=TRAIN["batch_size"], lr=TRAIN["lr"],
        noise_multiplier=TRAIN["noise_multiplier"])
    server = ServerProcess(config, port, tmp_path / "server.log", pki.ca_cert)
    fleet = EdgeFleet(tmp_path / "fleet")
    # The plain process needs the longest to start: it imports while the server starts (it
    # retries until the server answers), and fetches its task before the others train.
    real = start_edge(server, devices[-1], tmp_path / "edges", rounds=ROUNDS, seed=N_DEVICES - 1,
                      join_patience=6.0)
    edges = [real]
    try:
        server.start()
        wait_for(lambda: real.named("task") or real.returncode is not None, 180, 0.1, "the edge process to start")
        edges += [fleet.spawn(server, d, tmp_path / "edges", rounds=ROUNDS, seed=i, join_patience=6.0)
                  for i, d in enumerate(devices[:-1])]
        codes = [e.wait(timeout=240) for e in edges]
        metrics = server.metrics()
    finally:
        for e in edges:
            e.kill()
        fleet.close()
        server.stop()
    assert codes == [0] * N_DEVICES, [e.stderr_path.read_text()[-2000:] for e in edges if e.returncode]

    run = check_run(db, edges)
    versions = run["versions"]
    assert len(versions) - 1 >= 4, f"only {len(versions) - 1} buffers applied: {run['cohorts']}"
    assert metrics["devices_seen"] == N_DEVICES and metrics["bytes_in"] > 0 and metrics["bytes_out"] > 0
    assert set(metrics["statuses"]) <= {"200", "409"}, metrics["statuses"]  # 409: a leave that came too late
    summaries = [e.named("summary")[0] for e in edges]
    assert all(s["rounds"] == ROUNDS for s in summaries)
    applied = sum(s["statuses"].count("applied") for s in summaries)
    assert applied >= 0.75 * N_DEVICES * ROUNDS

    # The ledger never claims more than a device spent, and equals its accountant
    # whenever the device's last round reached the server.
    eps = epsilons(db, tmp_path / "edges", devices)
    for e in edges:
        ledger, own = eps[e.device.member]
        assert ledger <= own * (1 + 1e-9) + 1e-12, (ledger, own)
        if e.named("ended")[-1]["status"] == "applied":
            assert ledger == pytest.approx(own, rel=1e-9), (e.device.index, ledger, own)

    final = run["history"][-1]["accuracy"]
    torch.set_num_threads(1)
    reference = simulator_accuracy(len(versions) - 1, x_test, y_test)
    print(f"http accuracy {final:.3f} after {len(versions) - 1} versions, simulator {reference:.3f}, "
          f"{time.monotonic() - t0:.1f} s")
    assert final >= 0.6
    assert final >= reference - 0.12, (final, reference)

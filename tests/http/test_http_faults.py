"""Faults on a real deployment: the server SIGKILLed mid-buffer and restarted; devices killed at each stage.

Afterwards, always: versions are contiguous, every upload a device saw acknowledged is in
an applied sum (or its cohort aborted cleanly, revealing nothing), and ``ftte audit``
verifies the ledger.
"""

from __future__ import annotations

import time

import pytest
from deploy_helpers import (
    EdgeFleet,
    ServerProcess,
    check_run,
    digits_split,
    epsilons,
    free_port,
    make_devices,
    make_pki,
    settle,
    wait_for,
    write_server_config,
)

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

LATE_STAGES = {"share", "upload", "consistency", "unmask", "finishing"}


def deployment(tmp_path, n_devices: int, **config):
    pki = make_pki(tmp_path / "pki")
    files, test_file, _, _ = digits_split(tmp_path / "data", n_devices)
    devices, allow = make_devices(tmp_path / "keys", files)
    port = free_port()
    db = tmp_path / "state" / "server.db"
    settings = {"local_steps": 2, "batch_size": 32, "lr": 1.0, "stage_timeout_s": 2.0, "deadline_s": 3.0,
                "poll_wait_s": 2.0, **config}
    cfg = write_server_config(tmp_path / "server.toml", pki=pki, allow=allow, state=db, port=port,
                              test_data=test_file, **settings)
    server = ServerProcess(cfg, port, tmp_path / "server.log", pki.ca_cert)
    return server, devices, db


def assert_ledger_within_devices(db, state_root, devices) -> None:
    """Killed devices leave rounds the server never heard of: the ledger may hold less, never more."""
    for member, (ledger, own) in epsilons(db, state_root, devices).items():
        assert ledger <= own * (1 + 1e-9) + 1e-12, (member, ledger, own)


@pytest.fixture
def fleet(tmp_path):
    f = EdgeFleet(tmp_path / "fleet")
    yield f
    f.close()


def _kill_mid_buffer(server: ServerProcess, min_version: int, timeout: float, prefer: str | None = None) -> dict:
    """SIGKILL the server at the first moment a cohort with journaled member messages is in flight
    (in stage ``prefer`` if that is seen within half the timeout)."""
    t0 = time.monotonic()

    def mid_buffer():
        m = server.metrics()
        wanted = {prefer} if prefer and time.monotonic() - t0 < timeout / 2 else LATE_STAGES
        late = [cid for cid, stage in m["cohort_stages"].items() if stage in wanted]
        return (m, late) if m["version"] >= min_version and late else None

    metrics, late = wait_for(mid_buffer, timeout, 0.01, "a cohort mid-protocol")
    server.kill()
    return {"version": metrics["version"], "late": late, "stages": metrics["cohort_stages"]}


def _run_with_server_kills(tmp_path, fleet, kills: int):
    server, devices, db = deployment(tmp_path, 8)
    server.start()
    edges = [fleet.spawn(server, d, tmp_path / "edges", rounds=1000, seed=i, patience=60.0, join_patience=15.0)
             for i, d in enumerate(devices)]
    killed = []
    try:
        for k in range(kills):
            prefer = ("share", "upload", "unmask")[k % 3]
            killed.append(_kill_mid_buffer(server, min_version=1 + 2 * k, timeout=120, prefer=prefer))
            time.sleep(0.3)
            server.start()
            restarted = server.metrics()
            killed[-1]["recovered"] = restarted["recovered_cohorts"]
            # the status names the restored version's history row, read back from the checkpoint
            assert restarted["last_history_row"]["version"] == restarted["version"] >= killed[-1]["version"]
        wait_for(lambda: server.metrics()["version"] >= killed[-1]["version"] + 3, 120, 0.2,
                 "progress after the restart")
        for e in edges:
            e.kill()
        settle(server)
    finally:
        for e in edges:
            e.kill()
        server.stop()
    run = check_run(db, edges)
    assert_ledger_within_devices(db, tmp_path / "edges", devices)
    records = {c["cohort_id"]: c for c in run["cohorts"]}
    for k in killed:
        assert k["recovered"] >= 1, k
        for cid in k["late"]:
            assert cid in records, f"cohort {cid} in flight at the kill never finished"
    return run, killed


def test_server_sigkill_mid_buffer_then_restart(tmp_path, fleet):
    run, killed = _run_with_server_kills(tmp_path, fleet, kills=1)
    print(f"killed at {killed}; {len(run['versions']) - 1} versions, {len(run['cohorts'])} cohorts")


@pytest.mark.slow
def test_server_sigkilled_three_times(tmp_path, fleet):
    run, killed = _run_with_server_kills(tmp_path, fleet, kills=3)
    print(f"killed at {killed}; {len(run['versions']) - 1} versions, {len(run['cohorts'])} cohorts")


# A device killed right after an event misses the next stage; after an acknowledged upload
# it is a survivor whose input is in the sum.
KILLS = {"joined": "advertise", "advertised": "share", "shared": "upload", "uploaded": "consistency",
         "signed": "unmask"}


def test_devices_killed_at_each_protocol_stage(tmp_path, fleet):
    server, devices, db = deployment(tmp_path, 8 + len(KILLS))
    honest, dying = devices[:8], devices[8:]
    server.start()
    edges = [fleet.spawn(server, d, tmp_path / "edges", rounds=1000, seed=i, join_patience=15.0)
             for i, d in enumerate(honest)]
    victims = []
    try:
        wait_for(lambda: server.metrics()["version"] >= 1, 120, 0.2, "a first version")
        for d, event in zip(dying, KILLS):
            # One at a time, so a cohort never loses more than one member to this test.
            v = fleet.spawn(server, d, tmp_path / "edges", rounds=1, seed=100 + d.index, exit_at=event,
                            join_patience=60.0)
            assert v.wait(timeout=120) == -9, v.stderr_path.read_text()[-2000:]
            victims.append((v, event))
        version = server.metrics()["version"]
        wait_for(lambda: server.metrics()["version"] >= version + 2, 120, 0.2, "progress after the kills")
        for e in edges:
            e.kill()
        settle(server)
    finally:
        for e in edges:
            e.kill()
        server.stop()
    run = check_run(db, edges + [v for v, _ in victims])
    assert_ledger_within_devices(db, tmp_path / "edges", devices)
    records = {c["cohort_id"]: c for c in run["cohorts"]}
    outcomes = {}
    for v, event in victims:
        joined = v.named("joined")
        assert joined, f"device killed at {event} never joined"
        record = records[joined[-1]["cohort"]]
        member = v.device.member
        if record["aborted"]:
            outcomes[event] = "cohort aborted"
            continue
        assert record["dropped"].get(str(member)) == KILLS[event], (event, record)
        assert (member in record["included"]) == (event in ("uploaded", "signed")), (event, record)
        outcomes[event] = f"dropped at {KILLS[event]}"
    print(outcomes)
    assert sum(o != "cohort aborted" for o in outcomes.values()) >= 3, outcomes

"""The Ray backend against the local one: same seed, same result; a dead worker is a dropout."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

pytest.importorskip("ray")

from ray_helpers import RecordingLocal, run_traced, tiny  # noqa: E402

from ftte.cli import main as cli_main  # noqa: E402
from ftte.pipeline.backends import LocalBackend, RayBackend  # noqa: E402
from ftte.pipeline.partition import derive_rng  # noqa: E402
from ftte.pipeline.simulator import OFFLINE_MEAN_S  # noqa: E402
from ftte.pipeline import simulator  # noqa: E402


def test_fedavg_on_ray_is_bit_identical_to_local_and_ships_data_once(ray_2cpu):
    # a budget that retires devices mid-run, so the driver-side budget check is exercised too
    cfg = tiny(**{"run.strategy": "fedavg", "run.max_versions": 6, "privacy.epsilon_max": 1.0})
    local, local_events, lx = run_traced(cfg, LocalBackend())
    remote, remote_events, rx = run_traced(cfg, RayBackend(workers=2))
    assert remote.history == local.history
    assert np.array_equal(remote.weights, local.weights)  # bit-identical
    assert remote_events == local_events
    for key in ("epsilon_max", "train_rounds", "retired"):
        assert rx[key] == lx[key], key
    assert lx["retired"]  # the budget bit: devices were refused by the driver, identically
    assert rx["lost"] == [] and len(rx["worker_pids"]) == 2
    # model + plan and the data went into the object store once; each version's weights once
    assert rx["puts"]["spec"] == 1 and rx["puts"]["data"] == 1
    assert rx["puts"]["weights"] == local.summary["versions"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ftte", "fedbuff"])
@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
def test_async_strategies_on_ray_keep_event_order_and_history(ray_2cpu, strategy, lazy, monkeypatch):
    # a budget that retires devices mid-run (0.5 retired 14 of 16 before any merge: an empty history)
    cfg = tiny(**{"run.strategy": strategy, "run.max_versions": 8, "privacy.epsilon_max": 1.0})
    # lazy: hand over every started round at each merge (far beyond the default read-ahead),
    # which must not change anything either
    monkeypatch.setattr(simulator, "AHEAD_PER_WORKER", 1000)
    local, local_events, lx = run_traced(cfg, LocalBackend(), lazy=lazy)
    remote, remote_events, rx = run_traced(cfg, RayBackend(workers=2), lazy=lazy)
    assert rx["lazy"] is lazy and lx["lazy"] is lazy
    assert remote_events == local_events  # the same events, in the same virtual-time order
    assert remote.history == local.history and len(local.history) == cfg.run.max_versions
    assert np.array_equal(remote.weights, local.weights)
    assert rx["retired"] == lx["retired"] and rx["retired"]  # the budget bit, identically
    assert rx["epsilon_max"] == lx["epsilon_max"]
    assert rx["puts"]["spec"] == 1 and rx["puts"]["data"] == 1
    # lazy Ray hands started rounds over ahead of their cohort's close (and still matches local)
    assert (remote.summary["rounds_ahead"] > 0) is lazy and local.summary["rounds_ahead"] == 0


def _back_at(cfg, events, dev, attempt):
    """When a device whose round (its first trained event) was lost is ready again."""
    lost_at = [t for t, kind, key in events if kind == "trained" and key == dev][0]
    return lost_at + derive_rng(cfg.run.seed, "worker-lost", dev, attempt).exponential(OFFLINE_MEAN_S)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ftte", "fedavg"])
def test_a_worker_dying_mid_task_is_a_dropout_and_the_run_goes_on(ray_2cpu, strategy, tmp_path):
    cfg = tiny(**{"run.strategy": strategy, "run.max_versions": 3 if strategy == "fedavg" else 8})
    spy = RecordingLocal()
    _, spy_events, _ = run_traced(cfg, spy, lazy=False)
    if strategy == "ftte":
        # a first-attempt round whose device, once its worker dies, is back before the run ends
        firsts = [k for k in spy.submitted if k[1] == 1]
        victim = min(firsts, key=lambda k: _back_at(cfg, spy_events, *k))
    else:
        victim = spy.submitted[1]  # a round that really trains; its worker exits (os._exit) mid-task
    out = tmp_path / "run"
    result, events, x = run_traced(cfg, RayBackend(workers=2, crash_on=[victim]), out, lazy=False)
    # exactly one round is lost, not the others queued on the same worker: the victim's own, or,
    # on a loaded machine, the round the worker finished just before it, whose reply had not
    # left the process when it exited (os._exit); the victim's round then runs again
    assert len(x["lost"]) == 1, x["lost"]
    lost = x["lost"][0]
    assert lost == victim or lost in spy.submitted, (lost, victim)
    assert result.summary["versions"] == cfg.run.max_versions
    # Ray restarted the dead worker: still two workers, one of them a new process
    assert len(x["pids_after"]) == 2 and set(x["pids_after"]) != set(x["worker_pids"])
    dev = lost[0]
    conn = sqlite3.connect(out / "ledger.db")
    try:
        lost_rows = conn.execute("SELECT device_id FROM privacy_ledger_rows WHERE cohort_id = 'lost'").fetchall()
    finally:
        conn.close()
    if strategy == "ftte" and lost == victim:
        # the device comes back later: ready again after an offline spell drawn from the seed
        back_at = _back_at(cfg, events, *victim)
        assert events[-1][0] > back_at  # the run went on past it ...
        assert (back_at, "ready", dev) in events  # ... and the device was back
    assert lost_rows == [(str(dev),)]  # the spent round has its ledger row, so the audit still adds up
    assert cli_main(["audit", str(out / "ledger.db")]) == 0


@pytest.mark.slow
def test_in_lazy_mode_a_worker_dying_mid_task_drops_its_device_from_its_cohort(ray_2cpu, tmp_path):
    """Ray gets a lazy cohort's rounds when the cohort closes; a worker dying in one of them is
    known only at the merge. That device is a dropout: the others merge without it, under the
    close the cohort was planned at, and its spent round gets a LOST row."""
    cfg = tiny(**{"run.strategy": "ftte", "run.max_versions": 6})
    spy = RecordingLocal()
    _, _, sx = run_traced(cfg, spy, tmp_path / "local")
    assert sx["lazy"]
    victim = spy.submitted[0]  # a round of the first cohort to merge: its device's first spent round
    dev = victim[0]
    out = tmp_path / "run"
    result, _, x = run_traced(cfg, RayBackend(workers=2, crash_on=[victim]), out)
    assert x["lazy"] and x["lost"] == [victim]
    assert x["unmodelled_cohorts"] >= 1
    assert result.summary["versions"] == cfg.run.max_versions  # the run went on

    def rows(path, sql, *args):
        conn = sqlite3.connect(path / "ledger.db")
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    first = "SELECT cohort_id FROM privacy_ledger_rows WHERE device_id = ? ORDER BY rowid LIMIT 1"
    (cohort,), = rows(tmp_path / "local", first, str(dev))
    assert rows(out, first, str(dev)) == [("lost",)]  # its spent round has its row
    members = "SELECT device_id FROM privacy_ledger_rows WHERE cohort_id = ?"
    without = {r for r in rows(tmp_path / "local", members, cohort)} - {(str(dev),)}
    assert set(rows(out, members, cohort)) == without  # its cohort ran without it
    assert cli_main(["audit", str(out / "ledger.db")]) == 0

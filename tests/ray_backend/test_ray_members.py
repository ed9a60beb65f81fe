"""Secure aggregation's member side on Ray workers: the same sum as in-process, and a worker that
dies in the middle of a stage drops exactly its members, at that stage."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

pytest.importorskip("ray")

from ray_helpers import tiny  # noqa: E402
from secagg_helpers import make_params, random_inputs, signer  # noqa: E402

from ftte.crypto.secagg_local import run_session  # noqa: E402
from ftte.crypto.secagg_member import MemberHost  # noqa: E402
from ftte.crypto.stages import STAGE_LABELS  # noqa: E402
from ftte.pipeline.backends import MEMBERS_GROUP, RayBackend  # noqa: E402
from ftte.pipeline.simulator import Simulation  # noqa: E402

N = 9  # two workers: members 0-4 on the first, 5-8 on the second; the threshold (5) survives losing either


def _session(n=N, dim=64):
    params = make_params(n, dim=dim, bits=32)
    return params, {m: signer(m) for m in params.members}, random_inputs(params, seed=3)


@pytest.fixture
def ray_sim(ray_2cpu, request):
    """A started Ray backend (2 workers) of a small simulation; the test drives its workers directly."""
    sim = Simulation(tiny(), backend=RayBackend(workers=2, **getattr(request, "param", {})))
    try:
        yield sim
    finally:
        sim.close()


def test_members_run_on_the_workers_and_give_the_in_process_sum(ray_sim, monkeypatch):
    params, ids, inputs = _session()
    local, local_stats = run_session(params, ids, inputs, drop={2: "upload", 7: "unmask"})

    def not_here(*_a, **_k):
        raise AssertionError("a member's stage ran in the driver")

    monkeypatch.setattr(MemberHost, "stage", not_here)  # the workers' processes are not patched
    runner = ray_sim.backend.member_runner()
    remote, stats = run_session(params, ids, inputs, drop={2: "upload", 7: "unmask"}, members=runner)
    assert remote is not None and local is not None
    assert remote.survivors == local.survivors
    assert np.array_equal(remote.total, local.total)
    assert stats.lost == {}
    assert stats.bytes_up.keys() == local_stats.bytes_up.keys()
    assert stats.stage_up.keys() == local_stats.stage_up.keys()
    assert sorted(set(runner.placement.values())) == [0, 1]  # both workers held members


def test_seeded_members_on_the_workers_send_the_same_bytes_as_in_process(ray_sim):
    """A simulation's members draw from generators derived from its run seed; each travels unused to
    the worker that plays its member, so the ring and every message are the ones the driver would make."""
    from ftte.pipeline.cohort import member_randomness

    params, ids, inputs = _session(n=12)
    params = dataclasses.replace(params, graph="ring", neighbors=4)
    drop = {2: "upload", 7: "unmask"}
    local, local_stats = run_session(params, ids, inputs, drop=drop,
                                     randomness=member_randomness(5, params.cohort_id, params.members))
    remote, stats = run_session(params, ids, inputs, drop=drop, members=ray_sim.backend.member_runner(),
                                randomness=member_randomness(5, params.cohort_id, params.members))
    assert remote is not None and local is not None and np.array_equal(remote.total, local.total)
    assert stats.stage_up == local_stats.stage_up and stats.stage_down == local_stats.stage_down


@pytest.mark.slow
@pytest.mark.parametrize("ray_sim", [{"crash_members_at": s} for s in STAGE_LABELS], indirect=True,
                         ids=STAGE_LABELS)
def test_a_worker_dying_mid_stage_drops_its_members_at_that_stage(ray_sim):
    backend = ray_sim.backend
    stage = backend._crash_members_at
    pids_before = list(backend.worker_pids)
    params, ids, inputs = _session()
    runner = backend.member_runner()
    result, stats = run_session(params, ids, inputs, members=runner)
    held = sorted(m for m, i in runner.placement.items() if i == 1)  # the hook kills the last worker
    assert held == [5, 6, 7, 8]
    assert stats.lost == {m: stage for m in held}
    assert backend.members_lost == [(m, stage) for m in held]
    # exactly what the in-process session gives when those members vanish at that stage
    local, _ = run_session(params, ids, inputs, drop=stats.lost)
    assert result is not None and local is not None
    assert result.survivors == local.survivors
    assert np.array_equal(result.total, local.total)
    # Ray restarted the worker, and the next session has every member again
    import ray

    pids_after = ray.get([a.handle.ping.remote() for a in backend._actors])
    assert pids_after[0] == pids_before[0] and pids_after[1] != pids_before[1]
    again, again_stats = run_session(params, ids, inputs, members=backend.member_runner())
    assert again_stats.lost == {} and again is not None and again.survivors == tuple(params.members)


@pytest.mark.slow
def test_a_simulation_goes_on_when_a_worker_dies_in_a_secure_aggregation_stage(ray_2cpu, tmp_path):
    from ftte.cli import main as cli_main

    class Recording(Simulation):
        results: list = []

        def _apply(self, run, members, now):
            self.results.append(run.result)
            super()._apply(run, members, now)

    cfg = tiny(**{"run.strategy": "ftte", "run.max_versions": 5})
    sim = Recording(cfg, tmp_path / "run", backend=RayBackend(workers=2, crash_members_at="share"))
    try:
        result = sim.run()
        lost = list(sim.backend.members_lost)
    finally:
        sim.close()
    assert lost and {stage for _, stage in lost} == {"share"}
    hit = [r for r in sim.results if any(r.dropped.get(m) == "share" for m, _ in lost)]
    assert len(hit) == 1  # the cohort in session when the worker died: its members dropped at "share"
    assert all(m not in (hit[0].total.included if hit[0].total else ()) for m, _ in lost)
    assert result.summary["versions"] == cfg.run.max_versions  # the run went on
    assert cli_main(["audit", str(tmp_path / "run" / "ledger.db")]) == 0  # every spent round has its row


@pytest.mark.slow
def test_a_worker_killed_between_sessions_stages_loses_its_members_at_the_next_stage(ray_sim):
    import ray

    from ftte.crypto.stages import Stage

    backend = ray_sim.backend
    params, ids, inputs = _session()
    runner = backend.member_runner()
    runner.open(params, {m: (ids[m], inputs[m]) for m in params.members})
    # the worker holds the session (its members' calls run in order, after the open) ...
    ray.get(backend._actors[1].handle.usage.options(concurrency_group=MEMBERS_GROUP).remote())
    handle = backend._actors[1].handle
    before = ray.get(handle.ping.remote())
    ray.kill(handle, no_restart=False)  # ... and is killed; Ray restarts it
    # ray.kill is asynchronous: on a loaded machine the next call could still reach the old
    # process and complete, so wait until a restarted process answers
    deadline = time.monotonic() + 120
    while True:
        try:
            if ray.get(handle.ping.remote(), timeout=30) != before:
                break
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass
        assert time.monotonic() < deadline, "the killed worker was not restarted"
        time.sleep(0.2)
    replies, lost = runner.stage(Stage.ADVERTISE, {m: None for m in params.members})
    assert lost == {5, 6, 7, 8}  # the restarted worker does not hold the session
    assert sorted(replies.replies) == [0, 1, 2, 3, 4]
    runner.close()
    # the restarted worker plays a whole new session
    result, stats = run_session(params, ids, inputs, members=backend.member_runner())
    assert stats.lost == {} and result is not None and result.survivors == tuple(params.members)

"""Issue 13 in deployment: user-level DP (distributed discrete Gaussian inside the masked sum).

The first tests drive the real coordinator in process (real crypto, real SQLite, the real
ledger, as test_deploy_privacy); the last runs ``ftte server`` as a separate process with
in-process edge clients talking HTTP over 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import threading

import numpy as np
import pytest

pytest.importorskip("starlette")

from ftte import wire  # noqa: E402
from ftte.crypto.primitives import Signer  # noqa: E402
from ftte.crypto.secagg_client import SecAggClient  # noqa: E402
from ftte.deploy_messages import CohortStart, JoinRequest, PollRequest, SpentRound, Submit  # noqa: E402
from ftte.edge.user_level import DeviceUserLevel  # noqa: E402
from ftte.http_auth import member_id  # noqa: E402
from ftte.pipeline.refusal import Refused  # noqa: E402
from ftte.privacy.audit import verify_ledger  # noqa: E402
from ftte.privacy.distributed_dp import UserMechanism, parse_user_mechanism, user_epsilon  # noqa: E402
from ftte.privacy.ledger import Ledger  # noqa: E402
from ftte.protocol.cohort import (  # noqa: E402
    CohortRefused,
    DevicePolicy,
    check_cohort,
    contribution_binding,
    session_params,
)
from ftte.protocol.encoding import clip_l2  # noqa: E402
from ftte.protocol.user_encoding import ROTATION_ERROR, UserCodec, rotation_seed  # noqa: E402
from coordinator_helpers import CONFIG, Clock  # noqa: E402

# cohorts of 4: the user-level plan rule would refuse any plan (noise far above the signal); these
# tests are about the mechanism, so the rule is off (user_noise_ratio = inf)
USER_CONFIG = (CONFIG.replace("[privacy]\n", '[privacy]\nunit = "user"\nuser_epsilon = 8.0\nuser_delta = 1e-6\n'
                              "user_participations = 4\nuser_noise_ratio = inf\n")
               .replace("[server]\n", "[server]\nvariance_penalty = 0.0\n"))


def make_user_coordinator(tmp, signers, clock):
    from ftte.pipeline.coordinator import Coordinator
    from ftte.pipeline.deploy_config import parse_server_config
    from ftte.pipeline.deploy_task import build_task
    from ftte.pipeline.journal import Database

    (tmp / "allow.txt").write_text("".join(s.public_key.hex() + "\n" for s in signers))
    settings = parse_server_config(USER_CONFIG, base_dir=tmp)
    task = build_task(settings)
    db = Database(settings.path("state.db"), settings.path("ledger.key"))
    db.open()
    return Coordinator(task, db, {member_id(s.public_key): s.public_key for s in signers}, clock=clock), db


def user_join(coord, member: int, device: DeviceUserLevel, *, seq: int = 1, **over) -> JoinRequest:
    """What an edge client sends after charging one participation (edge/user_level.py)."""
    base = dict(plan_id=coord.plan_id, base_version=coord.version, model_hash=coord.hashes[coord.version], steps=1,
                sample_rate=1.0, noise_multiplier=device.plan.noise_multiplier, max_grad_norm=device.plan.params.clip,
                accountant="rdp", delta=device.delta, epsilon_max=device.epsilon_max, rng_source=device.rng_source,
                torch_version="t", opacus_version="o", ftte_version="f", round_seq=seq)
    base.update(over)
    return JoinRequest(**base)


def device_terms(coord, member: int, budget: float = 8.0) -> DeviceUserLevel:
    task = coord.task_info(member)
    return DeviceUserLevel.from_task(task, coord.task.dim, DevicePolicy(), budget)


def test_a_user_level_deployment_cohort_decodes_to_the_clipped_mean_and_audits(tmp_path):
    """Noise off on the devices: the merged step is the weighted mean of the clipped updates to within
    the rounding bound; every device checks the start with its own policy; the rows audit."""
    signers = [Signer() for _ in range(4)]
    rng = np.random.default_rng(0)

    async def scenario():
        coord, db = make_user_coordinator(tmp_path, signers, Clock())
        await coord.recover()
        before = coord.weights.copy()
        members = [member_id(s.public_key) for s in signers]
        devices = {m: device_terms(coord, m) for m in members}
        updates = {m: rng.normal(size=coord.task.dim) * (0.3 if i % 2 else 3.0) for i, m in enumerate(members)}
        joins = {m: user_join(coord, m, devices[m]) for m in members}
        for m in members:
            cid = (await coord.join(m, joins[m], wire.encode(joins[m]))).cohort_id
        starts = {m: await coord.poll(m, PollRequest(cid, 0), wait_s=5) for m in members}
        inputs = {}
        for m, s in zip(members, signers):
            start = starts[m]
            assert isinstance(start, CohortStart) and start.user_members == 4
            check_cohort(start, coord.task_info(m), DevicePolicy(), member=m, identity_key=s.public_key,
                         plan_id=coord.plan_id, base_version=0, coordinates=coord.task.dim)
            codec = UserCodec(devices[m].plan.params, rotation_seed(start.cohort_id, contribution_binding(start)))
            inputs[m] = codec.encode(updates[m], 1.0, _rng(m), noise=False).ring
        start = starts[members[0]]
        clients = {m: SecAggClient(session_params(start), m, s) for m, s in zip(members, signers)}
        make = [lambda m, x: clients[m].advertise(), lambda m, x: clients[m].share_keys(x),
                lambda m, x: clients[m].masked_input(x, inputs[m]), lambda m, x: clients[m].consistency(x),
                lambda m, x: clients[m].unmask(x)]
        previous = {m: None for m in members}
        for stage in range(5):
            if stage:
                previous = {m: await coord.poll(m, PollRequest(cid, stage), wait_s=5) for m in members}
            for m in members:
                await coord.submit(m, Submit(cid, wire.encode(make[stage](m, previous[m]))), 1 << 24)
        end = await coord.poll(members[0], PollRequest(cid, 5), wait_s=5)
        await coord.drain()
        after = coord.weights.copy()
        db.close()
        return end, before, after, updates, devices[members[0]], start

    end, before, after, updates, device, start = asyncio.run(scenario())
    assert end.status == "applied" and len(end.included) == 4
    clip = device.plan.params.clip
    mean = sum(clip_l2(u, clip * (1 - ROTATION_ERROR)) for u in updates.values()) / 4  # as the devices clip; weights 1
    codec = UserCodec(device.plan.params, rotation_seed(start.cohort_id, contribution_binding(start)))
    error = float(np.linalg.norm((after - before) - mean))  # server lr 1, no momentum
    assert error <= codec.rounding_bound(4) / 4 + 1e-9
    assert error > 0.0 and float(np.linalg.norm(mean)) > 100 * codec.rounding_bound(4) / 4  # the bound is not vacuous
    report = verify_ledger(tmp_path / "state.db")
    assert report.ok, report.problems
    with Ledger(tmp_path / "state.db") as ledger:
        rows = [e.row for e in ledger.entries()]
    assert len(rows) == 4
    for r in rows:  # the simulator's user-level row, column for column
        assert (r.steps, r.sample_rate, r.accountant, r.max_grad_norm) == (1, 1.0, "rdp", clip)
        assert parse_user_mechanism(r.rng_source) == UserMechanism.of(device.plan.params)
        assert r.epsilon_total == pytest.approx(user_epsilon([device.plan.noise_multiplier], 1e-6), rel=1e-9)


def _rng(m: int):
    from ftte.privacy.secure_random import SecureRandom

    return SecureRandom.from_seed(m, "test-rounding")


@pytest.mark.parametrize("change,what", [
    (lambda s: dataclasses.replace(s, user_sigma=s.user_sigma * 0.5), "sigma"),
    (lambda s: dataclasses.replace(s, clip=s.clip * 2), "clip"),
    (lambda s: dataclasses.replace(s, user_scale=s.user_scale * 2), "scale"),
    (lambda s: dataclasses.replace(s, user_calibrated_for=s.user_calibrated_for + 1), "calibrated_for"),
    (lambda s: dataclasses.replace(s, user_noise_multiplier=s.user_noise_multiplier / 2), "noise_multiplier"),
])
def test_a_start_that_changes_one_members_noise_or_clip_is_refused(tmp_path, change, what):
    """A server showing one member a lower noise, another clip or scale: that member refuses, and
    the binding differs from the others' so no advertisement verifies across the two views."""
    signers = [Signer() for _ in range(4)]

    async def scenario():
        coord, db = make_user_coordinator(tmp_path, signers, Clock())
        await coord.recover()
        members = [member_id(s.public_key) for s in signers]
        for m in members:
            j = user_join(coord, m, device_terms(coord, m))
            cid = (await coord.join(m, j, wire.encode(j))).cohort_id
        start = await coord.poll(members[0], PollRequest(cid, 0), wait_s=5)
        db.close()
        return coord.task_info(members[0]), start, members[0], coord.task.dim

    task, start, member, dim = asyncio.run(scenario())
    terms = dict(member=member, identity_key=signers[0].public_key, plan_id=start.plan_id, base_version=0,
                 coordinates=dim)
    check_cohort(start, task, DevicePolicy(), **terms)
    bad = change(start)
    with pytest.raises(CohortRefused, match=what if what != "clip" else "clip"):
        check_cohort(bad, task, DevicePolicy(), **terms)
    assert contribution_binding(bad) != contribution_binding(start)
    assert session_params(bad).binding != session_params(start).binding


def test_a_device_assuming_more_colluders_refuses_the_calibration(tmp_path):
    """Noise calibrated to T - 1 honest survivors is not enough for a device that assumes 2 colluders."""
    signers = [Signer() for _ in range(4)]

    async def scenario():
        coord, db = make_user_coordinator(tmp_path, signers, Clock())
        await coord.recover()
        members = [member_id(s.public_key) for s in signers]
        for m in members:
            j = user_join(coord, m, device_terms(coord, m))
            cid = (await coord.join(m, j, wire.encode(j))).cohort_id
        start = await coord.poll(members[0], PollRequest(cid, 0), wait_s=5)
        db.close()
        return coord.task_info(members[0]), start, members[0], coord.task.dim

    task, start, member, dim = asyncio.run(scenario())
    with pytest.raises(CohortRefused):
        check_cohort(start, task, DevicePolicy(max_corrupt=2), member=member, identity_key=signers[0].public_key,
                     plan_id=start.plan_id, base_version=0, coordinates=dim)


def test_a_device_with_a_noise_ceiling_refuses_a_plan_that_drowns_in_noise(tmp_path):
    """A participation costs the same user-level budget whatever the plan; a device that sets
    max_user_noise_ratio refuses a task whose plan's predicted noise/signal is above it, from the
    task's own mechanism (the same figure the server's rule predicts for that mechanism)."""
    from ftte.privacy.distributed_dp import mean_noise_ratio, params_noise_ratio

    signers = [Signer() for _ in range(4)]

    async def scenario():
        coord, db = make_user_coordinator(tmp_path, signers, Clock())
        await coord.recover()
        db.close()
        return coord.task_info(member_id(signers[0].public_key)), coord.task.dim

    task, dim = asyncio.run(scenario())
    accepted = DeviceUserLevel.from_task(task, dim, DevicePolicy(), 8.0)  # default: no ceiling
    p = accepted.plan.params
    ratio = params_noise_ratio(p)
    assert ratio == pytest.approx(mean_noise_ratio(dim, noise_multiplier=accepted.plan.noise_multiplier,
                                                   members=p.members, threshold=p.calibrated_for), rel=1e-12)
    assert ratio > 1.0  # cohorts of 4: far more noise than signal
    with pytest.raises(CohortRefused, match="max_user_noise_ratio"):
        DeviceUserLevel.from_task(task, dim, DevicePolicy(max_user_noise_ratio=ratio * 0.99), 8.0)
    assert DeviceUserLevel.from_task(task, dim, DevicePolicy(max_user_noise_ratio=ratio * 1.01), 8.0) == accepted
    with pytest.raises(ValueError):
        DevicePolicy(max_user_noise_ratio=0.0)


def test_the_server_refuses_a_participation_past_the_user_budget_or_of_another_mechanism(tmp_path):
    signers = [Signer() for _ in range(4)]

    async def scenario():
        coord, db = make_user_coordinator(tmp_path, signers, Clock())
        await coord.recover()
        m = member_id(signers[0].public_key)
        device = device_terms(coord, m)
        z = device.plan.noise_multiplier
        late = tuple((i, wire.encode(SpentRound(1, 1.0, z, device.plan.params.clip, 1e-6))) for i in range(1, 5))
        over = user_join(coord, m, device, seq=5, unreported=late)  # the fifth of a 4-participation budget
        with pytest.raises(Refused, match="cap") as budget:
            await coord.join(m, over, wire.encode(over))
        other = dataclasses.replace(device.plan.params, sigma=device.plan.params.sigma * 1.5)
        from ftte.privacy.distributed_dp import user_rng_source

        foreign = user_join(coord, m, device, rng_source=user_rng_source("chacha20:os", UserMechanism.of(other)))
        with pytest.raises(Refused, match="mechanism") as mech:
            await coord.join(m, foreign, wire.encode(foreign))
        sampled = user_join(coord, m, device, sample_rate=0.5)
        with pytest.raises(Refused, match="sample_rate"):
            await coord.join(m, sampled, wire.encode(sampled))
        ok = user_join(coord, m, device)
        await coord.join(m, ok, wire.encode(ok))
        await coord.drain()
        db.close()
        return budget.value, mech.value

    budget, mech = asyncio.run(scenario())
    assert budget.code == "policy" and mech.code == "policy"


# -- over real sockets: `ftte server` in its own process, edge clients over HTTP on 127.0.0.1 -------

def _user_server_config(tmp_path, port):
    from deploy_helpers import digits_split, make_devices, write_server_config

    paths, test_file, _, _ = digits_split(tmp_path / "data", 4)
    devices, allow = make_devices(tmp_path / "keys", paths)
    cfg = write_server_config(tmp_path / "server.toml", pki=None, allow=allow, state=tmp_path / "state.db", port=port,
                              test_data=test_file, buffer_size=4, deadline_s=3.0, stage_timeout_s=6.0, local_steps=2)
    text = cfg.read_text()
    text = text.replace("[privacy]\n", '[privacy]\nunit = "user"\nuser_epsilon = 8.0\nuser_delta = 1e-6\n'
                                       "user_participations = 4\nuser_noise_ratio = inf\n")
    text = text.replace("[server]\n", "[server]\nvariance_penalty = 0.0\n")
    cfg.write_text(text)
    return cfg, devices


@pytest.mark.slow
def test_user_level_deployment_over_http(tmp_path, monkeypatch):
    """Round 1, noise off on the devices (a test hook on the encoding): the model the server serves
    moves by the mean of the four clipped updates, to within the rounding bound. Round 2, noise on:
    device 0's own budget holds one participation only, so it refuses to take part (it never
    joins); device 1 is shown a start with half the noise (a tampering transport, standing in for
    a lying server) and refuses it. ``ftte audit`` verifies every user-level row."""
    pytest.importorskip("uvicorn")
    pytest.importorskip("httpx")
    from deploy_helpers import ServerProcess, audit, free_port
    from ftte.edge import user_level
    from ftte.edge.http_client import EdgeClient, Transport

    port = free_port()
    cfg, devices = _user_server_config(tmp_path, port)
    server = ServerProcess(cfg, port, tmp_path / "server.log", None)
    server.start()
    recorded: dict[int, tuple[np.ndarray, float, float]] = {}
    noise_on = threading.Event()
    real_input = user_level.DeviceUserLevel.input_vector

    def input_vector(self, start, delta, weight):
        if noise_on.is_set():
            return real_input(self, start, delta, weight)
        codec = UserCodec(self.plan.params, rotation_seed(start.cohort_id, contribution_binding(start)))
        recorded[start.cohort_id, len(recorded)] = (np.array(delta), weight, self.plan.params.clip)
        return codec.encode(delta, weight, _rng(len(recorded)), noise=False).ring

    monkeypatch.setattr(user_level.DeviceUserLevel, "input_vector", input_vector)

    class LyingStart(Transport):  # what a server showing this member less noise would send
        def call(self, endpoint, msg, expect, **kw):
            reply = super().call(endpoint, msg, expect, **kw)
            if isinstance(reply, CohortStart) and noise_on.is_set():
                reply = dataclasses.replace(reply, user_sigma=reply.user_sigma * 0.5)
            return reply

    from ftte.pipeline.deploy_config import load_server_config

    z = load_server_config(cfg).run.privacy.user_noise_multiplier()
    own_budget = [100.0] * 4
    own_budget[0] = 0.5 * (user_epsilon([z], 1e-6) + user_epsilon([z, z], 1e-6))  # one participation, not two
    x_y = []
    for d in devices:
        raw = np.loadtxt(d.data_file, delimiter=",", skiprows=1, dtype=np.float32)
        x_y.append((raw[:, :-1], raw[:, -1].astype(np.int64)))
    results: dict[int, list] = {i: [] for i in range(4)}
    pulls: dict[str, object] = {}
    first_round, second_round = threading.Barrier(5, timeout=240), threading.Barrier(5, timeout=240)
    errors: list[BaseException] = []

    def life(i):  # one thread per device: its accountant's SQLite connection stays in it
        try:
            d = devices[i]
            transport = LyingStart(server.url, d.signer, verify=False) if i == 1 else None
            with EdgeClient(server.url, d.signer, *x_y[i], state_dir=tmp_path / f"dev{i}", verify=False,
                            epsilon_max=own_budget[i], transport=transport, join_patience_s=60.0) as client:
                client.connect()
                if i == 2:
                    pulls["v0"] = client.pull()
                results[i].append(client.run_round())
                first_round.wait()
                if i == 2:
                    pulls["v1"] = client.pull()
                    pulls["params"] = client.user.plan.params
                second_round.wait()
                results[i].append(client.run_round())
        except BaseException as exc:  # surfaced by the main thread
            errors.append(exc)
            first_round.abort()
            second_round.abort()

    try:
        threads = [threading.Thread(target=life, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        first_round.wait()
        noise_on.set()  # round 2 runs with noise (and the lying start); device 2 pulls version 1 first
        second_round.wait()
        for t in threads:
            t.join(300)
    finally:
        server.stop()
    assert not errors, errors
    assert all(results[i][0].status == "applied" for i in range(4)), results
    v0, v1, params = pulls["v0"], pulls["v1"], pulls["params"]
    assert v1.version == 1
    # the devices clip at C (1 - ROTATION_ERROR) and rotate in float32 (error at most ROTATION_ERROR C)
    mean = sum(clip_l2(dl, c * (1 - ROTATION_ERROR)) * w for dl, w, c in recorded.values()) / sum(
        w for _, w, _ in recorded.values())
    bound = math.sqrt(params.padded_dim) / params.scale + ROTATION_ERROR * params.clip  # 4 survivors, weight sum 4
    step = v1.weights.astype(np.float64) - v0.weights.astype(np.float64)
    assert len(recorded) == 4
    assert float(np.linalg.norm(step - mean)) <= bound + 1e-6 * float(np.linalg.norm(v1.weights))
    assert float(np.linalg.norm(mean)) > 0.1
    assert results[0][1].status == "budget_exhausted", results[0]
    assert results[1][1].status == "dropped" and "sigma" in results[1][1].reason, results[1]
    assert results[2][1].status in ("applied", "aborted")
    code, out = audit(tmp_path / "state.db")
    assert code == 0, out
    with Ledger(tmp_path / "state.db") as ledger:
        rows = [e.row for e in ledger.entries()]
    assert len(rows) == 7  # 4 participations in round 1, 3 in round 2 (device 0 refused before joining)
    assert all(parse_user_mechanism(r.rng_source) is not None and r.noise_multiplier == z for r in rows)

"""The deployment's parts without sockets: import isolation, wire messages, config, rate limits,
and the coordinator's journal replay after a crash at every point of a cohort's life."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from ftte.crypto.primitives import Signer
from ftte.crypto.secagg_client import SecAggClient
from ftte.protocol.cohort import model_hash as edge_model_hash
from ftte.protocol.cohort import session_params
from ftte.protocol.encoding import UpdateCodec

from ftte import wire
from ftte.http_auth import member_id
from ftte.secagg_messages import (
    ConsistencyBundle,
    Roster,
    ShareDelivery,
    SurvivorList,
)
from ftte.deploy_messages import (
    CohortEnd,
    CohortStart,
    Pending,
    PollRequest,
    Submit,
    TaskInfo,
)

pytest.importorskip("starlette")
pytest.importorskip("httpx")

from coordinator_helpers import CONFIG, Clock, crash, drive_cohort, join_request, make_coordinator  # noqa: E402


def test_edge_client_does_not_import_the_server_stack():
    code = ("import sys, ftte.edge.http_client, ftte.edge.edge_cli; "
            "print(sorted(m for m in ('starlette', 'uvicorn', 'ftte.pipeline', 'fastapi', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "[]"


def test_model_hash_is_the_one_the_pipeline_uses():
    from ftte.pipeline import coordinator, server_model, simulator

    # both drivers hold their model in the one server core, which hashes with the device's function
    assert server_model.model_hash is edge_model_hash
    assert coordinator.ServerModel is simulator.ServerModel is server_model.ServerModel
    w = np.random.default_rng(0).normal(size=650).astype(np.float32)
    assert edge_model_hash("plan-y", w) != edge_model_hash("plan-x", w)
    assert edge_model_hash("plan-x", w) != edge_model_hash("plan-x", w + 1)


def test_member_id_is_stable_and_in_range():
    key = bytes(range(32))
    assert member_id(key) == member_id(key) and 0 <= member_id(key) < 2**63


def test_deploy_messages_round_trip():
    info = TaskInfo(1, "{}", "logistic", "{}", (64,), 10, np.zeros(650, np.float32), 5, 32, 1.0, 1, 0.7, 1.0, 0.0,
                    "rdp", 0.0, 4, 4000, 5000)
    back = wire.decode(wire.encode(info), expect=TaskInfo)
    assert back.input_shape == (64,) and back.initial_weights.shape == (650,)
    start = CohortStart("c", "p", bytes(32), 3, (1, 2), ((1, bytes(32)), (2, bytes(32))), 2, 0, "full", 0, 652, 16, 12,
                        2.0, -1.0, 0.5, 1.0, 0.25)
    assert wire.decode(wire.encode(start), expect=CohortStart) == start


def test_server_config_is_strict(tmp_path):
    from ftte.pipeline.config import ConfigError
    from ftte.pipeline.deploy_config import load_allow_list, parse_server_config

    ok = parse_server_config('[http]\nplaintext = true\n[server]\nbuffer_size = 4\n', base_dir=tmp_path)
    assert ok.http.plaintext and ok.run.server.buffer_size == 4 and ok.deploy.state == "ftte-server.db"
    for text, message in [
        ("[http]\nport = 1\n", "tls_cert and tls_key are required"),
        ("[http]\nplaintext = true\nbogus = 1\n", "unknown key 'bogus'"),
        ("[http]\nplaintext = true\n[fleet]\ndevices = 3\n", "simulated fleet"),
        ("[http]\nplaintext = true\n[run]\nstrategy = \"fedavg\"\n", "buffered"),
        ("[http]\nplaintext = true\n[secagg]\nenabled = false\n", "always aggregates securely"),
        ("[http]\nplaintext = true\n[deploy]\nnum_classes = \"ten\"\n", "[deploy] num_classes"),
        ("[http]\nplaintext = true\nrate_per_s = 0\n", "[http] rate_per_s"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            parse_server_config(text, base_dir=tmp_path)
    allow = tmp_path / "allow.txt"
    allow.write_text("# devices\n" + "ab" * 32 + " phone\n")
    assert list(load_allow_list(allow).values()) == ["phone"]
    allow.write_text("abcd\n")
    with pytest.raises(ConfigError, match="64-digit hex"):
        load_allow_list(allow)


def test_token_bucket_refills_at_its_rate():
    from ftte.pipeline.http_server import TokenBucket

    b = TokenBucket(rate=10.0, burst=2.0, tokens=2.0, updated=0.0)
    assert b.take(0.0) == 0 and b.take(0.0) == 0
    assert b.take(0.0) == pytest.approx(0.1)
    assert b.take(0.1) == 0


def test_submit_limit_fits_an_honest_upload_and_little_more():
    from ftte.pipeline.http_server import submit_limit

    dim, k = 650, 4
    limit = submit_limit(dim, k)
    upload = Submit("c-" + "0" * 16, wire.encode(__import__("ftte.secagg_messages", fromlist=["MaskedInput"]).MaskedInput(
        bytes(32), 1, np.zeros(dim + 2, np.uint32), bytes(64))))
    assert len(wire.encode(upload)) < limit < 4 * (dim + 2) + 8192


# -- the coordinator, driven directly, crashed and recovered at every point -------------------------

# Points at which the server "dies": (stage index, members that already sent that stage's message).
CRASH_POINTS = [(-1, 2), (0, 0), (0, 2), (1, 3), (2, 1), (3, 2), (4, 3), (4, 4)]


@pytest.mark.parametrize("crash_stage,crash_after", CRASH_POINTS)
def test_journal_replay_resumes_the_cohort(tmp_path, crash_stage, crash_after):
    """Members keep their client state; the server restarts from its file and the cohort completes."""
    from ftte.pipeline.http_errors import http_status
    from ftte.pipeline.refusal import Refused as ProtocolError
    from ftte.privacy.audit import verify_ledger

    signers = [Signer() for _ in range(4)]
    members = [member_id(s.public_key) for s in signers]
    clock = Clock()

    async def scenario():
        coord, db = make_coordinator(tmp_path, signers, clock)
        await coord.recover()
        alive = {"coord": coord, "db": db, "crashed": False}

        async def maybe_crash(stage: int, done: int) -> None:
            if alive["crashed"] or (stage, done) != (crash_stage, crash_after):
                return
            # SIGKILL: nothing is flushed or closed; the next server opens the same file.
            alive["crashed"] = True
            crash(alive["coord"], alive["db"])
            coord2, db2 = make_coordinator(tmp_path, signers, clock)
            await coord2.recover()
            alive["coord"], alive["db"] = coord2, db2

        async def poll(m, cid, stage):
            reply = await alive["coord"].poll(m, PollRequest(cid, stage), wait_s=5.0)
            assert not isinstance(reply, Pending), (stage, reply)
            return reply

        cid = None
        for i, m in enumerate(members):
            await maybe_crash(-1, i)
            cid = (await alive["coord"].join(m, join_request(alive["coord"], 0), wire.encode(
                join_request(alive["coord"], 0)))).cohort_id
        start = await poll(members[0], cid, 0)
        assert isinstance(start, CohortStart) and start.members == tuple(sorted(members))
        clients = {m: SecAggClient(session_params(start), m, s) for m, s in zip(members, signers)}
        codec = UpdateCodec(alive["coord"].task.dim, start.clip, start.value_bits, start.ring_bits)
        rng = np.random.default_rng(0)
        updates = {m: rng.normal(scale=0.01, size=codec.dim) for m in members}

        async def stage(index, make):
            for i, m in enumerate(members):
                await maybe_crash(index, i)
                msg = make(m)
                ack = await alive["coord"].submit(m, Submit(cid, wire.encode(msg)), 1 << 20)
                assert ack.stage == index
            await maybe_crash(index, len(members))

        await stage(0, lambda m: clients[m].advertise())
        rosters = {m: await poll(m, cid, 1) for m in members}
        await stage(1, lambda m: clients[m].share_keys(rosters[m]))
        deliveries = {m: await poll(m, cid, 2) for m in members}
        await stage(2, lambda m: clients[m].masked_input(deliveries[m], codec.encode(updates[m], 1.0, 1e-5, rng)))
        survivors = {m: await poll(m, cid, 3) for m in members}
        await stage(3, lambda m: clients[m].consistency(survivors[m]))
        bundles = {m: await poll(m, cid, 4) for m in members}
        assert all(isinstance(b, ConsistencyBundle) for b in bundles.values())
        await stage(4, lambda m: clients[m].unmask(bundles[m]))
        end = await poll(members[0], cid, 5)
        assert isinstance(end, CohortEnd) and end.status == "applied" and end.applied_version == 1, end
        assert sorted(end.included) == sorted(members)
        # A late duplicate is acknowledged idempotently, a different one refused, the cohort is over.
        with pytest.raises(ProtocolError) as refused:
            await alive["coord"].submit(members[0], Submit(cid, b"\x00"), 1 << 20)
        assert http_status(refused.value) == 409
        expected = sum(updates.values())
        got = alive["coord"].weights - alive["coord"].task.initial_subset
        await alive["coord"].drain()
        alive["db"].close()
        return expected / 4, got

    expected, got = asyncio.run(scenario())
    step = 2.0 * 4 / math.sqrt(650) / (2**11 - 1)  # quantisation step of the codec (clip 2, 12 bits)
    assert np.max(np.abs(got - expected)) < 2 * step
    result = verify_ledger(tmp_path / "state.db")
    assert result.ok and result.n_rows == 4, result.summary()


def test_a_refused_message_leaves_the_journal_untouched(tmp_path):
    from ftte.pipeline.http_errors import http_status
    from ftte.pipeline.refusal import Refused as ProtocolError

    signers = [Signer() for _ in range(4)]
    members = [member_id(s.public_key) for s in signers]
    clock = Clock()

    async def scenario():
        coord, db = make_coordinator(tmp_path, signers, clock)
        await coord.recover()
        for m in members:
            cid = (await coord.join(m, join_request(coord, 0), wire.encode(join_request(coord, 0)))).cohort_id
        start = await coord.poll(members[0], PollRequest(cid, 0), wait_s=5)
        client = SecAggClient(session_params(start), members[0], signers[0])
        before = coord.journal.entries
        bad = [
            (Submit(cid, b"\x91" * 5000 + b"\xc0"), 422),  # nested junk
            (Submit(cid, wire.encode(join_request(coord, 0))), 422),  # not a member message
            (Submit("c-nope", wire.encode(client.advertise())), 404),  # unknown cohort
        ]
        for submit, status in bad:
            with pytest.raises(ProtocolError) as refused:
                await coord.submit(members[0], submit, 1 << 20)
            assert http_status(refused.value) == status
        other = SecAggClient(session_params(start), members[1], signers[1]).advertise()
        with pytest.raises(ProtocolError) as refused:  # member 1's message posted by member 0
            await coord.submit(members[0], Submit(cid, wire.encode(other)), 1 << 20)
        assert http_status(refused.value) == 403
        with pytest.raises(ProtocolError) as refused:  # right shape, wrong stage
            roster = Roster(bytes(32), ())
            await coord.submit(members[0], Submit(cid, wire.encode(roster)), 1 << 20)
        assert http_status(refused.value) == 422
        await coord.drain()
        assert coord.journal.entries == before
        db.close()

    asyncio.run(scenario())


def test_stage_timeout_drops_the_silent_member_and_survives_a_restart(tmp_path):
    signers = [Signer() for _ in range(4)]
    members = [member_id(s.public_key) for s in signers]
    clock = Clock()

    async def scenario():
        coord, db = make_coordinator(tmp_path, signers, clock)
        await coord.recover()
        for m in members:
            cid = (await coord.join(m, join_request(coord, 0), wire.encode(join_request(coord, 0)))).cohort_id
        start = await coord.poll(members[0], PollRequest(cid, 0), wait_s=5)
        live = members[:3]
        clients = {m: SecAggClient(session_params(start), m, s) for m, s in zip(members, signers)}
        for m in live:
            await coord.submit(m, Submit(cid, wire.encode(clients[m].advertise())), 1 << 20)
        clock.now += 6.0  # past the stage timeout: the fourth member is dropped at "advertise"
        coord.tick()
        await coord.drain()
        silent = await coord.poll(members[3], PollRequest(cid, 1), wait_s=5)
        assert isinstance(silent, CohortEnd) and silent.status == "dropped"
        crash(coord, db)
        coord2, db2 = make_coordinator(tmp_path, signers, clock)  # crash + restart
        await coord2.recover()
        rosters = {m: await coord2.poll(m, PollRequest(cid, 1), wait_s=5) for m in live}
        for m in live:
            await coord2.submit(m, Submit(cid, wire.encode(clients[m].share_keys(rosters[m]))), 1 << 20)
        codec = UpdateCodec(coord2.task.dim, start.clip, start.value_bits, start.ring_bits)
        rng = np.random.default_rng(1)
        for m in live:
            d = await coord2.poll(m, PollRequest(cid, 2), wait_s=5)
            assert isinstance(d, ShareDelivery)
            msg = clients[m].masked_input(d, codec.encode(np.zeros(codec.dim), 1.0, 0.0, rng))
            await coord2.submit(m, Submit(cid, wire.encode(msg)), 1 << 20)
        for m in live:
            s = await coord2.poll(m, PollRequest(cid, 3), wait_s=5)
            assert isinstance(s, SurvivorList)
            await coord2.submit(m, Submit(cid, wire.encode(clients[m].consistency(s))), 1 << 20)
        for m in live:
            b = await coord2.poll(m, PollRequest(cid, 4), wait_s=5)
            await coord2.submit(m, Submit(cid, wire.encode(clients[m].unmask(b))), 1 << 20)
        end = await coord2.poll(members[0], PollRequest(cid, 5), wait_s=5)
        await coord2.drain()
        record = coord2.db.call_sync(lambda: coord2.db.state.cohort_records())[-1]
        db2.close()
        return end, record

    end, record = asyncio.run(scenario())
    assert end.status == "applied" and len(end.included) == 3
    assert record["dropped"] == {str(members[3]): "advertise"}
    assert json.dumps(record)  # plain JSON, as committed


def test_rounds_reported_late_reach_the_ledger_before_the_round(tmp_path):
    """A device that died after training reports that round with its next join: the ledger
    then composes to exactly what the device's own accountant holds."""
    import dataclasses

    from ftte.privacy.accountant import PrivacyStep, compute_epsilon
    from ftte.privacy.audit import verify_ledger
    from ftte.privacy.ledger import Ledger

    from ftte.deploy_messages import SpentRound

    signers = [Signer() for _ in range(4)]
    members = [member_id(s.public_key) for s in signers]
    late = SpentRound(2, 0.05, 1.0, 1.0, 1e-5)

    async def scenario():
        coord, db = make_coordinator(tmp_path, signers, Clock())
        await coord.recover()
        joins = {m: join_request(coord, 0) for m in members}
        joins[members[0]] = dataclasses.replace(joins[members[0]], round_seq=3,
                                                unreported=((1, wire.encode(late)), (2, wire.encode(late))))
        end = await drive_cohort(coord, signers, joins)
        bad = dataclasses.replace(join_request(coord, 1), round_seq=2, unreported=((2, wire.encode(late)),))
        from ftte.pipeline.refusal import Refused as ProtocolError

        with pytest.raises(ProtocolError):  # a late round must come before this one
            await coord.join(members[0], bad, wire.encode(bad))
        await coord.drain()
        db.close()
        return end

    end = asyncio.run(scenario())
    assert end.status == "applied"
    result = verify_ledger(tmp_path / "state.db")
    assert result.ok and result.n_rows == 6, result.summary()
    rows = [e.row for e in Ledger(tmp_path / "state.db").entries() if e.row.device_id == str(members[0])]
    assert [r.cohort_id for r in rows] == ["unmerged", "unmerged", end.cohort_id]
    device_eps = compute_epsilon([PrivacyStep(1.0, 0.05, 2)] * 3, 1e-5, "rdp")
    assert rows[-1].epsilon_total == pytest.approx(device_eps, rel=1e-12)


def test_an_emptied_forming_cohort_is_forgotten(tmp_path):
    from ftte.deploy_messages import LeaveRequest

    signers = [Signer() for _ in range(4)]
    m = member_id(signers[0].public_key)

    async def scenario():
        coord, db = make_coordinator(tmp_path, signers, Clock())
        await coord.recover()
        cid = (await coord.join(m, join_request(coord, 0), wire.encode(join_request(coord, 0)))).cohort_id
        await coord.leave(m, LeaveRequest(cid))
        assert coord.forming is None and cid not in coord.live
        rows = coord.db.call_sync(lambda: coord.db.conn.execute("SELECT COUNT(*) FROM deploy_journal").fetchone()[0])
        cid2 = (await coord.join(m, join_request(coord, 0), wire.encode(join_request(coord, 0)))).cohort_id
        await coord.drain()
        db.close()
        return rows, cid, cid2

    rows, cid, cid2 = asyncio.run(scenario())
    assert rows == 0 and cid2 != cid


@pytest.mark.parametrize("secagg", ["graph = \"ring\"\nneighbors = 4", "graph = \"full\"\nthreshold = 6"])
def test_every_cohort_size_can_form_a_session(tmp_path, secagg):
    """From the deadline's minimum to the buffer size: a small ring cohort falls back to the full graph."""
    from ftte.pipeline.coordinator import Coordinator
    from ftte.pipeline.deploy_config import parse_server_config
    from ftte.pipeline.deploy_task import build_task

    text = CONFIG.replace("buffer_size = 4", "buffer_size = 10").replace("clip = 2.0", f"clip = 2.0\n{secagg}")
    coord = Coordinator(build_task(parse_server_config(text, base_dir=tmp_path)), None, {})  # type: ignore[arg-type]
    coord.check_sessions()


def test_edge_reports_rounds_the_server_never_heard_of(tmp_path):
    """The client's bookkeeping: rounds whose join was never acknowledged go with the next join."""
    from ftte.edge.http_client import EdgeClient
    from ftte.privacy.accountant import AccountantStore, PrivacyStep
    from ftte.privacy.dpsgd import DPConfig

    class NoTransport:
        def close(self) -> None:
            pass

    signer = Signer()
    client = EdgeClient("https://unused", signer, np.zeros((4, 64), np.float32), np.zeros(4, np.int64),
                        state_dir=tmp_path, transport=NoTransport())  # type: ignore[arg-type]
    device = str(client.member)
    client.store = AccountantStore(tmp_path / "accountant.db")
    client.dp = DPConfig(accountant="rdp", epsilon_max=100.0)
    client.store.register(device, accountant="rdp", delta=1e-5)
    for _ in range(3):
        client.store.record(device, PrivacyStep(1.0, 0.05, 2))
    seq, late = client._late_rounds()
    assert seq == 3 and [i for i, _ in late] == [1, 2] and late[0][1].delta == 1e-5
    client._mark_reported({3, 1, 2}, True)  # the join was acknowledged
    client.store.record(device, PrivacyStep(1.0, 0.05, 2))
    assert client._late_rounds() == (4, [])
    client._mark_reported({4}, True)
    client._mark_reported({4}, False)  # ... then the device left that cohort before it started
    client.store.record(device, PrivacyStep(1.0, 0.05, 2))
    seq, late = client._late_rounds()
    assert seq == 5 and [i for i, _ in late] == [4]
    fresh = EdgeClient("https://unused", signer, np.zeros((4, 64), np.float32), np.zeros(4, np.int64),
                       state_dir=tmp_path, transport=NoTransport())  # type: ignore[arg-type]
    assert fresh._reported() == {1, 2, 3}  # survives a restart of the device
    client.close()


def test_edge_refuses_weights_that_do_not_match_the_plan(tmp_path):
    import dataclasses

    from ftte.edge.http_client import EdgeClient, ModelMismatch
    from ftte.round_messages import ModelPull
    from ftte.pipeline.deploy_config import parse_server_config
    from ftte.pipeline.deploy_task import build_task

    task = build_task(parse_server_config(CONFIG, base_dir=tmp_path))
    signer = Signer()
    info = task.task_info(member_id(signer.public_key), 5.0, 5.0)
    w = task.initial_subset.astype(np.float32)
    good = ModelPull(0, task.plan.plan_id, edge_model_hash(task.plan.plan_id, w), w)

    class Canned:
        def __init__(self) -> None:
            self.replies: list = [info]

        def call(self, endpoint, msg, expect, **kw):
            return self.replies.pop(0)

        def close(self) -> None:
            pass

    transport = Canned()
    client = EdgeClient("https://unused", signer, np.zeros((4, 64), np.float32), np.zeros(4, np.int64),
                        state_dir=tmp_path / "dev", transport=transport)  # type: ignore[arg-type]
    client.connect()
    transport.replies = [good]
    assert client.pull().version == 0
    tampered = w.copy()
    tampered[0] += 1.0
    for bad in (dataclasses.replace(good, weights=tampered),  # weights that are not the announced ones
                dataclasses.replace(good, plan_id="plan-0000000000000000"),  # another plan
                dataclasses.replace(good, weights=w[:-1], model_hash=edge_model_hash(task.plan.plan_id, w[:-1]))):
        transport.replies = [bad]
        with pytest.raises(ModelMismatch):
            client.pull()
    client.close()

    other = EdgeClient("https://unused", signer, np.zeros((4, 64), np.float32), np.zeros(4, np.int64),
                       state_dir=tmp_path / "dev2", transport=Canned(),  # type: ignore[arg-type]
                       model_factory=lambda t: __import__("ftte.edge.models", fromlist=["mlp"]).mlp())
    with pytest.raises(ModelMismatch, match="does not fit"):
        other.connect()  # the task's logistic plan on an MLP
    other.close()


def test_device_refuses_cohorts_with_unpinned_peers_or_too_few_members():
    """A malicious server must not be able to surround a device with identities it controls."""
    from ftte.protocol.cohort import CohortRefused, DevicePolicy, check_cohort
    from ftte.deploy_messages import CohortStart, TaskInfo

    me, peer, other, stranger = b"\x01" * 32, b"\x02" * 32, b"\x04" * 32, b"\x03" * 32
    task = TaskInfo(1, "{}", "logistic", "{}", (64,), 10, np.zeros(1, np.float32), 1, 1, 1.0, 1, 1.0, 1.0, 0.0,
                    "rdp", 0.0, 4, 1000, 1000, clip=2.0, value_bits=12, staleness_exponent=0.5,
                    variance_penalty=1.0, r_min=0.25, max_corrupt=1)

    def start(keys):
        members = tuple(range(1, len(keys) + 1))
        return CohortStart("c", "p", bytes(32), 3, members, tuple(zip(members, keys)), len(keys), 0, "full", 0, 652,
                           16, 12, 2.0, -1.0, 0.5, 1.0, 0.25, max_corrupt=1)

    common = dict(member=1, identity_key=me, plan_id="p", base_version=3, coordinates=650)
    pinned = DevicePolicy(trusted_keys=frozenset({me, peer, other}))
    check_cohort(start([me, peer, other]), task, pinned, **common)  # pinned peers: accepted
    with pytest.raises(CohortRefused, match="trusted"):
        check_cohort(start([me, stranger, other]), task, pinned, **common)
    with pytest.raises(CohortRefused, match="at least 4"):
        check_cohort(start([me, peer, other]), task, DevicePolicy(min_members=4), **common)
    check_cohort(start([me, stranger, other]), task, DevicePolicy(), **common)  # unpinned: the server's list

"""Hostile input against a live server while honest devices keep training.

Unsigned, unknown-key, bad-signature, stale, replayed, oversized (declared and streamed),
deeply nested, wrong-type and wrong-shape requests are all refused with the right status;
the wrong-shape upload comes from a real cohort member and leaves its slot untouched, so
the same member's honest upload is accepted afterwards and the cohort is applied with it.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest
from deploy_helpers import (
    EdgeFleet,
    ServerProcess,
    check_run,
    digits_split,
    free_port,
    make_devices,
    make_pki,
    settle,
    start_edge,
    wait_for,
    write_server_config,
)

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from ftte.crypto.primitives import Signer
from ftte.crypto.secagg_client import SecAggClient, sign_message
from ftte.protocol.cohort import session_params
from ftte.protocol.encoding import UpdateCodec
from ftte.edge.http_client import RetryPolicy, ServerRefused, Transport
from ftte.edge.plan import SubsetPlan

from ftte import wire
from ftte.http_auth import (
    HEADER_DEVICE,
    HEADER_SIGNATURE,
    signed_headers,
)
from ftte.secagg_messages import (
    ConsistencyBundle,
    Roster,
    ShareDelivery,
    SurvivorList,
)
from ftte.round_messages import ModelPull
from ftte.deploy_messages import (
    Ack,
    CohortEnd,
    CohortStart,
    ErrorReply,
    JoinReply,
    JoinRequest,
    Pending,
    PollRequest,
    PullRequest,
    Submit,
    TaskInfo,
    TaskRequest,
)


def signed(signer: Signer, path: str, body: bytes, *, t_ms: int | None = None, nonce: str | None = None) -> dict:
    t_ms = int(time.time() * 1000) if t_ms is None else t_ms
    return signed_headers(signer.sign, signer.public_key.hex(), path, body, time_ms=t_ms, nonce_hex=nonce)


def code_of(r: httpx.Response) -> str:
    return wire.decode(r.content, expect=ErrorReply).code


class Hostile:
    """An allow-listed device that speaks the protocol by hand, so it can also break it."""

    def __init__(self, server: ServerProcess, signer: Signer) -> None:
        self.signer = signer
        self.http = httpx.Client(base_url=server.url, verify=server.ssl_context(), timeout=30)
        self.t = Transport(server.url, signer, verify=str(server.ca), retry=RetryPolicy(patience_s=30))

    def post(self, path: str, body: bytes, **kw) -> httpx.Response:
        return self.http.post(path, content=body, headers=signed(self.signer, path, body, **kw))

    def close(self) -> None:
        self.http.close()
        self.t.close()


def test_hostile_requests_are_refused_while_honest_devices_train(tmp_path):
    pki = make_pki(tmp_path / "pki")
    files, test_file, _, _ = digits_split(tmp_path / "data", 4)
    devices, allow = make_devices(tmp_path / "keys", files, extra_keys=2)
    honest, attacker, flooder = devices[:4], devices[4], devices[5]
    port = free_port()
    db = tmp_path / "state" / "server.db"
    cfg = write_server_config(tmp_path / "server.toml", pki=pki, allow=allow, state=db, port=port, test_data=test_file,
                              local_steps=2, batch_size=32, lr=1.0, stage_timeout_s=3.0, deadline_s=3.0,
                              poll_wait_s=2.0, rate_per_s=20.0, rate_burst=40)
    server = ServerProcess(cfg, port, tmp_path / "server.log", pki.ca_cert)
    fleet = EdgeFleet(tmp_path / "fleet")
    server.start()
    # Three forked devices and one real `ftte edge` process.
    edges = [fleet.spawn(server, d, tmp_path / "edges", rounds=1000, seed=i, join_patience=15.0)
             for i, d in enumerate(honest[:3])]
    edges.append(start_edge(server, honest[3], tmp_path / "edges", rounds=1000, seed=3, join_patience=15.0))
    bad = Hostile(server, attacker.signer)
    outsider = Hostile(server, Signer())
    try:
        wait_for(lambda: server.metrics()["version"] >= 1, 180, 0.2, "a first version")
        v_before = server.metrics()["version"]
        pull = wire.encode(PullRequest("plan"))

        # -- authentication ------------------------------------------------------------------
        r = bad.http.post("/v1/pull", content=pull)
        assert r.status_code == 401 and code_of(r) == "unsigned"
        r = outsider.post("/v1/pull", pull)
        assert r.status_code == 401 and code_of(r) == "unknown_device"
        headers = signed(attacker.signer, "/v1/pull", pull)
        headers[HEADER_SIGNATURE] = ("0" if headers[HEADER_SIGNATURE][0] != "0" else "1") + headers[HEADER_SIGNATURE][1:]
        r = bad.http.post("/v1/pull", content=pull, headers=headers)
        assert r.status_code == 401 and code_of(r) == "bad_signature"
        r = bad.http.post("/v1/pull", content=wire.encode(PullRequest("other")), headers=signed(attacker.signer, "/v1/pull", pull))
        assert r.status_code == 401 and code_of(r) == "bad_signature"  # body swapped under a valid signature
        r = bad.http.post("/v1/task", content=pull, headers=signed(attacker.signer, "/v1/pull", pull))
        assert r.status_code == 401  # signature made for another path
        headers = signed(attacker.signer, "/v1/pull", pull)
        headers[HEADER_DEVICE] = "zz" * 32
        r = bad.http.post("/v1/pull", content=pull, headers=headers)
        assert r.status_code == 401 and code_of(r) == "bad_auth_headers"

        # -- replay and stale timestamps -------------------------------------------------------
        task = wire.encode(TaskRequest("hostile"))
        headers = signed(attacker.signer, "/v1/task", task)
        first = bad.http.post("/v1/task", content=task, headers=headers)
        again = bad.http.post("/v1/task", content=task, headers=headers)
        assert first.status_code == 200 and again.status_code == 409 and code_of(again) == "replay"
        r = bad.post("/v1/task", task, t_ms=int(time.time() * 1000) - 600_000)
        assert r.status_code == 400 and code_of(r) == "stale_timestamp"
        r = bad.post("/v1/task", task, t_ms=int(time.time() * 1000) + 600_000)
        assert r.status_code == 400 and code_of(r) == "stale_timestamp"

        # -- size limits ----------------------------------------------------------------------------
        big = b"\x00" * (200 * 1024)
        r = bad.post("/v1/join", big)
        assert r.status_code == 413 and code_of(r) == "too_large"

        def chunks():
            for _ in range(40):
                yield b"\x00" * 4096

        body = b"".join(chunks())
        r = bad.http.post("/v1/join", content=chunks(), headers=signed(attacker.signer, "/v1/join", body))
        assert r.status_code == 413  # no Content-Length: cut off while streaming
        r = bad.post("/v1/submit", b"\x00" * (10 << 20))
        assert r.status_code == 413

        # -- malformed bodies -----------------------------------------------------------------------
        for body in (b"\x91" * 60_000 + b"\xc0",  # nested past msgpack's stack limit
                     b"\x91" * 500 + b"\xc0",  # nested, parseable, not a message
                     b"\xc1garbage",
                     wire.encode(PullRequest("x")),  # a valid message of the wrong type for /join
                     b"\x94\x02\x2a\x01\x02"):  # unsupported schema version
            r = bad.post("/v1/join", body)
            assert r.status_code == 422 and code_of(r) == "malformed", (body[:8], r.status_code)

        # -- a real member that uploads the wrong shape, then the right one ----------------------
        info = bad.t.call("task", TaskRequest("hostile"), (TaskInfo,))
        plan = SubsetPlan.from_json(info.plan_json)
        model = bad.t.call("pull", PullRequest(plan.plan_id), (ModelPull,))
        join = JoinRequest(plan_id=plan.plan_id, base_version=model.version, model_hash=model.model_hash,
                           steps=info.local_steps, sample_rate=0.1, noise_multiplier=info.noise_multiplier,
                           max_grad_norm=info.max_grad_norm, accountant=info.accountant, delta=1e-5,
                           epsilon_max=1000.0, rng_source="test", torch_version="t", opacus_version="o",
                           ftte_version="f")
        with pytest.raises(ServerRefused) as refused:
            bad.t.call("join", dataclasses.replace(join, model_hash=bytes(32)), (JoinReply,))
        assert refused.value.status == 409 and refused.value.code == "model_mismatch"
        with pytest.raises(ServerRefused) as refused:
            bad.t.call("join", dataclasses.replace(join, noise_multiplier=0.01), (JoinReply,))
        assert refused.value.status == 422 and refused.value.code == "dp_mismatch"
        cid = bad.t.call("join", join, (JoinReply,)).cohort_id

        def poll(stage, want):
            while True:
                reply = bad.t.call("poll", PollRequest(cid, stage), (want, CohortEnd, Pending), read_timeout_s=30)
                if not isinstance(reply, Pending):
                    assert isinstance(reply, want), reply
                    return reply

        start = poll(0, CohortStart)
        client = SecAggClient(session_params(start), info.member, attacker.signer)

        def submit(msg):
            return bad.t.call("submit", Submit(cid, wire.encode(msg)), (Ack,))

        submit(client.advertise())
        submit(client.share_keys(poll(1, Roster)))
        delivery = poll(2, ShareDelivery)
        codec = UpdateCodec(plan.num_coordinates, start.clip, start.value_bits, start.ring_bits)
        # the weight an honest member would use (the server refuses a cohort whose weights no honest
        # members could produce: with the version moved on since the join, 1.0 would be a lie)
        weight = (1.0 + start.close_version - join.base_version) ** -start.staleness_exponent
        vector = codec.encode(np.zeros(plan.num_coordinates), weight, 0.0, np.random.default_rng(0))
        honest_upload = client.masked_input(delivery, vector)
        short = sign_message(attacker.signer, dataclasses.replace(honest_upload, vector=honest_upload.vector[:-1]))
        wide = sign_message(attacker.signer, dataclasses.replace(
            honest_upload, vector=honest_upload.vector.astype(np.uint32 if start.ring_bits == 16 else np.uint16)))
        forged = dataclasses.replace(honest_upload, signature=bytes(64))
        for msg, code in ((short, "bad_shape"), (wide, "bad_shape"), (forged, "bad_message_signature")):
            with pytest.raises(ServerRefused) as refused:
                submit(msg)
            assert refused.value.status == 422 and refused.value.code == code
        with pytest.raises(ServerRefused) as refused:  # a message naming another member
            submit(dataclasses.replace(honest_upload, member=honest_upload.member + 1))
        assert refused.value.status == 403
        assert submit(honest_upload).stage == 2  # the refused ones left the slot free
        submit(client.consistency(poll(3, SurvivorList)))
        submit(client.unmask(poll(4, ConsistencyBundle)))
        end = poll(5, CohortEnd)
        assert end.status == "applied" and info.member in end.included, end

        # -- rate limit --------------------------------------------------------------------------------
        # Several connections at once, so that the flood outruns the bucket's refill however slow
        # this (shared) machine is; it stops at the first 429 or after 1,000 requests.
        flood = [Hostile(server, flooder.signer) for _ in range(6)]
        body = wire.encode(PullRequest(plan.plan_id))
        statuses = [flood[0].post("/v1/pull", body).status_code]
        limited = threading.Event()

        def hammer(h: Hostile) -> None:
            for _ in range(170):
                if limited.is_set():
                    return
                code = h.post("/v1/pull", body).status_code
                statuses.append(code)
                if code == 429:
                    limited.set()

        threads = [threading.Thread(target=hammer, args=(h,)) for h in flood]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for h in flood:
            h.close()
        assert 429 in statuses and statuses[0] == 200

        # -- and the honest devices kept going --------------------------------------------------------
        wait_for(lambda: server.metrics()["version"] >= v_before + 3, 120, 0.2, "honest progress")
        metrics = server.metrics()
        for e in edges:
            e.kill()
        settle(server)
    finally:
        bad.close()
        outsider.close()
        for e in edges:
            e.kill()
        fleet.close()
        server.stop()
    assert metrics["statuses"].get("429", 0) >= 1 and metrics["statuses"].get("401", 0) >= 5
    assert metrics["devices_seen"] == 6  # 4 honest, the attacker, the flooder; never the outsider
    check_run(db, edges)

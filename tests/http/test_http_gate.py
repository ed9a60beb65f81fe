"""The HTTP gate under attack, on real sockets (issue 10, finding 7).

Each test starts the real app (coordinator, SQLite journal, :class:`Gate`, Starlette,
uvicorn with TLS) in this process on 127.0.0.1, so that it can look at the gate's tables
while an attacker talks HTTPS to it:

* a nonce flood from one device does not block another device (limits are charged before
  a nonce is stored, and nonces are kept per device with a bounded quota);
* requests that merely claim a public key are limited before their body is read or their
  signature checked;
* a timestamp of non-ASCII digits gets 400, not 500;
* ``/v1/metrics`` is off by default, and Prometheus text when the operator turns it on.
"""

from __future__ import annotations

import os
import ssl
import threading
import time
from pathlib import Path

import pytest
from deploy_helpers import free_port, make_devices, make_pki, write_server_config

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from ftte.crypto.primitives import Signer
from ftte.pipeline.coordinator import Coordinator
from ftte.pipeline.deploy_config import load_allow_list, load_server_config
from ftte.pipeline.deploy_task import build_task
from ftte.pipeline.http_server import Gate, build_app
from ftte.pipeline.journal import Database

from ftte import wire
from ftte.deploy_messages import ErrorReply, JoinRequest, TaskInfo, TaskRequest
from ftte.http_auth import HEADER_TIME, member_id, signed_headers


class LiveServer:
    """The deployment's app served by uvicorn over TLS from a thread of the test process."""

    def __init__(self, tmp: Path, *, metrics: bool | None = None, rate_per_s: float = 5.0, rate_burst: int = 10) -> None:
        self.pki = make_pki(tmp / "pki")
        self.devices, allow = make_devices(tmp / "keys", [], extra_keys=3)
        self.port = free_port()
        db_path = tmp / "state" / "server.db"
        db_path.parent.mkdir(parents=True, exist_ok=True)
        cfg = write_server_config(tmp / "server.toml", pki=self.pki, allow=allow, state=db_path, port=self.port,
                                  test_data=None, rate_per_s=rate_per_s, rate_burst=rate_burst,
                                  metrics=bool(metrics))
        settings = load_server_config(cfg)
        keys = load_allow_list(settings.path(settings.deploy.allow_list))
        self.db = Database(settings.path(settings.deploy.state), settings.path(settings.deploy.ledger_key),
                           settings.deploy.synchronous)
        self.db.open()
        coordinator = Coordinator(build_task(settings), self.db, {member_id(k): k for k in keys})
        self.gate = Gate(settings.http, keys)
        app, self.api = build_app(coordinator, self.gate, settings.http, metrics=metrics)
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on",
                                access_log=False, ssl_certfile=str(self.pki.server_cert),
                                ssl_keyfile=str(self.pki.server_key))
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the in-process server did not start")
            time.sleep(0.05)
        self.http = httpx.Client(base_url=f"https://127.0.0.1:{self.port}", timeout=30,
                                 verify=ssl.create_default_context(cafile=str(self.pki.ca_cert)))

    def post(self, signer: Signer, path: str, body: bytes, **override: object) -> httpx.Response:
        headers = signed_headers(signer.sign, signer.public_key.hex(), path, body, time_ms=int(time.time() * 1000))
        headers.update(override)
        return self.http.post(path, content=body, headers=headers)

    def close(self) -> None:
        self.http.close()
        self.server.should_exit = True
        self.thread.join(timeout=20)
        self.db.close()


@pytest.fixture()
def live(tmp_path):
    server = LiveServer(tmp_path)
    try:
        yield server
    finally:
        server.close()


def code_of(r: httpx.Response) -> str:
    return wire.decode(r.content, expect=ErrorReply).code


TASK = wire.encode(TaskRequest("gate-test"))


def test_nonce_flood_from_one_device_does_not_block_another(live):
    flooder, other = live.devices[0].signer, live.devices[1].signer
    a, b = member_id(flooder.public_key), member_id(other.public_key)
    t0 = time.monotonic()
    statuses = [live.post(flooder, "/v1/task", TASK).status_code for _ in range(150)]
    elapsed = time.monotonic() - t0
    admitted = statuses.count(200)
    assert set(statuses) <= {200, 429}, sorted(set(statuses))
    # the limit is charged before the nonce is stored: a refused request leaves nothing behind
    assert admitted <= 10 + 5.0 * elapsed + 1 and statuses.count(429) >= 100
    assert len(live.gate.nonces[a]) == admitted
    assert live.gate.nonces_held == admitted
    r = live.post(other, "/v1/task", TASK)
    assert r.status_code == 200 and wire.decode(r.content, expect=TaskInfo).member == b

    # The per-device quota is a backstop (for instance if the clock jumps): pretend the
    # flooder's table is at its quota and its bucket full again; only the flooder is refused.
    live.gate.nonce_quota = len(live.gate.nonces[a])
    live.gate.buckets[a].tokens = live.gate.buckets[a].burst
    r = live.post(flooder, "/v1/task", TASK)
    assert r.status_code == 429 and "replay window" in wire.decode(r.content, expect=ErrorReply).detail
    assert len(live.gate.nonces[a]) == live.gate.nonce_quota
    live.gate.nonce_quota = 10_000
    assert live.post(other, "/v1/task", TASK).status_code == 200


def test_claimed_key_is_limited_before_body_reads_and_signature_checks(live):
    """Public keys are broadcast; anyone may put one in a header. Such claims cost at most the
    key's unverified burst in body reads and Ed25519 checks, then 429 before the body."""
    victim = live.devices[2].signer
    impostor = Signer()
    join_sized = os.urandom(60 * 1024)
    checks_before = live.gate.signature_checks
    t0 = time.monotonic()
    statuses = []
    for _ in range(100):
        headers = signed_headers(impostor.sign, victim.public_key.hex(), "/v1/join", join_sized,
                                 time_ms=int(time.time() * 1000))
        statuses.append(live.http.post("/v1/join", content=join_sized, headers=headers).status_code)
    elapsed = time.monotonic() - t0
    checked = live.gate.signature_checks - checks_before
    assert set(statuses) <= {401, 429} and statuses.count(429) >= 70, statuses
    assert checked == statuses.count(401) and checked <= 10 + 5.0 * elapsed + 1
    assert live.gate.nonces_held == 0
    # the claims drained only the victim key's unverified bucket, which refills: the real
    # device then gets through (and its authentic requests refund what they took)
    time.sleep(2.5)
    r = live.post(victim, "/v1/task", TASK)
    assert r.status_code == 200, r.status_code


@pytest.mark.parametrize("stamp", ["\xb2", "\xb9\xb2\xb3", "1" * 12 + "\xb2"])
def test_non_ascii_digit_timestamp_gets_400_not_500(live, stamp):
    assert stamp.isdigit()  # the trap: str.isdigit() accepts superscripts, int() does not
    device = live.devices[0].signer
    r = live.post(device, "/v1/task", TASK, **{HEADER_TIME: stamp.encode("latin-1")})
    assert r.status_code == 400 and code_of(r) == "bad_timestamp"
    assert live.post(device, "/v1/task", TASK).status_code == 200  # and the server is fine


def test_metrics_are_off_by_default(live):
    r = live.http.get("/v1/metrics")
    assert r.status_code == 404
    assert "devices" not in r.text
    assert live.http.get("/v1/metrics", params={"format": "json"}).status_code == 404
    assert live.http.get("/v1/health").status_code == 200


def test_metrics_when_enabled_are_prometheus_text(tmp_path):
    server = LiveServer(tmp_path, metrics=True)
    try:
        device = server.devices[0].signer
        assert server.post(device, "/v1/task", TASK).status_code == 200
        assert server.post(device, "/v1/join", wire.encode(TaskRequest("x"))).status_code == 422
        r = server.http.get("/v1/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
        lines = r.text.splitlines()
        assert "# TYPE ftte_http_requests_total counter" in lines
        assert 'ftte_http_requests_total{route="task"} 1.0' in lines
        assert 'ftte_http_responses_total{status="422"} 1.0' in lines
        assert "ftte_devices_allowed 3.0" in lines
        samples = [ln for ln in lines if ln and not ln.startswith("#")]
        for ln in samples:  # every sample is `name{labels} value` with a parseable value
            name, value = ln.rsplit(" ", 1)
            float(value)
            assert name.split("{")[0].replace("_", "a").isalnum()
        doc = server.http.get("/v1/metrics", params={"format": "json"}).json()
        assert doc["devices_seen"] == 1 and doc["statuses"] == {"200": 1, "422": 1}
    finally:
        server.close()


def test_large_bodies_are_decoded_off_the_event_loop(tmp_path, monkeypatch):
    """A body above the inline threshold is hashed and decoded in a worker thread: while a
    slow decode runs, the event loop still answers /health at once."""
    import ftte.pipeline.http_server as http_server

    monkeypatch.setattr(http_server, "OFF_LOOP_BYTES", 1024)
    server = LiveServer(tmp_path)
    real_decode = wire.decode
    started = threading.Event()

    def slow_decode(data, expect=None, max_bytes=wire.MAX_MESSAGE_BYTES):
        if len(data) >= 1024:
            started.set()
            time.sleep(1.5)
        return real_decode(data, expect, max_bytes)

    monkeypatch.setattr(http_server.wire, "decode", slow_decode)
    try:
        device = server.devices[0].signer
        join = wire.encode(JoinRequest("p" * 16, 1, b"h" * 32, 1, 0.01, 1.0, 1.0, "rdp", 1e-5, 0.0, "r" * 1500,
                                       "t", "o", "f", 1, ()))
        result = {}
        worker = threading.Thread(target=lambda: result.setdefault("r", server.post(device, "/v1/join", join)))
        worker.start()
        assert started.wait(10)
        t0 = time.monotonic()
        health = server.http.get("/v1/health")
        assert health.status_code == 200 and time.monotonic() - t0 < 1.0
        worker.join(20)
        assert result["r"].status_code in (200, 400, 404, 409, 422)
    finally:
        server.close()

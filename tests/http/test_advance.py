"""``/v1/enter`` and ``/v1/advance``: a request and the server's next message in one round trip.

Each test starts the real app (coordinator, SQLite journal, gate, Starlette, uvicorn with
TLS) in this process on 127.0.0.1 and runs three real :class:`EdgeClient` devices in
threads against it over HTTPS:

* an honest round takes 7 requests per device (pull, enter: the join and the start, five
  advances) on one kept-alive TLS connection, and is applied;
* a server that piggy-backs a replayed message (the roster of the device's previous cohort),
  a tampered roster, or the end of another cohort on an advance reply, or a cohort start
  outside the task's terms on an enter reply, gets nothing from the device: it refuses the
  message, counts itself dropped and never uploads;
* an advance request is authenticated and replay-protected like every other request, and a
  message naming another member is refused before anything is stored;
* against a server without ``/enter`` and ``/advance`` the device falls back to join, submit
  and poll.
"""

from __future__ import annotations

import dataclasses
import ssl
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from deploy_helpers import digits_split, free_port, make_devices, make_pki, write_server_config

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from ftte.crypto.stages import Stage  # noqa: E402
from ftte.edge.http_client import EdgeClient, RetryPolicy  # noqa: E402
from ftte.pipeline import http_server  # noqa: E402
from ftte.pipeline.coordinator import Coordinator  # noqa: E402
from ftte.pipeline.deploy_config import load_allow_list, load_server_config  # noqa: E402
from ftte.pipeline.deploy_task import build_task  # noqa: E402
from ftte.pipeline.http_server import Gate, build_app  # noqa: E402
from ftte.pipeline.journal import Database  # noqa: E402
from ftte.secagg_messages import AdvertiseKeys, Roster  # noqa: E402

from ftte import wire  # noqa: E402
from ftte.deploy_messages import Advance, CohortEnd, CohortStart, ErrorReply  # noqa: E402
from ftte.http_auth import member_id, signed_headers  # noqa: E402

N = 3


class Deployment:
    """The app served by uvicorn over TLS from a thread, and three devices' keys and data."""

    def __init__(self, tmp: Path) -> None:
        self.pki = make_pki(tmp / "pki")
        files, _, _, _ = digits_split(tmp / "data", N)
        self.devices, allow = make_devices(tmp / "keys", files)
        self.port = free_port()
        db_path = tmp / "state" / "server.db"
        db_path.parent.mkdir(parents=True, exist_ok=True)
        cfg = write_server_config(tmp / "server.toml", pki=self.pki, allow=allow, state=db_path, port=self.port,
                                  test_data=None, buffer_size=N, deadline_s=120.0, stage_timeout_s=3.0,
                                  local_steps=2, poll_wait_s=20.0)
        settings = load_server_config(cfg)
        keys = load_allow_list(settings.path(settings.deploy.allow_list))
        self.db = Database(settings.path(settings.deploy.state), settings.path(settings.deploy.ledger_key),
                           settings.deploy.synchronous)
        self.db.open()
        self.coordinator = Coordinator(build_task(settings), self.db, {member_id(k): k for k in keys})
        self.gate = Gate(settings.http, keys)
        app, self.api = build_app(self.coordinator, self.gate, settings.http, metrics=True)
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on",
                                access_log=False, ssl_certfile=str(self.pki.server_cert),
                                ssl_keyfile=str(self.pki.server_key), timeout_keep_alive=60)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the in-process server did not start")
            time.sleep(0.05)
        self.url = f"https://127.0.0.1:{self.port}"
        self.tmp = tmp

    def client(self, i: int) -> EdgeClient:
        import csv

        with open(self.devices[i].data_file) as fh:
            rows = list(csv.reader(fh))[1:]
        data = np.array(rows, dtype=np.float32)
        return EdgeClient(self.url, self.devices[i].signer, data[:, :-1], data[:, -1].astype(np.int64),
                          state_dir=self.tmp / f"device{i}", epsilon_max=1000.0, verify=str(self.pki.ca_cert),
                          retry=RetryPolicy(base_s=0.05, patience_s=30.0), join_patience_s=60.0, seed=i)

    def run(self, rounds: int) -> tuple[list[list], list[EdgeClient]]:
        """``rounds`` rounds on every device at once; (each device's results, the clients, closed)."""
        clients: list[EdgeClient] = [None] * N  # type: ignore[list-item]
        results: list[list] = [[] for _ in range(N)]
        errors: list[BaseException] = []

        def go(i: int) -> None:
            clients[i] = self.client(i)  # built in its thread, like its accountant's SQLite connection
            try:
                results[i] = clients[i].run(rounds=rounds)
            except BaseException as exc:  # surfaced below
                errors.append(exc)
            finally:
                clients[i].close()  # in its own thread: SQLite connections stay with their thread

        threads = [threading.Thread(target=go, args=(i,)) for i in range(N)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=240)
        assert not errors, errors
        assert all(not t.is_alive() for t in threads)
        return results, clients

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
        self.db.close()


@pytest.fixture()
def deployment(tmp_path):
    d = Deployment(tmp_path)
    try:
        yield d
    finally:
        d.close()


def _rebuild_routes(deployment: Deployment) -> None:
    """The app binds its handlers when it is built: bind them again (after a handler was patched)."""
    deployment.server.config.app.router.routes[:] = deployment.api.routes()


def _tamper_advance(monkeypatch, deployment: Deployment, victim: int, change, handler: str = "_advance") -> list:
    """Make the server's ``/advance`` (or ``handler``) pass its reply to the victim through ``change``."""
    original = getattr(http_server.DeviceApi, handler)
    seen: list = []

    async def evil(self, member, msg, raw):
        reply = await original(self, member, msg, raw)
        if member != victim:
            return reply
        out = change(reply)
        seen.append((type(reply).__name__, out is not reply))
        return out

    monkeypatch.setattr(http_server.DeviceApi, handler, evil)
    _rebuild_routes(deployment)
    return seen


def test_an_honest_round_is_seven_requests_on_one_connection(deployment):
    results, clients = deployment.run(rounds=2)
    for per_device, client in zip(results, clients):
        assert [r.status for r in per_device] == ["applied", "applied"], per_device
        # task once, then per round: pull, enter (join + the cohort start), five advances
        assert client.transport.requests == 1 + 2 * 7
        assert client.transport.connections == 1  # one TLS handshake for the whole run
    requests = deployment.api.metrics.requests
    assert requests.get("advance") == 2 * 5 * N and requests.get("enter") == 2 * N
    assert not {"submit", "poll", "join"} & set(requests)


def test_a_replayed_roster_on_an_advance_reply_is_refused(deployment, monkeypatch):
    victim = deployment.devices[0].member
    kept: dict = {}

    def replay(reply):
        if isinstance(reply, Roster):
            if "roster" not in kept:  # the victim's first cohort: remember its roster, pass it on
                kept["roster"] = reply
                return reply
            return kept["roster"]  # later cohorts: the old one, validly signed by everybody
        return reply

    seen = _tamper_advance(monkeypatch, deployment, victim, replay)
    results, _ = deployment.run(rounds=2)
    first, second = results[0]
    assert first.status == "applied"
    assert second.status == "dropped" and not second.uploaded, second
    assert ("Roster", True) in seen  # the replayed roster did reach the device, over /advance


def test_a_tampered_roster_on_an_advance_reply_is_refused(deployment, monkeypatch):
    victim = deployment.devices[0].member

    def tamper(reply):
        if not isinstance(reply, Roster):
            return reply
        adverts = []
        for member, blob in reply.adverts:
            if member != victim:
                advert = wire.decode(blob, expect=AdvertiseKeys)
                sig = bytearray(advert.signature)
                sig[0] ^= 1
                blob = wire.encode(dataclasses.replace(advert, signature=bytes(sig)))
            adverts.append((member, blob))
        return dataclasses.replace(reply, adverts=tuple(adverts))

    seen = _tamper_advance(monkeypatch, deployment, victim, tamper)
    results, _ = deployment.run(rounds=1)
    (only,) = results[0]
    assert only.status == "dropped" and not only.uploaded, only
    assert ("Roster", True) in seen


def test_the_end_of_another_cohort_on_an_advance_reply_is_not_taken_for_this_one(deployment, monkeypatch):
    victim = deployment.devices[0].member

    def other_end(reply):
        if isinstance(reply, Roster):
            return CohortEnd("c-someoneelses", "applied", 7, (victim,), "")
        return reply

    _tamper_advance(monkeypatch, deployment, victim, other_end)
    results, _ = deployment.run(rounds=1)
    (only,) = results[0]
    assert only.status == "dropped" and not only.uploaded and "c-someoneelses" in only.reason, only


def test_a_cohort_start_on_an_enter_reply_is_checked_like_a_polled_one(deployment, monkeypatch):
    victim = deployment.devices[0].member

    def looser(reply):  # a start whose clip differs from the task's: weighs this member differently
        return dataclasses.replace(reply, clip=reply.clip * 4) if isinstance(reply, CohortStart) else reply

    seen = _tamper_advance(monkeypatch, deployment, victim, looser, handler="_enter")
    results, _ = deployment.run(rounds=1)
    (only,) = results[0]
    assert only.status == "dropped" and not only.uploaded and "clip" in only.reason, only
    assert ("CohortStart", True) in seen


def test_an_advance_is_authenticated_replay_protected_and_checked(deployment):
    a, b = deployment.devices[0].signer, deployment.devices[1].signer
    http = httpx.Client(base_url=deployment.url, timeout=30,
                        verify=ssl.create_default_context(cafile=str(deployment.pki.ca_cert)))
    try:
        body = wire.encode(Advance("c-nothing", b"\x00"))
        headers = signed_headers(a.sign, a.public_key.hex(), "/v1/advance", body, time_ms=int(time.time() * 1000))
        first = http.post("/v1/advance", content=body, headers=headers)
        assert first.status_code == 404 and wire.decode(first.content, expect=ErrorReply).code == "unknown_cohort"
        again = http.post("/v1/advance", content=body, headers=headers)  # the same signed request, replayed
        assert again.status_code == 409 and wire.decode(again.content, expect=ErrorReply).code == "replay"
        forged = dict(headers)
        forged["x-ftte-device"] = b.public_key.hex()  # someone else's key on a's signature
        assert http.post("/v1/advance", content=body, headers=forged).status_code == 401
    finally:
        http.close()


def test_a_device_falls_back_to_submit_and_poll_without_advance(deployment):
    # the routes an older server had: every one but /advance
    routes = deployment.server.config.app.router.routes
    routes[:] = [r for r in routes if not getattr(r, "path", "").endswith(("/advance", "/enter"))]
    results, clients = deployment.run(rounds=1)
    for per_device, client in zip(results, clients):
        assert [r.status for r in per_device] == ["applied"], per_device
        # task; pull, one refused enter, join, start, then five submits and five polls
        assert client.transport.requests == 1 + 4 + 10
    assert deployment.api.metrics.requests.get("submit") == 5 * N
    assert Stage.UNMASK.value == 4  # the slots this test counts

"""A malicious server against a real device (issue 10, findings 1 and 7).

The "server" here is a real HTTPS endpoint on 127.0.0.1 (``http.server`` with a
certificate from a throwaway CA) that answers ``/v1/task`` with a ``TaskInfo`` of the
attacker's choosing. A real :class:`EdgeClient` connects to it. The attacks:

* a task naming ``subprocess:run`` / ``os:system`` / an importable module with a side
  effect at import time as its model, with keyword arguments that would run a command:
  refused, no process started, nothing imported, no file written;
* the same with a bundled model but arguments it does not take, of the wrong type, or
  that would allocate billions of parameters: refused before any factory runs;
* numeric settings that would keep the device busy or waiting forever, or that switch DP
  off under a device with a finite budget: refused;
* ``ftte edge`` with an ``http://`` URL and no ``--insecure-plaintext``: refused before any
  connection; ``--insecure-plaintext`` with ``https://``: refused (the flag never turns off
  certificate checks), and a ``Transport`` cannot be built that skips them for https;
* a server clock header of non-ASCII digits: ignored, not a crash.
"""

from __future__ import annotations

import dataclasses
import json
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from deploy_helpers import make_pki

httpx = pytest.importorskip("httpx")

from ftte.crypto.primitives import Signer
from ftte.edge.http_client import (
    CertificateError,
    EdgeClient,
    ModelMismatch,
    RetryPolicy,
    Transport,
)
from ftte.edge.models import build_model, make_dp_compatible
from ftte.edge.plan import SubsetPlan

from ftte import cli, wire
from ftte.deploy_messages import TaskInfo, TaskRequest
from ftte.http_auth import HEADER_DEVICE, HEADER_SERVER_TIME, member_id

IN_FEATURES, CLASSES = 4, 2

# Every process-starting or code-loading event CPython reports while the attacks run.
_WATCHED = ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "import")
_events: list[tuple[str, str]] = []
_recording = threading.Event()


def _audit(event: str, args: tuple) -> None:
    if _recording.is_set() and event.startswith(_WATCHED):
        _events.append((event, repr(args)[:200]))


sys.addaudithook(_audit)


def honest_task(member: int, **override) -> TaskInfo:
    model = make_dp_compatible(build_model("logistic", in_features=IN_FEATURES, num_classes=CLASSES))
    plan = SubsetPlan.full(model)
    weights = np.concatenate([p.detach().reshape(-1).numpy() for p in model.parameters()]).astype(np.float32)
    task = TaskInfo(member=member, plan_json=plan.to_json(), model_name="logistic",
                    model_kwargs_json=json.dumps({"in_features": IN_FEATURES, "num_classes": CLASSES}),
                    input_shape=(IN_FEATURES,), num_classes=CLASSES, initial_weights=weights, local_steps=1,
                    batch_size=4, lr=0.1, dp_enabled=1, noise_multiplier=1.0, max_grad_norm=1.0, delta=0.0,
                    accountant="rdp", epsilon_max=0.0, buffer_size=2, stage_timeout_ms=1000, poll_wait_ms=1000,
                    clip=2.0, value_bits=12, staleness_exponent=0.5, variance_penalty=1.0, r_min=0.25,
                    max_corrupt=1)
    return dataclasses.replace(task, **override)


class EvilServer:
    """A real HTTP(S) endpoint on 127.0.0.1 that answers every task request with ``self.task(member)``."""

    def __init__(self, pki=None, server_time: str | None = None) -> None:
        self.requests: list[str] = []
        self.task_override: dict = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                outer.requests.append(self.path)
                self.rfile.read(int(self.headers.get("content-length", "0")))
                member = member_id(bytes.fromhex(self.headers[HEADER_DEVICE]))
                body = wire.encode(honest_task(member, **outer.task_override))
                self.send_response(200 if self.path == "/v1/task" else 404)
                self.send_header("content-type", "application/msgpack")
                self.send_header("content-length", str(len(body)))
                self.send_header(HEADER_SERVER_TIME, server_time or str(int(time.time() * 1000)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if pki is not None:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(str(pki.server_cert), str(pki.server_key))
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.url = f"{'https' if pki else 'http'}://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def pki(tmp_path):
    return make_pki(tmp_path / "pki")


@pytest.fixture()
def evil(pki):
    server = EvilServer(pki)
    try:
        yield server
    finally:
        server.close()


def device(tmp_path: Path, url: str, ca, **kw) -> EdgeClient:
    x = np.zeros((8, IN_FEATURES), np.float32)
    y = np.arange(8, dtype=np.int64) % CLASSES
    return EdgeClient(url, Signer(), x, y, state_dir=tmp_path / "device", verify=str(ca),
                      retry=RetryPolicy(patience_s=2.0), **kw)


@pytest.fixture()
def sneaky_module(tmp_path, monkeypatch) -> tuple[str, Path]:
    """An importable module that writes a file the moment it is imported."""
    marker = tmp_path / "imported.txt"
    name = "ftte_test_sneaky_factory"
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / f"{name}.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n"
        "def make(**kw):\n    import torch.nn as nn\n    return nn.Sequential(nn.Linear(4, 2))\n")
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    sys.modules.pop(name, None)
    return name, marker


def test_the_honest_task_from_this_server_is_accepted(tmp_path, evil, pki):
    """Control: the fake server's protocol is right, so the refusals below are about the attack."""
    with device(tmp_path, evil.url, pki.ca_cert) as client:
        task = client.connect()
    assert task.model_name == "logistic" and evil.requests == ["/v1/task"]


def test_server_named_code_is_never_imported_or_run(tmp_path, evil, pki, sneaky_module):
    module, import_marker = sneaky_module
    marker = tmp_path / "pwned.txt"
    attacks = [
        ("subprocess:run", {"args": ["touch", str(marker)]}),
        ("subprocess:check_call", {"args": ["touch", str(marker)]}),
        ("os:system", {"command": f"touch {marker}"}),
        ("builtins:exec", {"source": f"open({str(marker)!r}, 'w')"}),
        (f"{module}:make", {}),
        ("torch.nn:Linear", {"in_features": 4, "out_features": 2}),
    ]
    for name, kwargs in attacks:
        evil.task_override = {"model_name": name, "model_kwargs_json": json.dumps(kwargs)}
        _events.clear()
        _recording.set()
        try:
            with device(tmp_path / name.replace(":", "_"), evil.url, pki.ca_cert) as client:
                with pytest.raises(ModelMismatch, match="not a bundled model"):
                    client.connect()
                assert client.task is None and client.trainer is None
        finally:
            _recording.clear()
        assert not marker.exists(), name
        assert not import_marker.exists(), name
        assert module not in sys.modules
        spawned = [e for e in _events if not e[0].startswith("import")]
        assert spawned == [], (name, spawned)
        imported = [e for e in _events if e[0] == "import" and (module in e[1] or "subprocess" in e[1])]
        assert imported == [], (name, imported)
    assert evil.requests.count("/v1/task") == len(attacks)


@pytest.mark.parametrize("kwargs, match", [
    ({"in_features": IN_FEATURES, "num_classes": CLASSES, "__class__": "x"}, "takes no argument"),
    ({"in_features": "4", "num_classes": CLASSES}, "must be an integer"),
    ({"in_features": True, "num_classes": CLASSES}, "must be an integer"),
    ({"in_features": 1 << 20, "num_classes": 100_000}, "parameters"),
    ({"in_features": -1, "num_classes": CLASSES}, "must be an integer"),
])
def test_bundled_model_arguments_are_checked_before_any_factory_runs(tmp_path, evil, pki, kwargs, match):
    evil.task_override = {"model_kwargs_json": json.dumps(kwargs)}
    with device(tmp_path, evil.url, pki.ca_cert) as client:
        with pytest.raises(ModelMismatch, match=match):
            client.connect()


def test_deeply_nested_task_json_is_refused_not_a_crash(tmp_path, evil, pki):
    evil.task_override = {"model_kwargs_json": "[" * 4000}
    with device(tmp_path / "a", evil.url, pki.ca_cert) as client:
        with pytest.raises(ModelMismatch, match="JSON"):
            client.connect()
    evil.task_override = {"plan_json": "[" * 60_000}
    with device(tmp_path / "b", evil.url, pki.ca_cert) as client:
        with pytest.raises(ModelMismatch, match="plan"):
            client.connect()


@pytest.mark.parametrize("override, key", [
    ({"local_steps": 2**40}, "local_steps"),
    ({"poll_wait_ms": 10**12}, "poll_wait_ms"),
    ({"stage_timeout_ms": 10**12}, "stage_timeout_ms"),
    ({"batch_size": 0}, "batch_size"),
    ({"input_shape": (2**32, 2**32, 2**32, 2**32)}, "input_shape"),
    ({"dp_enabled": 0}, "dp_enabled"),
    ({"dp_enabled": 7}, "dp_enabled"),
])
def test_task_settings_outside_device_bounds_are_refused(tmp_path, evil, pki, override, key):
    evil.task_override = override
    with device(tmp_path, evil.url, pki.ca_cert) as client:
        with pytest.raises(ModelMismatch, match=key):
            client.connect()


def test_a_device_that_brings_its_own_factory_uses_it_whatever_the_server_names(tmp_path, evil, pki):
    import torch.nn as nn

    seen = []

    def own(task: TaskInfo) -> nn.Sequential:
        seen.append(task.model_name)
        return make_dp_compatible(build_model("logistic", in_features=IN_FEATURES, num_classes=CLASSES))

    evil.task_override = {"model_name": "subprocess:run", "model_kwargs_json": "{}"}
    with device(tmp_path, evil.url, pki.ca_cert, model_factory=own) as client:
        client.connect()
    assert seen == ["subprocess:run"]  # the name is only data to the device's own code


def test_non_ascii_server_clock_is_ignored_not_a_crash(tmp_path, pki):
    server = EvilServer(pki, server_time="\xb2\xb3")
    try:
        t = Transport(server.url, Signer(), verify=str(pki.ca_cert), retry=RetryPolicy(patience_s=2.0))
        reply = t.call("task", TaskRequest("x"), (TaskInfo,))
        assert isinstance(reply, TaskInfo) and t.offset_ms == 0
        t.close()
    finally:
        server.close()


# -- transport security of `ftte edge` --------------------------------------------------------------

def _edge_argv(url: str, tmp_path: Path, *extra: str) -> list[str]:
    key = tmp_path / "dev.key"
    key.write_bytes(Signer().private_bytes())
    data = tmp_path / "dev.csv"
    data.write_text("a,b,c,d,label\n0,0,0,0,1\n")
    return ["edge", "--server", url, "--key", str(key), "--data", str(data), "--target", "label",
            "--state", str(tmp_path / "state"), "--rounds", "1", "--patience", "2", *extra]


def test_edge_refuses_an_http_server_without_the_plaintext_flag(tmp_path, capsys):
    plain = EvilServer(None)
    try:
        assert cli.main(_edge_argv(plain.url, tmp_path)) == 2
        assert "refusing plain HTTP" in capsys.readouterr().err
        assert plain.requests == []  # nothing was sent, not even the task request
    finally:
        plain.close()


def test_plaintext_flag_never_disables_https_verification(tmp_path, evil, pki, capsys):
    assert cli.main(_edge_argv(evil.url, tmp_path, "--insecure-plaintext")) == 2
    assert "--insecure-plaintext applies only to http://" in capsys.readouterr().err
    assert evil.requests == []
    # the library refuses the combination too
    with pytest.raises(ValueError, match="cannot be turned off"):
        Transport(evil.url, Signer(), verify=False)
    no_check = ssl.create_default_context()
    no_check.check_hostname = False
    no_check.verify_mode = ssl.CERT_NONE
    with pytest.raises(ValueError, match="must verify"):
        Transport(evil.url, Signer(), verify=no_check)
    with pytest.raises(ValueError, match="plaintext opt-in"):
        Transport(evil.url.replace("https", "http"), Signer(), verify=True)
    # and with verification on, this server's certificate (from a CA the system does not
    # trust) is refused at the TLS handshake, at once and for good: no request reaches it
    t = Transport(evil.url, Signer(), verify=True, retry=RetryPolicy(base_s=0.05, patience_s=0.5))
    with pytest.raises(CertificateError, match="(?i)certificate"):
        t.call("task", TaskRequest("x"), (TaskInfo,))
    t.close()
    assert evil.requests == []

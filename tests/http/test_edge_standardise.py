"""Feature standardisation travels with the task: the server fixes the statistics, the device applies them.

A stub server on 127.0.0.1 (``http.server``, plain HTTP through the explicit opt-in) answers
``/v1/task`` with a real ``TaskInfo``; a real :class:`EdgeClient` connects to it. The
statistics come from the network, so hostile ones are refused before any record is touched.
On the server side, ``[deploy] standardize`` reads them from a file or computes them from
the test data, with every mistake named.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

pytest.importorskip("httpx")

from ftte.crypto.primitives import Signer  # noqa: E402
from ftte.edge.http_client import EdgeClient, EdgeError, ModelMismatch, RetryPolicy  # noqa: E402
from ftte.edge.models import build_model, make_dp_compatible  # noqa: E402
from ftte.edge.plan import SubsetPlan  # noqa: E402
from ftte.pipeline.config import ConfigError  # noqa: E402
from ftte.pipeline.deploy_config import parse_server_config  # noqa: E402
from ftte.pipeline.feature_stats import compute_stats, load_feature_stats  # noqa: E402
from ftte.protocol.features import standardise  # noqa: E402

from ftte import wire  # noqa: E402
from ftte.deploy_messages import TaskInfo  # noqa: E402
from ftte.http_auth import HEADER_DEVICE, HEADER_SERVER_TIME, member_id  # noqa: E402

FEATURES, CLASSES = 4, 2


def task_for(member: int, **override) -> TaskInfo:
    model = make_dp_compatible(build_model("logistic", in_features=FEATURES, num_classes=CLASSES))
    weights = np.concatenate([p.detach().reshape(-1).numpy() for p in model.parameters()]).astype(np.float32)
    task = TaskInfo(member=member, plan_json=SubsetPlan.full(model).to_json(), model_name="logistic",
                    model_kwargs_json=json.dumps({"in_features": FEATURES, "num_classes": CLASSES}),
                    input_shape=(FEATURES,), num_classes=CLASSES, initial_weights=weights, local_steps=1,
                    batch_size=4, lr=0.1, dp_enabled=1, noise_multiplier=1.0, max_grad_norm=1.0, delta=0.0,
                    accountant="rdp", epsilon_max=0.0, buffer_size=2, stage_timeout_ms=1000, poll_wait_ms=1000,
                    clip=2.0, value_bits=12, staleness_exponent=0.5, variance_penalty=1.0, r_min=0.25,
                    max_corrupt=1)
    return dataclasses.replace(task, **override)


@pytest.fixture()
def stub():
    state: dict = {"override": {}}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("content-length", "0")))
            body = wire.encode(task_for(member_id(bytes.fromhex(self.headers[HEADER_DEVICE])), **state["override"]))
            self.send_response(200)
            self.send_header("content-type", "application/msgpack")
            self.send_header("content-length", str(len(body)))
            self.send_header(HEADER_SERVER_TIME, str(int(time.time() * 1000)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    state["url"] = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()


RAW = np.array([[0.0, 10.0, 100.0, 5.0], [2.0, 30.0, 300.0, 5.0], [4.0, 20.0, 200.0, 5.0],
                [6.0, 40.0, 400.0, 5.0]], dtype=np.float32)
LABELS = np.array([0, 1, 0, 1], dtype=np.int64)


def client(tmp_path, url: str, **kw) -> EdgeClient:
    return EdgeClient(url, Signer(), RAW, LABELS, state_dir=tmp_path / "device", verify=False,
                      retry=RetryPolicy(patience_s=2.0), **kw)


def test_device_standardises_raw_records_with_the_task_statistics(tmp_path, stub):
    mean, std = compute_stats(RAW)
    stub["override"] = {"feature_mean": mean, "feature_std": std}
    with client(tmp_path, stub["url"]) as c:
        c.connect()
        x = c.x
    np.testing.assert_allclose(x, (RAW - mean) / std, rtol=1e-6)
    np.testing.assert_allclose(x[:, :3].mean(axis=0), 0.0, atol=1e-6)
    np.testing.assert_allclose(x[:, :3].std(axis=0), 1.0, rtol=1e-5)
    assert np.all(x[:, 3] == 0.0)  # a constant column: std counted as 1, only centred


def test_without_statistics_or_when_the_caller_opts_out_records_are_used_as_given(tmp_path, stub):
    with client(tmp_path / "a", stub["url"]) as c:
        c.connect()
        np.testing.assert_array_equal(c.x, RAW)
    mean, std = compute_stats(RAW)
    stub["override"] = {"feature_mean": mean, "feature_std": std}
    with client(tmp_path / "b", stub["url"], standardize=False) as c:
        c.connect()
        np.testing.assert_array_equal(c.x, RAW)


@pytest.mark.parametrize("mean, std, match", [
    (np.zeros(3, np.float32), np.ones(3, np.float32), "1 or 4 values"),
    (np.zeros(4, np.float32), np.ones(1, np.float32), "1 or 4 values"),
    (np.zeros(4, np.float32), np.zeros(0, np.float32), "1 or 4 values"),
    (np.zeros(4, np.float32), np.array([1, 1, 0, 1], np.float32), "finite and > 0"),
    (np.zeros(4, np.float32), np.array([1, -1, 1, 1], np.float32), "finite and > 0"),
])
def test_hostile_statistics_are_refused_before_the_records_are_touched(tmp_path, stub, mean, std, match):
    stub["override"] = {"feature_mean": mean, "feature_std": std}
    with client(tmp_path, stub["url"]) as c:
        with pytest.raises(ModelMismatch, match=match):
            c.connect()
        assert c.task is None and c.trainer is None
        np.testing.assert_array_equal(c.x, RAW)


@pytest.mark.parametrize("mean, std", [
    (np.array([0, 0, np.nan, 0], np.float32), np.ones(4, np.float32)),
    (np.zeros(4, np.float32), np.array([1, 1, np.inf, 1], np.float32)),
])
def test_non_finite_statistics_never_get_past_the_decoder(tmp_path, stub, mean, std):
    stub["override"] = {"feature_mean": mean, "feature_std": std}
    with client(tmp_path, stub["url"]) as c:
        with pytest.raises(EdgeError, match="NaN or infinite"):
            c.connect()
        assert c.task is None
        np.testing.assert_array_equal(c.x, RAW)


def config_text(deploy_extra: str) -> str:
    return f"""
[model]
name = "logistic"
[server]
buffer_size = 3
[http]
plaintext = true
[deploy]
input_shape = [4]
num_classes = 2
{deploy_extra}
"""


def test_server_reads_statistics_from_a_file_or_computes_them_from_test_data(tmp_path):
    np.savez(tmp_path / "test.npz", x=RAW, y=LABELS)
    np.savez(tmp_path / "stats.npz", mean=np.array([1, 2, 3, 4], np.float32), std=np.array([2, 2, 2, 2], np.float32))
    s = parse_server_config(config_text('standardize = "file"\nfeature_stats = "stats.npz"'), base_dir=tmp_path)
    mean, std = load_feature_stats(s)
    np.testing.assert_array_equal(mean, [1, 2, 3, 4])
    np.testing.assert_array_equal(std, [2, 2, 2, 2])
    s = parse_server_config(config_text('standardize = "test_data"\ntest_data = "test.npz"'), base_dir=tmp_path)
    mean, std = load_feature_stats(s)
    np.testing.assert_allclose(standardise(RAW, mean, std)[:, :3].std(axis=0), 1.0, rtol=1e-5)
    s = parse_server_config(config_text(""), base_dir=tmp_path)
    assert [len(a) for a in load_feature_stats(s)] == [0, 0]


@pytest.mark.parametrize("extra, match", [
    ('standardize = "file"', "feature_stats"),
    ('standardize = "test_data"', "test_data"),
    ('standardize = "always"', "standardize"),
    ('keep_versions = -1', "keep_versions"),
])
def test_misconfigured_standardisation_is_named(tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match):
        parse_server_config(config_text(extra), base_dir=tmp_path)


def test_statistics_of_the_wrong_length_are_refused_at_start(tmp_path):
    np.savez(tmp_path / "stats.npz", mean=np.zeros(3, np.float32), std=np.ones(3, np.float32))
    s = parse_server_config(config_text('standardize = "file"\nfeature_stats = "stats.npz"'), base_dir=tmp_path)
    with pytest.raises(ConfigError, match="feature_stats.*1 or 4 values"):
        load_feature_stats(s)
    s = parse_server_config(config_text('standardize = "file"\nfeature_stats = "missing.npz"'), base_dir=tmp_path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_feature_stats(s)

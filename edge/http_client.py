"""The edge client an app embeds: pull, train with DP-SGD, join a cohort, mask, upload, over HTTPS.

::

    client = EdgeClient("https://fl.example.org:8443", Signer(key_bytes), x, y,
                        state_dir="/data/ftte", epsilon_max=8.0, verify="ca.pem")
    client.run(rounds=10)

One :meth:`EdgeClient.run_round` is: pull the current subset weights and check their hash
against the plan this device was given (a mismatch is refused, never trained on); train
locally with :class:`~ftte.edge.runtime.LocalTrainer` (the accountant state lives in
``state_dir`` and survives restarts; a round that would exceed the budget is refused before
it reads any data); join the open cohort; then follow the cohort through its five
secure-aggregation stages with :class:`~ftte.crypto.secagg_member.MemberSession`. A round is
seven requests: ``pull``; ``enter`` (the join, with the cohort's start in the reply when it
comes within the long-poll wait); five ``advance`` (this member's message of a stage, with
the server's message of the next stage, or the cohort's end, in the reply). A piggy-backed
message is checked exactly as a polled one; ``Pending`` falls back to ``poll``.

Network trouble is retried with exponential backoff and jitter (a fresh nonce and
timestamp per attempt; the clock is corrected from the server's ``x-ftte-server-time``).
If the server stays unreachable past a stage's patience, or says the device missed a
stage, the device counts itself dropped from that cohort and the next round starts over
with a fresh pull: secure aggregation tolerates dropped members by design.

This module imports the standard library's :mod:`http.client` and the device-side parts of
ftte only (no HTTP client package, no web framework, nothing from ``ftte.pipeline``), so it
stays installable on a device. Proxy variables (``HTTPS_PROXY``) are not read: the device
talks to the server it was given.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import math
import os
import random
import select
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlsplit

import numpy as np
import torch
from ftte.crypto.primitives import Signer
from ftte.crypto.secagg_member import MemberSession
from ftte.crypto.secagg_session import SecAggError
from ftte.crypto.stages import POLL_END, Stage
from ftte.protocol.cohort import (
    CohortRefused,
    DevicePolicy,
    check_cohort,
    check_own_weight,
    check_task,
    codec_for,
    model_hash,
    reference_of,
    session_params,
    weight_rule,
)
from ftte.protocol.encoding import weigh_update
from ftte.protocol.features import check_stats, standardise
from ftte.edge.models import UntrustedModelError, build_registered_model, make_dp_compatible, parse_model_kwargs
from ftte.edge.plan import SubsetPlan
from ftte.edge.plan_search import device_prefix_chunk
from ftte.edge.runtime import LocalTrainer, LocalUpdate, TrainSettings
from ftte.edge.user_level import DeviceUserLevel
from ftte.privacy.accountant import AccountantStore
from ftte.privacy.budget import BudgetExceededError
from ftte.privacy.dpsgd import DPConfig
from ftte.privacy.device_record import append_claim
from ftte.privacy.ledger import library_versions
from ftte.privacy.spend import sign_spend
from torch import nn

from ftte import __version__, wire
from ftte.http_auth import (
    API_PREFIX,
    HEADER_SERVER_TIME,
    member_id,
    signed_headers,
)
from ftte.round_messages import ModelPull
from ftte.deploy_messages import (
    Ack,
    Advance,
    CohortEnd,
    CohortStart,
    ErrorReply,
    JoinReply,
    JoinRequest,
    LeaveRequest,
    Pending,
    PollRequest,
    PullRequest,
    SpentRound,
    Submit,
    TaskInfo,
    TaskRequest,
)

RETRYABLE_STATUS = {429, 500, 502, 503, 504}
MAX_LATE_ROUNDS = 500  # late rounds sent with one join (the server's limit); the rest go with the next
STAGE_EVENTS = {Stage.ADVERTISE: "advertised", Stage.SHARE: "shared", Stage.UPLOAD: "uploaded",
                Stage.CONSISTENCY: "signed", Stage.UNMASK: "unmasked"}
EVENTS = ("task", "pulled", "trained", "joined", "started", *STAGE_EVENTS.values(), "ended", "budget_exhausted")


class EdgeError(Exception):
    """Base of the client's errors."""


class ServerUnavailable(EdgeError):
    """The server could not be reached (or kept failing) within the patience allowed."""


class ServerRefused(EdgeError):
    """The server refused a request with a 4xx; retrying the same request cannot help."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status, self.code, self.detail = status, code, detail


class CertificateError(EdgeError):
    """The server's TLS certificate failed verification: permanent, never retried."""


class _NoProgress(ServerUnavailable):
    """The server answers but the cohort does not move (for instance, it never fills up)."""


class ModelMismatch(EdgeError):
    """The server sent weights whose hash, plan or shape do not match the plan this device joined."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter: ``uniform(0, min(cap, base * 2^attempt))``."""

    base_s: float = 0.2
    cap_s: float = 5.0
    patience_s: float = 60.0  # give up on one call after this long without success

    def delay(self, attempt: int) -> float:
        return random.uniform(0.0, min(self.cap_s, self.base_s * (2 ** min(attempt, 20))))


@dataclass(frozen=True)
class RoundResult:
    status: str  # applied | aborted | dropped | refused | budget_exhausted
    base_version: int = -1
    cohort_id: str = ""
    applied_version: int = -1
    uploaded: bool = False
    reason: str = ""
    epsilon: float = 0.0


def make_ssl_verify(verify: bool | str | os.PathLike | Any) -> Any:
    """``True`` (system CAs), a CA bundle path, or an ``ssl.SSLContext``; ``False`` only for plain HTTP tests.

    An ``ssl.SSLContext`` that does not check certificates and host names is refused:
    turning verification off is not a thing a caller can do for an ``https`` server.
    """
    import ssl

    if isinstance(verify, (str, os.PathLike)):
        return ssl.create_default_context(cafile=os.fspath(verify))
    if isinstance(verify, ssl.SSLContext) and (verify.verify_mode != ssl.CERT_REQUIRED or not verify.check_hostname):
        raise ValueError("the TLS context must verify the server certificate and host name")
    return verify


class Transport:
    """Signed msgpack requests with retries, backoff and server-clock correction, over one kept-alive connection.

    Replies are read with a size cap (a hostile server cannot make the device buffer more
    than :data:`MAX_REPLY_BYTES`), decoded with the bounded :func:`ftte.wire.decode`, and
    the server URL must be ``https://`` with certificate checks unless plaintext was asked for.

    The requests go over the standard library's :mod:`http.client`, on one connection that
    is kept alive across requests and rounds (one TLS handshake per process while the server
    keeps it open). A round is about a dozen small requests; a general HTTP client spent
    about 1.3 ms of CPU on each of them on a small device (URL models, cookie jars, header
    normalisation), several times the TLS record work itself.
    """

    MAX_REPLY_BYTES = wire.MAX_MESSAGE_BYTES + (1 << 20)
    READ_CHUNK = 64 * 1024

    @staticmethod
    def check_url(base_url: str, verify: Any) -> None:
        """``https://`` with certificate checks, or ``http://`` only when the caller opted into plaintext.

        ``verify=False`` is the plaintext opt-in (``ftte edge --insecure-plaintext``); it is refused
        for an ``https://`` URL, so a flag meant for local tests can never switch off the
        certificate check of a real server.
        """
        scheme = urlsplit(base_url).scheme.lower()
        if scheme == "https":
            if verify is False:
                raise ValueError("certificate verification cannot be turned off for an https:// server")
        elif scheme == "http":
            if verify is not False:
                raise ValueError("refusing plain http:// without the explicit plaintext opt-in "
                                 "(ftte edge --insecure-plaintext, for local tests only); use https://")
        else:
            raise ValueError(f"the server URL must start with https:// (got {scheme or 'no'} scheme)")

    def __init__(self, base_url: str, identity: Signer, *, verify: Any = True, timeout_s: float = 30.0,
                 retry: RetryPolicy = RetryPolicy(), connect_timeout_s: float = 10.0) -> None:
        self.check_url(base_url, verify)
        self.identity = identity
        self.device_hex = identity.public_key.hex()
        self.retry = retry
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.offset_ms = 0  # server clock minus ours
        url = urlsplit(base_url)
        if url.hostname is None:
            raise ValueError("the server URL has no host")
        self._https = url.scheme.lower() == "https"
        self._host = url.hostname
        self._port = url.port or (443 if self._https else 80)
        self._base_path = url.path.rstrip("/")
        self._tls = make_ssl_verify(verify) if self._https else None
        if self._tls is True:
            self._tls = ssl.create_default_context()
        self._conn: http.client.HTTPConnection | None = None
        self.bytes_up = 0
        self.bytes_down = 0
        self.requests = 0  # HTTP requests sent (attempts included)
        self.connections = 0  # connections opened (each one TLS handshake over https)
        self.last_refusal: ServerRefused | None = None  # the latest 4xx, for callers that only see a status

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _headers(self, path: str, body: bytes) -> dict[str, str]:
        return signed_headers(self.identity.sign, self.device_hex, path, body,
                              time_ms=int(time.time() * 1000) + self.offset_ms)

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        """(the open connection, whether it was used before); a kept-alive one the server closed is replaced."""
        conn = self._conn
        if conn is not None and conn.sock is not None and not _idle_socket_usable(conn.sock):
            conn.close()  # the server closed it while idle (or sent bytes nobody asked for)
            conn = None
        if conn is None or conn.sock is None:
            if conn is not None:
                conn.close()
            if self._https:
                conn = http.client.HTTPSConnection(self._host, self._port, timeout=self.connect_timeout_s,
                                                   context=self._tls)
            else:
                conn = http.client.HTTPConnection(self._host, self._port, timeout=self.connect_timeout_s)
            self._conn = conn
            conn.connect()  # TLS handshake and certificate check happen here
            # http.client writes the headers and the body separately: without TCP_NODELAY the
            # body waits for the server's delayed ACK of the headers (40 ms on Linux, per request)
            assert conn.sock is not None
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.connections += 1
            return conn, False
        return conn, True

    def _post(self, path: str, body: bytes, read_timeout_s: float) -> tuple[int, str | None, bytes | None]:
        """(status, server time header, body) of one POST; the body is None if the server sent more than the cap."""
        conn, reused = self._connection()
        try:
            assert conn.sock is not None
            conn.sock.settimeout(read_timeout_s)
            self.requests += 1
            conn.request("POST", self._base_path + path, body=body, headers=self._headers(path, body))
            r = conn.getresponse()
            stamp = r.getheader(HEADER_SERVER_TIME)
            declared = r.getheader("content-length", "")
            if declared.isascii() and declared.isdigit() and int(declared) > self.MAX_REPLY_BYTES:
                self.close()  # never read the rest of an oversized reply
                return r.status, stamp, None
            chunks, total = [], 0
            while True:
                chunk = r.read(self.READ_CHUNK)
                if not chunk:
                    break
                total += len(chunk)
                if total > self.MAX_REPLY_BYTES:
                    self.close()
                    return r.status, stamp, None
                chunks.append(chunk)
            if r.will_close:
                self.close()
            return r.status, stamp, b"".join(chunks)
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            if reused and isinstance(exc, (ConnectionError, http.client.RemoteDisconnected)):
                raise _StaleConnection(str(exc)) from exc
            raise

    def _sync_clock(self, stamp: str | None) -> None:
        # ASCII digits only: str.isdigit() also accepts "²" and friends, which int() refuses
        if stamp and len(stamp) < 16 and stamp.isascii() and stamp.isdigit():
            self.offset_ms = int(stamp) - int(time.time() * 1000)

    def call(self, endpoint: str, msg: Any, expect: tuple[type, ...], *, patience_s: float | None = None,
             read_timeout_s: float | None = None) -> Any:
        """POST ``msg`` to ``/v1/<endpoint>`` and return the decoded reply (one of ``expect``)."""
        path = f"{API_PREFIX}/{endpoint}"
        body = wire.encode(msg)
        deadline = time.monotonic() + (self.retry.patience_s if patience_s is None else patience_s)
        read_timeout = read_timeout_s or self.timeout_s
        attempt = resigned = stale = 0
        last = ""
        while True:
            try:
                status, stamp, content = self._post(path, body, read_timeout)
            except _StaleConnection as exc:
                # A kept-alive connection the server had dropped: open a new one and send again
                # at once (with a new nonce and timestamp), once; a second failure backs off.
                last = f"connection lost: {exc}"
                stale += 1
                if stale <= 1:
                    continue
            except (OSError, http.client.HTTPException) as exc:
                bad_cert = _certificate_failure(exc)
                if bad_cert is not None:  # retrying cannot make a certificate valid
                    raise CertificateError(f"{endpoint}: the server's TLS certificate failed verification: "
                                           f"{bad_cert.verify_message or bad_cert}") from None
                last = f"{type(exc).__name__}: {exc}"
            else:
                self._sync_clock(stamp)
                self.bytes_up += len(body)
                if content is None:
                    raise EdgeError(f"{endpoint}: the server's reply exceeds {self.MAX_REPLY_BYTES} bytes")
                self.bytes_down += len(content)
                if status == 200:
                    try:
                        reply = wire.decode(content)
                    except wire.WireError as exc:
                        raise EdgeError(f"{endpoint}: the server sent a malformed reply: {exc}") from None
                    if not isinstance(reply, expect):
                        raise EdgeError(f"{endpoint}: unexpected reply {type(reply).__name__}")
                    return reply
                code, detail = _error_of(content)
                last = f"{status} {code}: {detail}"
                if code in ("stale_timestamp", "replay"):
                    resigned += 1  # the clock was resynchronised above: sign again at once
                    if resigned <= 3:
                        continue
                elif status not in RETRYABLE_STATUS:
                    self.last_refusal = ServerRefused(status, code, detail)
                    raise self.last_refusal
            if time.monotonic() >= deadline:
                raise ServerUnavailable(f"{endpoint}: gave up after {attempt + 1} attempts ({last})")
            pause = self.retry.delay(attempt)
            attempt += 1
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))


class _StaleConnection(Exception):
    """A reused keep-alive connection failed before a reply: the server had closed it."""


def _idle_socket_usable(sock: socket.socket) -> bool:
    """Is an idle kept-alive socket still open with nothing unread? (Readable while idle means the
    server closed it, or sent bytes no request asked for: either way it is not reused.)"""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


def _certificate_failure(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification error behind a transport error, if that is what it is."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, ssl.SSLCertVerificationError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def _check_cohort_of(reply: Any, cohort_id: str) -> None:
    """A cohort message (start, end, pending) must name the cohort asked about: an end or a start
    of another cohort is never taken for this one's."""
    named = getattr(reply, "cohort_id", None)
    if named is not None and named != cohort_id:
        raise CohortRefused(f"the server answered for cohort {str(named)[:64]!r}, not {cohort_id!r}")


def _error_of(content: bytes) -> tuple[str, str]:
    try:
        err = wire.decode(content, expect=ErrorReply)
        return err.code, err.detail
    except wire.WireError:
        return "http_error", content[:200].decode("utf-8", "replace")


def default_model_factory(task: TaskInfo) -> nn.Module:
    """Build the task's architecture from the bundled registry, and only from it.

    The task comes from the server, which must not choose code that runs on the device:
    a ``package.module:factory`` name is refused here (no import, no call), and the
    arguments are checked against the bundled model's allowed keys, types, ranges and
    parameter count before its factory runs. A device that trains a custom architecture
    passes its own ``model_factory`` to :class:`EdgeClient` (``ftte edge --model-factory``).
    """
    return make_dp_compatible(build_registered_model(task.model_name, parse_model_kwargs(task.model_kwargs_json)))


def load_full_vector(model: nn.Module, vector: np.ndarray) -> None:
    """Set every parameter, in ``named_parameters`` order, from one flat float32 vector."""
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    if vector.shape != (total,):
        raise ModelMismatch(f"initial weights have {vector.shape[0]} values, the architecture {total}")
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(torch.as_tensor(vector[offset:offset + n].copy()).view_as(p))
            offset += n


class EdgeClient:
    """One device: its identity, its data, its accountant state, and a connection to one server."""

    def __init__(self, server_url: str, identity: Signer, x: np.ndarray, y: np.ndarray, *, state_dir: str | Path,
                 epsilon_max: float = 10.0, model_factory: Callable[[TaskInfo], nn.Module] | None = None,
                 verify: Any = True, retry: RetryPolicy = RetryPolicy(), timeout_s: float = 30.0,
                 on_event: Callable[[str, dict[str, Any]], None] | None = None, seed: int | None = None,
                 torch_threads: int | None = None, transport: Transport | None = None,
                 join_patience_s: float = 600.0, trusted_keys: Iterable[bytes] | None = None,
                 min_members: int | None = None, max_corrupt: int | None = None,
                 max_user_noise_ratio: float | None = None, policy: DevicePolicy | None = None,
                 standardize: bool = True) -> None:
        if len(x) != len(y) or len(x) == 0:
            raise ValueError("x and y must be non-empty and of equal length")
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        self.identity = identity
        self.member = member_id(identity.public_key)
        self.x = np.asarray(x, dtype=np.float32)
        self.y = np.asarray(y, dtype=np.int64)
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.epsilon_max = float(epsilon_max)
        self.model_factory = model_factory or default_model_factory
        self.retry = retry
        self.join_patience_s = join_patience_s
        self.on_event = on_event
        # Apply the task's feature statistics to the raw records (False: the caller passes records
        # already standardised exactly as the task says).
        self.standardize = standardize
        # This device's own rules for any cohort (peers pinned by the operator, or None: trust the
        # server's list; cohort floor; colluders assumed; user-level noise/signal ceiling); ``policy``
        # overrides these shortcuts.
        pinned = frozenset(trusted_keys) | {identity.public_key} if trusted_keys is not None else None
        floors = {k: v for k, v in (("min_members", min_members), ("max_corrupt", max_corrupt),
                                    ("max_user_noise_ratio", max_user_noise_ratio)) if v is not None}
        self.policy = policy or DevicePolicy(trusted_keys=pinned, **floors)  # unset: the policy's own defaults
        self._rng = np.random.default_rng(seed)
        self._seed = random.Random(seed)
        self._test_seed = seed
        self.transport = transport or Transport(server_url, identity, verify=verify, timeout_s=timeout_s, retry=retry)
        self.task: TaskInfo | None = None
        self.plan: SubsetPlan | None = None
        self.trainer: LocalTrainer | None = None
        self.store: AccountantStore | None = None
        self.dp: DPConfig | None = None
        self.user: DeviceUserLevel | None = None  # user-level DP terms (task unit "user"), see edge/user_level.py
        self._told: set[int] = set()
        self._advance = True  # the server has /enter and /advance (cleared once if it answers 404)
        self.rounds_done = 0

    # -- life cycle -----------------------------------------------------------------------------
    def close(self) -> None:
        if self.trainer is not None:
            self.trainer.close()
        if self.store is not None:
            self.store.close()
        self.transport.close()

    def __enter__(self) -> EdgeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _event(self, name: str, **info: Any) -> None:
        if self.on_event is not None:
            self.on_event(name, {"member": self.member, **info})

    @property
    def stage_patience(self) -> float:
        assert self.task is not None
        return max(self.retry.patience_s, 2.0 * self.task.stage_timeout_ms / 1000.0)

    @property
    def poll_read_timeout(self) -> float:
        assert self.task is not None
        return self.task.poll_wait_ms / 1000.0 + 15.0

    def connect(self) -> TaskInfo:
        """Fetch the task once: plan, architecture, initial weights, training and DP settings.

        Every field of the task comes from the server and is treated as hostile: nothing in
        it selects code, files or paths on this device. The architecture is built by
        ``model_factory`` (by default only from the bundled registry, arguments checked
        before any factory runs; a custom factory comes only from the device's own
        configuration); the plan is data checked against that model; the state directory
        and the accountant file are the device's own; and numeric settings are bounded so
        that a task cannot make the device train or wait without end, or switch off DP
        while the device holds a finite privacy budget.
        """
        if self.task is not None:
            return self.task
        task = self.transport.call("task", TaskRequest(f"ftte-edge/{__version__}"), (TaskInfo,),
                                   patience_s=self.retry.patience_s)
        if task.member != self.member:
            raise ModelMismatch("the server knows this device under another member id")
        shape = tuple(task.input_shape)
        limits = [
            (1 <= len(shape) <= 8 and all(1 <= d <= 1 << 24 for d in shape), "input_shape", shape[:8]),
            (2 <= task.num_classes <= 100_000, "num_classes", task.num_classes),
            (1 <= task.local_steps <= 100_000, "local_steps", task.local_steps),
            (1 <= task.batch_size <= 1 << 20, "batch_size", task.batch_size),
            (0.0 < task.lr <= 1000.0, "lr", task.lr),
            (task.stage_timeout_ms <= 3_600_000, "stage_timeout_ms", task.stage_timeout_ms),
            (task.poll_wait_ms <= 120_000, "poll_wait_ms", task.poll_wait_ms),
            (task.dp_enabled in (0, 1), "dp_enabled", task.dp_enabled),
            (task.dp_enabled or not math.isfinite(self.epsilon_max), "dp_enabled",
             "0 while this device holds a finite privacy budget"),
        ]
        for ok, key, value in limits:
            if not ok:
                raise ModelMismatch(f"refused the server's task: {key} = {value!r} is outside what this device accepts")
        check_task(task, self.policy)  # the contribution terms are within this device's own policy
        try:
            plan = SubsetPlan.from_json(task.plan_json)  # checks the plan id against its content
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise ModelMismatch(f"the task's plan is malformed: {str(exc)[:300]}") from None
        try:
            model = self.model_factory(task)
        except UntrustedModelError as exc:
            raise ModelMismatch(f"refused the server's model: {exc}") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelMismatch(f"cannot build the task's model: {str(exc)[:300]}") from None
        if not isinstance(model, nn.Sequential):
            raise ModelMismatch("the model factory must return an nn.Sequential")
        try:
            plan.check(model)  # names and shapes of every parameter
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelMismatch(f"the task's plan does not fit this device's model: {exc}") from None
        load_full_vector(model, np.asarray(task.initial_weights, dtype=np.float32))
        if task.dp_enabled and task.epsilon_max > 0:
            budget = min(self.epsilon_max, task.epsilon_max)
        else:
            budget = self.epsilon_max
        try:
            target = min(task.target_epsilon, budget) if task.target_epsilon > 0 else None
            dp = DPConfig(enabled=bool(task.dp_enabled) and task.unit != "user", noise_multiplier=task.noise_multiplier,
                          max_grad_norm=task.max_grad_norm, delta=task.delta if task.delta > 0 else None,
                          accountant=task.accountant, epsilon_max=budget if math.isfinite(budget) else math.inf,
                          target_epsilon=target, planned_rounds=task.planned_rounds if target else None,
                          min_noise_multiplier=max(self.policy.min_noise_multiplier, task.min_noise_multiplier))
            if task.clipping not in ("per_sample", "ghost"):
                raise ValueError(f"unknown clipping mode {task.clipping[:32]!r}")
            settings = TrainSettings(task.local_steps, task.batch_size, task.lr, task.clipping)
        except ValueError as exc:
            raise ModelMismatch(f"refused the server's training settings: {exc}") from None
        if self.x.shape[1:] != shape:
            if math.prod(self.x.shape[1:]) != math.prod(shape):
                raise ModelMismatch(f"records have shape {self.x.shape[1:]}, the model takes {shape}")
        if self.y.min() < 0 or self.y.max() >= task.num_classes:
            raise ValueError(f"labels must be class indices in [0, {task.num_classes})")
        mean = np.asarray(task.feature_mean, dtype=np.float32)
        std = np.asarray(task.feature_std, dtype=np.float32)
        if len(mean) or len(std):
            try:
                check_stats(mean, std, math.prod(shape))
            except ValueError as exc:
                raise ModelMismatch(f"refused the server's feature statistics: {exc}") from None
        chunk = device_prefix_chunk(model, plan, shape, task.batch_size, dp=bool(task.dp_enabled),
                                    clipping=task.clipping)
        settings = dataclasses.replace(settings, prefix_chunk=chunk)
        if task.unit == "user":  # user-level: the device's own plan of the mechanism, within its floors
            try:
                self.user = DeviceUserLevel.from_task(task, plan.num_coordinates, self.policy, self.epsilon_max)
            except CohortRefused as exc:
                raise ModelMismatch(f"refused the server's user-level terms: {exc}") from None
        self.store = AccountantStore(self.state_dir / "accountant.db")
        self.trainer = LocalTrainer(model, plan, dp, settings, self.store)
        self.task, self.plan, self.dp = task, plan, dp
        self._shape = shape
        standardised = bool(len(mean)) and self.standardize
        if standardised:  # the model expects these statistics; the device's records are raw
            self.x = standardise(self.x, mean, std)
        if self.x.shape[1:] != shape:
            self.x = self.x.reshape((len(self.x),) + shape)
        self._event("task", plan_id=plan.plan_id, coordinates=plan.num_coordinates, model=task.model_name,
                    standardised=standardised, records=len(self.x))
        return task

    # -- one round ------------------------------------------------------------------------------
    def pull(self) -> ModelPull:
        assert self.plan is not None
        pull = self.transport.call("pull", PullRequest(self.plan.plan_id), (ModelPull,),
                                   patience_s=self.retry.patience_s)
        if pull.plan_id != self.plan.plan_id:
            raise ModelMismatch(f"server sent plan {pull.plan_id}, this device joined {self.plan.plan_id}")
        if pull.weights.shape != (self.plan.num_coordinates,):
            raise ModelMismatch(f"server sent {pull.weights.shape[0]} weights, the plan has {self.plan.num_coordinates}")
        if model_hash(pull.plan_id, pull.weights) != pull.model_hash:
            raise ModelMismatch(f"weights of version {pull.version} do not match their announced hash")
        self._event("pulled", version=pull.version)
        return pull

    def train(self, pull: ModelPull) -> LocalUpdate:
        assert self.trainer is not None
        # Noise and sampling are keyed from the OS for every round (never from a seed the server
        # could search); ``seed`` only makes a test's runs repeatable, and the ledger says so.
        seed = None if self._test_seed is None else self._seed.randrange(2**31 - 1)
        update = self.trainer.train(self.member, pull.version, np.array(pull.weights, dtype=np.float32),
                                    self.x, self.y, seed)
        if self.user is not None:  # one participation, charged durably before anything is released
            assert self.store is not None
            update = dataclasses.replace(update, stats=self.user.charge(self.store, self.member, update.stats))
        self._event("trained", version=pull.version, epsilon=float(update.stats.epsilon_total))
        return update

    def run_round(self) -> RoundResult:
        """Pull, train, join and follow one cohort to its end (or until this device is dropped)."""
        self.connect()
        pull = self.pull()
        try:
            update = self.train(pull)
        except BudgetExceededError as exc:  # report what was spent, never 0.0
            assert self.trainer is not None
            spent = float(self.trainer.epsilon(self.member))
            self._event("budget_exhausted", epsilon=spent, epsilon_max=self.epsilon_max, reason=str(exc))
            return RoundResult("budget_exhausted", pull.version, reason=str(exc), epsilon=spent)
        result = self.aggregate(pull, update)
        self.rounds_done += 1
        self._event("ended", status=result.status, cohort=result.cohort_id, applied_version=result.applied_version,
                    uploaded=result.uploaded, reason=result.reason)
        return result

    def run(self, rounds: int | None = None, stop: Callable[[], bool] | None = None) -> list[RoundResult]:
        """Rounds until ``rounds`` are done, the budget is spent or ``stop()`` says so."""
        out: list[RoundResult] = []
        while rounds is None or len(out) < rounds:
            if stop is not None and stop():
                break
            self.transport.last_refusal = None
            result = self.run_round()
            out.append(result)
            if result.status == "budget_exhausted":
                break
            refusal = self.transport.last_refusal
            if result.status == "refused" and refusal is not None and refusal.status not in (409, 429):
                raise refusal  # the server refuses what this device sends (policy, DP terms): a new round cannot help
            if result.status in ("dropped", "aborted", "refused"):
                time.sleep(self.retry.delay(1))
        return out

    def aggregate(self, pull: ModelPull, update: LocalUpdate) -> RoundResult:
        """Join and run the secure-aggregation member protocol for this update."""
        assert self.plan is not None
        eps = float(update.stats.epsilon_total)
        s = update.stats
        versions = library_versions()
        seq, late = self._late_rounds()
        signature = self._sign_spend(update, pull.version)
        join = JoinRequest(
            plan_id=self.plan.plan_id, base_version=pull.version, model_hash=pull.model_hash,
            steps=s.steps, sample_rate=float(s.sample_rate), noise_multiplier=float(s.noise_multiplier),
            max_grad_norm=float(s.max_grad_norm), accountant=s.accountant,
            delta=float(s.delta) if math.isfinite(s.delta) and s.delta > 0 else 0.0,
            epsilon_max=float(s.epsilon_max) if math.isfinite(s.epsilon_max) else 0.0,
            rng_source=s.rng_source[:256], torch_version=versions["torch"][:64],
            opacus_version=versions["opacus"][:64], ftte_version=versions["ftte"][:64],
            round_seq=seq, unreported=tuple((i, wire.encode(r)) for i, r in late), spend_signature=signature,
            accountant_id=self._accountant_id(),
        )
        try:
            reply = self._enter(join)
        except ServerRefused as exc:
            return RoundResult("refused", pull.version, reason=str(exc), epsilon=eps)
        except ServerUnavailable as exc:
            return RoundResult("dropped", pull.version, reason=str(exc), epsilon=eps)
        told = {seq, *(i for i, _ in late)}
        self._mark_reported(told, True)  # the server stored the join: these rounds will reach the ledger
        self._told = told
        cid = reply.cohort_id
        self._event("joined", cohort=cid, version=pull.version)
        uploaded = False
        try:
            try:
                start = reply if isinstance(reply, (CohortStart, CohortEnd)) else \
                    self._poll(cid, 0, CohortStart, patience_s=self.join_patience_s)
            except _NoProgress as exc:
                return self._leave(cid, pull.version, str(exc), eps)
            if isinstance(start, CohortEnd):
                return self._ended(start, pull.version, uploaded, eps)
            assert self.task is not None
            check_cohort(start, self.task, self.policy, member=self.member, identity_key=self.identity.public_key,
                         plan_id=self.plan.plan_id, base_version=pull.version, coordinates=self.plan.num_coordinates)
            w = weigh_update(update.delta, update.base_version, start.close_version, reference_of(start),
                             weight_rule(start), start.clip)
            check_own_weight(w.weight, self.policy)

            def input_vector() -> np.ndarray:
                if self.user is not None:
                    return self.user.input_vector(start, update.delta, w.weight)
                return codec_for(start).encode(w.weighted, w.weight, w.variance, self._rng)

            session = MemberSession(session_params(start), self.member, self.identity, input_vector)
            self._event("started", cohort=cid, members=len(start.members), close_version=start.close_version)
            given: Any = None  # the server's input to the stage: none for the first
            for stage in Stage:
                # One request per stage: submit this member's message and get the next slot's
                # server message in the reply (``_step``); it goes through the same checks as a
                # polled one (reply type, cohort id, then the member session's own checks).
                given = self._step(cid, stage, session.reply(stage, given))
                if stage is Stage.UPLOAD:
                    uploaded = True
                    self._event(STAGE_EVENTS[stage], cohort=cid, weight=w.weight, staleness=w.staleness)
                else:
                    self._event(STAGE_EVENTS[stage], cohort=cid)
                if isinstance(given, CohortEnd):
                    return self._ended(given, pull.version, uploaded, eps)
            raise AssertionError("the unmask stage's next slot is the cohort's end")  # _step returns a CohortEnd
        except (ServerUnavailable, CohortRefused, SecAggError) as exc:
            return RoundResult("dropped", pull.version, cid, uploaded=uploaded, reason=str(exc), epsilon=eps)
        except ServerRefused as exc:
            status = "dropped" if exc.status in (403, 404, 409) else "refused"
            return RoundResult(status, pull.version, cid, uploaded=uploaded, reason=str(exc), epsilon=eps)

    def _ended(self, end: CohortEnd, base_version: int, uploaded: bool, eps: float) -> RoundResult:
        status = end.status
        if status == "applied" and self.member not in end.included:
            status = "dropped"
        return RoundResult(status, base_version, end.cohort_id, end.applied_version if status == "applied" else -1,
                           uploaded, end.reason, eps)

    def _enter(self, join: JoinRequest) -> JoinReply | CohortStart | CohortEnd | Pending:
        """Join, and get the cohort's start in the same reply when it comes within the long-poll
        wait (``/enter``; every reply names the cohort). Against a server without it (404),
        ``/join`` and polls, for the rest of this client's life."""
        reply = self._combined("enter", join, (CohortStart, CohortEnd, Pending))
        if reply is not None:
            return reply
        return self.transport.call("join", join, (JoinReply,), patience_s=self.stage_patience)

    def _combined(self, route: str, msg: Any, expect: tuple[type, ...]) -> Any:
        """Call a combined route (``/enter``, ``/advance``: a message and the next one back in one
        request); None once the server has answered that it has no such route (404), after which
        this client uses the separate requests for the rest of its life."""
        if not self._advance:
            return None
        try:
            return self.transport.call(route, msg, expect, patience_s=self.stage_patience,
                                       read_timeout_s=self.poll_read_timeout)
        except ServerRefused as exc:
            if not (exc.status == 404 and exc.code == "http_error"):  # a refusal, not an unknown route
                raise
            self._advance = False
            return None

    def _step(self, cohort_id: str, stage: Stage, msg: Any) -> Any:
        """Send this member's ``stage`` message; return the server's message of the next slot
        (the next stage's input, or the cohort's end after the last stage) or a ``CohortEnd``.

        Uses ``/advance`` (one request); against a server without it (404) it falls back to
        ``/submit`` then ``/poll`` for the rest of this client's life.
        """
        slot = int(stage) + 1
        want = CohortEnd if slot == POLL_END else Stage(slot).server_input
        payload = wire.encode(msg)
        reply = self._combined("advance", Advance(cohort_id, payload), (want, CohortEnd, Pending))
        if reply is not None:
            _check_cohort_of(reply, cohort_id)
            if not isinstance(reply, Pending):
                return reply
            return self._poll(cohort_id, slot, want)  # stored; the next message is not out yet
        self.transport.call("submit", Submit(cohort_id, payload), (Ack,), patience_s=self.stage_patience)
        return self._poll(cohort_id, slot, want)

    def _leave(self, cohort_id: str, base_version: int, why: str, eps: float) -> RoundResult:
        """Stop waiting for a cohort that does not fill up; if it started meanwhile, we are simply dropped."""
        try:
            self.transport.call("leave", LeaveRequest(cohort_id), (Ack,), patience_s=10.0)
        except EdgeError:
            pass  # the join stays with the server, and so does the ledger row it will get
        else:
            self._mark_reported(self._told, False)  # the server forgot the join: report these rounds again
        return RoundResult("dropped", base_version, cohort_id, reason=why, epsilon=eps)

    # -- rounds the ledger must eventually hold -------------------------------------------------
    @property
    def claims_file(self) -> Path:
        """This device's own record of its signed spend claims (``ftte audit --device-record``)."""
        return self.state_dir / "spend_claims.jsonl"

    def _sign_spend(self, update: LocalUpdate, version: int) -> bytes:
        """Sign "this round, at these parameters, brought me to ε" and keep the claim locally before
        anything is sent, so the operator cannot later drop or alter this round's row unnoticed."""
        assert self.plan is not None
        s = update.stats
        if not s.enabled:
            return b""
        spend = s.spend_record(plan_id=self.plan.plan_id, version=version)
        spend = dataclasses.replace(spend, rng_source=spend.rng_source[:256])
        signed, claim = sign_spend(spend, float(s.epsilon_total), self.identity)
        assert signed.device_public_key is not None and signed.device_signature is not None
        append_claim(self.claims_file, claim, signed.device_public_key, signed.device_signature)
        assert self.store is not None
        seq = len(self.store.history(str(self.member)))
        self._remember_signature(seq, version, spend.rng_source, signed.device_signature)
        return bytes.fromhex(signed.device_signature)

    def _accountant_id(self) -> bytes:
        """A random id of this device's accountant state, made once with it (see ``JoinRequest``)."""
        path = self.state_dir / "accountant_id"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return bytes.fromhex(path.read_text().strip())[:16]
        with os.fdopen(fd, "w") as fh:
            fh.write(os.urandom(16).hex())
        return bytes.fromhex(path.read_text().strip())[:16]

    @property
    def _signatures_file(self) -> Path:
        return self.state_dir / "round_signatures.json"

    def _signatures(self) -> dict[int, dict[str, Any]]:
        try:
            doc = json.loads(self._signatures_file.read_text())
        except (OSError, ValueError):
            return {}
        return {int(k): v for k, v in doc.items()} if isinstance(doc, dict) else {}

    def _remember_signature(self, seq: int, version: int, rng_source: str, signature_hex: str) -> None:
        """Keep each round's signed evidence by its place in the accountant, for a late report."""
        doc = self._signatures()
        doc[seq] = {"version": version, "rng_source": rng_source, "signature": signature_hex}
        tmp = self._signatures_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({str(k): v for k, v in sorted(doc.items())}))
        os.replace(tmp, self._signatures_file)

    @property
    def _reported_file(self) -> Path:
        return self.state_dir / "reported.json"

    def _reported(self) -> set[int]:
        try:
            doc = json.loads(self._reported_file.read_text())
        except (OSError, ValueError):
            return set()
        return {int(i) for i in doc.get("reported", [])} if doc.get("member") == self.member else set()

    def _mark_reported(self, seqs: set[int], reported: bool) -> None:
        done = self._reported()
        done = done | seqs if reported else done - seqs
        tmp = self._reported_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"member": self.member, "reported": sorted(done)}))
        os.replace(tmp, self._reported_file)

    def _late_rounds(self) -> tuple[int, list[tuple[int, SpentRound]]]:
        """(this round's place in the accountant history, earlier rounds the server never heard of).

        A round is spent when the accountant records it, before training; if the device then
        died or lost the server before its join was acknowledged, the server never heard of
        it. Reporting such rounds with the next join keeps the ledger's ε equal to the one
        this device's accountant holds. (If the device died between the server's ack and
        writing ``reported.json``, a round is reported twice: the ledger over-counts, never under.)
        """
        assert self.store is not None and self.dp is not None
        device = str(self.member)
        history = self.store.history(device)
        state = self.store.state(device)
        if not (self.dp.enabled or self.user is not None) or state is None:
            return len(history), []
        clip = self.user.plan.params.clip if self.user is not None else self.dp.max_grad_norm
        done = self._reported()
        evidence = self._signatures()

        def spent(i: int, step) -> SpentRound:
            e = evidence.get(i)
            extra = dict(version=int(e["version"]), rng_source=str(e["rng_source"])[:128],
                         signature=bytes.fromhex(e["signature"])) if e else {}
            return SpentRound(step.steps, float(step.sample_rate), float(step.noise_multiplier),
                              float(clip), float(state.delta), **extra)

        late = [(i, spent(i, step)) for i, step in enumerate(history[:-1], start=1) if i not in done]
        return len(history), late[:MAX_LATE_ROUNDS]

    def _poll(self, cohort_id: str, stage: int, want: type, *, patience_s: float | None = None):
        """Long-poll until the server's message for ``stage`` (or the cohort's end) arrives."""
        assert self.task is not None
        # Stages after the start are bounded by the server's stage timeout, after which it
        # answers "dropped" or moves on; only waiting for the cohort to fill is open-ended.
        patience = 4.0 * self.stage_patience if patience_s is None else patience_s
        deadline = time.monotonic() + patience
        while True:
            reply = self.transport.call("poll", PollRequest(cohort_id, stage), (want, CohortEnd, Pending),
                                        patience_s=self.stage_patience, read_timeout_s=self.poll_read_timeout)
            _check_cohort_of(reply, cohort_id)
            if not isinstance(reply, Pending):
                return reply
            if time.monotonic() >= deadline:
                raise _NoProgress(f"no progress in cohort {cohort_id} stage {stage} for {patience:.0f} s")
            time.sleep(min(reply.retry_after_ms, 5000) / 1000.0)


__all__ = [
    "CertificateError",
    "EdgeClient",
    "EdgeError",
    "ModelMismatch",
    "RetryPolicy",
    "RoundResult",
    "ServerRefused",
    "ServerUnavailable",
    "Transport",
    "default_model_factory",
]

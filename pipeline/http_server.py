"""The HTTP face of the coordinator: a Starlette ASGI app that treats every byte as hostile.

Endpoints (all under ``/v1``; request and response bodies are ``ftte.wire`` msgpack with a
versioned schema, except the two operator endpoints, which speak JSON):

=================  =====================  ==========================================
``POST /task``      ``TaskRequest``         ``TaskInfo`` (plan, architecture, settings)
``POST /pull``      ``PullRequest``         ``ModelPull`` (version, plan id, hash, weights)
``POST /join``      ``JoinRequest``         ``JoinReply`` (the cohort to wait in)
``POST /enter``     ``JoinRequest``         a join, then the start's poll answer (slot 0)
``POST /poll``      ``PollRequest``         the stage's server message, ``CohortEnd`` or ``Pending``
``POST /submit``    ``Submit``              ``Ack`` once the message is durable
``POST /advance``   ``Advance``             a submit, then the next slot's poll answer
``POST /leave``     ``LeaveRequest``        ``Ack``: stop waiting for a cohort not yet started
``GET /health``     —                       JSON: status, version, schema
``GET /metrics``    —                       opt-in (``[http] metrics = true``, default off):
                                           Prometheus text; ``?format=json`` for JSON
=================  =====================  ==========================================

Every ``POST`` goes through the same gate, in an order chosen so that the cheap checks
run first, nothing is allocated for a request that will be refused, and every limit is
charged before anything is stored on the request's behalf:

1. ``Content-Length`` above the endpoint's limit (or not ASCII digits): **413** / **400**
   before a byte of the body is read (the body is then streamed and cut off at the limit
   too, for chunked uploads);
2. missing or malformed authentication headers, or a device key not on the allow-list:
   **401**; a timestamp that is not ASCII digits: **400** ``bad_timestamp``
   (``str.isdigit`` alone accepts ``"²"``, which ``int`` refuses);
3. a timestamp outside ``±clock_skew_s`` of the server clock, or older than this process's
   start (what makes nonces forgotten in a restart harmless): **400** ``stale_timestamp``,
   with the server time in the reply so an honest device can resynchronise;
4. the claimed key's *unverified* token bucket is empty: **429** before the body is read.
   Public keys are no secret (every ``CohortStart`` lists them), so anyone can claim one;
   this bucket bounds the body reads and signature checks such claims cost, and is refunded
   when the signature verifies, so an honest device never drains it;
5. the Ed25519 signature over method, path, body digest, nonce, timestamp and key: **401**;
6. the device's own token bucket is empty: **429** with ``Retry-After``;
7. a nonce already seen inside the window: **409** ``replay``. Nonces are kept per device,
   only for admitted requests and only while their timestamp could still be accepted, so a
   device holds at most ``rate_burst + rate_per_s · 2 · clock_skew_s`` of them and a flood
   from one device cannot fill a table that another device needs;
8. ``wire.decode`` with the endpoint's limits (size, msgpack nesting and lengths, schema
   version, tag, field kinds), off the event loop for large bodies: **422**;
9. the coordinator's own checks (plan, shapes, dtype, stage, membership): a
   :class:`~ftte.pipeline.refusal.Refused` code, always raised before any state change,
   answered with the status :mod:`ftte.pipeline.http_errors` maps it to.

Errors carry an :class:`~ftte.deploy_messages.ErrorReply` body. Every response carries the server
clock in ``x-ftte-server-time``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import resource
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TextIO

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from ftte.pipeline.coordinator import Coordinator
from ftte.pipeline.http_errors import http_status
from ftte.pipeline.refusal import Refused
from ftte.pipeline.deploy_config import HttpSettings
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ftte import wire
from ftte.http_auth import (
    API_PREFIX,
    CONTENT_TYPE,
    HEADER_DEVICE,
    HEADER_NONCE,
    HEADER_SERVER_TIME,
    HEADER_SIGNATURE,
    HEADER_TIME,
    body_digest,
    is_hex,
    member_id,
    request_signing_bytes,
)
from ftte.deploy_messages import (
    Ack,
    Advance,
    ErrorReply,
    JoinRequest,
    LeaveRequest,
    PollRequest,
    PullRequest,
    Submit,
    TaskRequest,
)


class ProtocolError(Exception):
    """A refusal at the HTTP layer: a status, a stable code, a detail; raised before any state change."""

    def __init__(self, status: int, code: str, detail: str = "") -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status, self.code, self.detail = status, code, detail


LATENCY_WINDOW = 20_000  # most recent successful requests per endpoint kept for the percentiles
OFF_LOOP_BYTES = 256 * 1024  # bodies at least this large are hashed and decoded in a worker thread
DECODE_WORKERS = 2  # at most this many large bodies are decoded at once
SWEEP_EVERY = 10_000  # admitted requests between sweeps of every device's nonce table


@dataclass
class TokenBucket:
    """``rate`` tokens per second up to ``burst``; one request costs one token."""

    rate: float
    burst: float
    tokens: float
    updated: float

    def refund(self) -> None:
        self.tokens = min(self.burst, self.tokens + 1.0)

    def take(self, now: float) -> float:
        """0 if a token was taken, else the seconds until one is available."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


@dataclass
class Metrics:
    started: float = field(default_factory=time.time)
    bytes_in: int = 0
    bytes_out: int = 0
    requests: dict[str, int] = field(default_factory=dict)
    statuses: dict[int, int] = field(default_factory=dict)
    devices_seen: set[int] = field(default_factory=set)

    latency: dict[str, deque] = field(default_factory=dict)

    def observe(self, key: str, seconds: float) -> None:
        window = self.latency.get(key)
        if window is None:
            window = self.latency[key] = deque(maxlen=LATENCY_WINDOW)
        window.append(seconds)

    def latency_summary(self) -> dict[str, dict[str, float]]:
        out = {}
        for key, window in sorted(self.latency.items()):
            values = sorted(window)
            if values:
                out[key] = {"count": len(values), "p50_ms": 1000 * values[len(values) // 2],
                            "p99_ms": 1000 * values[min(len(values) - 1, int(0.99 * len(values)))]}
        return out

    def count(self, route: str, status: int, n_in: int, n_out: int) -> None:
        self.requests[route] = self.requests.get(route, 0) + 1
        self.statuses[status] = self.statuses.get(status, 0) + 1
        self.bytes_in += n_in
        self.bytes_out += n_out


class _BodyTooLarge(Exception):
    pass


class Gate:
    """Authentication, replay protection, rate limits and body limits for one server process."""

    def __init__(self, http: HttpSettings, allow: dict[bytes, str], clock: Callable[[], float] = time.time) -> None:
        self.http = http
        self.clock = clock
        # Parsed once: a request then costs one Ed25519 verification and no key decoding.
        self.devices = {key.hex(): (member_id(key), Ed25519PublicKey.from_public_bytes(key)) for key in allow}
        if len({m for m, _ in self.devices.values()}) != len(self.devices):
            raise ValueError("two allow-listed keys map to the same member id")
        self.boot_ms = int(clock() * 1000)
        # A nonce must be remembered while its timestamp can still be accepted: at most
        # 2 * clock_skew_s after it is seen. The device's bucket admits at most burst +
        # rate * window requests in that time, which is therefore the most nonces an
        # in-budget device can hold; the quota is a backstop if the clock jumps.
        self.nonce_window_s = 2.0 * http.clock_skew_s
        self.nonce_quota = int(math.ceil(http.rate_burst + http.rate_per_s * self.nonce_window_s)) + 1
        self.nonces: dict[int, OrderedDict[str, float]] = {}  # member -> nonce -> expiry (seconds)
        self.buckets: dict[int, TokenBucket] = {}  # admitted requests, per device
        self.unverified: dict[int, TokenBucket] = {}  # requests claiming a key, before their signature checks
        self.signature_checks = 0
        self._admitted = 0

    @property
    def nonces_held(self) -> int:
        return sum(len(table) for table in self.nonces.values())

    def _bucket(self, table: dict[int, TokenBucket], member: int, now: float) -> TokenBucket:
        bucket = table.get(member)
        if bucket is None:
            burst = float(self.http.rate_burst)
            bucket = table[member] = TokenBucket(self.http.rate_per_s, burst, burst, now)
        return bucket

    @staticmethod
    def _expire(table: OrderedDict[str, float], now: float) -> None:
        while table:
            nonce, expiry = next(iter(table.items()))
            if expiry > now:
                break
            table.popitem(last=False)

    def _sweep_all(self, now: float) -> None:
        for member in list(self.nonces):
            self._expire(self.nonces[member], now)
            if not self.nonces[member]:
                del self.nonces[member]

    async def admit(self, request: Request, limit: int) -> tuple[int, bytes]:
        """(member, body) of an authentic, fresh, in-budget request; raises ``ProtocolError`` otherwise."""
        length = request.headers.get("content-length")
        if length is not None:
            if not (length.isascii() and length.isdigit()):
                raise ProtocolError(400, "bad_length", "Content-Length is not a number")
            if int(length) > limit:
                raise ProtocolError(413, "too_large", f"body of {length} bytes exceeds the limit of {limit}")
        h = request.headers
        device, nonce, stamp, sig = h.get(HEADER_DEVICE), h.get(HEADER_NONCE), h.get(HEADER_TIME), h.get(HEADER_SIGNATURE)
        if not (device and nonce and stamp and sig):
            raise ProtocolError(401, "unsigned", "missing authentication headers")
        if not (is_hex(device, 64) and is_hex(nonce, 32) and is_hex(sig, 128)):
            raise ProtocolError(401, "bad_auth_headers", "malformed authentication headers")
        # isascii(): str.isdigit() is also true for "\xb2" ("²"), which int() then refuses
        if not (stamp.isascii() and stamp.isdigit() and len(stamp) < 16):
            raise ProtocolError(400, "bad_timestamp", "the timestamp must be decimal ASCII digits (milliseconds)")
        known = self.devices.get(device)
        if known is None:
            raise ProtocolError(401, "unknown_device", "this key is not on the allow-list")
        member, key = known
        now = self.clock()
        t_ms = int(stamp)
        skew_ms = self.http.clock_skew_s * 1000
        if abs(t_ms - now * 1000) > skew_ms or t_ms < self.boot_ms:
            raise ProtocolError(400, "stale_timestamp", "timestamp outside the accepted window; resynchronise")
        # Anyone can claim a public key: charge the claim before reading a body or checking a signature.
        claims = self._bucket(self.unverified, member, now)
        wait = claims.take(now)
        if wait > 0:
            raise ProtocolError(429, "rate_limited", f"too many unauthenticated requests for this key; "
                                                     f"retry after {wait:.2f} s")
        try:
            body = await self._read(request, limit)
        except _BodyTooLarge:
            raise ProtocolError(413, "too_large", f"body exceeds the limit of {limit} bytes") from None
        digest = await asyncio.to_thread(body_digest, body) if len(body) >= OFF_LOOP_BYTES else body_digest(body)
        message = request_signing_bytes(request.method, request.url.path, digest, nonce, t_ms, device)
        self.signature_checks += 1
        try:
            key.verify(bytes.fromhex(sig), message)
        except InvalidSignature:
            raise ProtocolError(401, "bad_signature", "the request signature does not verify") from None
        claims.refund()  # authentic: the device's own bucket is what limits it from here
        wait = self._bucket(self.buckets, member, now).take(now)
        if wait > 0:
            raise ProtocolError(429, "rate_limited", f"retry after {wait:.2f} s")
        table = self.nonces.get(member)
        if table is None:
            table = self.nonces[member] = OrderedDict()
        self._expire(table, now)
        if nonce in table:
            raise ProtocolError(409, "replay", "this nonce was already used")
        if len(table) >= self.nonce_quota:
            raise ProtocolError(429, "rate_limited", "too many requests from this device in the replay window")
        table[nonce] = now + self.nonce_window_s
        self._admitted += 1
        if self._admitted % SWEEP_EVERY == 0:
            self._sweep_all(now)
        return member, body

    @staticmethod
    async def _read(request: Request, limit: int) -> bytes:
        chunks: list[bytes] = []
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise _BodyTooLarge()
            chunks.append(chunk)
        return b"".join(chunks)


Handler = Callable[[int, Any, bytes], Awaitable[Any]]


class DeviceApi:
    """Binds the gate, the coordinator and the metrics into Starlette routes."""

    def __init__(self, coordinator: Coordinator, gate: Gate, http: HttpSettings, *,
                 metrics: bool | None = None) -> None:
        self.coordinator = coordinator
        self.gate = gate
        self.http = http
        # /metrics reveals the fleet's activity (devices seen, cohorts, traffic): off unless the
        # operator sets [http] metrics = true (expose it only where scrapers, not devices, reach)
        self.metrics_enabled = bool(http.metrics) if metrics is None else metrics
        self.decoder = ThreadPoolExecutor(max_workers=DECODE_WORKERS, thread_name_prefix="ftte-decode")
        self.metrics = Metrics()
        self.upload_limit = submit_limit(coordinator.task.dim, coordinator.cfg.server.buffer_size)
        self.latency: dict[str, list[float]] = {}
        self.last_seen: dict[int, float] = {}  # member -> time of its last admitted request (progress log)

    def _time_header(self) -> dict[str, str]:
        return {HEADER_SERVER_TIME: str(int(self.gate.clock() * 1000))}

    def _encode(self, status: int, msg: Any, extra: dict[str, str] | None = None) -> Response:
        data = wire.encode(msg)
        headers = self._time_header()
        if extra:
            headers.update(extra)
        return Response(data, status_code=status, media_type=CONTENT_TYPE, headers=headers)

    def _error(self, exc: ProtocolError) -> Response:
        extra = {}
        if exc.status == 429:
            extra["retry-after"] = "1"
        reply = ErrorReply(exc.code, exc.detail[:1000], int(self.gate.clock() * 1000))
        return self._encode(exc.status, reply, extra)

    def route(self, name: str, request_type: type, handler: Handler, limit: int | None = None):
        limit_bytes = limit or self.http.max_request_bytes

        async def endpoint(request: Request) -> Response:
            t0 = t_body = time.perf_counter()
            body = b""
            key = name
            try:
                member, body = await self.gate.admit(request, limit_bytes)
                t_body = time.perf_counter()
                self.metrics.devices_seen.add(member)
                self.last_seen[member] = time.time()
                try:
                    if len(body) >= OFF_LOOP_BYTES:  # never stall every other device on one large body
                        msg = await asyncio.get_running_loop().run_in_executor(
                            self.decoder, wire.decode, body, request_type, limit_bytes)
                    else:
                        msg = wire.decode(body, expect=request_type, max_bytes=limit_bytes)
                except wire.WireError as exc:
                    raise ProtocolError(422, "malformed", str(exc)) from None
                reply = await handler(member, msg, body)
                if isinstance(reply, Ack) and reply.stage == 2:
                    key = "upload"  # a masked input: the endpoint the load benchmark measures
                response = self._encode(200, reply)
            except ProtocolError as exc:
                response = self._error(exc)
            except Refused as exc:
                response = self._error(ProtocolError(http_status(exc), exc.code, exc.detail))
            except Exception as exc:  # a server bug: say so in the protocol's own terms, and log it
                print(f"ftte server: {name} failed: {exc!r}", file=sys.stderr, flush=True)
                response = self._error(ProtocolError(500, "internal", "internal error"))
            self.metrics.count(name, response.status_code, len(body), len(response.body))
            if response.status_code == 200:
                # total: from the request's arrival (includes receiving the body from a slow
                # client); processing: from the whole body being in hand to the reply.
                now = time.perf_counter()
                self.metrics.observe(key, now - t0)
                self.metrics.observe(key + "_processing", now - t_body)
            return response

        return Route(f"{API_PREFIX}/{name}", endpoint, methods=["POST"])

    # -- handlers -----------------------------------------------------------------------------
    async def _task(self, member: int, msg: TaskRequest, raw: bytes):
        return self.coordinator.task_info(member)

    async def _pull(self, member: int, msg: PullRequest, raw: bytes):
        return self.coordinator.pull(member, msg)

    async def _join(self, member: int, msg: JoinRequest, raw: bytes):
        return await self.coordinator.join(member, msg, raw)

    async def _leave(self, member: int, msg: LeaveRequest, raw: bytes):
        return await self.coordinator.leave(member, msg)

    async def _poll(self, member: int, msg: PollRequest, raw: bytes):
        return await self.coordinator.poll(member, msg)

    async def _submit(self, member: int, msg: Submit, raw: bytes):
        return await self.coordinator.submit(member, msg, self.upload_limit)

    async def _enter(self, member: int, msg: JoinRequest, raw: bytes):
        """Join, then long-poll the cohort's start: the same checks and durability as ``/join`` and
        ``/poll``, in one request. A 200 reply (start, end, or ``Pending`` naming the cohort) means
        the join is stored."""
        joined = await self.coordinator.join(member, msg, raw)
        return await self.coordinator.poll(member, PollRequest(joined.cohort_id, 0))

    async def _advance(self, member: int, msg: Advance, raw: bytes):
        """Submit, then long-poll the next slot: the same checks and durability as ``/submit`` and
        ``/poll``, in one request (the device's round needs one request per stage, not two)."""
        ack = await self.coordinator.submit(member, Submit(msg.cohort_id, msg.payload), self.upload_limit)
        return await self.coordinator.poll(member, PollRequest(msg.cohort_id, ack.stage + 1))

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "version": self.coordinator.version, "schema": wire.SCHEMA_VERSION},
                            headers=self._time_header())

    def metrics_doc(self) -> dict[str, Any]:
        m = self.metrics
        return {
            **self.coordinator.status(),
            "uptime_s": round(time.time() - m.started, 3),
            "devices_allowed": len(self.gate.devices),
            "devices_seen": len(m.devices_seen),
            "bytes_in": m.bytes_in,
            "bytes_out": m.bytes_out,
            "requests": m.requests,
            "statuses": {str(k): v for k, v in sorted(m.statuses.items())},
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "nonces_held": self.gate.nonces_held,
            "latency": m.latency_summary(),
        }

    async def metrics_endpoint(self, request: Request) -> Response:
        doc = self.metrics_doc()
        if request.query_params.get("format") == "json":
            return JSONResponse(doc, headers=self._time_header())
        return PlainTextResponse(prometheus_text(doc), headers=self._time_header(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    def routes(self) -> list[Route]:
        return [
            self.route("task", TaskRequest, self._task),
            self.route("pull", PullRequest, self._pull),
            self.route("join", JoinRequest, self._join),
            self.route("enter", JoinRequest, self._enter),
            self.route("leave", LeaveRequest, self._leave),
            self.route("poll", PollRequest, self._poll),
            self.route("submit", Submit, self._submit, limit=self.upload_limit),
            self.route("advance", Advance, self._advance, limit=self.upload_limit),
            Route(f"{API_PREFIX}/health", self.health, methods=["GET"]),
        ] + ([Route(f"{API_PREFIX}/metrics", self.metrics_endpoint, methods=["GET"])] if self.metrics_enabled else [])


_COUNTERS = {"bytes_in", "bytes_out"}


def _prom_name(key: str) -> str:
    return "ftte_" + "".join(c if c.isascii() and (c.isalnum() or c == "_") else "_" for c in key)


def _prom_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def prometheus_text(doc: dict[str, Any]) -> str:
    """The metrics document in the Prometheus text exposition format (version 0.0.4).

    Numbers at the top level become gauges (``bytes_in``/``bytes_out`` counters), the
    request and status counts become labelled counters, the latency percentiles a summary;
    anything else (text, nested documents) is left out.
    """
    lines: list[str] = []

    def metric(name: str, kind: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{labels} {float(value)!r}" for labels, value in samples)

    for key, value in sorted(doc.items()):
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, (int, float)) and math.isfinite(value):
            name = _prom_name(key) + ("_total" if key in _COUNTERS else "")
            metric(name, "counter" if key in _COUNTERS else "gauge", [("", value)])
    requests = doc.get("requests") or {}
    metric("ftte_http_requests_total", "counter",
           [(f'{{route="{_prom_label(str(r))}"}}', n) for r, n in sorted(requests.items())])
    statuses = doc.get("statuses") or {}
    metric("ftte_http_responses_total", "counter",
           [(f'{{status="{_prom_label(str(c))}"}}', n) for c, n in sorted(statuses.items())])
    latency = doc.get("latency") or {}
    samples: list[tuple[str, float]] = []
    for route, summary in sorted(latency.items()):
        label = _prom_label(str(route))
        samples += [(f'{{route="{label}",quantile="0.5"}}', summary["p50_ms"] / 1000.0),
                    (f'{{route="{label}",quantile="0.99"}}', summary["p99_ms"] / 1000.0)]
    metric("ftte_http_latency_seconds", "summary", samples)
    lines.extend(f'ftte_http_latency_seconds_count{{route="{_prom_label(str(r))}"}} {float(s["count"])!r}'
                 for r, s in sorted(latency.items()))
    return "\n".join(lines) + "\n"


def submit_limit(dim: int, cohort_size: int) -> int:
    """Largest honest ``Submit``: a 32-bit masked vector of ``dim + 2`` coordinates, or the
    share messages of a ``cohort_size`` cohort, plus envelope overhead."""
    masked = 4 * (dim + 2) + 256
    shares = 160 * cohort_size + 256
    return max(masked, shares) + 4096


class ProgressLog:
    """One line per finished cohort: what an operator watching the server wants to see.

    It reads the coordinator's record of ended cohorts (insertion-ordered) a few times a
    second, so it never sits on the protocol's path; a line carries the cohort's outcome,
    the version, the test accuracy of that version when the server evaluates, the counts of
    applied and aborted cohorts and the devices that made a request in the last
    :data:`ACTIVE_WINDOW_S` seconds.
    """

    ACTIVE_WINDOW_S = 120.0

    def __init__(self, coordinator: Coordinator, api: "DeviceApi", out: TextIO) -> None:
        self.coordinator = coordinator
        self.api = api
        self.out = out
        self.seen: set[str] = set()

    def start(self) -> None:
        self.seen = set(self.coordinator.ended)  # cohorts finished before this start (recovered)

    def lines(self) -> list[str]:
        c = self.coordinator
        new = [(cid, end) for cid, end in list(c.ended.items()) if cid not in self.seen]
        self.seen = set(c.ended)
        if not new:
            return []
        now = time.time()
        active = sum(1 for t in self.api.last_seen.values() if now - t <= self.ACTIVE_WINDOW_S)
        counts = (f"cohorts applied {c.counters.cohorts_applied}, aborted {c.counters.cohorts_aborted}; "
                  f"devices active {active}")
        out = []
        for cid, end in new:
            if end.status == "applied":
                row = c.recent_history.get(end.applied_version) or {}
                acc = ""
                if row.get("accuracy") is not None:  # several cohorts may end between two looks
                    acc = f", test accuracy {float(row['accuracy']):.4f}"
                out.append(f"ftte server: cohort {cid} applied ({len(end.included)} members): "
                           f"version {end.applied_version}{acc}; {counts}")
            else:
                out.append(f"ftte server: cohort {cid} aborted ({end.reason[:160]}): version {c.version}; {counts}")
        return out

    async def run(self, interval_s: float = 0.25) -> None:
        self.start()
        while True:
            await asyncio.sleep(interval_s)
            for line in self.lines():
                print(line, file=self.out, flush=True)


def build_app(coordinator: Coordinator, gate: Gate, http: HttpSettings, *,
              metrics: bool | None = None, progress: TextIO | None = None) -> tuple[Starlette, DeviceApi]:
    """The ASGI app; ``metrics`` overrides ``[http] metrics`` (default: off); ``progress``
    receives one line per finished cohort (see :class:`ProgressLog`; default: none)."""
    api = DeviceApi(coordinator, gate, http, metrics=metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        await coordinator.recover()
        loop = asyncio.get_running_loop()
        timers = loop.create_task(coordinator.run_timers())
        log = loop.create_task(ProgressLog(coordinator, api, progress).run()) if progress is not None else None
        try:
            yield
        finally:
            timers.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await timers
            if log is not None:
                log.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await log
            await coordinator.drain()
            api.decoder.shutdown(wait=False, cancel_futures=True)

    app = Starlette(routes=api.routes(), lifespan=lifespan)
    return app, api


__all__ = ["DeviceApi", "Gate", "ProgressLog", "TokenBucket", "build_app", "prometheus_text", "submit_limit"]

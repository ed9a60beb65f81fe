"""``ftte bench http``: a loopback load run of `ftte server` with hundreds of concurrent devices.

What runs: a real ``ftte server`` process (HTTPS with a throwaway CA, SQLite journal and
ledger, DP accounting on), and ``--workers`` load processes that each drive
``devices / workers`` simulated devices on asyncio, one TLS connection per device. A
simulated device does everything a real one does on the wire (signed requests, pull,
join with its DP parameters, the five secure-aggregation stages with real keys, shares
and masks, a masked upload of the plan's size) except training: its update is random, so
the load is the server's, not torch's.

It stops by itself: after ``--duration`` seconds no device starts a new round, devices
finish (or abandon) their cohort within ``--grace`` seconds, and the whole run is
bounded by a hard timeout after which every process is killed. It reports, as JSON:
requests per second over the measured window, p50/p99 latency of the upload endpoint
(client-side, around the HTTPS call, and server-side, inside the handler), the server's
peak resident memory, the peak number of established connections to the server, cohorts
applied, and the requests refused by status.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--devices", type=int, default=200, help="concurrent devices (connections), default 200")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load, default 60")
    parser.add_argument("--grace", type=float, default=30.0, help="seconds for cohorts in flight to finish")
    parser.add_argument("--workers", type=int, default=2, help="load-generating processes, default 2")
    parser.add_argument("--buffer", type=int, default=20, help="cohort size K, default 20")
    parser.add_argument("--model", default="mlp", help="model whose subset is uploaded (default mlp: 17,226 floats)")
    parser.add_argument("--stage-timeout", type=float, default=20.0, help="server stage timeout, seconds")
    parser.add_argument("--plaintext", action="store_true", help="plain HTTP instead of TLS")
    parser.add_argument("--synchronous", choices=("full", "normal"), default="full",
                        help="SQLite durability of the server state (default full: fsync every commit)")
    parser.add_argument("--keep", metavar="DIR", help="run in DIR and keep the server state (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="print only the JSON result")


# -- server ----------------------------------------------------------------------------------------

def _write_config(root: Path, args: argparse.Namespace, port: int, pki) -> Path:
    tls = "plaintext = true\n" if pki is None else f'tls_cert = "{pki.server_cert}"\ntls_key = "{pki.server_key}"\n'
    cfg = root / "server.toml"
    cfg.write_text(f"""
[run]
strategy = "ftte"
[model]
name = "{args.model}"
[train]
local_steps = 2
batch_size = 16
[privacy]
noise_multiplier = 1.0
epsilon_max = 1000000.0
target_epsilon = 0.0
accountant = "rdp"
[secagg]
clip = 1.0
value_bits = 12
[server]
buffer_size = {args.buffer}
deadline_s = 5.0
[http]
host = "127.0.0.1"
port = {port}
{tls}poll_wait_s = 10.0
rate_per_s = 100.0
rate_burst = 200
metrics = true
[deploy]
state = "{root / 'server.db'}"
ledger_key = "{root / 'ledger.key'}"
allow_list = "{root / 'devices.txt'}"
input_shape = [64]
num_classes = 10
stage_timeout_s = {args.stage_timeout}
max_staleness = 1000
synchronous = "{args.synchronous}"
""")
    return cfg


def _peak_rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def _established(port: int) -> int:
    """Established TCP connections whose local port is the server's (server side of each connection)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if parts[3] == "01" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


# -- load workers -----------------------------------------------------------------------------------

def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def _device_loop(url: str, key: bytes, ca: str | None, stop_at: float, hard_stop: float, out: dict) -> None:
    import httpx
    import numpy as np
    from ftte.crypto.primitives import Signer
    from ftte.crypto.secagg_member import MemberSession
    from ftte.crypto.stages import POLL_END, Stage
    from ftte.protocol.cohort import codec_for, session_params
    from ftte.edge.plan import SubsetPlan

    from ftte import wire
    from ftte.http_auth import (
        HEADER_SERVER_TIME,
        signed_headers,
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

    signer = Signer(key)
    device = signer.public_key.hex()
    rng = np.random.default_rng(int.from_bytes(key[:4], "big"))
    verify: Any = False
    if ca:
        import ssl

        verify = ssl.create_default_context(cafile=ca)
    offset = [0]
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(base_url=url, verify=verify, limits=limits, timeout=httpx.Timeout(60.0)) as http:

        async def call(endpoint: str, msg: Any, timed: bool = False) -> Any:
            path = f"/v1/{endpoint}"
            body = wire.encode(msg)
            for attempt in range(20):
                if time.time() > hard_stop:
                    raise TimeoutError
                headers = signed_headers(signer.sign, device, path, body, time_ms=int(time.time() * 1000) + offset[0])
                t0 = time.perf_counter()
                try:
                    r = await http.post(path, content=body, headers=headers)
                except httpx.TransportError:
                    out["transport_errors"] += 1
                    await asyncio.sleep(0.2 * (attempt + 1))
                    continue
                dt = time.perf_counter() - t0
                out["requests"] += 1
                if time.time() <= stop_at:
                    out["requests_in_window"] += 1
                stamp = r.headers.get(HEADER_SERVER_TIME)
                if stamp:
                    offset[0] = int(stamp) - int(time.time() * 1000)
                if r.status_code == 200:
                    if timed:
                        out["upload_s"].append(dt)
                    return wire.decode(r.content)
                code = wire.decode(r.content, expect=ErrorReply).code
                out["refused"][f"{r.status_code} {code}"] = out["refused"].get(f"{r.status_code} {code}", 0) + 1
                if r.status_code in (429, 503) or code in ("stale_timestamp", "replay"):
                    await asyncio.sleep(0.1 * (attempt + 1))
                    continue
                return None
            return None

        info = await call("task", TaskRequest("ftte-bench"))
        if not isinstance(info, TaskInfo):
            return
        plan = SubsetPlan.from_json(info.plan_json)
        while time.time() < stop_at:
            pull = await call("pull", PullRequest(plan.plan_id))
            if not isinstance(pull, ModelPull):
                continue
            join = JoinRequest(plan_id=plan.plan_id, base_version=pull.version, model_hash=pull.model_hash,
                               steps=info.local_steps, sample_rate=0.05, noise_multiplier=info.noise_multiplier,
                               max_grad_norm=info.max_grad_norm, accountant=info.accountant, delta=1e-5,
                               epsilon_max=0.0, rng_source="bench", torch_version="-", opacus_version="-",
                               ftte_version="-")
            reply = await call("join", join)
            if not isinstance(reply, JoinReply):
                continue
            cid = reply.cohort_id

            async def poll(stage: int, want: type):
                while time.time() < hard_stop:
                    r = await call("poll", PollRequest(cid, stage))
                    if r is None or isinstance(r, CohortEnd) or isinstance(r, want):
                        return r
                    if not isinstance(r, Pending):
                        return None
                return None

            start = await poll(0, CohortStart)
            if not isinstance(start, CohortStart):
                continue

            def input_vector(start=start) -> np.ndarray:
                update = rng.normal(scale=0.2 / np.sqrt(plan.num_coordinates), size=plan.num_coordinates)
                return codec_for(start).encode(update, 1.0, float(update.var()), rng)

            session = MemberSession(session_params(start), info.member, signer, input_vector)

            async def submit(msg: Any, timed: bool = False) -> bool:
                return isinstance(await call("submit", Submit(cid, wire.encode(msg)), timed), Ack)

            ok = True
            for stage in Stage:
                given = None
                if stage.server_input is not None:
                    given = await poll(int(stage), stage.server_input)
                    if not isinstance(given, stage.server_input):
                        ok = False
                        break
                if not await submit(session.reply(stage, given), timed=stage is Stage.UPLOAD):
                    ok = False
                    break
                if stage is Stage.UPLOAD:
                    out["uploads"] += 1
            if not ok:
                continue
            end = await poll(POLL_END, CohortEnd)
            if isinstance(end, CohortEnd):
                out["rounds_" + end.status] = out.get("rounds_" + end.status, 0) + 1


def _worker(url: str, keys: list[bytes], ca: str | None, start_at: float, stop_at: float, hard_stop: float,
            queue: mp.Queue) -> None:
    out: dict[str, Any] = {"requests": 0, "requests_in_window": 0, "uploads": 0, "upload_s": [],
                           "transport_errors": 0, "refused": {}, "crashed": 0}

    async def main() -> None:
        await asyncio.sleep(max(0.0, start_at - time.time()))

        async def guarded(key: bytes) -> None:
            try:
                await _device_loop(url, key, ca, stop_at, hard_stop, out)
            except TimeoutError:
                pass
            except Exception as exc:  # count and keep the others going
                out["crashed"] += 1
                out.setdefault("crash_examples", []).append(repr(exc)[:200])

        tasks = [asyncio.create_task(guarded(k)) for k in keys]
        await asyncio.wait(tasks, timeout=max(1.0, hard_stop - time.time()))
        for t in tasks:
            t.cancel()

    asyncio.run(main())
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    out["cpu_s"] = usage.ru_utime + usage.ru_stime
    out["crash_examples"] = out.get("crash_examples", [])[:5]
    queue.put(out)


# -- the run ------------------------------------------------------------------------------------------

def run_load(args: argparse.Namespace) -> dict[str, Any]:
    from ftte.bench.http_pki import make_pki
    from ftte.crypto.primitives import Signer

    if args.devices < 2 or args.buffer < 2 or args.buffer > args.devices:
        raise ValueError("need 2 <= --buffer <= --devices")
    tmp = None
    if args.keep:
        root = Path(args.keep)
        root.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="ftte-bench-http-")
        root = Path(tmp.name)
    signers = [Signer() for _ in range(args.devices)]
    (root / "devices.txt").write_text("".join(f"{s.public_key.hex()}\n" for s in signers))
    pki = None if args.plaintext else make_pki(root / "pki")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _write_config(root, args, port, pki)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    log = open(root / "server.log", "ab")
    profile = os.environ.get("FTTE_PROFILE_SERVER")  # a path: profile the server's event loop with cProfile
    prefix = ["-m", "cProfile", "-o", profile] if profile else []
    server = subprocess.Popen([sys.executable, *prefix, "-m", "ftte.cli", "server", "--config", str(cfg)],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"{'http' if pki is None else 'https'}://127.0.0.1:{port}"
    hard_timeout = args.duration + args.grace + 120.0
    t_begin = time.time()
    result: dict[str, Any] = {}
    try:
        _wait_healthy(url, pki, server, timeout=120)
        cpu_at_start = _cpu_seconds(server.pid)
        ctx = mp.get_context("spawn")
        queue: mp.Queue = ctx.Queue()
        start_at = time.time() + 3.0  # let the workers import first
        stop_at = start_at + args.duration
        hard_stop = stop_at + args.grace
        keys = [s.private_bytes() for s in signers]
        shards = [keys[i::args.workers] for i in range(args.workers)]
        workers = [ctx.Process(target=_worker, args=(url, shard, None if pki is None else str(pki.ca_cert),
                                                     start_at, stop_at, hard_stop, queue), daemon=True)
                   for shard in shards]
        for w in workers:
            w.start()
        peak_conn, samples = 0, []
        while time.time() < hard_stop + 5 and any(w.is_alive() for w in workers):
            if time.time() - t_begin > hard_timeout:
                break
            if start_at <= time.time() <= stop_at:
                n = _established(port)
                samples.append(n)
                peak_conn = max(peak_conn, n)
            time.sleep(0.5)
        parts = []
        for _ in workers:
            try:
                parts.append(queue.get(timeout=max(5.0, hard_stop + 30 - time.time())))
            except Exception:
                break
        for w in workers:
            w.join(timeout=5)
            if w.is_alive():
                w.kill()
        metrics = _get_json(url, pki, "/v1/metrics?format=json")
        server_cpu = _cpu_seconds(server.pid) - cpu_at_start
        uploads = [x for p in parts for x in p["upload_s"]]
        refused: dict[str, int] = {}
        for p in parts:
            for k, v in p["refused"].items():
                refused[k] = refused.get(k, 0) + v
        server_upload = metrics.get("latency", {}).get("upload", {})
        server_processing = metrics.get("latency", {}).get("upload_processing", {})
        result = {
            "devices": args.devices,
            "workers": args.workers,
            "duration_s": args.duration,
            "tls": pki is not None,
            "synchronous": args.synchronous,
            "model": args.model,
            "upload_coordinates": metrics.get("last_history_row", {}) and None,
            "buffer_size": args.buffer,
            "requests": sum(p["requests"] for p in parts),
            "requests_per_s": round(sum(p["requests_in_window"] for p in parts) / args.duration, 1),
            "uploads": len(uploads),
            "uploads_per_s": round(len(uploads) / args.duration, 1),
            "upload_p50_ms": round(1000 * _percentile(uploads, 0.5), 2),
            "upload_p99_ms": round(1000 * _percentile(uploads, 0.99), 2),
            "server_upload_p50_ms": round(server_upload.get("p50_ms", float("nan")), 2),
            "server_upload_p99_ms": round(server_upload.get("p99_ms", float("nan")), 2),
            "server_upload_processing_p50_ms": round(server_processing.get("p50_ms", float("nan")), 2),
            "server_upload_processing_p99_ms": round(server_processing.get("p99_ms", float("nan")), 2),
            "server_peak_rss_bytes": max(_peak_rss(server.pid), int(metrics.get("peak_rss_bytes", 0))),
            "peak_established_connections": peak_conn,
            "mean_established_connections": round(sum(samples) / len(samples), 1) if samples else 0,
            "versions": metrics.get("version"),
            "cohorts_applied": metrics.get("cohorts_applied"),
            "cohorts_aborted": metrics.get("cohorts_aborted"),
            "ledger_rows_written": metrics.get("ledger_rows_written"),
            "journal_transactions": metrics.get("journal_transactions"),
            "journal_entries": metrics.get("journal_entries"),
            "bytes_in": metrics.get("bytes_in"),
            "bytes_out": metrics.get("bytes_out"),
            "refused": refused,
            "transport_errors": sum(p["transport_errors"] for p in parts),
            "device_crashes": sum(p["crashed"] for p in parts),
            "crash_examples": [e for p in parts for e in p.get("crash_examples", [])][:5],
            "wall_s": round(time.time() - t_begin, 1),
            "server_cpu_s": round(server_cpu, 1),
            "load_workers_cpu_s": round(sum(p.get("cpu_s", 0.0) for p in parts), 1),
            "cpus": os.cpu_count(),
            "journal_write_ms": metrics.get("journal_write_ms"),
            "cohort_commit_ms": metrics.get("cohort_commit_ms"),
            "server_latency_ms": {k: {q: round(x, 2) for q, x in v.items()} for k, v in metrics.get("latency", {}).items()},
        }
        del result["upload_coordinates"]
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
        log.close()
        if tmp is not None:
            tmp.cleanup()
    return result


def _ssl(pki):
    import ssl

    return None if pki is None else ssl.create_default_context(cafile=str(pki.ca_cert))


def _get_json(url: str, pki, path: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(url + path, timeout=30, context=_ssl(pki)) as r:
        return json.loads(r.read())


def _wait_healthy(url: str, pki, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"server exited with {server.returncode}")
        try:
            _get_json(url, pki, "/v1/health")
            return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError("server did not become healthy")


def run(args: argparse.Namespace) -> int:
    try:
        result = run_load(args)
    except (ValueError, RuntimeError) as exc:
        print(f"ftte bench http: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(json.dumps(result, indent=2, sort_keys=True))
    return 0 if result.get("uploads", 0) > 0 and result.get("device_crashes", 1) == 0 else 1

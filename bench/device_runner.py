"""The device process of ``ftte bench device``: a real :class:`~ftte.edge.http_client.EdgeClient`, timed by phase.

``python -m ftte.bench.device_runner --server URL --ca CA --key KEY --data CSV --out FILE.json``

It runs real rounds against ``ftte server`` (pull, DP-SGD, join, five secure-aggregation
stages over HTTPS) and charges every second, wall and CPU, to the phase it was spent in.
The client itself is not changed: the runner passes a timing ``Transport`` subclass and a
timing ``EdgeClient`` subclass, and, in this process only, wraps the three names the
client's ``aggregate`` uses for the update's encoding and the secure-aggregation member
(``weigh_update``, ``codec_for``, ``MemberSession``). A phase's time is exclusive: the
signing inside a request is charged to ``sign``, not to the request.

After the protocol rounds, the same (confined) process times what the deployment cannot
switch: the same training without DP, the full model with and without DP, the encoding
and one member's secure-aggregation work in-process
(:func:`ftte.crypto.secagg_local.run_session`) at the subset's and the full model's size,
and the training-memory figures the plan search uses. Everything goes to ``--out``.
"""

from __future__ import annotations

import time

_T_MAIN = time.time()  # the interpreter has started and is running this module; nothing heavy imported yet

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Iterator  # noqa: E402

TIMED_NAMES = ("weigh_update", "codec_for", "MemberSession")


def rss_bytes() -> tuple[int, int]:
    """(current, peak) resident set of this process, from /proc/self/status (VmRSS, VmHWM)."""
    cur = peak = 0
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    except OSError:
        pass
    if not peak:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return cur, peak


def own_cgroup_cpu_stat() -> Path | None:
    """The ``cpu.stat`` of this process's own CPU cgroup (v1 ``cpu`` controller, or v2), if readable."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        names = controllers.split(",")
        if "cpu" in names:  # cgroup v1
            for mount in (",".join(names), "cpu", "cpu,cpuacct"):
                path = Path("/sys/fs/cgroup") / mount / rel.lstrip("/") / "cpu.stat"
                if path.exists():
                    return path
        elif controllers == "":  # cgroup v2
            path = Path("/sys/fs/cgroup") / rel.lstrip("/") / "cpu.stat"
            if path.exists():
                return path
    return None


def throttled_seconds(path: Path) -> float:
    """Seconds the cgroup has spent throttled by its CPU quota so far (v1 ns, v2 us)."""
    for line in path.read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "throttled_time":
            return int(value) / 1e9
        if key == "throttled_usec":
            return int(value) / 1e6
    return 0.0


class PhaseClock:
    """Wall and CPU seconds per named phase, exclusive of the phases nested inside it.

    With ``throttle`` (a cgroup ``cpu.stat``), the phases named in ``throttled_phases`` also get
    the seconds the quota held the process back while they ran (inclusive of nested phases):
    wall time that is neither CPU nor network. Reading the file costs CPU that lands in the
    enclosing phase, so it is off unless asked for."""

    def __init__(self) -> None:
        self.totals: dict[str, list[float]] = {}
        self._stack: list[list[float]] = []
        self.throttle: Path | None = None
        self.throttled_phases: frozenset[str] = frozenset()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        track = self.throttle is not None and name in self.throttled_phases
        th0 = throttled_seconds(self.throttle) if track else 0.0  # type: ignore[arg-type]
        w0, c0 = time.perf_counter(), time.process_time()
        self._stack.append([0.0, 0.0])
        try:
            yield
        finally:
            child_w, child_c = self._stack.pop()
            w, c = time.perf_counter() - w0, time.process_time() - c0
            t = self.totals.setdefault(name, [0.0, 0.0, 0, 0.0])
            t[0] += w - child_w
            t[1] += c - child_c
            t[2] += 1
            if track:
                t[3] += throttled_seconds(self.throttle) - th0  # type: ignore[arg-type]
            if self._stack:
                self._stack[-1][0] += w
                self._stack[-1][1] += c

    def take(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for k, v in self.totals.items():
            out[k] = {"wall_s": v[0], "cpu_s": v[1], "calls": int(v[2])}
            if self.throttle is not None and k in self.throttled_phases:
                out[k]["throttled_s"] = v[3]
        self.totals = {}
        return out


CLOCK = PhaseClock()


def cpu_share_probe(seconds: float) -> dict[str, float]:
    """Spin for ``seconds`` of wall time: the CPU time obtained over the wall time is this process's share."""
    w0, c0 = time.perf_counter(), time.process_time()
    x = 0
    while time.perf_counter() - w0 < seconds:
        for i in range(2000):
            x += i
    w, c = time.perf_counter() - w0, time.process_time() - c0
    return {"wall_s": w, "cpu_s": c, "share": c / w}


def _install_timers() -> None:
    """Wrap, in this process only, the names the client's ``aggregate`` uses to encode and mask."""
    import ftte.edge.http_client as hc
    from ftte.crypto.secagg_member import MemberSession

    missing = [n for n in TIMED_NAMES if not hasattr(hc, n)]
    if missing:
        raise RuntimeError(f"ftte.edge.http_client no longer uses {missing}: update the device benchmark's timers")
    weigh = hc.weigh_update
    codec_for = hc.codec_for

    def timed_weigh(*a: Any, **k: Any) -> Any:
        with CLOCK.phase("encode"):
            return weigh(*a, **k)

    class TimedCodec:
        def __init__(self, codec: Any) -> None:
            self._codec = codec
            LAST["codec"] = codec

        def encode(self, *a: Any, **k: Any) -> Any:
            with CLOCK.phase("encode"):
                return self._codec.encode(*a, **k)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._codec, name)

    def timed_codec_for(start: Any) -> Any:
        LAST["start"] = start
        return TimedCodec(codec_for(start))

    class TimedMemberSession(MemberSession):
        def reply(self, stage: Any, server_input: Any) -> Any:
            with CLOCK.phase("secagg"):
                return super().reply(stage, server_input)

    hc.weigh_update = timed_weigh
    hc.codec_for = timed_codec_for
    hc.MemberSession = TimedMemberSession


LAST: dict[str, Any] = {}


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else 0.0


def time_training(trainer: Any, member: int, weights: Any, x: Any, y: Any, reps: int) -> dict[str, float]:
    """Median wall and CPU seconds of ``reps`` local rounds of ``trainer`` (after one warm-up round)."""
    trainer.train(member, 0, weights, x, y)
    walls, cpus = [], []
    for _ in range(reps):
        w0, c0 = time.perf_counter(), time.process_time()
        trainer.train(member, 0, weights, x, y)
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return {"wall_s": _median(walls), "cpu_s": _median(cpus), "reps": reps}


def time_encoding(codec: Any, dim: int, rule: Any, reps: int) -> dict[str, float]:
    import dataclasses

    import numpy as np
    from ftte.protocol.encoding import weigh_update

    codec = dataclasses.replace(codec, dim=dim)
    rng = np.random.default_rng(0)
    delta = rng.normal(0, 0.01, dim).astype(np.float32)
    walls, cpus = [], []
    for _ in range(reps + 1):
        w0, c0 = time.perf_counter(), time.process_time()
        w = weigh_update(delta, 0, 1, None, rule, codec.clip)
        codec.encode(w.weighted, w.weight, w.variance, rng)
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return {"wall_s": _median(walls[1:]), "cpu_s": _median(cpus[1:]), "reps": reps}


def time_secagg_member(start: Any, dim: int, reps: int) -> dict[str, float]:
    """One member's work in a whole in-process session (``run_session``) of the real cohort's shape, at ``dim``.

    The session runs every member and the server in this process; the server's time is
    measured apart and removed, and the rest is divided by the number of members.
    """
    import dataclasses

    import numpy as np
    from ftte.crypto.primitives import Signer
    from ftte.crypto.quantize import Quantizer
    from ftte.crypto.secagg_local import run_session
    from ftte.protocol.cohort import session_params

    params = session_params(start)
    members = params.members
    identities = {m: Signer() for m in members}
    params = dataclasses.replace(params, identity_keys=tuple(identities[m].public_key for m in members),
                                 dim=dim + 2)
    rng = np.random.default_rng(0)
    q = Quantizer(1.0, start.value_bits, start.ring_bits)
    inputs = {m: q.quantize(rng.normal(0, 0.2, dim + 2), rng) for m in members}
    walls, cpus, masks = [], [], []
    for _ in range(reps):
        w0, c0 = time.perf_counter(), time.process_time()
        result, stats = run_session(params, identities, inputs)
        w, c = time.perf_counter() - w0, time.process_time() - c0
        if result is None:
            raise RuntimeError(f"in-process session aborted: {stats.aborted}")
        n = len(members)
        # the server's share is wall time; on one confined process wall and CPU scale alike, so remove it pro rata
        server_fraction = stats.server_seconds / w if w > 0 else 0.0
        walls.append((w - stats.server_seconds) / n)
        cpus.append(c * (1.0 - server_fraction) / n)
        masks.append(_median(list(stats.mask_seconds.values())))
    return {"wall_s": _median(walls), "cpu_s": _median(cpus), "mask_wall_s": _median(masks),
            "members": len(members), "dim": dim, "reps": reps}


def training_memory(model: Any, plan: Any, batch_size: int, input_shape: tuple[int, ...], dp: bool,
                    num_classes: int, clipping: str) -> dict[str, int]:
    from ftte.edge.memory import TrainingSetup, estimate_training_memory, measure_training_memory

    setup = TrainingSetup(batch_size=batch_size, input_shape=input_shape, dp=dp, optimizer="sgd",
                          num_classes=num_classes, clipping=clipping)
    return {"estimated_bytes": int(estimate_training_memory(model, plan, setup).peak_bytes),
            "measured_bytes": int(measure_training_memory(model, plan, setup).peak_bytes)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ftte.bench.device_runner")
    p.add_argument("--server", required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--state", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--epsilon", type=float, default=1000.0)
    p.add_argument("--side-reps", type=int, default=3, help="repetitions of each side-by-side measurement")
    p.add_argument("--probe-s", type=float, default=1.0, help="seconds of the CPU-share probe")
    p.add_argument("--join-patience", type=float, default=300.0)
    p.add_argument("--throttle", action="store_true",
                   help="also record the seconds the CPU quota throttled the pull and each whole round")
    p.add_argument("--profile", default=os.environ.get("FTTE_BENCH_PROFILE", ""),
                   help="write a cProfile of rounds 2.. to this file (default: $FTTE_BENCH_PROFILE; none)")
    args = p.parse_args(argv)

    spawned = float(os.environ.get("FTTE_BENCH_SPAWN_TIME", _T_MAIN))
    t_imp = time.perf_counter()
    import torch

    torch.set_num_threads(1)
    import numpy as np
    from ftte.crypto.primitives import Signer  # noqa: F401
    from ftte.edge.edge_cli import load_csv
    from ftte.edge.http_client import EdgeClient, RetryPolicy, Transport, default_model_factory
    from ftte.edge.identity import load_identity

    imports_done = time.time()
    startup = {"interpreter_wall_s": _T_MAIN - spawned, "import_wall_s": time.perf_counter() - t_imp,
               "total_wall_s": imports_done - spawned, "cpu_s": time.process_time()}
    startup["rss_bytes"] = rss_bytes()[0]

    _install_timers()
    probe = cpu_share_probe(args.probe_s)
    if args.throttle:
        CLOCK.throttle = own_cgroup_cpu_stat()
        CLOCK.throttled_phases = frozenset({"pull", "other"})  # "other" wraps the whole round

    class TimedTransport(Transport):
        def call(self, endpoint: str, msg: Any, expect: tuple[type, ...], **kw: Any) -> Any:
            up, down = self.bytes_up, self.bytes_down
            try:
                with CLOCK.phase(f"net:{endpoint}"):
                    return super().call(endpoint, msg, expect, **kw)
            finally:
                b = BYTES.setdefault(endpoint, [0, 0, 0])
                b[0] += self.bytes_up - up
                b[1] += self.bytes_down - down
                b[2] += 1

        def _headers(self, path: str, body: bytes) -> dict[str, str]:
            with CLOCK.phase("sign"):
                return super()._headers(path, body)

    class TimedClient(EdgeClient):
        def connect(self) -> Any:
            if self.task is not None:
                return self.task
            with CLOCK.phase("connect"):
                return super().connect()

        def pull(self) -> Any:
            with CLOCK.phase("pull"):
                return super().pull()

        def train(self, pull: Any) -> Any:
            with CLOCK.phase("train"):
                update = super().train(pull)
            LAST["update"], LAST["pull"] = update, pull
            return update

        def _sign_spend(self, update: Any, version: int) -> bytes:
            with CLOCK.phase("sign"):
                return super()._sign_spend(update, version)

    identity = load_identity(args.key)
    x, y = load_csv(args.data, "label")
    retry = RetryPolicy(patience_s=60.0)
    transport = TimedTransport(args.server, identity, verify=args.ca, retry=retry)
    client = TimedClient(args.server, identity, x, y, state_dir=args.state, epsilon_max=args.epsilon,
                         verify=args.ca, retry=retry, transport=transport, join_patience_s=args.join_patience)
    rounds = []
    try:
        client.connect()
        connect = CLOCK.take()
        connect_bytes = {k: {"up": v[0], "down": v[1], "requests": v[2]} for k, v in BYTES.items()}
        BYTES.clear()
        profiler = None
        for r in range(args.rounds):
            if r == 1 and args.profile:  # steady state: the first round pays one-off costs
                import cProfile

                profiler = cProfile.Profile(time.process_time)  # CPU seconds, not waiting
                profiler.enable()
            with CLOCK.phase("other"):
                result = client.run_round()
            rounds.append({"round": r, "status": result.status, "reason": result.reason[:300],
                           "cohort": result.cohort_id, "phases": CLOCK.take(),
                           "bytes": {k: {"up": v[0], "down": v[1], "requests": v[2]} for k, v in BYTES.items()}})
            BYTES.clear()
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile)
        rss_after_rounds = rss_bytes()
        ru_after_rounds = resource.getrusage(resource.RUSAGE_SELF)

        # -- side by side, in this same confined process ------------------------------------------
        from ftte.edge.plan import SubsetPlan, subset_vector
        from ftte.edge.runtime import LocalTrainer
        from ftte.privacy.accountant import AccountantStore
        from ftte.privacy.dpsgd import DPConfig
        from ftte.protocol.cohort import weight_rule

        task, plan, dp = client.task, client.plan, client.dp
        assert task is not None and plan is not None and dp is not None
        settings = client.trainer.settings  # what the device itself trains with (clipping, prefix chunk)
        model = default_model_factory(task)
        full = SubsetPlan.full(model)
        side_dir = Path(args.state) / "side"
        side_dir.mkdir(parents=True, exist_ok=True)
        xs = client.x
        dp_side = DPConfig(enabled=True, noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm,
                           delta=dp.delta, accountant=dp.accountant, epsilon_max=1e12)
        side: dict[str, Any] = {}
        for plan_name, pl in (("subset", plan), ("full", full)):
            for dp_name, cfg in (("dp", dp_side), ("plain", DPConfig(enabled=False))):
                store = AccountantStore(side_dir / f"{plan_name}-{dp_name}.db")
                pl_settings = settings if pl is plan else dataclasses.replace(settings, prefix_chunk=None)
                trainer = LocalTrainer(model, pl, cfg, pl_settings, store)
                side[f"train_{plan_name}_{dp_name}"] = time_training(
                    trainer, client.member, subset_vector(model, pl), xs, client.y, args.side_reps)
                trainer.close()
                store.close()
        start = LAST.get("start")
        if start is not None:
            codec = LAST["codec"]
            for plan_name, pl in (("subset", plan), ("full", full)):
                side[f"encode_{plan_name}"] = time_encoding(codec, pl.num_coordinates, weight_rule(start),
                                                            args.side_reps)
                side[f"secagg_member_{plan_name}"] = time_secagg_member(start, pl.num_coordinates, args.side_reps)
        shape = tuple(task.input_shape)
        memory = {
            "subset": training_memory(model, plan, task.batch_size, shape, True, task.num_classes, settings.clipping),
            "full": training_memory(model, full, task.batch_size, shape, True, task.num_classes, settings.clipping),
        }
        rss_end = rss_bytes()
        doc = {
            "pid": os.getpid(),
            "member": client.member,
            "startup": startup,
            "cpu_probe": probe,
            "connect": connect,
            "connect_bytes": connect_bytes,
            "rounds": rounds,
            "side": side,
            "plan": {"plan_id": plan.plan_id, "layers": list(plan.trainable_layers),
                     "coordinates": plan.num_coordinates, "full_coordinates": full.num_coordinates},
            "task": {"local_steps": task.local_steps, "batch_size": task.batch_size, "records": int(len(xs)),
                     "noise_multiplier": float(dp.noise_multiplier), "dp": bool(dp.enabled),
                     "clipping": settings.clipping, "prefix_chunk": settings.prefix_chunk,
                     "model": task.model_name, "input_shape": list(task.input_shape),
                     "cohort_members": len(start.members) if start is not None else 0},
            "memory": {
                "rss_after_import_bytes": startup["rss_bytes"],
                "peak_rss_rounds_bytes": rss_after_rounds[1],
                "peak_rss_end_bytes": rss_end[1],
                "ru_maxrss_rounds_bytes": ru_after_rounds.ru_maxrss * 1024,
                "training_memory": memory,
            },
            "throttle_source": str(CLOCK.throttle) if CLOCK.throttle is not None else None,
            "torch_threads": torch.get_num_threads(),
            "numpy": np.__version__,
        }
    finally:
        client.close()
    Path(args.out).write_text(json.dumps(doc, indent=1))
    return 0


BYTES: dict[str, list[int]] = {}

if __name__ == "__main__":
    sys.exit(main())

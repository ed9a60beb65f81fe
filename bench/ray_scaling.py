"""``ftte bench ray``: simulated device updates per second, local backend versus Ray with 1..n workers.

Two figures per backend, measured side by side in one run (repeats interleaved so that
load from other jobs on a shared machine hits every backend alike):

* ``device_work``: the driver's device path alone. ``--rounds`` rounds are handed to the
  backend exactly as the simulator does it (pull, budget check and accountant record in
  the driver, submit), then all are resolved. Updates per second = rounds / wall time.
* ``simulation``: a whole ``Simulation.run()`` (``--versions`` merges; the server's side of
  secure aggregation and evaluation in the driver, the members' side and training on the
  backend's workers), eager (every round started is handed to the backend; a Ray run stops
  with some still queued, never trained: ``rounds_trained``) and lazy (``*_lazy``, the default
  on both backends: only the rounds of cohorts that close are trained; Ray gets them when the
  cohort closes, the local backend at the merge); updates per second = device rounds started /
  wall time of ``run()``, so ratios are inverse wall-time ratios of runs with the same result.
  The backend's start-up (Ray
  workers importing torch and wrapping the model) is reported apart, as ``startup_s``. CPU
  seconds spent during ``run()`` by the driver process and by each worker process are
  reported too (``driver_cpu_s``, ``workers_cpu_s``): on a shared machine they tell how
  the work was split when wall time cannot.

Before any timing the driver's accountant cache is warmed for every device (an RDP curve
per distinct sample rate costs up to half a second, once per process; workers never
compute it, the driver hands them the checked plan). Ratios are against the local
backend (and Ray n workers against Ray 1), for medians (``ratios``) and for the best
repeat of each (``ratios_best``). ``identical`` checks that every Ray simulation produced
the local backend's history and weights.
Without ``--address`` a local Ray instance gets ``max(--workers)`` CPUs and is shut down
at the end; with it the cluster is joined and left running.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

__all__ = ["configure", "run"]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", default="1,2", help="Ray worker counts to measure, comma separated (default 1,2)")
    parser.add_argument("--address", default="", help="join this Ray cluster instead of starting a local instance")
    parser.add_argument("--model", default="cnn8", help="model name (default cnn8, the default config's)")
    parser.add_argument("--strategy", choices=("ftte", "fedbuff", "fedavg"), default="ftte")
    parser.add_argument("--devices", type=int, default=100, help="fleet size (default 100)")
    parser.add_argument("--buffer", type=int, default=0,
                        help="cohort size ([server] buffer_size; default 0: the config's); larger = more secure-"
                             "aggregation work per member (each member's share and unmask work grows with the cohort)")
    parser.add_argument("--local-steps", type=int, default=0,
                        help="DP-SGD steps per device round (default 0: the config's); more = heavier device work")
    parser.add_argument("--secagg", choices=("on", "off"), default="on",
                        help="secure aggregation (default on, the config's); off shows what the members' stages cost "
                             "as Ray calls")
    parser.add_argument("--rounds", type=int, default=200, help="device rounds per device_work measurement (default 200)")
    parser.add_argument("--versions", type=int, default=10, help="merges per simulation measurement (default 10)")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per backend; the median is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _config(args: argparse.Namespace) -> Any:
    from ftte.pipeline.config import load_config

    extra: dict[str, Any] = {"train.local_steps": args.local_steps} if args.local_steps else {}
    if args.buffer:
        extra["server.buffer_size"] = args.buffer
    if args.secagg == "off":
        extra["secagg.enabled"] = False
    return load_config(None, preset="digits").with_overrides(**extra, **{
        "run.seed": args.seed,
        "run.strategy": args.strategy,
        "run.max_versions": args.versions,
        "model.name": args.model,
        "fleet.devices": args.devices,
        # measure throughput, not budget exhaustion: no device may retire mid-measurement
        "privacy.epsilon_max": 1e9,
    })


def _backend(name: str, workers: int, address: str) -> Any:
    from ftte.pipeline.backends import LocalBackend, RayBackend

    return LocalBackend() if name == "local" else RayBackend(address, workers)


def _device_work(cfg: Any, backend: Any, rounds: int, repeats: int) -> dict[str, Any]:
    """``repeats`` timed batches of ``rounds`` device rounds on one started backend."""
    from ftte.pipeline.simulator import Simulation

    t0 = time.perf_counter()
    sim = Simulation(cfg, backend=backend, lazy=False)
    startup = time.perf_counter() - t0
    try:
        fleet = sim.fleet
        attempt = 0
        walls = []
        for _ in range(repeats):
            attempt += 1
            t = time.perf_counter()
            pending = []
            for i in range(rounds):
                dev = fleet[i % len(fleet)]
                r, _ = sim._begin_round(dev, attempt * rounds + i, charge_now=True)
                if r is None:
                    raise RuntimeError("a device ran out of budget during the benchmark")
                pending.append(r.pending)
            for p in pending:
                if sim.backend.resolve(p) is None:
                    raise RuntimeError("a worker died during the benchmark")
            walls.append(time.perf_counter() - t)
        return {"startup_s": startup, "walls_s": walls}
    finally:
        sim.close()


def _warm_up(cfg: Any) -> float:
    """Fill this process's accountant cache (one RDP curve per distinct sample rate, up to half a
    second each) for every device, so no backend's timing includes the driver's one-off maths."""
    from ftte.pipeline.simulator import Simulation

    t = time.perf_counter()
    sim = Simulation(cfg)
    try:
        for dev in sim.fleet:
            sim.trainer.plan_round(dev.device_id, len(sim.data.device_indices[dev.device_id]))
    finally:
        sim.close()
    return time.perf_counter() - t


def _simulation(cfg: Any, backend: Any, lazy: bool = False) -> dict[str, Any]:
    from ftte.pipeline.simulator import Simulation

    t0 = time.perf_counter()
    # Eager: every round started is handed to the backend. Lazy (the default for these strategies,
    # on both backends): only the rounds of cohorts that close are trained.
    sim = Simulation(cfg, backend=backend, lazy=lazy)
    startup = time.perf_counter() - t0
    try:
        before = _worker_usage(sim.backend)
        t, cpu = time.perf_counter(), time.process_time()
        result = sim.run()
        wall, driver_cpu = time.perf_counter() - t, time.process_time() - cpu
        after = _worker_usage(sim.backend)
        workers_cpu = [b[0] - a[0] for a, b in zip(before, after)]
        # a Ray run stops with rounds still queued on its workers: those are never trained
        trained = sum(b[1] - a[1] for a, b in zip(before, after)) if after else sim.rounds_computed
        return {"startup_s": startup, "wall_s": wall, "train_rounds": sim.train_rounds,
                "rounds_trained": trained, "driver_cpu_s": driver_cpu, "workers_cpu_s": workers_cpu,
                "history": result.history, "weights": result.weights}
    finally:
        sim.close()


def _worker_usage(backend: Any) -> list[tuple[float, int]]:
    return list(backend.worker_usage()) if hasattr(backend, "worker_usage") else []


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    worker_counts = sorted({int(w) for w in str(args.workers).split(",") if w.strip()})
    if not worker_counts or worker_counts[0] < 1:
        raise ValueError("--workers needs positive counts, e.g. 1,2")
    cfg = _config(args)
    modes = [("local", 0)] + [("ray", w) for w in worker_counts]
    label = {m: ("local" if m[0] == "local" else f"ray_{m[1]}") for m in modes}
    load_before = _load()
    warm_up = _warm_up(cfg)

    owns = False
    if not ray.is_initialized():
        if args.address:
            ray.init(address=args.address, log_to_driver=False)
        else:
            ray.init(num_cpus=max(worker_counts), include_dashboard=False, log_to_driver=False)
            owns = True
    try:
        cluster_cpus = ray.cluster_resources().get("CPU")
        # device work: one started backend per mode, its repeats back to back
        work: dict[str, dict[str, Any]] = {}
        for m in modes:
            work[label[m]] = _device_work(cfg, _backend(m[0], m[1], args.address), args.rounds, args.repeats)
        # simulations: repeats interleaved across modes
        sims: dict[str, list[dict[str, Any]]] = {label[m] + lazy: [] for m in modes for lazy in ("", "_lazy")}
        for _ in range(args.repeats):
            for m in modes:
                for lazy in ("", "_lazy"):
                    sims[label[m] + lazy].append(_simulation(cfg, _backend(m[0], m[1], args.address), lazy=bool(lazy)))
    finally:
        if owns:
            ray.shutdown()

    ref = sims["local"][0]
    identical = all(r["history"] == ref["history"] and np.array_equal(r["weights"], ref["weights"])
                    for runs in sims.values() for r in runs)
    device_work = {}
    for name, w in work.items():
        wall = statistics.median(w["walls_s"])
        device_work[name] = {"updates_per_s": args.rounds / wall, "best_updates_per_s": args.rounds / min(w["walls_s"]),
                             "median_wall_s": wall, "walls_s": w["walls_s"], "startup_s": w["startup_s"]}
    simulation = {}
    for name, runs in sims.items():
        rates = [r["train_rounds"] / r["wall_s"] for r in runs]
        simulation[name] = {"updates_per_s": statistics.median(rates), "best_updates_per_s": max(rates), "rates": rates,
                            "train_rounds": runs[0]["train_rounds"], "walls_s": [r["wall_s"] for r in runs],
                            "rounds_trained": [r["rounds_trained"] for r in runs],
                            "startup_s": statistics.median(r["startup_s"] for r in runs),
                            # CPU seconds during run(): the driver process, and each worker process
                            "driver_cpu_s": [r["driver_cpu_s"] for r in runs],
                            "workers_cpu_s": [r["workers_cpu_s"] for r in runs]}

    def ratios(table: dict[str, dict[str, Any]], key: str = "updates_per_s") -> dict[str, float]:
        out = {}
        first = worker_counts[0]
        for w in worker_counts:
            out[f"ray_{w}_vs_local"] = table[f"ray_{w}"][key] / table["local"][key]
            if w != first:
                out[f"ray_{w}_vs_ray_{first}"] = table[f"ray_{w}"][key] / table[f"ray_{first}"][key]
            if "local_lazy" in table:  # the defaults side by side, and Ray's default against local eager
                out[f"ray_{w}_lazy_vs_local_lazy"] = table[f"ray_{w}_lazy"][key] / table["local_lazy"][key]
                out[f"ray_{w}_lazy_vs_local"] = table[f"ray_{w}_lazy"][key] / table["local"][key]
        return out

    return {
        "command": "ftte bench ray " + " ".join(sys.argv[3:]) if sys.argv[1:3] == ["bench", "ray"] else None,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "ray": ray.__version__, "load_avg_before": load_before, "load_avg_after": _load(),
                    "ray_cluster_cpus": cluster_cpus, "address": args.address or None},
        "config": {"model": args.model, "strategy": args.strategy, "devices": args.devices, "rounds": args.rounds,
                   "buffer": cfg.server.buffer_size,
                   "versions": args.versions, "repeats": args.repeats, "seed": args.seed,
                   "local_steps": cfg.train.local_steps, "batch_size": cfg.train.batch_size,
                   "dp": cfg.privacy.enabled, "secagg": cfg.secagg.enabled},
        "driver_warm_up_s": warm_up,
        "device_work": device_work,
        "simulation": simulation,
        # medians, and the best repeat of each (what the machine gives when other jobs pause)
        "ratios": {"device_work": ratios(device_work), "simulation": ratios(simulation)},
        "ratios_best": {"device_work": ratios(device_work, "best_updates_per_s"),
                        "simulation": ratios(simulation, "best_updates_per_s")},
        "identical": identical,
    }


def run(args: argparse.Namespace) -> int:
    try:
        import ray  # noqa: F401
    except ImportError:
        print("ftte bench ray: needs Ray: pip install 'ftte[ray]'", file=sys.stderr)
        return 2
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out = measure(args)
    except (ValueError, RuntimeError, ConnectionError) as exc:
        print(f"ftte bench ray: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out, sort_keys=True))
    else:
        for section in ("device_work", "simulation"):
            for name, row in out[section].items():
                print(f"{section:>12} {name:>8}: {row['updates_per_s']:8.2f} updates/s  (startup {row['startup_s']:.1f} s)")
        for section, table in out["ratios"].items():
            for key, value in table.items():
                print(f"{section:>12} {key:>16}: {value:.3f}")
        print(f"{'identical':>12}: {out['identical']}")
    return 0 if out["identical"] else 1

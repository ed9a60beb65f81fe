"""``ftte bench device`` end to end in a tiny configuration: a real TLS ``ftte server``, real ``ftte edge``
devices and one confined device process; the JSON must hold every phase with positive times, and the
confined process must really have been confined. And the default task (``--task mnist``): its data
files, server configuration and plan are the default configuration's, as the deployment reads them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ftte.bench.device_bench import bench_task, summarize, write_deployment

# every phase the confined device's rounds must have spent time in (names of the runner's PhaseClock)
ROUND_PHASES = ("pull", "net:pull", "train", "encode", "secagg", "sign", "net:enter", "net:advance", "other")  # 7 requests a round
SIDE = ("train_subset_dp", "train_subset_plain", "train_full_dp", "train_full_plain", "encode_subset", "encode_full",
        "secagg_member_subset", "secagg_member_full")
QUOTA = 0.25


@pytest.mark.slow
def test_device_bench_tiny_run(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "ftte.cli", "bench", "device", "--task", "digits", "--rounds", "2",
                        "--side-reps", "1",
                        "--local-steps", "2", "--cpu", str(QUOTA), "--json", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    raw = json.loads((out / "device_bench_raw.json").read_text())

    # rounds completed on the confined device, and each spent time in every phase
    assert [x["status"] for x in raw["rounds"]] == ["applied", "applied"]
    for rnd in raw["rounds"]:
        for name in ROUND_PHASES:
            ph = rnd["phases"].get(name)
            assert ph is not None, (name, sorted(rnd["phases"]))
            assert ph["wall_s"] > 0 and ph["cpu_s"] > 0, (name, ph)
        assert sum(b["up"] for b in rnd["bytes"].values()) > 0
        assert sum(b["down"] for b in rnd["bytes"].values()) > 0
    for name in SIDE:
        assert raw["side"][name]["wall_s"] > 0 and raw["side"][name]["cpu_s"] > 0, name
    st = raw["startup"]
    assert st["total_wall_s"] > 0 and st["import_wall_s"] > 0 and st["cpu_s"] > 0 and st["rss_bytes"] > 0

    # memory: the whole process next to the plan's training memory
    mem = summary["memory"]
    assert mem["peak_rss_rounds_bytes"] >= mem["rss_after_import_bytes"] > 0
    tm = mem["training_memory"]["subset"]
    assert 0 < tm["measured_bytes"] < mem["peak_rss_rounds_bytes"]

    # confined: the process's measured CPU share is near the quota (an unconfined one gets a whole core)
    dev = summary["device"]
    assert dev["mechanism"] in ("cgroup2", "cgroup1", "rlimit")
    assert dev["cpu_fraction"] == QUOTA
    low = 0.1 if dev["mechanism"] == "rlimit" else 0.5  # a duty cycle caps the share, it does not grant it
    assert low * QUOTA <= dev["measured_cpu_share"] <= 1.4 * QUOTA, dev
    if dev["mechanism"] != "rlimit":
        assert sum(v for k, v in dev["throttling"].items() if k.startswith("nr_throttled")) > 0, dev
    # start-up is CPU-bound: under a quarter core its wall time is well over its CPU time
    assert st["total_wall_s"] > 2.0 * st["cpu_s"]

    # the figures the report is made of are there, and the plot was written
    assert summary["overhead_ratio_cpu"] is not None and summary["overhead_ratio_cpu"] > 0
    for key in ("dp_on_over_off_training", "full_over_subset_training_dp", "secagg_on_over_off_round"):
        assert summary["ratios"][key] > 0
    assert (out / "device_breakdown.png").stat().st_size > 10_000
    assert summarize(raw)["phases_per_round"] == summary["phases_per_round"]


def _simulator_choice(cfg):
    """What a default simulation trains: the simulator's own data, fleet, model and plan search."""
    from ftte.pipeline.datasets import load_dataset
    from ftte.pipeline.fleet import build_fleet
    from ftte.pipeline.model_builder import build_global_model
    from ftte.pipeline.strategies import strategy_for

    data = load_dataset(cfg.data, cfg.run.seed, cfg.fleet.devices)
    fleet = build_fleet(cfg.fleet, cfg.fleet.devices, cfg.run.seed)
    model = build_global_model(cfg.model.name, cfg.run.seed, data.input_shape, data.n_classes)
    strategy = strategy_for(cfg)
    return strategy.choose_training(model, data, fleet), strategy.memory_budget(fleet)


def test_mnist_task_is_the_default_configuration(tmp_path):
    """``--task mnist`` writes 784-column IID CSVs of the 5,000 standardised MNIST digits, a server config the
    deployment loads as cnn28 on (1, 28, 28) with the default [train], and the plan, clipping mode and budget
    that the simulator's plan search gives a default run."""
    import torch

    from ftte.pipeline.config import load_config
    from ftte.pipeline.datasets import load_mnist
    from ftte.pipeline.deploy_config import load_server_config
    from ftte.pipeline.deploy_task import build_task

    torch.set_num_threads(1)
    cfg = load_config(None)
    assert (cfg.data.name, cfg.model.name) == ("mnist", "cnn28")  # the packaged default the task stands for
    task = bench_task("mnist")
    assert (task.model, task.input_shape) == ("cnn28", (1, 28, 28))
    assert (task.local_steps, task.batch_size, task.lr) == (cfg.train.local_steps, cfg.train.batch_size, cfg.train.lr)
    assert bench_task("mnist", local_steps=7, lr=0.25).local_steps == 7  # the command line wins
    with pytest.raises(ValueError, match="cnn28"):
        bench_task("mnist", model="mlp")

    dep = write_deployment(tmp_path, task, 3, port=1, noise_multiplier=1.0)

    # data: every digit once, 784 features + label per row, IID over the devices, standardised on training rows
    rows, labels = [], []
    for path in dep.data_files:
        with open(path) as fh:
            header = fh.readline().rstrip("\n").split(",")
        assert header == [f"p{j}" for j in range(784)] + ["label"]
        a = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float32)
        rows.append(a[:, :-1])
        labels.append(a[:, -1].astype(np.int64))
    sizes = [len(r) for r in rows]
    with np.load(dep.test_file) as test:
        x_test, y_test = test["x"], test["y"]
    assert x_test.shape == (1000, 1, 28, 28) and max(sizes) - min(sizes) <= 1 and sum(sizes) == 4000
    train = np.concatenate(rows)
    assert abs(float(train.mean())) < 1e-3 and abs(float(train.std()) - 1.0) < 1e-3
    for lab in labels:  # IID: each device holds every class
        assert set(lab.tolist()) == set(range(10))
    pixels, y_all = load_mnist()
    # one affine map (a single mean and std, scale > 0) takes the raw digits onto the written rows: sorted row
    # sums line up on a straight line, and the map's constant is the background pixel's written value
    raw_sums = np.sort(pixels.reshape(len(pixels), -1).sum(axis=1).astype(np.float64))
    written = np.concatenate([train, x_test.reshape(len(x_test), -1)]).astype(np.float64)
    slope, offset = np.polyfit(raw_sums, np.sort(written.sum(axis=1)), 1)
    assert slope > 0 and np.allclose(slope * raw_sums + offset, np.sort(written.sum(axis=1)), atol=0.05)
    assert np.isclose(written.min(), offset / 784, atol=1e-4)  # a zero pixel maps to -mean/std
    assert np.array_equal(np.bincount(np.concatenate(labels + [y_test]), minlength=10),
                          np.bincount(y_all, minlength=10))

    # plan: the simulator's own choice for the default configuration
    sim, sim_budget = _simulator_choice(cfg)
    assert dep.chosen.budget_bytes == sim_budget == int(8 * 2**20 * cfg.train.memory_budget_fraction)
    assert dep.chosen.plan.trainable_layers == sim.plan.trainable_layers
    assert dep.chosen.plan.num_coordinates == sim.plan.num_coordinates
    assert dep.chosen.clipping == sim.clipping and dep.chosen.prefix_chunk == sim.prefix_chunk

    # config: what ``ftte server`` reads from it, and the task it would send devices
    settings = load_server_config(dep.config)
    run = settings.run
    assert run.model.name == "cnn28" and tuple(settings.deploy.input_shape) == (1, 28, 28)
    assert (run.train.local_steps, run.train.batch_size, run.train.lr) == (task.local_steps, task.batch_size, task.lr)
    assert run.train.clipping == sim.clipping
    assert run.privacy.enabled and run.privacy.noise_multiplier == 1.0 and run.privacy.target_epsilon == 0.0
    assert run.server.buffer_size == 3 and run.secagg.enabled
    deployed = build_task(settings)
    assert deployed.plan.plan_id == sim.plan.plan_id
    info = deployed.task_info(0, 1.0, 1.0)
    assert info.model_name == "cnn28" and tuple(info.input_shape) == (1, 28, 28) and info.clipping == sim.clipping


def test_digits_task_keeps_the_first_deployment(tmp_path):
    """``--task digits`` still deploys the mlp on 64 features, 5 steps, per-sample clipping, the straggler's plan."""
    from ftte.pipeline.deploy_config import load_server_config

    dep = write_deployment(tmp_path, bench_task("digits"), 3, port=1, noise_multiplier=1.0)
    settings = load_server_config(dep.config)
    assert settings.run.model.name == "mlp" and tuple(settings.deploy.input_shape) == (64,)
    assert (settings.run.train.local_steps, settings.run.train.lr) == (5, 0.5)
    assert settings.run.train.clipping == "auto" and settings.run.train.settings().clipping == "per_sample"
    assert dep.chosen.plan.trainable_layers == ("5",) and dep.chosen.plan.num_coordinates == 650


@pytest.mark.slow
def test_device_bench_mnist_round(tmp_path):
    """One confined round of the default task: applied, on the default plan, with every side-by-side figure."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "ftte.cli", "bench", "device", "--task", "mnist", "--rounds", "1",
                        "--side-reps", "1", "--cpu", str(QUOTA), "--json", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    raw = json.loads((out / "device_bench_raw.json").read_text())
    assert [x["status"] for x in raw["rounds"]] == ["applied"]
    assert summary["task"]["name"] == "mnist" and summary["task"]["model"] == "cnn28"
    assert raw["task"]["input_shape"] == [1, 28, 28] and raw["task"]["clipping"] == raw["deployment"]["plan_clipping"]
    assert raw["plan"]["full_coordinates"] == 131210 and 0 < raw["plan"]["coordinates"] < 131210
    for name in ROUND_PHASES:
        assert raw["rounds"][0]["phases"][name]["cpu_s"] > 0, name
    for name in SIDE:
        assert raw["side"][name]["cpu_s"] > 0, name
    # the full model trains more than the subset, with and without DP
    assert raw["side"]["train_full_plain"]["cpu_s"] > raw["side"]["train_subset_plain"]["cpu_s"]
    assert summary["overhead_ratio_cpu"] > 0

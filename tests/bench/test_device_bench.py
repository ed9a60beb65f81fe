"""``ftte bench device`` end to end in a tiny configuration: a real TLS ``ftte server``, real ``ftte edge``
devices and one confined device process; the JSON must hold every phase with positive times, and the
confined process must really have been confined.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ftte.bench.device_bench import summarize

# every phase the confined device's rounds must have spent time in (names of the runner's PhaseClock)
ROUND_PHASES = ("pull", "net:pull", "train", "encode", "secagg", "sign", "net:enter", "net:advance", "other")  # 7 requests a round
SIDE = ("train_subset_dp", "train_subset_plain", "train_full_dp", "train_full_plain", "encode_subset", "encode_full",
        "secagg_member_subset", "secagg_member_full")
QUOTA = 0.25


@pytest.mark.slow
def test_device_bench_tiny_run(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "ftte.cli", "bench", "device", "--rounds", "2", "--side-reps", "1",
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

"""Wall time and peak RSS of one simulation per fleet size (``python -m ftte.bench.scale_fleet``).

Each fleet size runs in a fresh Python process, so its peak resident set size
(``ru_maxrss``) is that run's alone: dataset build, fleet, the simulator and the run. The
parent prints one JSON object per size and the ratios of wall time to the smallest size.
Defaults: ``data.name=synthetic``, ``model.name=mlp``, 20 model versions, local backend;
anything else through ``--set key=value`` (the simulator's own override syntax).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

BASE_OVERRIDES = ("data.name=synthetic", "model.name=mlp")


def one(devices: int, versions: int, extra: list[str], out_dir: str | None) -> dict[str, Any]:
    """One simulation in this process; returns its figures."""
    t0 = time.perf_counter()
    from ftte.pipeline.config import load_config, parse_overrides
    from ftte.pipeline.simulator import Simulation

    items = [*BASE_OVERRIDES, f"fleet.devices={devices}", f"run.max_versions={versions}", *extra]
    cfg = load_config().with_overrides(**parse_overrides(items))
    t1 = time.perf_counter()
    sim = Simulation(cfg, out_dir)
    t2 = time.perf_counter()
    try:
        result = sim.run()
    finally:
        sim.close()
    t3 = time.perf_counter()
    s = result.summary
    return {
        "devices": devices, "versions": s["versions"], "overrides": items,
        "wall_s": round(t3 - t0, 2), "setup_s": round(t2 - t1, 2), "run_s": round(t3 - t2, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "train_rounds": s["train_rounds"], "updates_applied": s["updates_applied"],
        "aborted_cohorts": s["aborted_cohorts"], "final_accuracy": s["final_accuracy"],
        "virtual_time_s": s["virtual_time_s"], "epsilon_max": s["epsilon_max"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", default="1000,10000,100000", help="fleet sizes, comma separated")
    p.add_argument("--versions", type=int, default=20)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    p.add_argument("--out", action="store_true", help="write ledger.db/accountants.db (a temporary directory)")
    p.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(one(args.child, args.versions, args.set, tmp if args.out else None)))
        return 0
    rows = []
    for n in (int(x) for x in args.devices.split(",")):
        cmd = [sys.executable, "-m", "ftte.bench.scale_fleet", "--child", str(n), "--versions", str(args.versions)]
        cmd += [f"--set={s}" for s in args.set] + (["--out"] if args.out else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            return proc.returncode
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row), flush=True)
    if len(rows) > 1:
        base = rows[0]["wall_s"]
        print(json.dumps({"wall_ratio_to_first": {r["devices"]: round(r["wall_s"] / base, 2) for r in rows}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``ftte bench seeds``: several ``ftte compare`` runs that differ only in the seed, read together.

One seed's final accuracy moves by several points with the seed alone (issue 12: ftte's
tuning seed scored 0.487 where the reported seed gave 0.4154 with the same rates), so a
single-seed verdict on "final accuracy >= FedAvg" can be a coin toss. This reads the
``compare.json`` of each run, checks that the runs compared the same strategies under the
same settings apart from ``run.seed`` (and the learning rates each strategy used), and
prints per strategy the final accuracy of every seed, the mean and the sample standard
deviation, the paired differences ftte minus each baseline, and the final-accuracy goal
judged on the means. Each seed's own verdicts stay in its ``compare.json``.

    ftte bench seeds runs/seed0 runs/seed2 runs/seed3 [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["configure", "run", "read_runs", "summarise"]

BASELINES = ("fedavg", "fedbuff")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dirs", nargs="+", help="output folders of `ftte compare` (each holding compare.json)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _without_seed(config: Mapping[str, Any]) -> dict[str, Any]:
    """The run's configuration minus what may differ between the seeds' runs."""
    out = json.loads(json.dumps(config))
    out.get("run", {}).pop("seed", None)
    out.get("run", {}).pop("strategy", None)
    out.get("server", {}).pop("lr", None)
    out.get("train", {}).pop("lr", None)
    return out


def _rates(strategy: Mapping[str, Any]) -> tuple[Any, Any]:
    lr = strategy.get("learning_rates") or {}
    return lr.get("server"), lr.get("device")


def read_runs(dirs: Sequence[Path]) -> list[dict[str, Any]]:
    """Each folder's ``compare.json``; refuses runs that are not the same comparison."""
    runs = []
    for d in dirs:
        path = Path(d) / "compare.json"
        try:
            runs.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: not a readable compare.json ({exc})") from None
    if len(runs) < 2:
        raise ValueError("give at least two runs")
    seeds = [r["config"]["run"]["seed"] for r in runs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"two runs share a seed: {seeds}")
    first = runs[0]
    for d, r in zip(dirs[1:], runs[1:]):
        if set(r["strategies"]) != set(first["strategies"]):
            raise ValueError(f"{d}: strategies {sorted(r['strategies'])}, the first run has {sorted(first['strategies'])}")
        if _without_seed(r["config"]) != _without_seed(first["config"]) or r["horizon_s"] != first["horizon_s"]:
            raise ValueError(f"{d}: configured differently from {dirs[0]} (apart from the seed)")
        for name, s in r["strategies"].items():
            if _rates(s) != _rates(first["strategies"][name]):
                raise ValueError(f"{d}: {name} used other learning rates than in {dirs[0]}")
    return runs


def _spread(values: Sequence[float]) -> dict[str, Any]:
    return {"values": list(values), "mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else math.nan}


def summarise(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Final accuracy per strategy and seed, means, paired differences and the goal on the means."""
    seeds = [r["config"]["run"]["seed"] for r in runs]
    names = list(runs[0]["strategies"])
    finals = {n: _spread([r["strategies"][n]["final_accuracy"] for r in runs]) for n in names}
    out: dict[str, Any] = {"seeds": seeds, "final_accuracy": finals,
                           "learning_rates": {n: runs[0]["strategies"][n].get("learning_rates") for n in names}}
    if "ftte" in finals:
        out["ftte_minus"] = {b: _spread([f - x for f, x in zip(finals["ftte"]["values"], finals[b]["values"])])
                             for b in BASELINES if b in finals}
        if all(b in finals for b in BASELINES):
            f = finals["ftte"]["mean"]
            met = all(f >= finals[b]["mean"] for b in BASELINES)
            out["goal"] = {"goal": "ftte mean final accuracy >= fedavg's and >= fedbuff's (over the seeds)", "met": met,
                           "detail": ", ".join(f"{n} {finals[n]['mean']:.4f}" for n in ("ftte", *BASELINES)),
                           "seeds_met": sum(all(v >= finals[b]["values"][i] for b in BASELINES)
                                            for i, v in enumerate(finals["ftte"]["values"]))}
    out["per_seed_verdicts"] = {str(s): r.get("verdicts") for s, r in zip(seeds, runs)}
    return out


def _print(summary: Mapping[str, Any]) -> None:
    seeds = summary["seeds"]
    head = "strategy    " + "".join(f"  seed {s:<5}" for s in seeds) + "      mean       sd  lr srv/dev"
    print(head)
    print("-" * len(head))
    for name, f in summary["final_accuracy"].items():
        lr = summary["learning_rates"].get(name) or {}
        print(f"{name:<12}" + "".join(f"  {v:>10.4f}" for v in f["values"]) + f"  {f['mean']:>8.4f} {f['sd']:>8.4f}"
              f"  {lr.get('server', '—')}/{lr.get('device', '—')}")
    for b, d in summary.get("ftte_minus", {}).items():
        print(f"ftte - {b:<5}" + "".join(f"  {v:>+10.4f}" for v in d["values"]) + f"  {d['mean']:>+8.4f} {d['sd']:>8.4f}")
    goal = summary.get("goal")
    if goal:
        print(f"\n{'   MET' if goal['met'] else 'MISSED'}  {goal['goal']}: {goal['detail']} "
              f"(ftte ahead of both on {goal['seeds_met']} of {len(seeds)} seeds)")


def run(args: argparse.Namespace) -> int:
    try:
        summary = summarise(read_runs([Path(d) for d in args.dirs]))
    except (ValueError, KeyError) as exc:
        print(f"ftte bench seeds: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        _print(summary)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ftte bench seeds", description=__doc__.splitlines()[0])
    configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

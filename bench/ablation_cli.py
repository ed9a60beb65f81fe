"""``ftte bench ablation``: what the variance term and secure aggregation each change.

Runs the ``ftte`` strategy four ways on the same fleet, data and seeds: age-and-variance
weights (the default) against age-only weights (``variance_penalty = 0``), and secure
aggregation on against off. Prints one JSON object with each run's figures and the ratios.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ftte.pipeline.run_outputs import ConfigError, add_common_arguments, config_from_args, fail, run_one

VARIANTS: dict[str, dict[str, Any]] = {
    "age_and_variance": {},
    "age_only": {"server.variance_penalty": 0.0},
    "secagg_off": {"secagg.enabled": False},
}

KEYS = ("final_accuracy", "best_accuracy", "time_to_target_s", "virtual_time_s", "wall_time_s", "versions",
        "bytes_up_per_update")


def configure(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    try:
        base = config_from_args(args.config, args.set, preset=args.preset).with_overrides(**{"run.strategy": "ftte"})
        configs = {name: base.with_overrides(**ov) if ov else base for name, ov in VARIANTS.items()}
    except (ConfigError, OSError, ValueError) as exc:
        return fail("ftte bench ablation", exc)
    from ftte.pipeline.report import final_accuracy_mean, plot_accuracy, smoothed_time_to_target, write_summary_json

    out = Path(args.out or "runs/ablation")
    runs: dict[str, dict[str, Any]] = {}
    histories = {}
    for name, cfg in configs.items():
        result = run_one(cfg, out / name, quiet=args.quiet or args.json, label=name)
        runs[name] = {k: result.summary.get(k) for k in KEYS}
        # read as `ftte compare` reads a run: mean of the last 10 evaluations, smoothed time to target
        runs[name]["final_accuracy_mean10"] = final_accuracy_mean(result.history, 10)
        runs[name]["smoothed_time_to_target_s"] = smoothed_time_to_target(result.history, base.run.target_accuracy, 3)
        histories[name] = result.history
    a, v, off = runs["age_only"], runs["age_and_variance"], runs["secagg_off"]

    def diff(x: Any, y: Any) -> float | None:
        return None if x is None or y is None else x - y

    report = {
        "runs": runs,
        "variance_term_accuracy_gain": diff(v["final_accuracy"], a["final_accuracy"]),
        "variance_term_accuracy_gain_mean10": diff(v["final_accuracy_mean10"], a["final_accuracy_mean10"]),
        "secagg_accuracy_change": diff(v["final_accuracy"], off["final_accuracy"]),
        "secagg_accuracy_change_mean10": diff(v["final_accuracy_mean10"], off["final_accuracy_mean10"]),
        "secagg_virtual_time_ratio": (v["virtual_time_s"] / off["virtual_time_s"]) if off["virtual_time_s"] else None,
        "secagg_wall_time_ratio": (v["wall_time_s"] / off["wall_time_s"]) if off["wall_time_s"] else None,
        "secagg_upload_ratio": (v["bytes_up_per_update"] / off["bytes_up_per_update"])
        if off["bytes_up_per_update"] else None,
    }
    write_summary_json(out / "ablation.json", report)
    plot_accuracy(histories, out / "ablation.png", target=base.run.target_accuracy, title="ftte ablations")
    print(json.dumps(report, sort_keys=True, default=str) if args.json else json.dumps(report, indent=2, default=str))
    return 0

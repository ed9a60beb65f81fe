"""``ftte compare``: ftte, fedbuff and fedavg on the same fleet, data and seeds."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ftte.pipeline.run_outputs import ConfigError, add_common_arguments, config_from_args, fail, print_summary, run_one

STRATEGIES = ("ftte", "fedbuff", "fedavg")


def configure(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--strategies", default=",".join(STRATEGIES),
                        help="comma-separated subset of ftte,fedbuff,fedavg (default: all three)")


def ratio(a: Any, b: Any) -> float | None:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
        return a / b
    return None


def ratios_against(base: dict[str, Any], other: dict[str, Any]) -> dict[str, float | None]:
    return {
        "time_to_target": ratio(other.get("time_to_target_s"), base.get("time_to_target_s")),
        "final_accuracy_diff": (other["final_accuracy"] - base["final_accuracy"])
        if other.get("final_accuracy") is not None and base.get("final_accuracy") is not None else None,
        "peak_client_memory": ratio(other.get("peak_client_memory_bytes"), base.get("peak_client_memory_bytes")),
        "bytes_up_per_update": ratio(other.get("bytes_up_per_update"), base.get("bytes_up_per_update")),
        "bytes_up_vs_float32_full_model": ratio(other.get("bytes_up_per_update"), other.get("float32_full_update_bytes")),
        "bytes_down_per_update": ratio(other.get("bytes_down_per_update"), base.get("bytes_down_per_update")),
    }


def run(args: argparse.Namespace) -> int:
    names = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown or not names:
        return fail("ftte compare", ValueError(f"unknown strategies {unknown}; choose from {STRATEGIES}"))
    try:
        base_cfg = config_from_args(args.config, args.set)
        configs = {s: base_cfg.with_overrides(**{"run.strategy": s}) for s in names}
    except (ConfigError, OSError, ValueError) as exc:
        return fail("ftte compare", exc)
    from ftte.pipeline.report import plot_accuracy, write_summary_json

    out = Path(args.out or "runs/compare")
    summaries: dict[str, dict[str, Any]] = {}
    histories: dict[str, list[dict[str, Any]]] = {}
    for name in names:
        try:
            result = run_one(configs[name], out / name, quiet=args.quiet, label=name)
        except (ConfigError, ValueError) as exc:
            return fail("ftte compare", exc)
        summaries[name], histories[name] = result.summary, result.history
        print_summary(result.summary, out / name)
    report: dict[str, Any] = {"strategies": summaries}
    if "fedavg" in summaries:
        report["ratios_vs_fedavg"] = {n: ratios_against(summaries["fedavg"], s) for n, s in summaries.items() if n != "fedavg"}
    if "fedbuff" in summaries and "ftte" in summaries:
        report["ftte_vs_fedbuff"] = ratios_against(summaries["fedbuff"], summaries["ftte"])
    write_summary_json(out / "compare.json", report)
    plot_accuracy(histories, out / "compare.png", target=base_cfg.run.target_accuracy,
                  title="Test accuracy against virtual time")
    print(json.dumps(report.get("ratios_vs_fedavg", {}), indent=2, default=str))
    print(f"compare.json and compare.png in {out}")
    return 0

"""``ftte compare``: ftte, fedbuff and fedavg on the same fleet, data and seeds."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ftte.pipeline.run_outputs import (
    ConfigError, add_common_arguments, caused_by_interrupt, check_resumable, config_from_args, fail, interrupted,
    print_summary, run_one, target_warning,
)

STRATEGIES = ("ftte", "fedbuff", "fedavg")


def configure(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, fresh=True)
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


def compare(base_cfg: Any, out: Path | None, names: list[str], *, quiet: bool = True, fresh: bool = False,
            on_summary: Any = None) -> dict[str, Any]:
    """Run each strategy of ``names`` on ``base_cfg`` into ``out/<strategy>`` and return the
    comparison (also written to ``out/compare.json`` with ``compare.png``). Every strategy's
    folder is checked before any runs, so a refused resume writes nothing."""
    from ftte.pipeline.report import plot_accuracy, write_summary_json

    configs = {s: base_cfg.with_overrides(**{"run.strategy": s}) for s in names}
    if out is not None and not fresh:
        for name in names:
            check_resumable(configs[name], out / name)
    summaries: dict[str, dict[str, Any]] = {}
    histories: dict[str, list[dict[str, Any]]] = {}
    for name in names:
        folder = None if out is None else out / name
        result = run_one(configs[name], folder, quiet=quiet, label=name, fresh=fresh, checked=True)
        summaries[name], histories[name] = result.summary, result.history
        if on_summary is not None:
            on_summary(name, result.summary, folder)
    report: dict[str, Any] = {"strategies": summaries}
    if "fedavg" in summaries:
        report["ratios_vs_fedavg"] = {n: ratios_against(summaries["fedavg"], s) for n, s in summaries.items() if n != "fedavg"}
    if "fedbuff" in summaries and "ftte" in summaries:
        report["ftte_vs_fedbuff"] = ratios_against(summaries["fedbuff"], summaries["ftte"])
    if out is not None:
        write_summary_json(out / "compare.json", report)
        plot_accuracy(histories, out / "compare.png", target=base_cfg.run.target_accuracy,
                      title="Test accuracy against virtual time: " + ", ".join(names))
    return report


def run(args: argparse.Namespace) -> int:
    names = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown or not names:
        return fail("ftte compare", ValueError(f"unknown strategies {unknown}; choose from {STRATEGIES}"))
    try:
        base_cfg = config_from_args(args.config, args.set)
    except (ConfigError, OSError, ValueError) as exc:
        return fail("ftte compare", exc)
    from ftte.pipeline.report import jsonable

    out = Path(args.out or "runs/compare")

    def show(name: str, summary: dict[str, Any], folder: Path | None) -> None:
        print_summary(summary, folder, warn=False)

    try:
        report = compare(base_cfg, out, names, quiet=args.quiet, fresh=args.fresh, on_summary=show)
    except (ConfigError, ValueError) as exc:
        return fail("ftte compare", exc)
    except BaseException as exc:
        if not caused_by_interrupt(exc):
            raise
        return interrupted("ftte compare", exc)
    warning = target_warning(next(iter(report["strategies"].values())))
    if warning:
        print(warning, file=sys.stderr)
    print(json.dumps(jsonable(report.get("ratios_vs_fedavg", {})), indent=2))
    print(f"compare.json and compare.png in {out}")
    return 0

"""Running a configured simulation with a progress bar and writing its outputs.

Shared by ``ftte simulate`` and ``ftte compare``: one function runs one strategy into
its directory and writes ``summary.json``, ``history.csv``, the accuracy plot and a
Markdown report next to ``ledger.db`` (which the run itself keeps up to date).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

from ftte.pipeline.config import Config, ConfigError, load_config, parse_overrides

if TYPE_CHECKING:  # the simulator pulls in torch; import it only when a run starts
    from ftte.pipeline.simulator import RunResult


def config_from_args(path: str | None, overrides: list[str] | None) -> Config:
    cfg = load_config(path)
    if overrides:
        cfg = cfg.with_overrides(**parse_overrides(overrides))
    return cfg


def add_common_arguments(parser) -> None:
    parser.add_argument("--config", metavar="FILE.toml", help="run configuration (default: the packaged default)")
    parser.add_argument("--out", metavar="DIR", default=None, help="output directory (default: runs/<command>)")
    parser.add_argument("--set", metavar="SECTION.KEY=VALUE", action="append", default=[],
                        help="override one config key, e.g. --set server.buffer_size=20 (repeatable)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run_one(cfg: Config, out_dir: Path, *, quiet: bool = False, label: str = "") -> "RunResult":
    """Run ``cfg`` into ``out_dir`` (resuming if it holds an earlier run) and write the outputs."""
    from ftte.pipeline.progress import Progress
    from ftte.pipeline.simulator import Simulation

    desc = label or cfg.run.strategy
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # opacus' PRV domain maths warns on log(0)
        # Build first: data, fleet, model and plan search can still refuse the config, and a
        # refused run must leave no directory behind.
        sim = Simulation(cfg, out_dir)
        try:
            (out_dir / "config.toml").write_text(cfg.to_toml())
            with Progress(total=cfg.run.max_versions, desc=desc, enabled=not quiet) as bar:
                def tick(row: dict[str, Any]) -> None:
                    bar.update(1, status=f"acc {row['accuracy']:.3f}  t={row['virtual_time_s']:.0f}s")

                sim.on_version = tick
                if sim.version:
                    bar.update(sim.version, status=f"resumed at version {sim.version}")
                result = sim.run()
        finally:
            sim.close()
    write_outputs(out_dir, result, cfg)
    return result


def write_outputs(out_dir: Path, result: "RunResult", cfg: Config) -> None:
    from ftte.pipeline.report import plot_accuracy, write_history_csv, write_markdown_report, write_summary_json

    write_summary_json(out_dir / "summary.json", result.summary)
    write_history_csv(out_dir / "history.csv", result.history)
    plot = out_dir / "accuracy.png"
    plot_accuracy({result.summary["strategy"]: result.history}, plot, target=cfg.run.target_accuracy)
    write_markdown_report(out_dir, result.summary, result.history, plots=[plot])


def print_summary(summary: dict[str, Any], out_dir: Path) -> None:
    keys = ("strategy", "devices", "versions", "final_accuracy", "time_to_target_s", "virtual_time_s",
            "wall_time_s", "bytes_up_per_update", "bytes_down_per_update", "peak_client_memory_bytes",
            "epsilon_max", "delta")
    for key in keys:
        value = summary.get(key)
        if isinstance(value, float):
            value = f"{value:.4g}"
        print(f"  {key:>26}: {value}")
    print(f"  {'outputs':>26}: {out_dir}")


def fail(prog: str, exc: Exception) -> int:
    print(f"{prog}: {exc}", file=sys.stderr)
    return 2


__all__ = ["ConfigError", "add_common_arguments", "config_from_args", "fail", "print_summary", "run_one", "write_outputs"]

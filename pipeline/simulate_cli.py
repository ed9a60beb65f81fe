"""``ftte simulate``: one strategy over a simulated fleet, with outputs in a directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from ftte.pipeline.run_outputs import ConfigError, add_common_arguments, config_from_args, fail, print_summary, run_one


def configure(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--strategy", choices=("ftte", "fedbuff", "fedavg"), help="override [run] strategy")


def run(args: argparse.Namespace) -> int:
    try:
        overrides = list(args.set) + ([f'run.strategy="{args.strategy}"'] if args.strategy else [])
        cfg = config_from_args(args.config, overrides)
    except (ConfigError, OSError, ValueError) as exc:
        return fail("ftte simulate", exc)
    out = Path(args.out or "runs/simulate")
    try:
        result = run_one(cfg, out, quiet=args.quiet)
    except (ConfigError, ValueError) as exc:
        return fail("ftte simulate", exc)
    print_summary(result.summary, out)
    return 0

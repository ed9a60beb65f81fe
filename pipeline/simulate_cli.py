"""``ftte simulate``: one strategy over a simulated fleet, with outputs in a directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from ftte.pipeline.run_outputs import (
    ConfigError, add_common_arguments, caused_by_interrupt, config_from_args, fail, interrupted, print_summary,
    run_one,
)


def configure(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, fresh=True)
    parser.add_argument("--strategy", choices=("ftte", "fedbuff", "fedavg"), help="override [run] strategy")
    parser.add_argument("--backend", choices=("local", "ray"),
                        help="override [run] backend: where device training runs (ray needs the ray extra)")
    parser.add_argument("--address", metavar="ADDR",
                        help="override [run] ray_address: join this Ray cluster (implies --backend ray); "
                             "without it a local Ray instance is started and shut down")


def cli_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The config keys the dedicated flags set (they win over --set)."""
    out: dict[str, object] = {}
    if args.strategy:
        out["run.strategy"] = args.strategy
    if args.address is not None:
        out["run.ray_address"] = args.address
        out["run.backend"] = args.backend or "ray"
    elif args.backend:
        out["run.backend"] = args.backend
    return out


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args.config, list(args.set), preset=args.preset)
        flags = cli_overrides(args)
        if flags:
            cfg = cfg.with_overrides(**flags)
    except (ConfigError, OSError, ValueError) as exc:
        return fail("ftte simulate", exc)
    out = Path(args.out or "runs/simulate")
    try:
        result = run_one(cfg, out, quiet=args.quiet, fresh=args.fresh)
    except (ConfigError, ValueError) as exc:
        return fail("ftte simulate", exc)
    except BaseException as exc:
        if not caused_by_interrupt(exc):
            raise
        return interrupted("ftte simulate", exc)
    print_summary(result.summary, out)
    return 0

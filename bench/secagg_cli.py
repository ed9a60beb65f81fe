"""``ftte bench secagg``: one full secure-aggregation session, timings and bytes as JSON."""

from __future__ import annotations

import argparse
import json
import sys

from ftte.bench.secagg_run import SecAggBenchConfig, run as run_ours


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", type=int, default=10, help="cohort size (default 10)")
    parser.add_argument("--dim", type=int, default=100_000, help="vector length (default 100000)")
    parser.add_argument("--dropout", type=float, default=0.1, help="fraction of members that drop before upload")
    parser.add_argument("--graph", choices=("full", "ring"), default="full", help="masking graph")
    parser.add_argument("--neighbors", type=int, default=0, help="ring graph: neighbours per member (even; 0 = derived from --dropout)")
    parser.add_argument("--threshold", type=int, default=0, help="survivor threshold T (default floor(n/2)+1)")
    parser.add_argument("--value-bits", type=int, default=12, help="quantization precision per coordinate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare", choices=("flower",), help="also run Flower's SecAgg+ building blocks")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    try:
        cfg = SecAggBenchConfig(
            clients=args.clients,
            dim=args.dim,
            dropout=args.dropout,
            graph=args.graph,
            neighbors=args.neighbors,
            threshold=args.threshold,
            value_bits=args.value_bits,
            seed=args.seed,
        )
        out = run_ours(cfg)
        if args.compare == "flower":
            from ftte.bench.flower_ref import compare_with_flower

            out.update(compare_with_flower(cfg, out))
    except (ValueError, RuntimeError, ImportError) as exc:
        print(f"ftte bench secagg: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out, sort_keys=True))
    else:
        for key in sorted(out):
            print(f"{key:>28}: {out[key]}")
    return 0 if out["exact"] else 1

"""The ``ftte`` command line.

Each subcommand lives in the module that owns its work and exposes two functions,
``configure(parser)`` and ``run(args) -> int``. Modules are imported only when their
command is chosen, so ``ftte --help`` stays fast and the top-level package never imports
torch or the server stack.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from typing import Sequence

from ftte import __version__

# command path -> (module, one-line help)
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("bench", "secagg"): ("ftte.bench.secagg_cli", "one secure-aggregation session with real crypto; timings and bytes"),
    ("bench", "memory"): ("ftte.bench.memory_cli", "measured DP-SGD training memory: full model versus budgeted subset"),
    ("bench", "ablation"): ("ftte.bench.ablation_cli", "ftte with and without the variance term and secure aggregation"),
    ("bench", "ray"): ("ftte.bench.ray_scaling", "simulated device updates per second: local backend versus Ray workers"),
    ("audit",): ("ftte.privacy.audit_cli", "verify a privacy ledger and recompute every epsilon"),
    ("simulate",): ("ftte.pipeline.simulate_cli", "simulate a heterogeneous fleet training one strategy"),
    ("compare",): ("ftte.pipeline.compare_cli", "run ftte, fedbuff and fedavg on the same fleet and compare"),
    ("server",): ("ftte.pipeline.server_cli", "serve the coordinator over HTTPS to allow-listed edge devices"),
    ("edge",): ("ftte.edge.edge_cli", "run one edge device against an `ftte server`"),
    ("keygen",): ("ftte.edge.keygen_cli", "create a device identity key and print its public key"),
    ("bench", "http"): ("ftte.bench.http_load", "loopback load test of `ftte server`: requests/s, latency, memory"),
    ("bench", "hostile"): ("ftte.bench.hostile_body", "memory and time to refuse hostile msgpack request bodies"),
}


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftte", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"ftte {__version__}")
    top = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for path, (module, help_text) in COMMANDS.items():
        if not _available(module):
            continue
        if len(path) == 1:
            sub = top.add_parser(path[0], help=help_text, description=help_text)
        else:
            if path[0] not in groups:
                group_parser = top.add_parser(path[0], help=f"{path[0]} subcommands")
                groups[path[0]] = group_parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
            sub = groups[path[0]].add_parser(path[1], help=help_text, description=help_text)
        mod = importlib.import_module(module)
        mod.configure(sub)
        sub.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    module = getattr(args, "_module", None)
    if module is None:
        parser.print_help()
        return 2
    return int(importlib.import_module(module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""The ftte command line: simulate, compare, audit, serve and benchmark.

Each subcommand lives in the module that owns its work and exposes two functions,
``configure(parser)`` and ``run(args) -> int``. Modules are imported only when their
command is chosen, so ``ftte --help`` stays fast and the top-level package never imports
torch or the server stack.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
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
    ("bench", "clipping"): ("ftte.bench.clipping_memory", "DP step memory: per-sample against ghost clipping"),
    ("bench", "device"): ("ftte.bench.device_bench", "a real edge device confined to a CPU quota and memory limit: round cost by phase"),
    ("bench", "hostile"): ("ftte.bench.hostile_body", "memory and time to refuse hostile msgpack request bodies"),
    ("bench", "seeds"): ("ftte.bench.compare_seeds", "several `ftte compare` runs differing only in the seed: mean final accuracy"),
    ("config", "show"): ("ftte.pipeline.config_cli", "print the configuration in force as TOML"),
    ("deploy", "init"): ("ftte.pipeline.deploy_init",
                         "write a ready-to-run deployment: server.toml, CA and certificate, device keys, sample data"),
    ("export",): ("ftte.pipeline.export_cli", "write the deployment's current global model as a PyTorch file"),
}

# ``code`` and `code` (reStructuredText and Markdown inline literals) in help texts
_LITERAL = re.compile(r"``(.+?)``|`([^`]+?)`")


def plain_text(text: str) -> str:
    """Help text without inline-literal markup: a terminal shows the quotes verbatim."""
    return _LITERAL.sub(lambda m: m.group(1) or m.group(2), text)


class PlainHelpFormatter(argparse.HelpFormatter):
    """Strips inline-literal markup from descriptions and argument help, wherever they were written."""

    def _format_text(self, text: str) -> str:
        return super()._format_text(plain_text(text))

    def _expand_help(self, action: argparse.Action) -> str:
        return plain_text(super()._expand_help(action))

    def _format_action(self, action: argparse.Action) -> str:
        return plain_text(super()._format_action(action))


def quiet_native_logs() -> None:
    """Keep torch's profiler (kineto) from printing "USDT: profiler_start/stop" lines on stderr
    each time the simulator measures training memory. Level 6 is above kineto's highest
    (USDT = 5); a user's own KINETO_LOG_LEVEL is left alone."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftte", description=__doc__.splitlines()[0],
                                     formatter_class=PlainHelpFormatter)
    parser.add_argument("--version", action="version", version=f"ftte {__version__}")
    top = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for path, (module, help_text) in COMMANDS.items():
        if not _available(module):
            continue
        if len(path) == 1:
            sub = top.add_parser(path[0], help=help_text, description=help_text, formatter_class=PlainHelpFormatter)
        else:
            if path[0] not in groups:
                group_parser = top.add_parser(path[0], help=f"{path[0]} subcommands",
                                              formatter_class=PlainHelpFormatter)
                groups[path[0]] = group_parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
            sub = groups[path[0]].add_parser(path[1], help=help_text, description=help_text,
                                             formatter_class=PlainHelpFormatter)
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
    quiet_native_logs()
    try:
        return int(importlib.import_module(module).run(args) or 0)
    except KeyboardInterrupt:  # commands that handle Ctrl-C themselves say more; none shows a traceback
        print(f"ftte {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an error some cleanup raised while handling Ctrl-C is still Ctrl-C
        if not isinstance(exc.__context__, KeyboardInterrupt):
            raise
        print(f"ftte {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

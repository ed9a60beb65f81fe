"""``ftte config show``: the configuration a run would use, as TOML.

The packaged defaults, a ``--config`` file and ``--set`` overrides are merged and
validated exactly as ``ftte simulate`` does; the output can be saved and passed back
with ``--config``.
"""

from __future__ import annotations

import argparse

from ftte.pipeline.run_outputs import ConfigError, config_from_args, fail


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.toml", help="run configuration (default: the packaged default)")
    parser.add_argument("--preset", metavar="NAME", help="start from a packaged preset (digits, mnist500)")
    parser.add_argument("--set", metavar="SECTION.KEY=VALUE", action="append", default=[],
                        help="override one config key, e.g. --set fleet.devices=20 (repeatable)")


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args.config, list(args.set), preset=args.preset)
    except (ConfigError, OSError, ValueError) as exc:
        return fail("ftte config show", exc)
    print(cfg.to_toml(), end="")
    return 0

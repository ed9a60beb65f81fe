"""``ftte export --config server.toml --out model.pt [--state FILE]``: the current global model as a PyTorch file.

Reads the newest version from the server's state file (read-only, so the server may keep
running) and writes ``torch.save`` of its state_dict with the architecture's name and
arguments and the feature statistics it expects (see :mod:`ftte.pipeline.model_export`).
Load it with ``ftte.pipeline.model_export.load_model(path)``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE.toml", help="the deployment's configuration")
    parser.add_argument("--out", required=True, metavar="FILE.pt", help="where to write the model")
    parser.add_argument("--state", metavar="FILE", help="read this state file instead of [deploy] state")


def run(args: argparse.Namespace) -> int:
    from ftte.pipeline.config import ConfigError
    from ftte.pipeline.model_export import export_model

    try:
        info = export_model(Path(args.config), Path(args.out), Path(args.state) if args.state else None)
    except (OSError, ValueError, ConfigError) as exc:
        print(f"ftte export: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(info))
    return 0

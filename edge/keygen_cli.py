"""``ftte keygen FILE``: create a device identity key and print its public key for the allow-list."""

from __future__ import annotations

import argparse
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("key", metavar="FILE", help="where to write the private key (refuses to overwrite)")
    parser.add_argument("--show", action="store_true", help="only print the public key of an existing FILE")


def run(args: argparse.Namespace) -> int:
    from ftte.edge.identity import create_identity, load_identity

    from ftte.http_auth import member_id

    try:
        signer = load_identity(args.key) if args.show else create_identity(args.key)
    except (OSError, ValueError) as exc:
        print(f"ftte keygen: {exc}", file=sys.stderr)
        return 2
    print(f"{signer.public_key.hex()}  # member {member_id(signer.public_key)}")
    return 0

"""``ftte audit LEDGER [--report DIR]``: verify a privacy ledger and recompute every ε.

Exit status: 0 when everything verifies, 1 on any tampering, ε mismatch or exceeded
budget, 2 when the ledger cannot be opened at all. Imports of torch/opacus happen only in
:func:`run`, so ``ftte --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ledger", help="path of the SQLite privacy ledger")
    parser.add_argument("--report", metavar="DIR", help="write audit.md and epsilon.png into DIR")
    parser.add_argument("--rtol", type=float, default=1e-6,
                        help="relative tolerance for recomputed epsilon (default: 1e-6)")
    parser.add_argument("--atol", type=float, default=1e-9,
                        help="absolute tolerance for recomputed epsilon (default: 1e-9)")
    parser.add_argument("--expect-key", metavar="HEX",
                        help="the writer's Ed25519 public key (hex) the ledger must be signed with")
    parser.add_argument("--expect-head", metavar="HEX",
                        help="the published hash of the ledger's last row")
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of text")


def run(args: argparse.Namespace) -> int:
    import sqlite3

    from .audit import verify_ledger, write_report

    try:
        result = verify_ledger(
            args.ledger, rtol=args.rtol, atol=args.atol,
            expect_public_key=args.expect_key, expect_head=args.expect_head,
        )
    except (FileNotFoundError, sqlite3.DatabaseError) as exc:
        print(f"ftte audit: cannot read ledger: {exc}", file=sys.stderr)
        return 2
    files = write_report(result, args.report) if args.report else None
    if args.json:
        doc = result.to_json()
        if files is not None:
            doc["report"] = {"markdown": str(files.markdown), "plot": str(files.plot)}
        print(json.dumps(doc, indent=2))
    else:
        print(result.summary())
        if files is not None:
            print(f"  report: {files.markdown} ({files.plot.name})")
    return 0 if result.ok else 1

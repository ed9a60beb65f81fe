"""``ftte audit LEDGER [--report DIR] [--anchor SEQ:HASH ...] [--device-record FILE ...]``:
verify a privacy ledger, recompute every ε, check published anchors, device evidence,
device records and the recorded policy.

Both the text and the ``--json`` output print the current anchor (``SEQ:HASH`` of the last
row): publish it somewhere the operator cannot edit (a transparency log, an auditor's
mailbox), and later audits with ``--anchor`` prove the rows up to it are unchanged.

Exit status: 0 when everything verifies, 1 on any tampering, ε mismatch, exceeded budget,
failed anchor, bad device evidence or policy violation, 2 when the ledger cannot be opened
at all or an argument is malformed. Imports of torch/opacus happen only in
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
    parser.add_argument("--anchor", metavar="SEQ:HASH", action="append", default=[],
                        help="a published anchor (row number and its hash, as printed by an earlier audit); the "
                             "ledger must extend it unchanged. Repeatable")
    parser.add_argument("--device-record", metavar="FILE", action="append", default=[],
                        help="a device's own record of its signed spend claims; report its rounds that the ledger "
                             "lacks or states differently. Repeatable")
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of text")


def run(args: argparse.Namespace) -> int:
    import sqlite3

    from .audit import parse_anchor, verify_ledger, write_report

    try:
        anchors = [parse_anchor(a) for a in args.anchor]
    except ValueError as exc:
        print(f"ftte audit: {exc}", file=sys.stderr)
        return 2
    try:
        result = verify_ledger(
            args.ledger, rtol=args.rtol, atol=args.atol,
            expect_public_key=args.expect_key, expect_head=args.expect_head,
            anchors=anchors, device_records=args.device_record,
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

"""A device's own record of the spend claims it signed, and its comparison with a server ledger.

Why the device keeps one: the server's ledger is signed by the server, so it proves only
that the server wrote it. A device that keeps every claim it signed (one JSON line per
round, appended and fsynced before the update leaves the device) can later hand that file
to an auditor, and ``ftte audit LEDGER --device-record FILE`` reports any of its rounds the
ledger lacks or states differently. The file holds no records, only round parameters and ε.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable

from .ledger import LedgerEntry
from .spend import SpendClaim, verify_claim

RECORD_FORMAT = "ftte.privacy.device-record/1"
MAX_LINE_BYTES = 16_384
MAX_RECORD_BYTES = 64 * 1024 * 1024
_CLAIM_FIELDS = tuple(f.name for f in fields(SpendClaim))


class DeviceRecordError(ValueError):
    """The device record file is malformed."""


@dataclass(frozen=True)
class SignedClaim:
    claim: SpendClaim
    public_key: str  # hex
    signature: str  # hex

    def verifies(self) -> bool:
        return verify_claim(self.claim, self.public_key, self.signature)


def append_claim(path: str | os.PathLike[str], claim: SpendClaim, public_key_hex: str, signature_hex: str) -> None:
    """Append one signed claim and fsync (the device calls this before sending the update)."""
    line = json.dumps({"format": RECORD_FORMAT, "claim": claim.to_dict(), "public_key": public_key_hex,
                       "signature": signature_hex}, sort_keys=True, separators=(",", ":"), allow_nan=True)
    data = (line + "\n").encode("ascii")
    fd = os.open(os.fspath(path), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_claims(path: str | os.PathLike[str]) -> list[SignedClaim]:
    """Parse a device record, bounding sizes before building anything."""
    p = Path(path)
    size = p.stat().st_size
    if size > MAX_RECORD_BYTES:
        raise DeviceRecordError(f"{p}: {size} bytes exceeds the {MAX_RECORD_BYTES}-byte limit")
    out = []
    with p.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if len(raw) > MAX_LINE_BYTES:
                raise DeviceRecordError(f"{p}:{number}: line longer than {MAX_LINE_BYTES} bytes")
            if not raw.strip():
                continue
            try:
                doc: Any = json.loads(raw)
                if doc.get("format") != RECORD_FORMAT:
                    raise ValueError(f"format {doc.get('format')!r}")
                body = doc["claim"]
                if set(body) != set(_CLAIM_FIELDS):
                    raise ValueError("claim fields differ from the format's")
                claim = SpendClaim(**body)
                pub, sig = doc["public_key"], doc["signature"]
                if not (isinstance(pub, str) and isinstance(sig, str)):
                    raise ValueError("public_key and signature must be hex strings")
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                raise DeviceRecordError(f"{p}:{number}: {exc}") from exc
            out.append(SignedClaim(claim, pub, sig))
    return out


@dataclass(frozen=True)
class RecordFinding:
    """One disagreement between a device record and the ledger."""

    kind: str  # "missing", "altered", "bad_record_signature", "not_in_record"
    message: str
    device_id: str
    seq: int | None = None


def compare_with_ledger(claims: Iterable[SignedClaim], entries: Iterable[LedgerEntry]) -> list[RecordFinding]:
    """What the ledger lacks or states differently, claim by claim.

    A claim is matched by its signature (the device's signature is unique per claim): a row
    carrying it must restate the claim exactly, else the row was **altered**; no row carrying
    it means the round is **missing** (or was stored without the device's evidence). Rows
    signed by one of the record's keys that the record does not hold are reported too
    (``not_in_record``): the server attributes to the device a round it did not sign.
    """
    claims = list(claims)
    entries = list(entries)
    by_signature = {e.row.device_signature: e for e in entries if e.row.device_signature is not None}
    keys = {c.public_key for c in claims}
    seen: set[str] = set()
    out: list[RecordFinding] = []
    for c in claims:
        dev = c.claim.device_id
        if not c.verifies():
            out.append(RecordFinding("bad_record_signature", "a claim in the device record does not verify "
                                     "under its own key (the record file itself was altered)", dev))
            continue
        seen.add(c.signature)
        entry = by_signature.get(c.signature)
        if entry is None:
            out.append(RecordFinding("missing", f"round of plan {c.claim.plan_id!r} at version {c.claim.version} "
                                     f"(epsilon_total {c.claim.epsilon_total!r}) is not in the ledger", dev))
            continue
        row_claim = SpendClaim.for_row(entry.row)
        if row_claim != c.claim or entry.row.device_public_key != c.public_key:
            diff = [k for k in _CLAIM_FIELDS if getattr(row_claim, k) != getattr(c.claim, k)]
            out.append(RecordFinding("altered", f"ledger row differs from the device's claim in {diff or ['key']}",
                                     dev, entry.seq))
    for e in entries:
        if e.row.device_public_key in keys and e.row.device_signature not in seen:
            out.append(RecordFinding("not_in_record", "row signed with this device's key is not in its record",
                                     e.row.device_id, e.seq))
    return out

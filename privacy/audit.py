"""Audit a privacy ledger: integrity, recomputed ε, budgets, and a report.

The auditor trusts the ledger file for nothing. It checks, in order:

1. **Metadata**: format tag, ledger id and writer public key (optionally pinned).
2. **Integrity** of every row: contiguous sequence numbers (a gap is a deletion), the
   hash chain (each ``prev_hash`` equals the previous row's hash; row 1 links to the
   genesis hash bound to ledger id and key), the recomputed SHA-256 of each row's
   canonical encoding, and the Ed25519 signature over it.
3. **Head**: the signed (count, last hash) summary matches the rows, which is what makes
   truncating the tail visible.
4. **ε recomputation**: for each device, the history of recorded (noise multiplier,
   sample rate, steps) is replayed through the named Opacus accountant at the recorded
   δ; every recorded cumulative ε and per-round ε must match within tolerance.
5. **Budgets**: any device whose cumulative ε (recorded or recomputed) exceeds its
   recorded ``epsilon_max`` is flagged.
6. **Anchors** (``--anchor SEQ:HASH``, published earlier): the chain is recomputed from the
   genesis hash through row SEQ from the rows' *contents*, and must end in HASH. Any change,
   removal or reordering of a row at or before SEQ, or a swapped writer key, changes that
   hash, whoever re-signed the ledger afterwards; honest growth past SEQ does not.
7. **Device evidence**: a row carrying a device signature must verify against the claim
   rebuilt from the row (:mod:`.spend`); one device id must keep one device key. Rows
   without a signature are counted as unsigned, not failed, unless their device signs its
   other rows: a device that signs signs every round, late reports included.
8. **Device records** (``--device-record FILE``): every claim a device kept must appear,
   unchanged, in the ledger (:mod:`.device_record`).
9. **Policy**: when the ledger's metadata holds a :class:`~.policy.PrivacyPolicy`, every
   row must respect it (accountant, δ at most the policy's and one δ per device, the noise
   floor, ``epsilon_max`` and recorded and recomputed ε within the cap).

A row that fails integrity checks is still decoded and recomputed where possible, so
the report shows what the tampered row claims.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .accountant import NON_PRIVATE_ACCOUNTANT, PrivacyStep, compute_epsilon
from .device_record import DeviceRecordError, compare_with_ledger, read_claims
from .distributed_dp import parse_user_mechanism, user_row_problems
from .ledger import (
    LEDGER_FORMAT,
    POLICY_META_KEY,
    LedgerEntry,
    compute_row_hash,
    entry_from_record,
    genesis_hash,
    head_signing_message,
    parse_head,
    read_meta,
    read_records,
    row_signing_message,
    verify_signature,
)
from .policy import PrivacyPolicy
from .spend import row_device_signature_ok

DEFAULT_RTOL = 1e-6
DEFAULT_ATOL = 1e-9

ISSUE_KINDS = ("meta", "key", "decode", "sequence", "chain", "hash", "signature", "head", "anchor",
               "device_signature", "device_key", "device_record", "epsilon", "over_budget", "policy")
INTEGRITY_KINDS = ("meta", "key", "decode", "sequence", "chain", "hash", "signature", "head", "anchor",
                   "device_signature", "device_key")


def parse_anchor(text: str) -> tuple[int, str]:
    """``SEQ:HASH`` (as ``ftte audit --json`` prints it) to ``(seq, hash)``."""
    seq_text, sep, hash_text = text.partition(":")
    try:
        seq = int(seq_text)
        bytes.fromhex(hash_text)
    except ValueError:
        seq, hash_text = 0, ""
    if not sep or seq < 1 or len(hash_text) != 64:
        raise ValueError(f"anchor {text!r} is not SEQ:HASH (a row number >= 1 and a 64-digit hex SHA-256)")
    return seq, hash_text.lower()


@dataclass(frozen=True)
class AuditIssue:
    """One finding. ``kind`` is one of :data:`ISSUE_KINDS`."""

    kind: str
    message: str
    seq: int | None = None
    device_id: str | None = None


@dataclass(frozen=True)
class RoundAudit:
    """One ledger row as recorded, next to what the auditor recomputed."""

    seq: int
    device_id: str
    plan_id: str
    version: int
    cohort_id: str | None
    timestamp: str
    sample_rate: float
    steps: int
    noise_multiplier: float
    max_grad_norm: float
    accountant: str
    delta: float
    epsilon_max: float
    epsilon_round_recorded: float
    epsilon_round_recomputed: float
    epsilon_total_recorded: float
    epsilon_total_recomputed: float
    integrity_ok: bool
    epsilon_ok: bool
    library_versions: str


@dataclass(frozen=True)
class DeviceAudit:
    """A device's rounds in ledger order and its final standing against its budget."""

    device_id: str
    rounds: tuple[RoundAudit, ...]
    epsilon_total_recorded: float
    epsilon_total_recomputed: float
    epsilon_max: float
    delta: float
    accountant: str
    over_budget: bool


@dataclass(frozen=True)
class AuditResult:
    """Everything the audit found. ``ok`` is the single pass/fail answer."""

    path: str
    n_rows: int
    ledger_id: str | None
    public_key_hex: str | None
    head_hash: str | None
    integrity_ok: bool
    epsilon_ok: bool
    budget_ok: bool
    issues: tuple[AuditIssue, ...]
    devices: dict[str, DeviceAudit] = field(default_factory=dict)
    anchor: tuple[int, str] | None = None  # (seq, hash) of the last row: publish it
    signed_rows: int = 0  # rows carrying a device signature (all verified, or an issue says otherwise)
    unsigned_rows: int = 0  # rows without device evidence
    policy: PrivacyPolicy | None = None
    user_rows: int = 0  # rows protecting the device (user-level, :mod:`.distributed_dp`); the rest: records

    @property
    def ok(self) -> bool:
        return self.integrity_ok and self.epsilon_ok and self.budget_ok and not self.issues

    @property
    def anchor_arg(self) -> str | None:
        return None if self.anchor is None else f"{self.anchor[0]}:{self.anchor[1]}"

    def summary(self) -> str:
        """A few lines for a terminal."""
        status = "PASS" if self.ok else "FAIL"
        lines = [
            f"ledger {self.path}: {status}",
            f"  rows {self.n_rows}, devices {len(self.devices)}, head {self.head_hash or '-'}",
            f"  writer key {self.public_key_hex or '-'}",
            f"  integrity {'ok' if self.integrity_ok else 'FAILED'}, "
            f"epsilon {'ok' if self.epsilon_ok else 'MISMATCH'}, budgets {'ok' if self.budget_ok else 'EXCEEDED'}",
            f"  device evidence: {self.signed_rows} signed rows, {self.unsigned_rows} unsigned",
            f"  unit protected: {self.user_rows} user-level rows, {self.n_rows - self.user_rows} record-level",
            f"  policy: {self.policy.to_json() if self.policy is not None else 'none recorded'}",
            f"  anchor (publish): {self.anchor_arg or '-'}",
        ]
        by_kind: dict[str, int] = {}
        for issue in self.issues:
            by_kind[issue.kind] = by_kind.get(issue.kind, 0) + 1
        if by_kind:
            lines.append("  issues: " + ", ".join(f"{k} x{v}" for k, v in sorted(by_kind.items())))
            for issue in self.issues[:10]:
                where = f"row {issue.seq}" if issue.seq is not None else "ledger"
                lines.append(f"    [{issue.kind}] {where}: {issue.message}")
            if len(self.issues) > 10:
                lines.append(f"    … {len(self.issues) - 10} more (see the report)")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "n_rows": self.n_rows,
            "ledger_id": self.ledger_id,
            "public_key": self.public_key_hex,
            "head_hash": self.head_hash,
            "integrity_ok": self.integrity_ok,
            "epsilon_ok": self.epsilon_ok,
            "budget_ok": self.budget_ok,
            "anchor": None if self.anchor is None else {"seq": self.anchor[0], "hash": self.anchor[1],
                                                         "arg": self.anchor_arg},
            "device_evidence": {"signed_rows": self.signed_rows, "unsigned_rows": self.unsigned_rows},
            "units": {"user": self.user_rows, "record": self.n_rows - self.user_rows},
            "policy": None if self.policy is None else json.loads(self.policy.to_json()),
            "issues": [vars(i) for i in self.issues],
            "devices": {
                d: {
                    "rounds": len(a.rounds),
                    "epsilon_total_recorded": _json_float(a.epsilon_total_recorded),
                    "epsilon_total_recomputed": _json_float(a.epsilon_total_recomputed),
                    "epsilon_max": _json_float(a.epsilon_max),
                    "delta": a.delta,
                    "accountant": a.accountant,
                    "over_budget": a.over_budget,
                }
                for d, a in self.devices.items()
            },
        }


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


def _close(a: float, b: float, rtol: float, atol: float) -> bool:
    if math.isinf(a) or math.isinf(b):
        return a == b
    return math.isclose(a, b, rel_tol=rtol, abs_tol=atol)


def open_readonly(path: str | os.PathLike[str]) -> sqlite3.Connection:
    """Open without any chance of modifying the file (or creating it)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no ledger at {p}")
    return sqlite3.connect(f"{p.resolve().as_uri()}?mode=ro", uri=True)


def verify_ledger(
    path: str | os.PathLike[str],
    *,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    expect_public_key: str | None = None,
    expect_head: str | None = None,
    anchors: Sequence[tuple[int, str]] = (),
    device_records: Sequence[str | os.PathLike[str]] = (),
) -> AuditResult:
    """Run every check on the ledger at ``path`` and return an :class:`AuditResult`.

    ``anchors``: published ``(seq, hash)`` pairs the ledger must extend unchanged.
    ``device_records``: device record files (:mod:`.device_record`) to check against the ledger.
    Raises ``FileNotFoundError`` if there is no file and ``sqlite3.DatabaseError`` if it
    is not an SQLite database; every other problem becomes an :class:`AuditIssue`.
    """
    conn = open_readonly(path)
    try:
        return _verify(conn, os.fspath(path), rtol, atol, expect_public_key, expect_head, tuple(anchors),
                       tuple(device_records))
    finally:
        conn.close()


def _verify(
    conn: sqlite3.Connection,
    path: str,
    rtol: float,
    atol: float,
    expect_public_key: str | None,
    expect_head: str | None,
    anchors: tuple[tuple[int, str], ...] = (),
    device_records: tuple[str | os.PathLike[str], ...] = (),
) -> AuditResult:
    issues: list[AuditIssue] = []
    integrity_bad: set[int] = set()

    # 1. metadata -----------------------------------------------------------------------
    try:
        meta = read_meta(conn)
        records = read_records(conn)
    except sqlite3.DatabaseError as exc:
        issues.append(AuditIssue("meta", f"ledger tables unreadable: {exc}"))
        return AuditResult(path, 0, None, None, None, False, False, False, tuple(issues))
    ledger_id, pub = meta.get("ledger_id"), meta.get("public_key")
    if meta.get("format") != LEDGER_FORMAT:
        issues.append(AuditIssue("meta", f"format is {meta.get('format')!r}, expected {LEDGER_FORMAT!r}"))
    if not ledger_id or not pub:
        issues.append(AuditIssue("meta", "ledger id or writer public key missing from metadata"))
    if expect_public_key is not None and pub != expect_public_key.lower():
        issues.append(AuditIssue("key", f"writer key {pub} is not the expected {expect_public_key}"))
    genesis = genesis_hash(ledger_id or "", pub or "")

    # 2. integrity per row ------------------------------------------------------------
    entries: list[tuple[dict[str, Any], LedgerEntry | None]] = []
    prev_hash = genesis
    for expected_seq, rec in enumerate(records, start=1):
        seq = rec.get("seq")
        dev = rec.get("device_id") if isinstance(rec.get("device_id"), str) else None
        try:
            entry: LedgerEntry | None = entry_from_record(rec)
        except (TypeError, ValueError, KeyError) as exc:
            entry = None
            integrity_bad.add(expected_seq)
            issues.append(AuditIssue("decode", f"row does not decode: {exc}", seq, dev))
        if seq != expected_seq:
            integrity_bad.add(expected_seq)
            issues.append(AuditIssue("sequence", f"expected seq {expected_seq}, found {seq} (row deleted or inserted)",
                                     seq, dev))
        if rec.get("prev_hash") != prev_hash:
            integrity_bad.add(expected_seq)
            issues.append(AuditIssue("chain", "prev_hash does not match the previous row's hash", seq, dev))
        if entry is not None:
            recomputed = compute_row_hash(entry.seq, entry.prev_hash, entry.row)
            if recomputed != entry.row_hash:
                integrity_bad.add(expected_seq)
                issues.append(AuditIssue("hash", "row contents do not match its stored hash", seq, dev))
            if pub is None or not _hex_ok(entry.row_hash) or not verify_signature(
                pub, row_signing_message(entry.row_hash), entry.signature
            ):
                integrity_bad.add(expected_seq)
                issues.append(AuditIssue("signature", "signature does not verify under the writer key", seq, dev))
        prev_hash = rec.get("row_hash")  # type: ignore[assignment]
        entries.append((rec, entry))

    # 3. signed head --------------------------------------------------------------------
    last_hash = records[-1].get("row_hash") if records else None
    try:
        head = parse_head(meta.get("head"))
    except (ValueError, KeyError, TypeError) as exc:
        head = None
        issues.append(AuditIssue("head", f"head record unreadable: {exc}"))
    if head is None:
        if records:
            issues.append(AuditIssue("head", "rows present but no signed head"))
    else:
        if head.count != len(records) or head.head_hash != last_hash:
            issues.append(AuditIssue(
                "head", f"signed head says {head.count} rows ending {head.head_hash[:16]}…, "
                        f"ledger has {len(records)} rows ending {str(last_hash)[:16]}… (rows deleted or added)"))
        if pub is None or not verify_signature(pub, head_signing_message(ledger_id or "", head.count, head.head_hash),
                                               head.signature):
            issues.append(AuditIssue("head", "head signature does not verify under the writer key"))
    if expect_head is not None and last_hash != expect_head.lower():
        issues.append(AuditIssue("head", f"last row hash {last_hash} is not the expected {expect_head}"))

    # 6. anchors -------------------------------------------------------------------------
    for seq, anchor_hash in anchors:
        problem = _anchor_problem(records, genesis, seq, anchor_hash)
        if problem is not None:
            issues.append(AuditIssue("anchor", f"anchor {seq}:{anchor_hash[:16]}…: {problem}", seq))

    # 7. device evidence ----------------------------------------------------------------
    signed = unsigned = 0
    device_keys: dict[str, str] = {}
    signing = {e.row.device_id for _, e in entries if e is not None and e.row.device_signature is not None}
    for position, (rec, entry) in enumerate(entries, start=1):
        if entry is None:
            continue
        verdict = row_device_signature_ok(entry.row)
        if verdict is None:
            unsigned += 1
            if entry.row.device_id in signing and math.isfinite(entry.row.epsilon_total):
                # a device that signs its rounds signs every one (late reports included): an
                # unsigned row of such a device had its evidence stripped, or was made up
                issues.append(AuditIssue("device_signature", "unsigned row of a device that signs its rounds "
                                         "(evidence stripped, or a row the device never claimed)", entry.seq,
                                         entry.row.device_id))
            continue
        signed += 1
        if not verdict:
            integrity_bad.add(position)
            issues.append(AuditIssue("device_signature", "device signature does not verify against the row's "
                                     "spend claim (parameters or epsilon changed, or forged)", entry.seq,
                                     entry.row.device_id))
        key = entry.row.device_public_key or ""
        known = device_keys.setdefault(entry.row.device_id, key)
        if known != key:
            integrity_bad.add(position)
            issues.append(AuditIssue("device_key", f"device key {key[:16]}… differs from this device's earlier "
                                     f"key {known[:16]}…", entry.seq, entry.row.device_id))

    integrity_ok = not any(i.kind in INTEGRITY_KINDS for i in issues)

    # 8. device records -----------------------------------------------------------------
    decoded = [e for _, e in entries if e is not None]
    for record_path in device_records:
        try:
            claims = read_claims(record_path)
        except (OSError, DeviceRecordError) as exc:
            issues.append(AuditIssue("device_record", f"device record {record_path} unreadable: {exc}"))
            continue
        for finding in compare_with_ledger(claims, decoded):
            issues.append(AuditIssue("device_record", f"{finding.kind}: {finding.message} (record {record_path})",
                                     finding.seq, finding.device_id))

    # 4. ε recomputation, 5. budgets ----------------------------------------------------
    histories: dict[str, list[PrivacyStep]] = {}
    prev_total: dict[str, float] = {}
    rounds: dict[str, list[RoundAudit]] = {}
    epsilon_ok = True
    user_rows = 0
    for position, (rec, entry) in enumerate(entries, start=1):
        if entry is None:
            continue
        row = entry.row
        dev = row.device_id
        try:
            step = PrivacyStep(row.noise_multiplier, row.sample_rate, row.steps)
            if row.accountant == NON_PRIVATE_ACCOUNTANT and row.noise_multiplier != 0.0:
                raise ValueError("accountant 'none' recorded for a noisy round")
            history = histories.setdefault(dev, [])
            history.append(step)
            mechanism = row.accountant if row.accountant != NON_PRIVATE_ACCOUNTANT else "prv"
            total = compute_epsilon(history, row.delta, mechanism)
            before = prev_total.get(dev, 0.0)
            eps_round = total - before if math.isfinite(total) else math.inf
            prev_total[dev] = total
        except (ValueError, TypeError) as exc:
            epsilon_ok = False
            issues.append(AuditIssue("epsilon", f"cannot recompute epsilon: {exc}", entry.seq, dev))
            total = eps_round = math.nan
        ok = _close(row.epsilon_total, total, rtol, atol) and _close(row.epsilon_round, eps_round, rtol, atol)
        problems = []  # user-level: the row must be one participation of the mechanism it records
        if _is_user_row(row.rng_source):
            user_rows += 1
            problems = user_row_problems(row.noise_multiplier, row.sample_rate, row.steps, row.accountant,
                                         row.max_grad_norm, row.rng_source)
            for problem in problems:
                issues.append(AuditIssue("epsilon", f"user-level row: {problem}", entry.seq, dev))
        if not ok and not math.isnan(total):
            epsilon_ok = False
            issues.append(AuditIssue(
                "epsilon",
                f"recorded epsilon_total={row.epsilon_total!r} (round {row.epsilon_round!r}) but "
                f"{row.accountant} recomputes {total!r} (round {eps_round!r}) at delta={row.delta!r}",
                entry.seq, dev))
        if problems:
            epsilon_ok = ok = False
        rounds.setdefault(dev, []).append(RoundAudit(
            seq=entry.seq, device_id=dev, plan_id=row.plan_id, version=row.version, cohort_id=row.cohort_id,
            timestamp=row.timestamp, sample_rate=row.sample_rate, steps=row.steps,
            noise_multiplier=row.noise_multiplier, max_grad_norm=row.max_grad_norm, accountant=row.accountant,
            delta=row.delta, epsilon_max=row.epsilon_max, epsilon_round_recorded=row.epsilon_round,
            epsilon_round_recomputed=eps_round, epsilon_total_recorded=row.epsilon_total,
            epsilon_total_recomputed=total, integrity_ok=position not in integrity_bad, epsilon_ok=ok,
            library_versions=f"torch {row.torch_version}, opacus {row.opacus_version}, ftte {row.ftte_version}",
        ))

    devices: dict[str, DeviceAudit] = {}
    budget_ok = True
    for dev, rs in rounds.items():
        last = rs[-1]
        over = any(
            r.epsilon_total_recorded > r.epsilon_max or (not math.isnan(r.epsilon_total_recomputed)
                                                          and r.epsilon_total_recomputed > r.epsilon_max)
            for r in rs
        )
        if over:
            budget_ok = False
            worst = max(rs, key=lambda r: max(r.epsilon_total_recorded, _nan_to_neg(r.epsilon_total_recomputed)))
            issues.append(AuditIssue(
                "over_budget",
                f"device {dev!r} reached epsilon={max(worst.epsilon_total_recorded, _nan_to_neg(worst.epsilon_total_recomputed)):.4g}"
                f" > epsilon_max={worst.epsilon_max:.4g} at delta={worst.delta:.3g}",
                worst.seq, dev))
        devices[dev] = DeviceAudit(
            device_id=dev, rounds=tuple(rs), epsilon_total_recorded=last.epsilon_total_recorded,
            epsilon_total_recomputed=last.epsilon_total_recomputed, epsilon_max=last.epsilon_max,
            delta=last.delta, accountant=last.accountant, over_budget=over,
        )

    # 9. policy ------------------------------------------------------------------------------
    policy: PrivacyPolicy | None = None
    if meta.get(POLICY_META_KEY) is not None:
        try:
            policy = PrivacyPolicy.from_json(meta[POLICY_META_KEY])
        except (ValueError, TypeError) as exc:
            issues.append(AuditIssue("policy", f"policy in metadata unreadable: {exc}"))
    if policy is not None:
        issues.extend(_policy_issues(policy, rounds, entries))

    last_seq = records[-1].get("seq") if records else None
    anchor = (int(last_seq), last_hash) if isinstance(last_seq, int) and isinstance(last_hash, str) else None
    return AuditResult(
        path=path, n_rows=len(records), ledger_id=ledger_id, public_key_hex=pub,
        head_hash=last_hash if isinstance(last_hash, str) else None,
        integrity_ok=integrity_ok, epsilon_ok=epsilon_ok, budget_ok=budget_ok,
        issues=tuple(issues), devices=devices, anchor=anchor, signed_rows=signed, unsigned_rows=unsigned,
        policy=policy, user_rows=user_rows,
    )


def _anchor_problem(records: list[dict[str, Any]], genesis: str, seq: int, anchor_hash: str) -> str | None:
    """None when rows 1..seq, re-hashed from their contents, chain from the genesis to ``anchor_hash``.

    Only contents are trusted here, never a stored hash or signature: a ledger rewritten and
    re-signed with the writer's key still hashes differently."""
    if seq > len(records):
        return f"the ledger has only {len(records)} rows (rows at or before the anchor were removed)"
    prev = genesis
    for position in range(1, seq + 1):
        rec = records[position - 1]
        if rec.get("seq") != position:
            return f"row {position} is stored as seq {rec.get('seq')!r} (rows removed or reordered)"
        try:
            entry = entry_from_record(rec)
        except (TypeError, ValueError, KeyError) as exc:
            return f"row {position} does not decode ({exc})"
        prev = compute_row_hash(position, prev, entry.row)
    if prev != anchor_hash:
        return ("the chain re-hashed from the rows' contents ends in "
                f"{prev[:16]}…: a row at or before the anchor was changed, removed or reordered, or the key replaced")
    return None


def _is_user_row(rng_source: str) -> bool:
    try:
        return parse_user_mechanism(rng_source) is not None
    except ValueError:
        return True  # a malformed user-level tag: user_row_problems names it


def _policy_issues(policy: PrivacyPolicy, rounds: dict[str, list[RoundAudit]],
                   entries: list[tuple[dict[str, Any], LedgerEntry | None]]) -> list[AuditIssue]:
    out: list[AuditIssue] = []
    for _, entry in entries:
        if entry is None:
            continue
        if _is_user_row(entry.row.rng_source) != (policy.unit == "user"):
            out.append(AuditIssue("policy", f"a {'user' if _is_user_row(entry.row.rng_source) else 'record'}-level "
                                  f"row in a ledger whose policy protects the {policy.unit!r} unit",
                                  entry.seq, entry.row.device_id))
        for problem in policy.row_violations(entry.row):
            out.append(AuditIssue("policy", problem, entry.seq, entry.row.device_id))
    for dev, rs in rounds.items():
        deltas = sorted({r.delta for r in rs})
        if len(deltas) > 1:
            out.append(AuditIssue("policy", f"device {dev!r} is accounted at several deltas {deltas}", rs[-1].seq, dev))
        for r in rs:
            if not math.isnan(r.epsilon_total_recomputed) and r.epsilon_total_recomputed > policy.epsilon_cap:
                out.append(AuditIssue("policy", f"recomputed epsilon_total {r.epsilon_total_recomputed:.6g} exceeds "
                                      f"the cap {policy.epsilon_cap!r}", r.seq, dev))
    return out


def _nan_to_neg(x: float) -> float:
    return -math.inf if math.isnan(x) else x


def _hex_ok(s: Any) -> bool:
    try:
        bytes.fromhex(s)
        return len(s) == 64
    except (TypeError, ValueError):
        return False


# -- report --------------------------------------------------------------------------

@dataclass(frozen=True)
class ReportFiles:
    markdown: Path
    plot: Path


def _fmt(x: float) -> str:
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return str(x)
    return f"{x:.6g}"


def write_report(result: AuditResult, out_dir: str | os.PathLike[str]) -> ReportFiles:
    """Write ``audit.md`` (summary, issues, one table per device) and ``epsilon.png`` (the
    spread of cumulative ε over devices as the ledger grows, and a histogram of final ε)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md_path, png_path = out / "audit.md", out / "epsilon.png"
    _plot(result, png_path)

    lines = [
        "# Privacy ledger audit",
        "",
        f"- Ledger: `{result.path}`",
        f"- Result: **{'PASS' if result.ok else 'FAIL'}**",
        f"- Rows: {result.n_rows}; devices: {len(result.devices)}",
        f"- Ledger id: `{result.ledger_id}`",
        f"- Writer public key (Ed25519): `{result.public_key_hex}`",
        f"- Anchor (publish this; audit later with `--anchor {result.anchor_arg}`): `{result.anchor_arg}`",
        f"- Device evidence: {result.signed_rows} signed rows, {result.unsigned_rows} unsigned",
        f"- Policy: {'`' + result.policy.to_json() + '`' if result.policy is not None else 'none recorded'}",
        f"- Integrity (sequence, chain, hashes, signatures, head): {'ok' if result.integrity_ok else 'FAILED'}",
        f"- Recomputed epsilon: {'matches' if result.epsilon_ok else 'MISMATCH'}",
        f"- Budgets: {'respected' if result.budget_ok else 'EXCEEDED'}",
        "",
        f"![cumulative epsilon over devices]({png_path.name})",
        "",
        "## Issues",
        "",
    ]
    if result.issues:
        lines += ["| kind | row | device | finding |", "|---|---|---|---|"]
        for i in result.issues:
            msg = i.message.replace("|", "\\|")
            lines.append(f"| {i.kind} | {i.seq if i.seq is not None else '-'} | {i.device_id or '-'} | {msg} |")
    else:
        lines.append("None.")
    for dev, audit in sorted(result.devices.items()):
        lines += [
            "",
            f"## Device `{dev}`",
            "",
            f"Accountant {audit.accountant}, delta {_fmt(audit.delta)}, epsilon_max {_fmt(audit.epsilon_max)}; "
            f"cumulative epsilon recorded {_fmt(audit.epsilon_total_recorded)}, recomputed "
            f"{_fmt(audit.epsilon_total_recomputed)}{' — **over budget**' if audit.over_budget else ''}.",
            "",
            "| row | plan | version | cohort | sample rate | steps | noise | clip | eps round (rec / recomp) "
            "| eps total (rec / recomp) | status | libraries | timestamp |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in audit.rounds:
            status = "ok" if (r.integrity_ok and r.epsilon_ok) else (
                "TAMPERED" if not r.integrity_ok else "EPS MISMATCH")
            lines.append(
                f"| {r.seq} | {r.plan_id} | {r.version} | {r.cohort_id or '-'} | {_fmt(r.sample_rate)} | {r.steps} "
                f"| {_fmt(r.noise_multiplier)} | {_fmt(r.max_grad_norm)} "
                f"| {_fmt(r.epsilon_round_recorded)} / {_fmt(r.epsilon_round_recomputed)} "
                f"| {_fmt(r.epsilon_total_recorded)} / {_fmt(r.epsilon_total_recomputed)} | {status} "
                f"| {r.library_versions} | {r.timestamp} |"
            )
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return ReportFiles(markdown=md_path, plot=png_path)


def _epsilon_quantiles(result: AuditResult, max_points: int = 400) -> tuple[list[int], "Any"]:
    """Cumulative ε of every device as the ledger grows: for up to ``max_points`` ledger rows
    (evenly spaced, last included), the row's sequence number and the min, 10%, 50%, 90%
    quantiles and max over devices (a device counts 0 before its first row)."""
    import numpy as np

    devices = sorted(result.devices)
    index = {d: i for i, d in enumerate(devices)}
    rows = sorted((r.seq, index[d], r.epsilon_total_recorded)
                  for d, a in result.devices.items() for r in a.rounds)
    if not rows:
        return [], np.zeros((0, 5))
    keep = set(np.linspace(0, len(rows) - 1, min(max_points, len(rows))).round().astype(int).tolist())
    current = np.zeros(len(devices))
    seqs, stats = [], []
    for i, (seq, dev, eps) in enumerate(rows):
        if math.isfinite(eps):
            current[dev] = eps
        if i in keep:
            seqs.append(seq)
            stats.append(np.quantile(current, [0.0, 0.1, 0.5, 0.9, 1.0]))
    return seqs, np.array(stats)


def _plot(result: AuditResult, path: Path) -> None:
    _figure(result).savefig(path)


def _figure(result: AuditResult) -> "Any":
    """Two panels that stay readable for any number of devices: the spread of cumulative ε
    over devices as the ledger grows (median, 10-90% band, min-max band) and a histogram of
    every device's final ε; budgets dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax, hist = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    n = len(result.devices)
    budgets = sorted({a.epsilon_max for a in result.devices.values() if math.isfinite(a.epsilon_max)})
    seqs, q = _epsilon_quantiles(result)
    if seqs:
        ax.fill_between(seqs, q[:, 0], q[:, 4], step="post", color="C0", alpha=0.15, label="min-max")
        ax.fill_between(seqs, q[:, 1], q[:, 3], step="post", color="C0", alpha=0.35, label="10-90%")
        ax.plot(seqs, q[:, 2], drawstyle="steps-post", color="C0", linewidth=1.6, label="median")
    finals = [a.epsilon_total_recorded for a in result.devices.values() if math.isfinite(a.epsilon_total_recorded)]
    if finals:
        hist.hist(finals, bins=min(30, max(5, len(finals) // 3)), color="C0", alpha=0.8)
    for i, b in enumerate(budgets[:3]):
        label = "budget" if i == 0 else None
        ax.axhline(b, color="0.3", linestyle="--", linewidth=1.0, label=label)
        hist.axvline(b, color="0.3", linestyle="--", linewidth=1.0, label=label)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("ledger row (sequence number)")
    ax.set_ylabel("cumulative epsilon (recorded)")
    ax.set_title(f"Privacy spend over {n} device{'s' if n != 1 else ''}")
    ax.grid(True, alpha=0.3)
    if seqs or budgets:
        ax.legend(fontsize="small", loc="upper left")
    hist.yaxis.set_major_locator(MaxNLocator(integer=True))
    hist.set_xlabel("final cumulative epsilon")
    hist.set_ylabel("devices")
    hist.set_title("Final epsilon per device")
    hist.grid(True, alpha=0.3)
    if budgets:
        hist.legend(fontsize="small", loc="upper left")
    fig.tight_layout()
    return fig

"""The append-only, hash-chained, signed privacy ledger.

Why a ledger at all: a DP guarantee is only as good as the record of what was spent.
Each row says, for one device and one round, which mechanism ran (sample rate, steps,
noise multiplier, clipping norm), under which accountant and library versions, what it
cost and what the device had spent in total. An auditor who trusts nothing but the
writer's public key can then recompute every ε from those parameters (``audit.py``).

Why a hash chain *and* signatures: the chain (each row carries the SHA-256 of the
previous row's canonical encoding) makes editing, deleting or reordering a row visible;
the Ed25519 signature by the writer's key makes it impossible to repair the chain after
an edit without the key. Truncating the tail leaves a valid chain, so the ledger also
keeps a signed *head* (row count and last hash) that every append updates.

What this cannot detect on its own: a wholesale rollback to an older, complete copy of
the file (old rows, old signed head), a forger who swaps in their own public key and
re-signs everything, or the operator, who holds the key, rewriting rows and re-signing.
These need evidence outside the file: publish anchors (``SEQ:HASH`` of a row, printed by
``ftte audit``; ``--anchor`` re-hashes the chain up to it from the rows' contents), pin the
writer's key (``--expect-key``), and let devices sign their own spend claims
(``device_public_key``/``device_signature`` columns, :mod:`.spend`), which the key does not
help to forge. The policy the server enforced is stored in the metadata (``policy``).

Optional columns (``outcome``, ``device_public_key``, ``device_signature``) were added after
format 1 was in use; a None value is left out of the canonical encoding, so older rows keep
their hashes, and older files gain the columns when a writer opens them.

Transactions: :meth:`Ledger.append` runs in its own ``BEGIN IMMEDIATE`` transaction, or,
given ``conn=``, inside the caller's connection under a SAVEPOINT, so the server can
commit the new model version, the round's ledger rows and the cohort record atomically.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import uuid
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from functools import lru_cache
from importlib import metadata
from typing import TYPE_CHECKING, Any, Iterable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

if TYPE_CHECKING:
    from .policy import PrivacyPolicy

LEDGER_FORMAT = "ftte.privacy.ledger/1"
POLICY_META_KEY = "policy"
ROWS_TABLE = "privacy_ledger_rows"
META_TABLE = "privacy_ledger_meta"
_ROW_DOMAIN = b"ftte.privacy.ledger.row/1\x00"
_HEAD_DOMAIN = b"ftte.privacy.ledger.head/1\x00"
_GENESIS_DOMAIN = "ftte.privacy.ledger.genesis/1"
_ACCOUNTANTS = ("prv", "rdp", "none")


class LedgerError(RuntimeError):
    """The ledger cannot be opened or written as asked (not tampering: see audit)."""


@lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    """Installed versions of the libraries whose behaviour determines ε and the noise.

    Read from package metadata so that this module does not import torch.
    """
    out = {}
    for name in ("torch", "opacus", "ftte"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "unknown"
    return out


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class LedgerRow:
    """One device's privacy spend in one round, as written by the server.

    ``epsilon_round`` is the marginal cost (cumulative after minus cumulative before),
    ``epsilon_total`` the device's cumulative ε at ``delta`` after the round, both from
    the named ``accountant``. ``version`` is the global model version trained from.
    """

    device_id: str
    plan_id: str
    version: int
    sample_rate: float
    steps: int
    noise_multiplier: float
    max_grad_norm: float
    accountant: str
    rng_source: str
    epsilon_round: float
    epsilon_total: float
    delta: float
    epsilon_max: float
    cohort_id: str | None = None
    torch_version: str = field(default_factory=lambda: library_versions()["torch"])
    opacus_version: str = field(default_factory=lambda: library_versions()["opacus"])
    ftte_version: str = field(default_factory=lambda: library_versions()["ftte"])
    timestamp: str = field(default_factory=_utc_now)
    outcome: str | None = None
    device_public_key: str | None = None
    device_signature: str | None = None

    def __post_init__(self) -> None:
        # Normalise types so the canonical encoding does not depend on whether a caller
        # passed a numpy float, a tensor scalar or an int where a float belongs.
        def setf(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        for name in ("device_id", "plan_id", "accountant", "rng_source", "torch_version",
                     "opacus_version", "ftte_version", "timestamp"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TypeError(f"{name} must be a str, got {type(value).__name__}")
        if not self.device_id:
            raise ValueError("device_id must not be empty")
        if self.cohort_id is not None and not isinstance(self.cohort_id, str):
            raise TypeError(f"cohort_id must be a str or None, got {type(self.cohort_id).__name__}")
        for name in ("version", "steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value:
                raise TypeError(f"{name} must be an integer, got {value!r}")
            setf(name, int(value))
        for name in ("sample_rate", "noise_multiplier", "max_grad_norm", "epsilon_round", "epsilon_total",
                     "delta", "epsilon_max"):
            value = float(getattr(self, name))
            if math.isnan(value):
                raise ValueError(f"{name} must not be NaN")
            setf(name, value)
        if self.accountant not in _ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {_ACCOUNTANTS}, got {self.accountant!r}")
        if self.outcome is not None:
            from .spend import RoundOutcome  # spend.py builds rows, so it imports this module

            setf("outcome", RoundOutcome(self.outcome).value)
        for name in ("device_public_key", "device_signature"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a hex str or None, got {type(value).__name__}")
        if (self.device_public_key is None) != (self.device_signature is None):
            raise ValueError("device_public_key and device_signature go together")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ROW_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(LedgerRow))
OPTIONAL_FIELDS: tuple[str, ...] = ("outcome", "device_public_key", "device_signature")
"""Columns added after format 1 was in use: omitted from the canonical encoding when None,
so rows written before they existed keep their hashes."""


@dataclass(frozen=True)
class LedgerEntry:
    """A stored row with its chain position, hashes and signature (hex)."""

    seq: int
    row: LedgerRow
    prev_hash: str
    row_hash: str
    signature: str


@dataclass(frozen=True)
class LedgerHead:
    """The signed summary of the whole ledger: how many rows, and the last row's hash."""

    count: int
    head_hash: str
    signature: str


# -- canonical encoding, hashing, signing ---------------------------------------------

def canonical_row_bytes(seq: int, prev_hash: str, row: LedgerRow | dict[str, Any]) -> bytes:
    """The exact bytes that are hashed: sorted-key compact JSON of the row's fields plus
    its sequence number, previous hash and the format tag.

    JSON floats are written with Python's shortest round-trip ``repr``, so a value read
    back from SQLite (an IEEE double) re-encodes to the same bytes.
    """
    data = row.to_dict() if isinstance(row, LedgerRow) else {k: row.get(k) for k in ROW_FIELDS}
    for name in OPTIONAL_FIELDS:
        if data.get(name) is None:
            data.pop(name, None)
    doc = {"format": LEDGER_FORMAT, "seq": int(seq), "prev_hash": prev_hash, "row": data}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True).encode("ascii")


def compute_row_hash(seq: int, prev_hash: str, row: LedgerRow | dict[str, Any]) -> str:
    return hashlib.sha256(canonical_row_bytes(seq, prev_hash, row)).hexdigest()


def genesis_hash(ledger_id: str, public_key_hex: str) -> str:
    """The ``prev_hash`` of row 1. Binding it to the ledger id and writer key means a
    row cannot be spliced in from another ledger, and a replaced key breaks row 1."""
    return hashlib.sha256(f"{_GENESIS_DOMAIN}|{ledger_id}|{public_key_hex}".encode("ascii")).hexdigest()


def row_signing_message(row_hash: str) -> bytes:
    return _ROW_DOMAIN + bytes.fromhex(row_hash)


def head_signing_message(ledger_id: str, count: int, head_hash: str) -> bytes:
    return _HEAD_DOMAIN + f"{ledger_id}|{int(count)}|{head_hash}".encode("ascii")


def public_key_hex(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def verify_signature(public_key_hex_: str, message: bytes, signature_hex: str) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key_hex_)).verify(bytes.fromhex(signature_hex), message)
        return True
    except (InvalidSignature, ValueError):
        return False


def load_signing_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """The writer's key from a configured path; never creates one.

    A configured key path that does not exist is an operator error (a missing mount, a
    typo): silently creating a new key there would start a ledger nobody can tie to the
    published key, so we refuse with the path in the message.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise LedgerError(
            f"ledger signing key {path} does not exist; create it once (e.g. with "
            f"ftte.privacy.ledger.load_or_create_signing_key) or fix the configured path"
        ) from None
    if len(raw) != 32:
        raise LedgerError(f"ledger signing key {path} is not 32 raw Ed25519 bytes")
    return Ed25519PrivateKey.from_private_bytes(raw)


def load_or_create_signing_key(path: str | os.PathLike[str], *, create: bool = True) -> Ed25519PrivateKey:
    """The writer's long-term Ed25519 key, kept as 32 raw bytes in a 0600 file at any path.

    Created with ``O_EXCL`` so two processes racing to create it cannot end up with
    different keys. ``create=False`` (a configured path) behaves as :func:`load_signing_key`.
    The key should not live beside the ledger: whoever holds both can re-sign a rewritten
    ledger (only anchors published elsewhere catch that, see ``audit``).
    """
    path = os.fspath(path)
    if not create or os.path.exists(path):
        return load_signing_key(path)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise LedgerError(f"cannot create ledger signing key {path}: directory {parent} does not exist")
    key = Ed25519PrivateKey.generate()
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                            serialization.NoEncryption())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return load_signing_key(path)
    with os.fdopen(fd, "wb") as fh:
        fh.write(raw)
    return key


# -- schema -----------------------------------------------------------------------------

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {META_TABLE} (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS {ROWS_TABLE} (
    seq              INTEGER PRIMARY KEY,
    device_id        TEXT NOT NULL,
    plan_id          TEXT NOT NULL,
    version          INTEGER NOT NULL,
    sample_rate      REAL NOT NULL,
    steps            INTEGER NOT NULL,
    noise_multiplier REAL NOT NULL,
    max_grad_norm    REAL NOT NULL,
    accountant       TEXT NOT NULL,
    rng_source       TEXT NOT NULL,
    epsilon_round    REAL NOT NULL,
    epsilon_total    REAL NOT NULL,
    delta            REAL NOT NULL,
    epsilon_max      REAL NOT NULL,
    cohort_id        TEXT,
    torch_version    TEXT NOT NULL,
    opacus_version   TEXT NOT NULL,
    ftte_version     TEXT NOT NULL,
    timestamp        TEXT NOT NULL,
    prev_hash        TEXT NOT NULL UNIQUE,
    row_hash         TEXT NOT NULL UNIQUE,
    signature        TEXT NOT NULL,
    outcome          TEXT,
    device_public_key TEXT,
    device_signature TEXT
);
CREATE INDEX IF NOT EXISTS {ROWS_TABLE}_device ON {ROWS_TABLE} (device_id, seq);
CREATE TRIGGER IF NOT EXISTS {ROWS_TABLE}_no_update BEFORE UPDATE ON {ROWS_TABLE}
BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS {ROWS_TABLE}_no_delete BEFORE DELETE ON {ROWS_TABLE}
BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS {META_TABLE}_no_update BEFORE UPDATE ON {META_TABLE} WHEN OLD.key <> 'head'
BEGIN SELECT RAISE(ABORT, 'privacy ledger metadata is immutable'); END;
CREATE TRIGGER IF NOT EXISTS {META_TABLE}_no_delete BEFORE DELETE ON {META_TABLE}
BEGIN SELECT RAISE(ABORT, 'privacy ledger metadata is immutable'); END;
"""

_COLUMNS = ("seq",) + ROW_FIELDS + ("prev_hash", "row_hash", "signature")


def ensure_schema(conn: sqlite3.Connection) -> None:
    """Create the ledger's tables and append-only triggers in ``conn``'s database.

    The triggers stop accidental edits through SQL; they are not a security boundary
    (anyone with the file can drop them) — the chain and signatures are.
    """
    for stmt in _split_sql(_SCHEMA):
        conn.execute(stmt)
    present = _row_columns(conn)
    for name in OPTIONAL_FIELDS:  # a ledger created before these columns existed
        if name not in present:
            conn.execute(f"ALTER TABLE {ROWS_TABLE} ADD COLUMN {name} TEXT")


def _row_columns(conn: sqlite3.Connection) -> set[str]:
    return {r[1] for r in conn.execute(f"PRAGMA table_info({ROWS_TABLE})")}


def _split_sql(script: str) -> list[str]:
    # executescript() would COMMIT an open transaction first; splitting keeps DDL inside
    # whatever transaction the caller holds. sqlite3.complete_statement knows that the
    # ';' inside a trigger body does not end the statement.
    parts: list[str] = []
    buf = ""
    for line in script.strip().splitlines():
        buf += line + "\n"
        if sqlite3.complete_statement(buf):
            parts.append(buf.strip())
            buf = ""
    if buf.strip():
        raise ValueError(f"incomplete SQL statement: {buf!r}")
    return parts


def entry_from_record(record: sqlite3.Row | dict[str, Any]) -> LedgerEntry:
    """Decode one stored row. Raises (TypeError/ValueError) if its columns are malformed."""
    data = {k: record[k] for k in ROW_FIELDS if k not in OPTIONAL_FIELDS}
    data.update({k: record.get(k) if isinstance(record, dict) else record[k] for k in OPTIONAL_FIELDS})
    return LedgerEntry(
        seq=int(record["seq"]),
        row=LedgerRow(**data),
        prev_hash=str(record["prev_hash"]),
        row_hash=str(record["row_hash"]),
        signature=str(record["signature"]),
    )


def read_meta(conn: sqlite3.Connection) -> dict[str, str]:
    return {k: v for k, v in conn.execute(f"SELECT key, value FROM {META_TABLE}")}


def read_records(conn: sqlite3.Connection, device_id: str | None = None) -> list[dict[str, Any]]:
    """Stored rows (all, or one device's) as plain dicts, in ``seq`` order, without any
    validation. Optional columns a ledger predates read as None."""
    present = _row_columns(conn)
    cols = [c for c in _COLUMNS if c in present or c not in OPTIONAL_FIELDS]
    where, args = ("WHERE device_id = ? ", (device_id,)) if device_id is not None else ("", ())
    cur = conn.execute(f"SELECT {', '.join(cols)} FROM {ROWS_TABLE} {where}ORDER BY seq", args)
    out = []
    for r in cur.fetchall():
        rec = dict(zip(cols, r))
        for name in OPTIONAL_FIELDS:
            rec.setdefault(name, None)
        out.append(rec)
    return out


def parse_head(value: str | None) -> LedgerHead | None:
    if value is None:
        return None
    doc = json.loads(value)
    return LedgerHead(count=int(doc["count"]), head_hash=str(doc["head_hash"]), signature=str(doc["signature"]))


class Ledger:
    """A privacy ledger in one SQLite database (its own file or the server's database).

    Open with the writer's ``signing_key`` to append; open without it to read. The first
    writer fixes the ledger id and public key in the metadata table; opening an existing
    ledger with a different key is refused, since its rows could never verify.
    """

    def __init__(self, path: str | os.PathLike[str], signing_key: Ed25519PrivateKey | None = None) -> None:
        self.path = os.fspath(path)
        self._key = signing_key
        if signing_key is None and not os.path.isfile(self.path):
            raise LedgerError(f"no ledger at {self.path} (open it with the writer's key to create one)")
        self._conn = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
        if signing_key is not None:
            self._initialise(public_key_hex(signing_key))
        meta = self._read_meta_or_fail()
        self.ledger_id: str = meta["ledger_id"]
        self.public_key_hex: str = meta["public_key"]
        self.genesis_hash: str = genesis_hash(self.ledger_id, self.public_key_hex)

    # -- lifecycle -------------------------------------------------------------------
    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _initialise(self, pub_hex: str) -> None:
        c = self._conn
        c.execute("BEGIN IMMEDIATE")
        try:
            ensure_schema(c)
            meta = read_meta(c)
            if "public_key" not in meta:
                for key, value in (("format", LEDGER_FORMAT), ("ledger_id", uuid.uuid4().hex),
                                   ("public_key", pub_hex), ("created_at", _utc_now())):
                    c.execute(f"INSERT INTO {META_TABLE} (key, value) VALUES (?, ?)", (key, value))
            elif meta["public_key"] != pub_hex:
                raise LedgerError(
                    f"ledger {self.path} was written with public key {meta['public_key'][:16]}…; "
                    f"the supplied signing key ({pub_hex[:16]}…) cannot extend it"
                )
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:  # an interrupt can land after COMMIT
                c.execute("ROLLBACK")
            raise

    def _read_meta_or_fail(self) -> dict[str, str]:
        try:
            meta = read_meta(self._conn)
        except sqlite3.OperationalError as exc:
            raise LedgerError(f"{self.path} is not a privacy ledger ({exc})") from exc
        for key in ("ledger_id", "public_key"):
            if key not in meta:
                raise LedgerError(f"{self.path}: ledger metadata lacks {key!r}")
        return meta

    # -- writes ----------------------------------------------------------------------
    def append(self, row: LedgerRow, conn: sqlite3.Connection | None = None) -> LedgerEntry:
        """Append one row; see :meth:`append_many`."""
        return self.append_many([row], conn=conn)[0]

    def append_many(self, rows: Iterable[LedgerRow], conn: sqlite3.Connection | None = None) -> list[LedgerEntry]:
        """Append rows atomically (all or none) and update the signed head.

        Without ``conn`` this opens and commits its own ``BEGIN IMMEDIATE``
        transaction. With ``conn`` (a connection to the same database file) the rows
        join the caller's transaction under a SAVEPOINT and are committed or rolled back
        with it; we never commit or roll back the caller's transaction. If ``conn`` has
        no open transaction, the SAVEPOINT itself makes the append atomic and durable.
        """
        if self._key is None:
            raise LedgerError("ledger opened without a signing key is read-only")
        rows = list(rows)
        if conn is None:
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            try:
                out = [self._append_in(c, r) for r in rows]
                c.execute("COMMIT")
            except BaseException:
                if c.in_transaction:  # an interrupt can land after COMMIT
                    c.execute("ROLLBACK")
                raise
            return out
        self._check_same_database(conn)
        conn.execute("SAVEPOINT ftte_privacy_ledger")
        try:
            out = [self._append_in(conn, r) for r in rows]
        except BaseException:
            conn.execute("ROLLBACK TO SAVEPOINT ftte_privacy_ledger")
            conn.execute("RELEASE SAVEPOINT ftte_privacy_ledger")
            raise
        conn.execute("RELEASE SAVEPOINT ftte_privacy_ledger")
        return out

    def _append_in(self, c: sqlite3.Connection, row: LedgerRow) -> LedgerEntry:
        if not isinstance(row, LedgerRow):
            raise TypeError(f"expected LedgerRow, got {type(row).__name__}")
        assert self._key is not None
        last = c.execute(f"SELECT seq, row_hash FROM {ROWS_TABLE} ORDER BY seq DESC LIMIT 1").fetchone()
        seq, prev = (last[0] + 1, last[1]) if last else (1, self.genesis_hash)
        h = compute_row_hash(seq, prev, row)
        sig = self._key.sign(row_signing_message(h)).hex()
        values = (seq,) + tuple(getattr(row, f) for f in ROW_FIELDS) + (prev, h, sig)
        c.execute(
            f"INSERT INTO {ROWS_TABLE} ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
            values,
        )
        head_sig = self._key.sign(head_signing_message(self.ledger_id, seq, h)).hex()
        head = json.dumps({"count": seq, "head_hash": h, "signature": head_sig}, sort_keys=True)
        c.execute(
            f"INSERT INTO {META_TABLE} (key, value) VALUES ('head', ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (head,),
        )
        return LedgerEntry(seq=seq, row=row, prev_hash=prev, row_hash=h, signature=sig)

    def _check_same_database(self, conn: sqlite3.Connection) -> None:
        files = [r[2] for r in conn.execute("PRAGMA database_list") if r[1] == "main"]
        mine, theirs = os.path.realpath(self.path), os.path.realpath(files[0]) if files and files[0] else None
        if theirs is None or mine != theirs:
            raise LedgerError(
                f"conn is attached to {files[0] if files else '?'!r}, not to this ledger's database {self.path!r}"
            )

    # -- reads -----------------------------------------------------------------------
    def entries(self, conn: sqlite3.Connection | None = None) -> list[LedgerEntry]:
        """All rows in order, decoded but *not verified* (use ``audit.verify_ledger``)."""
        return [entry_from_record(r) for r in read_records(conn or self._conn)]

    def rows_for(self, device_id: str, conn: sqlite3.Connection | None = None) -> list[LedgerEntry]:
        """One device's rows in ledger order (``conn``: read inside the caller's transaction)."""
        return [entry_from_record(r) for r in read_records(conn or self._conn, device_id)]

    def anchor(self) -> tuple[int, str] | None:
        """(seq, hash) of the last row: publish it, then audit later with ``--anchor SEQ:HASH``."""
        last = self._conn.execute(f"SELECT seq, row_hash FROM {ROWS_TABLE} ORDER BY seq DESC LIMIT 1").fetchone()
        return (int(last[0]), str(last[1])) if last else None

    # -- policy ------------------------------------------------------------------------
    def set_policy(self, policy: "PrivacyPolicy") -> None:
        """Write the task's privacy policy into the metadata, once; the same policy again is a
        no-op, a different one is refused (the audit checks every row against it)."""
        if self._key is None:
            raise LedgerError("ledger opened without a signing key is read-only")
        c = self._conn
        c.execute("BEGIN IMMEDIATE")
        try:
            current = read_meta(c).get(POLICY_META_KEY)
            if current is None:
                c.execute(f"INSERT INTO {META_TABLE} (key, value) VALUES (?, ?)", (POLICY_META_KEY, policy.to_json()))
            elif current != policy.to_json():
                raise LedgerError(f"ledger {self.path} already records policy {current}; refusing {policy.to_json()}")
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:  # an interrupt can land after COMMIT
                c.execute("ROLLBACK")
            raise

    def policy(self) -> "PrivacyPolicy | None":
        from .policy import PrivacyPolicy

        text = read_meta(self._conn).get(POLICY_META_KEY)
        return None if text is None else PrivacyPolicy.from_json(text)

    def head(self) -> LedgerHead | None:
        return parse_head(read_meta(self._conn).get("head"))

    def __len__(self) -> int:
        return int(self._conn.execute(f"SELECT COUNT(*) FROM {ROWS_TABLE}").fetchone()[0])

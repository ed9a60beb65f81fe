"""Durable server state: one SQLite file that also holds the privacy ledger.

The ledger's ``append_many(rows, conn=...)`` writes inside a caller's transaction on
the same database file, so keeping the server's tables beside it lets each applied
buffer commit the new model version, the cohort record, the history row and the
ledger rows in ONE transaction: after a crash either all of a buffer is there or none.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

SCHEMA = """
CREATE TABLE IF NOT EXISTS server_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS server_versions (
    version INTEGER PRIMARY KEY,
    virtual_time_s REAL NOT NULL,
    weights BLOB NOT NULL,
    velocity BLOB,
    reference_variance REAL
);
CREATE TABLE IF NOT EXISTS server_cohorts (
    cohort_id TEXT PRIMARY KEY,
    close_version INTEGER NOT NULL,
    applied_version INTEGER,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS server_history (version INTEGER PRIMARY KEY, row TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS server_device_rounds (
    device TEXT NOT NULL,
    round TEXT NOT NULL,
    PRIMARY KEY (device, round)
);
"""


def _blob(vec: np.ndarray | None) -> bytes | None:
    return None if vec is None else np.ascontiguousarray(vec, dtype="<f8").tobytes()


def _vec(blob: bytes | None) -> np.ndarray | None:
    return None if blob is None else np.frombuffer(blob, dtype="<f8").copy()


@dataclass(frozen=True)
class Checkpoint:
    version: int
    virtual_time_s: float
    weights: np.ndarray
    velocity: np.ndarray | None
    reference_variance: float | None
    history: list[dict[str, Any]]
    cohorts: int  # highest cohort number recorded; new cohorts continue after it


class ServerState:
    def __init__(self, path: str | Path, keep_versions: int = 0) -> None:
        if keep_versions < 0:
            raise ValueError("keep_versions must be >= 0 (0 keeps every version)")
        self.path = Path(path)
        # Model versions kept (0: all). Each commit of a new version deletes, in the same
        # transaction, the weights of versions ``keep_versions`` or more behind it; the caller
        # makes it cover every version a device may still cite. History rows, cohort records
        # and the ledger are never pruned.
        self.keep_versions = keep_versions
        self.conn = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        for stmt in SCHEMA.strip().split(";"):
            if stmt.strip():
                self.conn.execute(stmt)

    def close(self) -> None:
        self.conn.close()

    # -- metadata ---------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM server_meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: str) -> None:
        self.conn.execute("INSERT OR REPLACE INTO server_meta (key, value) VALUES (?, ?)", (key, value))

    # -- commits ----------------------------------------------------------------------
    def commit_version(self, *, version: int, virtual_time_s: float, weights: np.ndarray,
                       velocity: np.ndarray | None, reference_variance: float | None,
                       cohort: dict[str, Any] | None, history_row: dict[str, Any] | None,
                       ledger: Any = None, ledger_rows: Iterable[Any] = (),
                       device_rounds: Iterable[tuple[str, str]] = ()) -> None:
        """Everything one applied (or aborted) buffer changes, atomically."""
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            if history_row is not None:
                c.execute(
                    "INSERT INTO server_versions (version, virtual_time_s, weights, velocity, reference_variance) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (version, virtual_time_s, _blob(weights), _blob(velocity), reference_variance),
                )
                c.execute("INSERT INTO server_history (version, row) VALUES (?, ?)", (version, json.dumps(history_row)))
            if cohort is not None:
                c.execute(
                    "INSERT INTO server_cohorts (cohort_id, close_version, applied_version, record) VALUES (?, ?, ?, ?)",
                    (cohort["cohort_id"], cohort["close_version"], cohort.get("applied_version"), json.dumps(cohort)),
                )
            if self.keep_versions > 0 and history_row is not None:
                c.execute("DELETE FROM server_versions WHERE version <= ?", (version - self.keep_versions,))
            rows = list(ledger_rows)
            if ledger is not None and rows:
                ledger.append_many(rows, conn=c)
            c.executemany("INSERT INTO server_device_rounds (device, round) VALUES (?, ?)", list(device_rounds))
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:  # an interrupt can land after COMMIT
                c.execute("ROLLBACK")
            raise

    # -- reading back -----------------------------------------------------------------
    def latest(self) -> Checkpoint | None:
        row = self.conn.execute(
            "SELECT version, virtual_time_s, weights, velocity, reference_variance FROM server_versions "
            "ORDER BY version DESC LIMIT 1"
        ).fetchone()
        if row is None:
            return None
        history = [json.loads(r[0]) for r in self.conn.execute("SELECT row FROM server_history ORDER BY version")]
        # cohorts merge out of order, so resume numbering after the highest id ever recorded
        numbers = [int(cid.rsplit("-", 1)[1]) for (cid,) in self.conn.execute("SELECT cohort_id FROM server_cohorts")
                   if cid.rsplit("-", 1)[-1].isdigit()]
        return Checkpoint(row[0], row[1], _vec(row[2]), _vec(row[3]), row[4], history, max(numbers, default=0))

    def recorded_rounds(self, device: str) -> set[str]:
        """Ids (accountant instance and place in it) of this device's rounds already in the ledger."""
        return {r[0] for r in self.conn.execute("SELECT round FROM server_device_rounds WHERE device = ?", (device,))}

    def versions(self) -> list[int]:
        return [r[0] for r in self.conn.execute("SELECT version FROM server_versions ORDER BY version")]

    def cohort_records(self) -> list[dict[str, Any]]:
        return [json.loads(r[0]) for r in self.conn.execute("SELECT record FROM server_cohorts ORDER BY rowid")]

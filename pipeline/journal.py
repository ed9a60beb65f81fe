"""The deployment's durable storage: one SQLite file, one thread, a write-ahead protocol journal.

Why a journal: the secure-aggregation server state machine (:class:`SecAggServer`) is
deterministic in the messages it accepted and the moments its stages were closed. So
instead of serialising its internals, the server appends every accepted member message
and every stage decision to ``deploy_journal`` *before* acknowledging it; after a crash
(``SIGKILL`` included) replaying a cohort's entries in order rebuilds the exact state
machine, and the devices, which retry, carry on where they were.

Why one thread: sqlite3 connections belong to the thread that made them, and the
coordinator runs on an asyncio loop that must never block on ``fsync``. Every database
call therefore goes through :meth:`Database.call`, which runs it on a single dedicated
thread owning the only connections (``ServerState`` and the privacy ``Ledger``, both on
the same file, WAL, ``synchronous=FULL``).

Why group commit: under load many devices upload at once. :class:`JournalWriter` queues
entries and writes every queued entry in one transaction (one ``fsync``), resolving each
entry's future only once it is durable; order is preserved, so a stage-close entry is
never durable before the messages that led to it.

An applied (or aborted) cohort is committed by :meth:`Database.commit_cohort`: model
version, cohort record, history row and the ledger rows of its members in ONE
transaction (:meth:`ServerState.commit_version`); its journal entries are deleted by the
next journal transaction. A cohort id present in ``server_cohorts`` is finished, whatever the
journal still says, so a crash between the two steps cannot apply a buffer twice.
"""

from __future__ import annotations

import asyncio
import dataclasses
import concurrent.futures
import json
import os
import sqlite3
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from ftte.pipeline.state import Checkpoint, ServerState
from ftte.privacy.policy import PrivacyPolicy
from ftte.privacy.accountant import PrivacyStep, compute_epsilon
from ftte.privacy.ledger import (
    Ledger,
    LedgerRow,
    load_or_create_signing_key,
)
from ftte.privacy.spend import RoundOutcome, SpendRecord, ledger_rows

T = TypeVar("T")

JOURNAL_SCHEMA = """
CREATE TABLE IF NOT EXISTS deploy_journal (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    cohort_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    member INTEGER,
    stage TEXT,
    data BLOB,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS deploy_journal_cohort ON deploy_journal (cohort_id, seq);
"""

# Journal entry kinds, in the order a cohort produces them.
OPEN, JOIN, LEAVE, START, MESSAGE, CLOSE = "open", "join", "leave", "start", "msg", "close"
KINDS = (OPEN, JOIN, LEAVE, START, MESSAGE, CLOSE)


@dataclass(frozen=True)
class JournalEntry:
    cohort_id: str
    kind: str
    at: float
    member: int | None = None
    stage: str | None = None
    data: bytes | None = None


@dataclass(frozen=True)
class MemberRound:
    """What the ledger needs about one member's round (from its JoinRequest)."""

    device_id: str
    plan_id: str
    version: int
    step: PrivacyStep
    max_grad_norm: float
    accountant: str
    delta: float
    epsilon_max: float
    rng_source: str
    torch_version: str
    opacus_version: str
    ftte_version: str
    cohort_id: str | None = None  # None: the committed cohort; "unmerged" for a round reported late
    device_public_key: str | None = None  # hex; with the signature, the device's evidence for this row
    device_signature: str | None = None
    merged: bool = False  # its update is in the applied sum
    seq: int = 0  # the round's place in the device's accountant history (0: unknown, never deduplicated)
    accountant_id: str = ""  # the device's accountant instance (a fresh state starts counting again)


@dataclass(frozen=True)
class CohortCommit:
    """One finished cohort, applied (``history_row`` set, version bumped) or aborted."""

    version: int
    elapsed_s: float
    weights: np.ndarray
    velocity: np.ndarray | None
    reference_variance: float | None
    record: dict[str, Any]
    history_row: dict[str, Any] | None
    rounds: tuple[MemberRound, ...]


@dataclass
class Recovered:
    """What a (re)starting server reads back."""

    checkpoint: Checkpoint | None
    recent_weights: dict[int, np.ndarray]
    finished: dict[str, dict[str, Any]]
    journal: list[JournalEntry] = field(default_factory=list)
    ledger_public_key: str = ""


class Database:
    """All SQLite access of one server, on one thread."""

    def __init__(self, path: Path, ledger_key_path: Path, synchronous: str = "full", keep_versions: int = 0) -> None:
        if synchronous not in ("full", "normal"):
            raise ValueError("synchronous must be 'full' or 'normal'")
        if keep_versions < 0:
            raise ValueError("keep_versions must be >= 0 (0 keeps every version)")
        self.synchronous = synchronous
        self.keep_versions = keep_versions  # model versions kept in the state file (0: all); see ServerState
        self.path = Path(path)
        self._key_path = Path(ledger_key_path)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ftte-db")
        self.state: ServerState | None = None
        self.ledger: Ledger | None = None
        self._finished: list[str] = []  # committed cohorts whose journal entries are still to delete

    # -- thread plumbing -----------------------------------------------------------------
    def call_sync(self, fn: Callable[..., T], *args: Any) -> T:
        return self._pool.submit(fn, *args).result()

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.wrap_future(self._pool.submit(fn, *args))

    def open(self) -> None:
        self.call_sync(self._open)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.state = ServerState(self.path, self.keep_versions)
        self.state.conn.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
        for stmt in JOURNAL_SCHEMA.strip().split(";"):
            if stmt.strip():
                self.state.conn.execute(stmt)
        self.ledger = Ledger(self.path, load_or_create_signing_key(self._key_path))
        # The accountants import Opacus lazily (seconds): pay that now, not in the first commit,
        # which would hold up every journal write queued behind it.
        compute_epsilon([PrivacyStep(1.0, 0.01, 1)], 1e-5, "rdp")

    def close(self) -> None:
        def _close() -> None:
            if self.ledger is not None:
                self.ledger.close()
            if self.state is not None:
                self.state.close()
        try:
            self.call_sync(_close)
        finally:
            self._pool.shutdown(wait=True)

    @property
    def conn(self) -> sqlite3.Connection:
        assert self.state is not None, "database not open"
        return self.state.conn

    # -- journal -------------------------------------------------------------------------
    def write_entries(self, entries: list[JournalEntry]) -> None:
        """Append entries in one transaction (runs on the database thread)."""
        c = self.conn
        finished, self._finished = self._finished, []
        c.execute("BEGIN IMMEDIATE")
        try:
            c.executemany(
                "INSERT INTO deploy_journal (cohort_id, kind, member, stage, data, at) VALUES (?, ?, ?, ?, ?, ?)",
                [(e.cohort_id, e.kind, e.member, e.stage, e.data, e.at) for e in entries],
            )
            c.executemany("DELETE FROM deploy_journal WHERE cohort_id = ?", [(cid,) for cid in finished])
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:  # an interrupt can land after COMMIT
                c.execute("ROLLBACK")
            self._finished = finished + self._finished
            raise

    def forget_cohort(self, cohort_id: str) -> None:
        """Drop the journal of a cohort that never started and has no member left."""
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            c.execute("DELETE FROM deploy_journal WHERE cohort_id = ?", (cohort_id,))
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:  # an interrupt can land after COMMIT
                c.execute("ROLLBACK")
            raise

    def journal_bytes(self) -> int:
        row = self.conn.execute("SELECT COALESCE(SUM(LENGTH(data)), 0), COUNT(*) FROM deploy_journal").fetchone()
        return int(row[0])

    # -- startup ---------------------------------------------------------------------------
    def recover(self, keep_versions: int) -> Recovered:
        """Checkpoint, recent model versions, finished cohorts, and the journal of unfinished ones."""
        assert self.state is not None and self.ledger is not None
        c = self.conn
        ckpt = self.state.latest()
        recent: dict[int, np.ndarray] = {}
        if ckpt is not None:
            for version, blob in c.execute(
                    "SELECT version, weights FROM server_versions WHERE version >= ? ORDER BY version",
                    (ckpt.version - keep_versions,)):
                recent[int(version)] = np.frombuffer(blob, dtype="<f8").copy()
        finished = {rec["cohort_id"]: rec for rec in self.state.cohort_records()}
        # Cohorts committed just before a crash may still have journal entries: drop them now.
        c.execute("BEGIN IMMEDIATE")
        try:
            c.execute("DELETE FROM deploy_journal WHERE cohort_id IN (SELECT cohort_id FROM server_cohorts)")
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:  # an interrupt can land after COMMIT
                c.execute("ROLLBACK")
            raise
        journal = [
            JournalEntry(cid, kind, at, member, stage, bytes(data) if data is not None else None)
            for cid, kind, member, stage, data, at in c.execute(
                "SELECT cohort_id, kind, member, stage, data, at FROM deploy_journal ORDER BY seq")
        ]
        return Recovered(ckpt, recent, finished, journal, self.ledger.public_key_hex)

    def commit_initial(self, weights: np.ndarray, plan_id: str, config_json: str) -> None:
        """Version 0 (the initial model) and the deployment's identity, once."""
        assert self.state is not None
        saved = self.state.get_meta("deploy_plan_id")
        if saved is not None and saved != plan_id:
            raise RuntimeError(f"{self.path} belongs to a deployment of plan {saved}, this config makes {plan_id}")
        if saved is None:
            self.state.set_meta("deploy_plan_id", plan_id)
            self.state.set_meta("deploy_started_at", repr(time.time()))
        self.state.set_meta("deploy_config", config_json)
        if self.state.latest() is None:
            self.state.commit_version(version=0, virtual_time_s=0.0, weights=weights, velocity=None,
                                      reference_variance=None, cohort=None,
                                      history_row={"version": 0, "elapsed_s": 0.0, "initial": True})

    def started_at(self) -> float:
        assert self.state is not None
        value = self.state.get_meta("deploy_started_at")
        return float(value) if value else time.time()

    def set_policy(self, policy: PrivacyPolicy) -> None:
        assert self.ledger is not None
        self.ledger.set_policy(policy)

    def epsilon_after(self, rounds: list[MemberRound]) -> float:
        """One device's ledger ε once ``rounds`` (its rounds not yet in the ledger, oldest first) are added."""
        assert self.ledger is not None
        rows = ledger_rows(self.ledger, [(_spend(r), RoundOutcome.UNMERGED, None) for r in rounds])
        return rows[-1].epsilon_total if rows else 0.0

    # -- finishing a cohort --------------------------------------------------------------
    def commit_cohort(self, commit: CohortCommit) -> int:
        """Ledger rows with ε recomputed from the ledger itself, then the one-transaction commit.

        The ε written for a device is what its rounds *in this ledger* compose to (the
        audit recomputes exactly that). A device's own accountant may count more: rounds
        it trained but whose join never reached this server released nothing to it.
        Returns the number of ledger rows written.
        """
        assert self.state is not None and self.ledger is not None
        fresh, seqs = self._first_reports(commit.rounds)
        rows = self._ledger_rows(dataclasses.replace(commit, rounds=fresh))
        self.state.commit_version(
            version=commit.version, virtual_time_s=commit.elapsed_s, weights=commit.weights,
            velocity=commit.velocity, reference_variance=commit.reference_variance, cohort=commit.record,
            history_row=commit.history_row, ledger=self.ledger, ledger_rows=rows, device_rounds=seqs,
        )
        # Its journal entries are dead now; the next journal transaction deletes them (one fsync
        # fewer per cohort). If the server dies first, recover() deletes them: the cohort is in
        # server_cohorts, which is what marks it finished.
        self._finished.append(commit.record["cohort_id"])
        return len(rows)

    def _first_reports(self, rounds: tuple[MemberRound, ...]) -> tuple[tuple[MemberRound, ...], list[tuple[str, str]]]:
        """Drop rounds the ledger already holds (same device, same accountant instance, same place in
        it): a device that died after its join was stored but before it noted so reports the round
        again with its next join. Every round thus reaches the ledger exactly once. The accountant
        instance (a random id the device keeps with its state) matters: a device that lost its state
        counts from 1 again, and those are new rounds."""
        assert self.state is not None
        known: dict[str, set[str]] = {}
        fresh, ids = [], []
        for r in rounds:
            if r.seq > 0 and r.accountant_id:
                rid = f"{r.accountant_id}:{r.seq}"
                seen = known.setdefault(r.device_id, self.state.recorded_rounds(r.device_id))
                if rid in seen:
                    continue
                seen.add(rid)
                ids.append((r.device_id, rid))
            fresh.append(r)
        return tuple(fresh), ids

    def _ledger_rows(self, commit: CohortCommit) -> list[LedgerRow]:
        """The cohort's rows through the one row builder (``ftte.privacy.spend.ledger_rows``):
        ε recomputed from each device's history in this ledger, read through the Ledger API
        inside this connection. A member's late-reported round (``cohort_id == "unmerged"``)
        is UNMERGED; the others are MERGED when their update is in the applied sum, else
        ABORTED (the cohort aborted, or the member dropped out of it)."""
        assert self.ledger is not None
        cohort_id = commit.record["cohort_id"]
        items: list[tuple[SpendRecord, RoundOutcome, str | None]] = []
        for r in commit.rounds:
            if r.cohort_id == RoundOutcome.UNMERGED.value:
                items.append((_spend(r), RoundOutcome.UNMERGED, None))
            else:
                outcome = RoundOutcome.MERGED if r.merged and commit.history_row is not None else RoundOutcome.ABORTED
                items.append((_spend(r), outcome, r.cohort_id or cohort_id))
        return ledger_rows(self.ledger, items, conn=self.conn)


def _spend(r: MemberRound) -> SpendRecord:
    return SpendRecord(
        device_id=r.device_id, plan_id=r.plan_id, version=r.version, step=r.step, max_grad_norm=r.max_grad_norm,
        delta=r.delta, accountant=r.accountant, epsilon_max=r.epsilon_max, rng_source=r.rng_source,
        torch_version=r.torch_version, opacus_version=r.opacus_version, ftte_version=r.ftte_version,
        device_public_key=r.device_public_key, device_signature=r.device_signature,
    )


class JournalWriter:
    """Group commit: every entry queued while a write is in flight goes into the next transaction."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._queue: list[tuple[JournalEntry, asyncio.Future]] = []
        self._task: asyncio.Task | None = None
        self.transactions = 0
        self.entries = 0
        self.write_seconds: deque[float] = deque(maxlen=10_000)  # per transaction, for the metrics

    def append(self, entry: JournalEntry) -> asyncio.Future:
        """Queue ``entry`` (order-preserving) and return a future that resolves once it is durable."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._queue.append((entry, fut))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._drain())
        return fut

    async def _drain(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            t0 = time.perf_counter()
            try:
                await self.db.call(self.db.write_entries, [e for e, _ in batch])
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # the in-memory state is ahead of the disk: stop
                print(f"ftte server: journal write failed ({exc!r}); exiting so a restart replays the journal",
                      file=sys.stderr, flush=True)
                os._exit(70)
            self.write_seconds.append(time.perf_counter() - t0)
            self.transactions += 1
            self.entries += len(batch)
            for _, fut in batch:
                if not fut.done():
                    fut.set_result(None)

    async def flush(self) -> None:
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)


def dumps_record(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True)

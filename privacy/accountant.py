"""Privacy accounting whose state survives restarts.

A device's privacy loss is a function of its whole history of DP-SGD steps, not of the
last round alone: ε composes over every Poisson-subsampled Gaussian step the device ever
took on its records. If that history lived only in process memory, a device that
restarts (an app update, a reboot, a crash) would silently begin again at ε = 0 and could
spend its budget twice. So the history is the persistent state, stored in SQLite per
device id, and ε is always *recomputed from the history* with Opacus's own accountants
(PRV by default, RDP selectable) rather than accumulated as a running float that could
drift from what the accountant would say.

The history is kept one record per round, ``(noise_multiplier, sample_rate, steps)``.
Before handing it to Opacus we merge consecutive records with the same noise and sample
rate, exactly as Opacus's ``IAccountant.step`` does when it is fed one step at a time,
so the numbers we report are the numbers Opacus itself would report for the same run.
"""

from __future__ import annotations

import math
import os
import sqlite3
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any, Iterable, NamedTuple, Sequence

SUPPORTED_ACCOUNTANTS: tuple[str, ...] = ("prv", "rdp")
"""Accountants that may be named in a config or a ledger row.

``"none"`` is accepted only for non-private rounds (noise multiplier 0): their ε is
infinite and no accountant is involved.
"""

NON_PRIVATE_ACCOUNTANT = "none"


@dataclass(frozen=True)
class PrivacyStep:
    """One round of DP-SGD as the accountant sees it: ``steps`` Poisson-subsampled
    Gaussian steps at one ``sample_rate`` and one ``noise_multiplier``.

    Stored as plain Python floats/ints so that a value written to SQLite and read back
    is bit-identical (REAL is an IEEE double), which keeps recomputed ε reproducible.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "noise_multiplier", float(self.noise_multiplier))
        object.__setattr__(self, "sample_rate", float(self.sample_rate))
        if isinstance(self.steps, bool) or int(self.steps) != self.steps:
            raise ValueError(f"steps must be an integer, got {self.steps!r}")
        object.__setattr__(self, "steps", int(self.steps))
        if not (self.noise_multiplier >= 0.0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise_multiplier must be finite and >= 0, got {self.noise_multiplier}")
        if not (0.0 < self.sample_rate <= 1.0):
            raise ValueError(f"sample_rate must lie in (0, 1], got {self.sample_rate}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")

    def as_tuple(self) -> tuple[float, float, int]:
        return (self.noise_multiplier, self.sample_rate, self.steps)


def opacus_history(history: Iterable[PrivacyStep]) -> list[tuple[float, float, int]]:
    """The ``history`` list an Opacus accountant would hold after the same steps.

    Opacus appends ``(noise_multiplier, sample_rate, 1)`` per step and merges a step
    into the last entry when both values are equal; we reproduce that merge so PRV's
    discretisation (which depends on the grouping) sees the identical input.
    """
    merged: list[tuple[float, float, int]] = []
    for step in history:
        if merged and merged[-1][0] == step.noise_multiplier and merged[-1][1] == step.sample_rate:
            nm, q, n = merged[-1]
            merged[-1] = (nm, q, n + step.steps)
        else:
            merged.append(step.as_tuple())
    return merged


def check_accountant_name(name: str, *, allow_none: bool = False) -> str:
    """Validate an accountant name early, with the list of valid names in the error."""
    valid = SUPPORTED_ACCOUNTANTS + ((NON_PRIVATE_ACCOUNTANT,) if allow_none else ())
    if name not in valid:
        raise ValueError(f"unknown accountant {name!r}; expected one of {', '.join(valid)}")
    return name


def make_accountant(history: Iterable[PrivacyStep], mechanism: str = "prv"):
    """An Opacus accountant (``PRVAccountant`` / ``RDPAccountant``) preloaded with
    ``history``, so a restarted device continues where it stopped."""
    from opacus.accountants import create_accountant  # heavy import: torch

    check_accountant_name(mechanism)
    acc = create_accountant(mechanism=mechanism)
    acc.history = opacus_history(history)
    return acc


@lru_cache(maxsize=4096)
def _epsilon_cached(history: tuple[tuple[float, float, int], ...], delta: float, mechanism: str) -> float:
    # Pure function of its arguments, so caching only saves time (PRV costs ~0.2-1 s
    # per call); the trainer, the budget check and the audit all ask for the same
    # prefixes of the same histories.
    from opacus.accountants import create_accountant

    if mechanism == "rdp":
        return max(0.0, _rdp_epsilon(history, delta))
    acc = create_accountant(mechanism=mechanism)
    acc.history = list(history)
    # Opacus's RDP-to-(ε, δ) conversion can return a slightly negative number when the
    # true ε is tiny (very small sample rates). ε is non-negative by definition and any
    # larger value is still a valid bound, so we report max(0, ·).
    return max(0.0, float(acc.get_epsilon(delta=delta)))


@lru_cache(maxsize=16384)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> Any:
    """RDP of one step at Opacus's default orders; composition is additive in steps.

    One vector per distinct (noise, rate) pair, whatever the number of devices sharing it.
    The cache is large because a target-ε noise search evaluates ~25 noise values per
    sample rate: with a small cache those evicted the pairs in use and every budget check
    recomputed its curve (~5 ms a vector of ~150 orders, ~1 KiB each held)."""
    from opacus.accountants import RDPAccountant

    from .rdp_curve import rdp_one_step  # Opacus's compute_rdp, bit for bit, ~3x faster

    return rdp_one_step(sample_rate, noise_multiplier, RDPAccountant.DEFAULT_ALPHAS)


def _rdp_epsilon(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """Exactly what ``RDPAccountant.get_epsilon`` computes (it, too, multiplies one
    step's RDP by the step count and sums over entries), but with each distinct
    (noise, rate) pair's per-step RDP computed once: a simulated device's budget check
    then costs microseconds instead of ~0.1 s of fractional-order special functions."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as rdp_analysis

    total = sum(_rdp_per_step(nm, q) * steps for nm, q, steps in history)
    eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=total, delta=delta)
    return float(eps)


def compute_epsilon(history: Sequence[PrivacyStep], delta: float, mechanism: str = "prv") -> float:
    """ε at ``delta`` after ``history`` according to Opacus's ``mechanism`` accountant.

    An empty history costs nothing (0.0). A history containing a non-private step
    (noise multiplier 0) has no finite ε, so this returns ``inf``.
    """
    if not (0.0 < delta < 1.0):
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    if not history:
        return 0.0
    if any(step.noise_multiplier == 0.0 for step in history):
        return math.inf
    check_accountant_name(mechanism)
    return _epsilon_cached(tuple(opacus_history(history)), float(delta), mechanism)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class DeviceAccountantState:
    """Everything needed to answer "how much has this device spent?" after a restart.

    ``accountant`` and ``delta`` are fixed when the device is first registered: a
    budget is a statement about (ε, δ) under one accounting method, and letting δ
    drift between rounds (for instance because the local dataset grew) would make the
    cumulative figure meaningless.
    """

    device_id: str
    accountant: str
    delta: float
    history: tuple[PrivacyStep, ...] = field(default_factory=tuple)
    epsilon_total: float = 0.0

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.history)

    def epsilon_after(self, planned: PrivacyStep) -> float:
        """ε after ``planned`` were appended to the history (nothing is stored)."""
        return compute_epsilon((*self.history, planned), self.delta, self.accountant)


class Charge(NamedTuple):
    """The result of :meth:`AccountantStore.charge`: the device's state after the round and
    its cumulative ε before and after it (both recomputed from the stored history)."""

    state: DeviceAccountantState
    epsilon_before: float
    epsilon_after: float

    @property
    def round_cost(self) -> float:
        return self.epsilon_after - self.epsilon_before if math.isfinite(self.epsilon_after) else math.inf


_SCHEMA = """
CREATE TABLE IF NOT EXISTS accountant_devices (
    device_id   TEXT PRIMARY KEY,
    accountant  TEXT NOT NULL,
    delta       REAL NOT NULL,
    created_at  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS accountant_steps (
    device_id        TEXT NOT NULL REFERENCES accountant_devices(device_id),
    seq              INTEGER NOT NULL,
    noise_multiplier REAL NOT NULL,
    sample_rate      REAL NOT NULL,
    steps            INTEGER NOT NULL,
    epsilon_total    REAL NOT NULL,
    recorded_at      TEXT NOT NULL,
    PRIMARY KEY (device_id, seq)
);
"""


DURABILITY_MODES: tuple[str, ...] = ("each_write", "flush")


class AccountantStore:
    """SQLite-backed accountant state, keyed by device id.

    One connection per store object; writes run in ``BEGIN IMMEDIATE`` transactions so
    two processes sharing a file cannot interleave a read-modify-write of the same
    device. A new store object on the same file (a restarted process) sees the full
    history. ``path=":memory:"`` gives a throw-away store for tests and simulations.

    ``durability``:

    * ``"each_write"`` (default): every register/record/charge is its own committed (and,
      on a file, synced) transaction. A device or a deployment needs this: a round is
      durable before it trains.
    * ``"flush"``: the store works on an in-memory copy of the file (loaded at open) and
      writes what changed since the last :meth:`flush` in ONE transaction when
      :meth:`flush` (or :meth:`close`) is called. The simulator flushes right before it
      commits each applied buffer, so the accountants on disk are exactly those of the
      last applied buffer (and the rounds in flight then), with one synced transaction
      per buffer instead of one per trained round. Only for a single writer that owns
      the file: another process writing the same file meanwhile is not seen.
    """

    def __init__(self, path: str | os.PathLike[str], *, durability: str = "each_write") -> None:
        if durability not in DURABILITY_MODES:
            raise ValueError(f"unknown durability {durability!r}; expected one of {', '.join(DURABILITY_MODES)}")
        self.path = os.fspath(path)
        self.durability = durability
        self._disk: sqlite3.Connection | None = None
        # (device rows, step rows) written to the working copy since the last flush
        self._pending_devices: list[tuple[str, str, float, str]] = []
        self._pending_steps: list[tuple[str, int, float, float, int, float, str]] = []
        self._txn_devices: list[tuple[str, str, float, str]] = []  # of the working transaction
        self._txn_steps: list[tuple[str, int, float, float, int, float, str]] = []
        if durability == "flush" and self.path != ":memory:":
            self._disk = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
            self._disk.executescript(_SCHEMA)
            self._conn = sqlite3.connect(":memory:", isolation_level=None)
            self._disk.backup(self._conn)
        else:
            self._conn = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
            self._conn.executescript(_SCHEMA)

    # -- lifecycle -------------------------------------------------------------------
    @property
    def unflushed(self) -> int:
        """Rows (device registrations and rounds) not yet on disk (always 0 in ``each_write`` mode)."""
        return len(self._pending_devices) + len(self._pending_steps)

    def flush(self) -> int:
        """Write every change since the last flush to the file in one ``BEGIN IMMEDIATE``
        transaction; returns how many rows it wrote. A no-op in ``each_write`` mode. If the
        write fails nothing is written and the changes stay pending."""
        disk = self._disk
        if disk is None or not (self._pending_devices or self._pending_steps):
            return 0
        disk.execute("BEGIN IMMEDIATE")
        try:
            disk.executemany("INSERT INTO accountant_devices (device_id, accountant, delta, created_at) "
                             "VALUES (?, ?, ?, ?)", self._pending_devices)
            disk.executemany("INSERT INTO accountant_steps (device_id, seq, noise_multiplier, sample_rate, steps, "
                             "epsilon_total, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?)", self._pending_steps)
            disk.execute("COMMIT")
        except BaseException:
            if disk.in_transaction:  # an interrupt can land after COMMIT
                disk.execute("ROLLBACK")
            raise
        n = self.unflushed
        self._pending_devices, self._pending_steps = [], []
        return n

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._conn.close()
            if self._disk is not None:
                self._disk.close()
                self._disk = None

    def _begin(self) -> None:
        self._txn_devices, self._txn_steps = [], []
        self._conn.execute("BEGIN IMMEDIATE")

    def _commit(self) -> None:
        self._conn.execute("COMMIT")
        self._pending_devices.extend(self._txn_devices)
        self._pending_steps.extend(self._txn_steps)
        self._txn_devices, self._txn_steps = [], []

    def _rollback(self) -> None:
        self._txn_devices, self._txn_steps = [], []
        if self._conn.in_transaction:  # an interrupt can land after COMMIT
            self._conn.execute("ROLLBACK")

    def _insert_device(self, device_id: str, accountant: str, delta: float) -> None:
        row = (device_id, accountant, float(delta), _now())
        self._conn.execute("INSERT INTO accountant_devices (device_id, accountant, delta, created_at) VALUES (?, ?, ?, ?)",
                           row)
        if self._disk is not None:
            self._txn_devices.append(row)

    def _insert_step(self, device_id: str, seq: int, step: PrivacyStep, epsilon_total: float) -> None:
        row = (device_id, seq, step.noise_multiplier, step.sample_rate, step.steps, float(epsilon_total), _now())
        self._conn.execute(
            "INSERT INTO accountant_steps (device_id, seq, noise_multiplier, sample_rate, steps, epsilon_total,"
            " recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?)", row)
        if self._disk is not None:
            self._txn_steps.append(row)

    def __enter__(self) -> "AccountantStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reads -----------------------------------------------------------------------
    def devices(self) -> list[str]:
        return [r[0] for r in self._conn.execute("SELECT device_id FROM accountant_devices ORDER BY device_id")]

    def history(self, device_id: str) -> tuple[PrivacyStep, ...]:
        rows = self._conn.execute(
            "SELECT noise_multiplier, sample_rate, steps FROM accountant_steps WHERE device_id = ? ORDER BY seq",
            (device_id,),
        ).fetchall()
        return tuple(PrivacyStep(nm, q, n) for nm, q, n in rows)

    def state(self, device_id: str) -> DeviceAccountantState | None:
        """The device's state, or None if it was never registered."""
        head = self._conn.execute(
            "SELECT accountant, delta FROM accountant_devices WHERE device_id = ?", (device_id,)
        ).fetchone()
        if head is None:
            return None
        last = self._conn.execute(
            "SELECT epsilon_total FROM accountant_steps WHERE device_id = ? ORDER BY seq DESC LIMIT 1",
            (device_id,),
        ).fetchone()
        return DeviceAccountantState(
            device_id=device_id,
            accountant=head[0],
            delta=float(head[1]),
            history=self.history(device_id),
            epsilon_total=float(last[0]) if last else 0.0,
        )

    def accountant(self, device_id: str):
        """A fresh Opacus accountant holding the device's stored history."""
        st = self._require(device_id)
        return make_accountant(st.history, st.accountant)

    def epsilon(self, device_id: str) -> float:
        """ε spent so far, recomputed from the stored history (not the cached figure)."""
        st = self._require(device_id)
        return compute_epsilon(st.history, st.delta, st.accountant)

    # -- writes ----------------------------------------------------------------------
    def register(self, device_id: str, *, accountant: str, delta: float) -> DeviceAccountantState:
        """Create the device's record, or return it if it exists with the same settings.

        Raises ``ValueError`` if the device exists with a different accountant or δ:
        silently switching either would change what the stored budget means.
        """
        check_accountant_name(accountant)
        if not (0.0 < delta < 1.0):
            raise ValueError(f"delta must lie in (0, 1), got {delta}")
        self._begin()
        try:
            row = self._conn.execute(
                "SELECT accountant, delta FROM accountant_devices WHERE device_id = ?", (device_id,)
            ).fetchone()
            if row is None:
                self._insert_device(device_id, accountant, delta)
            elif row[0] != accountant or float(row[1]) != float(delta):
                raise ValueError(
                    f"device {device_id!r} is registered with accountant={row[0]!r}, delta={row[1]!r}; "
                    f"refusing to continue with accountant={accountant!r}, delta={delta!r}"
                )
            self._commit()
        except BaseException:
            self._rollback()
            raise
        st = self.state(device_id)
        assert st is not None
        return st

    def record(
        self,
        device_id: str,
        step: PrivacyStep,
        *,
        epsilon_total: float | None = None,
        expected_rounds: int | None = None,
    ) -> DeviceAccountantState:
        """Append one round to the device's history, atomically.

        ``epsilon_total`` is the cumulative ε after this round; it is stored only as a
        cache for quick reads (``state().epsilon_total``) and is recomputed here when
        not given. The authoritative value is always the one recomputed from history.

        ``expected_rounds`` is the history length the caller based its decision on
        (e.g. a budget check); if another writer appended in between, the record is
        refused instead of being stored on top of a stale decision.
        """
        st = self._require(device_id)
        if expected_rounds is None:
            expected_rounds = len(st.history)
        if epsilon_total is None:
            epsilon_total = st.epsilon_after(step)
        self._begin()
        try:
            (last_seq,) = self._conn.execute(
                "SELECT COALESCE(MAX(seq), 0) FROM accountant_steps WHERE device_id = ?", (device_id,)
            ).fetchone()
            if last_seq != expected_rounds:
                raise RuntimeError(
                    f"device {device_id!r}: history changed concurrently (expected {expected_rounds} rounds, "
                    f"found {last_seq}); re-check the budget and retry"
                )
            self._insert_step(device_id, last_seq + 1, step, epsilon_total)
            self._commit()
        except BaseException:
            self._rollback()
            raise
        st2 = self.state(device_id)
        assert st2 is not None
        return st2

    def charge(
        self,
        device_id: str,
        step: PrivacyStep,
        *,
        accountant: str,
        delta: float,
        epsilon_max: float,
        expected_rounds: int | None = None,
    ) -> Charge:
        """Register the device if new and record one round, in ONE ``BEGIN IMMEDIATE``
        transaction, refusing it first if it would take the device past ``epsilon_max``.

        This is the only call a driver needs before training: a refused round stores
        nothing (not even the registration), and no other writer can slip a round in
        between the budget check and the record. ``expected_rounds``: the history length a
        plan was made against; a different length raises ``RuntimeError`` (re-plan).
        Raises ``BudgetExceededError`` when over budget and ``ValueError`` when the device
        is registered with another accountant or δ.
        """
        from .budget import BudgetExceededError  # budget.py imports this module

        check_accountant_name(accountant)
        if not (0.0 < delta < 1.0):
            raise ValueError(f"delta must lie in (0, 1), got {delta}")
        c = self._conn
        self._begin()
        try:
            head = c.execute("SELECT accountant, delta FROM accountant_devices WHERE device_id = ?",
                             (device_id,)).fetchone()
            if head is None:
                self._insert_device(device_id, accountant, delta)
            elif head[0] != accountant or float(head[1]) != float(delta):
                raise ValueError(
                    f"device {device_id!r} is registered with accountant={head[0]!r}, delta={head[1]!r}; "
                    f"refusing to charge a round with accountant={accountant!r}, delta={delta!r}")
            history = self.history(device_id)
            if expected_rounds is not None and len(history) != expected_rounds:
                raise RuntimeError(
                    f"device {device_id!r}: history changed concurrently (expected {expected_rounds} rounds, "
                    f"found {len(history)}); re-check the budget and retry")
            before = compute_epsilon(history, delta, accountant)
            after = compute_epsilon((*history, step), delta, accountant)
            if not (after <= epsilon_max):
                raise BudgetExceededError(
                    device_id=device_id, epsilon_max=epsilon_max, delta=delta, epsilon_spent=before,
                    round_cost=after - before, epsilon_after=after, planned=step, accountant=accountant)
            self._insert_step(device_id, len(history) + 1, step, after)
            self._commit()
        except BaseException:
            self._rollback()
            raise
        # exactly what the transaction just stored (re-reading it cost a device more SELECTs and
        # the whole history again, every round)
        state = DeviceAccountantState(device_id, accountant, float(delta), (*history, step), float(after))
        return Charge(state, before, after)

    def _require(self, device_id: str) -> DeviceAccountantState:
        st = self.state(device_id)
        if st is None:
            raise KeyError(f"device {device_id!r} has no accountant state; call register() first")
        return st

"""The ledger: chained, signed, append-only, and able to join the caller's transaction."""

from __future__ import annotations

import math
import sqlite3

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ftte.privacy.audit import verify_ledger
from ftte.privacy.ledger import (
    ROWS_TABLE,
    Ledger,
    LedgerError,
    LedgerRow,
    compute_row_hash,
    library_versions,
    load_or_create_signing_key,
    row_signing_message,
    verify_signature,
)


def _row(device="d1", version=0, eps_total=0.5, eps_round=0.5, cohort="c1") -> LedgerRow:
    return LedgerRow(
        device_id=device, plan_id="plan-1", version=version, sample_rate=0.1, steps=3, noise_multiplier=1.0,
        max_grad_norm=1.0, accountant="prv", rng_source="test", epsilon_round=eps_round,
        epsilon_total=eps_total, delta=1e-5, epsilon_max=8.0, cohort_id=cohort,
    )


def _nonprivate_row(device: str) -> LedgerRow:
    # noise 0, accountant "none", ε = inf: lets the audit at the end of a test run
    # without an accountant; ε recomputation itself is covered in test_audit.py.
    return LedgerRow(
        device_id=device, plan_id="ablation", version=0, sample_rate=0.1, steps=3, noise_multiplier=0.0,
        max_grad_norm=math.inf, accountant="none", rng_source="test", epsilon_round=math.inf,
        epsilon_total=math.inf, delta=1e-5, epsilon_max=math.inf,
    )


def test_append_chains_signs_and_reads_back(tmp_path, signing_key):
    path = tmp_path / "l.db"
    with Ledger(path, signing_key) as led:
        e1 = led.append(_row(version=0, eps_total=0.123456789012345678))
        e2 = led.append(_row(device="d2", version=1, cohort=None))
        assert (e1.seq, e2.seq) == (1, 2)
        assert e1.prev_hash == led.genesis_hash and e2.prev_hash == e1.row_hash
        assert led.head().count == 2 and led.head().head_hash == e2.row_hash
    with Ledger(path) as ro:  # read-only: no key
        entries = ro.entries()
        assert [e.row for e in entries] == [e1.row, e2.row]  # floats round-trip exactly
        assert entries[1].row.cohort_id is None
        for e in entries:
            assert compute_row_hash(e.seq, e.prev_hash, e.row) == e.row_hash
            assert verify_signature(ro.public_key_hex, row_signing_message(e.row_hash), e.signature)
        assert ro.rows_for("d2") == [entries[1]]
        with pytest.raises(LedgerError, match="read-only"):
            ro.append(_row())
    v = library_versions()
    assert e1.row.torch_version == v["torch"] and e1.row.opacus_version == v["opacus"] and v["ftte"] != "unknown"


def test_sql_edits_are_refused_by_triggers(tmp_path, signing_key):
    path = tmp_path / "l.db"
    with Ledger(path, signing_key) as led:
        led.append(_row())
    conn = sqlite3.connect(path)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute(f"UPDATE {ROWS_TABLE} SET epsilon_total = 0.01")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute(f"DELETE FROM {ROWS_TABLE}")
    with pytest.raises(sqlite3.IntegrityError, match="immutable"):
        conn.execute("UPDATE privacy_ledger_meta SET value = 'x' WHERE key = 'public_key'")
    conn.close()


def test_other_key_cannot_extend_and_foreign_connection_refused(tmp_path, signing_key):
    path = tmp_path / "l.db"
    Ledger(path, signing_key).close()
    with pytest.raises(LedgerError, match="cannot extend"):
        Ledger(path, Ed25519PrivateKey.generate())
    with pytest.raises(LedgerError, match="no ledger at"):
        Ledger(tmp_path / "missing.db")
    sqlite3.connect(tmp_path / "empty.db").execute("CREATE TABLE t (x)")
    with pytest.raises(LedgerError, match="not a privacy ledger"):
        Ledger(tmp_path / "empty.db")
    led = Ledger(path, signing_key)
    other = sqlite3.connect(tmp_path / "other.db")
    with pytest.raises(LedgerError, match="not to this ledger"):
        led.append(_row(), conn=other)
    assert len(led) == 0
    led.close()


def test_append_joins_the_callers_transaction(tmp_path, signing_key):
    """Server pattern: model version + ledger rows + cohort record commit together."""
    path = tmp_path / "server.db"
    led = Ledger(path, signing_key)
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE models (version INTEGER PRIMARY KEY, blob BLOB)")
    conn.execute("CREATE TABLE cohorts (id TEXT PRIMARY KEY, members INTEGER)")
    conn.commit()

    # rolled back: nothing of the three survives
    conn.execute("INSERT INTO models VALUES (1, x'00')")
    led.append_many([_nonprivate_row("a"), _nonprivate_row("b")], conn=conn)
    conn.execute("INSERT INTO cohorts VALUES ('c1', 2)")
    conn.rollback()
    assert len(led) == 0 and led.head() is None
    assert conn.execute("SELECT COUNT(*) FROM models").fetchone() == (0,)

    # committed: all three
    conn.execute("INSERT INTO models VALUES (1, x'00')")
    led.append_many([_nonprivate_row("a"), _nonprivate_row("b")], conn=conn)
    conn.execute("INSERT INTO cohorts VALUES ('c1', 2)")
    assert len(led) == 0  # not visible to other connections before commit
    conn.commit()
    assert len(led) == 2 and led.head().count == 2
    assert conn.execute("SELECT COUNT(*) FROM cohorts").fetchone() == (1,)

    # a failure inside append leaves the caller's transaction usable and its own work intact
    conn.execute("INSERT INTO models VALUES (2, x'01')")
    with pytest.raises(TypeError):
        led.append_many([_nonprivate_row("c"), "not a row"], conn=conn)  # type: ignore[list-item]
    conn.commit()
    assert len(led) == 2 and conn.execute("SELECT COUNT(*) FROM models").fetchone() == (2,)

    # autocommit connection without an open transaction: the append is atomic on its own
    auto = sqlite3.connect(path, isolation_level=None)
    led.append(_nonprivate_row("d"), conn=auto)
    assert len(led) == 3
    auto.close()
    conn.close()
    led.close()
    assert verify_ledger(path).ok


def test_row_validation_and_key_file(tmp_path):
    with pytest.raises(ValueError):
        _row(eps_total=float("nan"))
    with pytest.raises(TypeError):
        LedgerRow(**{**_row().to_dict(), "version": 1.5})
    with pytest.raises(ValueError):
        LedgerRow(**{**_row().to_dict(), "accountant": "gdp"})
    k1 = load_or_create_signing_key(tmp_path / "writer.key")
    k2 = load_or_create_signing_key(tmp_path / "writer.key")
    assert (tmp_path / "writer.key").stat().st_mode & 0o777 == 0o600
    msg = b"x"
    k2.public_key().verify(k1.sign(msg), msg)

"""The audit passes an untouched ledger and fails every kind of tampering, via `ftte audit` too."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path
from typing import Callable

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ftte import cli
from ftte.privacy.accountant import PrivacyStep, compute_epsilon
from ftte.privacy.audit import verify_ledger
from ftte.privacy.ledger import (
    META_TABLE,
    ROWS_TABLE,
    Ledger,
    LedgerRow,
    compute_row_hash,
    genesis_hash,
    head_signing_message,
    public_key_hex,
    read_records,
    row_signing_message,
)


def _copy(clean: dict, tmp_path: Path) -> Path:
    dst = tmp_path / "ledger.db"
    shutil.copy(clean["path"], dst)
    return dst


def _raw(path: Path) -> sqlite3.Connection:
    """What an attacker with the file does: drop the guard triggers, then edit."""
    conn = sqlite3.connect(path, isolation_level=None)
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
        conn.execute(f"DROP TRIGGER {name}")
    return conn


def test_untouched_ledger_passes_and_report_is_written(clean_ledger, tmp_path, capsys):
    result = verify_ledger(clean_ledger["path"])
    assert result.ok, result.summary()
    assert result.n_rows == clean_ledger["n_rows"] == 6
    assert set(result.devices) == {"phone-1", "watch-2"}
    watch = result.devices["watch-2"]
    assert watch.accountant == "rdp" and len(watch.rounds) == 3
    assert [r.noise_multiplier for r in watch.rounds] == [1.1, 1.4, 1.1]
    assert watch.epsilon_total_recomputed == watch.epsilon_total_recorded
    # independent check of the last figure with a plain Opacus accountant
    expected = compute_epsilon([PrivacyStep(nm, 1 / 16, 4) for nm in (1.1, 1.4, 1.1)], watch.delta, "rdp")
    assert watch.epsilon_total_recorded == pytest.approx(expected, rel=1e-12)

    report = tmp_path / "report"
    rc = cli.main(["audit", str(clean_ledger["path"]), "--report", str(report),
                   "--expect-key", clean_ledger["public_key"], "--expect-head", result.head_hash])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "PASS" in out
    md = (report / "audit.md").read_text()
    assert "## Device `phone-1`" in md and "## Device `watch-2`" in md and "**PASS**" in md
    assert md.count("| ok |") == 6
    png = (report / "epsilon.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    rc = cli.main(["audit", str(clean_ledger["path"]), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0 and doc["ok"] is True and doc["devices"]["phone-1"]["rounds"] == 3


def _edit_value(conn: sqlite3.Connection) -> None:
    conn.execute(f"UPDATE {ROWS_TABLE} SET epsilon_total = epsilon_total / 2 WHERE seq = 2")


def _edit_mechanism(conn: sqlite3.Connection) -> None:
    conn.execute(f"UPDATE {ROWS_TABLE} SET noise_multiplier = 3.0 WHERE seq = 5")


def _edit_and_rehash(conn: sqlite3.Connection) -> None:
    """Edit row 2 and repair the whole chain (everything but the signatures)."""
    conn.execute(f"UPDATE {ROWS_TABLE} SET cohort_id = 'forged' WHERE seq = 2")
    recs = read_records(conn)
    prev = recs[0]["row_hash"]
    for rec in recs[1:]:
        new_hash = compute_row_hash(rec["seq"], prev, rec)
        conn.execute(f"UPDATE {ROWS_TABLE} SET prev_hash = ?, row_hash = ? WHERE seq = ?",
                     (prev, new_hash, rec["seq"]))
        prev = new_hash


def _delete_middle(conn: sqlite3.Connection) -> None:
    conn.execute(f"DELETE FROM {ROWS_TABLE} WHERE seq = 3")


def _delete_last(conn: sqlite3.Connection) -> None:
    conn.execute(f"DELETE FROM {ROWS_TABLE} WHERE seq = (SELECT MAX(seq) FROM {ROWS_TABLE})")


def _delete_device_and_renumber(conn: sqlite3.Connection) -> None:
    """Hide a device entirely and close the gaps in seq."""
    conn.execute(f"DELETE FROM {ROWS_TABLE} WHERE device_id = 'phone-1'")
    conn.execute(f"UPDATE {ROWS_TABLE} SET seq = seq - 3")


def _swap_rows(conn: sqlite3.Connection) -> None:
    """Reorder: rows 2 and 3 trade places (each keeps its own hash and signature)."""
    conn.execute(f"UPDATE {ROWS_TABLE} SET seq = -1 WHERE seq = 2")
    conn.execute(f"UPDATE {ROWS_TABLE} SET seq = 2 WHERE seq = 3")
    conn.execute(f"UPDATE {ROWS_TABLE} SET seq = 3 WHERE seq = -1")


def _swap_contents(conn: sqlite3.Connection) -> None:
    """Reorder a device's rounds by swapping the parameter columns of rows 4 and 5."""
    cols = "noise_multiplier, epsilon_round, epsilon_total, version, cohort_id"
    r4 = conn.execute(f"SELECT {cols} FROM {ROWS_TABLE} WHERE seq = 4").fetchone()
    r5 = conn.execute(f"SELECT {cols} FROM {ROWS_TABLE} WHERE seq = 5").fetchone()
    sets = ", ".join(f"{c.strip()} = ?" for c in cols.split(","))
    conn.execute(f"UPDATE {ROWS_TABLE} SET {sets} WHERE seq = 4", r5)
    conn.execute(f"UPDATE {ROWS_TABLE} SET {sets} WHERE seq = 5", r4)


def _replace_ledger_id(conn: sqlite3.Connection) -> None:
    conn.execute(f"UPDATE {META_TABLE} SET value = 'feedfacefeedfacefeedfacefeedface' WHERE key = 'ledger_id'")


def _type_garbage(conn: sqlite3.Connection) -> None:
    conn.execute(f"UPDATE {ROWS_TABLE} SET steps = 'many' WHERE seq = 1")


TAMPERS: dict[str, tuple[Callable[[sqlite3.Connection], None], set[str]]] = {
    # the signature covers the stored hash, so a plain edit shows up as a hash mismatch
    # (and, where the edit touches accounting, as an epsilon mismatch too)
    "edit_epsilon": (_edit_value, {"hash", "epsilon"}),
    "edit_noise": (_edit_mechanism, {"hash", "epsilon"}),
    "edit_and_rehash_chain": (_edit_and_rehash, {"signature", "head"}),
    "delete_middle_row": (_delete_middle, {"sequence", "chain", "head"}),
    "delete_last_row": (_delete_last, {"head"}),
    "delete_device_and_renumber": (_delete_device_and_renumber, {"chain", "head"}),
    "swap_row_order": (_swap_rows, {"chain"}),
    "swap_row_contents": (_swap_contents, {"hash"}),
    "replace_ledger_id": (_replace_ledger_id, {"chain", "head"}),
    "garbage_type": (_type_garbage, {"decode"}),
}


@pytest.mark.parametrize("name", sorted(TAMPERS))
def test_tampering_fails_the_audit_and_the_cli(clean_ledger, tmp_path, capsys, name):
    tamper, expected_kinds = TAMPERS[name]
    path = _copy(clean_ledger, tmp_path)
    conn = _raw(path)
    tamper(conn)
    conn.close()

    result = verify_ledger(path)
    kinds = {i.kind for i in result.issues}
    assert not result.ok and not result.integrity_ok
    assert expected_kinds <= kinds, (kinds, result.summary())

    rc = cli.main(["audit", str(path)])
    out = capsys.readouterr().out
    assert rc == 1 and "FAIL" in out


def test_report_of_a_tampered_ledger_marks_the_row(clean_ledger, tmp_path, capsys):
    path = _copy(clean_ledger, tmp_path)
    conn = _raw(path)
    _edit_value(conn)
    conn.close()
    report = tmp_path / "report"
    assert cli.main(["audit", str(path), "--report", str(report)]) == 1
    md = (report / "audit.md").read_text()
    assert "**FAIL**" in md and md.count("| TAMPERED |") == 1 and md.count("| ok |") == 5
    assert (report / "epsilon.png").stat().st_size > 5000
    capsys.readouterr()


def test_forged_key_is_caught_when_the_key_is_pinned(clean_ledger, tmp_path, capsys):
    """An attacker re-signs everything with their own key and swaps the public key.
    The file is then self-consistent; only a pinned key (or head hash) exposes it."""
    path = _copy(clean_ledger, tmp_path)
    forger = Ed25519PrivateKey.generate()
    pub = public_key_hex(forger)
    conn = _raw(path)
    conn.execute(f"UPDATE {META_TABLE} SET value = ? WHERE key = 'public_key'", (pub,))
    ledger_id = conn.execute(f"SELECT value FROM {META_TABLE} WHERE key = 'ledger_id'").fetchone()[0]
    prev = genesis_hash(ledger_id, pub)
    for rec in read_records(conn):
        h = compute_row_hash(rec["seq"], prev, rec)
        conn.execute(f"UPDATE {ROWS_TABLE} SET prev_hash = ?, row_hash = ?, signature = ? WHERE seq = ?",
                     (prev, h, forger.sign(row_signing_message(h)).hex(), rec["seq"]))
        prev = h
    n = clean_ledger["n_rows"]
    head = {"count": n, "head_hash": prev, "signature": forger.sign(head_signing_message(ledger_id, n, prev)).hex()}
    conn.execute(f"UPDATE {META_TABLE} SET value = ? WHERE key = 'head'", (json.dumps(head),))
    conn.close()

    assert verify_ledger(path).ok  # self-consistent: this is why the key must be pinned
    pinned = verify_ledger(path, expect_public_key=clean_ledger["public_key"])
    assert not pinned.ok and {i.kind for i in pinned.issues} == {"key"}
    rc = cli.main(["audit", str(path), "--expect-key", clean_ledger["public_key"]])
    assert rc == 1 and "FAIL" in capsys.readouterr().out


def _append_signed(path: Path, key: Ed25519PrivateKey, **overrides) -> None:
    with Ledger(path, key) as led:
        last = led.entries()[-1].row
        fields = {**last.to_dict(), "version": last.version + 1, "timestamp": "2030-01-01T00:00:00+00:00"}
        fields.update(overrides)
        led.append(LedgerRow(**fields))


def test_misreported_epsilon_is_caught_even_when_properly_signed(clean_ledger, tmp_path, capsys):
    path = _copy(clean_ledger, tmp_path)
    # the writer claims the last round (same parameters again) cost nothing
    last = Ledger(path).entries()[-1].row
    _append_signed(path, clean_ledger["key"], epsilon_round=0.0, epsilon_total=last.epsilon_total)
    result = verify_ledger(path)
    assert result.integrity_ok and not result.epsilon_ok and not result.ok
    assert [i.kind for i in result.issues] == ["epsilon"]
    assert cli.main(["audit", str(path)]) == 1
    capsys.readouterr()


def test_over_budget_device_is_flagged(clean_ledger, tmp_path, capsys):
    path = _copy(clean_ledger, tmp_path)
    entries = Ledger(path).entries()
    dev_rows = [e.row for e in entries if e.row.device_id == "watch-2"]
    # a correctly accounted round that pushes the device past its epsilon_max
    hist = [PrivacyStep(r.noise_multiplier, r.sample_rate, r.steps) for r in dev_rows]
    big = PrivacyStep(0.6, 1 / 16, 80)
    total = compute_epsilon(hist + [big], dev_rows[-1].delta, "rdp")
    assert total > dev_rows[-1].epsilon_max
    _append_signed(path, clean_ledger["key"], noise_multiplier=big.noise_multiplier, steps=big.steps,
                   epsilon_total=total, epsilon_round=total - dev_rows[-1].epsilon_total)
    result = verify_ledger(path)
    assert result.integrity_ok and result.epsilon_ok and not result.budget_ok
    assert [i.kind for i in result.issues] == ["over_budget"]
    assert result.devices["watch-2"].over_budget and not result.devices["phone-1"].over_budget
    assert cli.main(["audit", str(path)]) == 1
    assert "EXCEEDED" in capsys.readouterr().out


def test_cli_missing_ledger_exits_2(tmp_path, capsys):
    assert cli.main(["audit", str(tmp_path / "nope.db")]) == 2
    assert "cannot read ledger" in capsys.readouterr().err
    assert not (tmp_path / "nope.db").exists()

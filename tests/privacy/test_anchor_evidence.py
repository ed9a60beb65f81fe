"""Anchors the operator cannot rewrite, device-signed rows, device records, and the key path.

The operator in these tests holds ``ledger.key`` and rewrites the ledger *in place* (same
ledger id, same writer key, fresh chain, fresh signatures, fresh signed head), which passes
every check that looks only at the file. Only published anchors and device evidence catch it.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ftte.privacy import audit_cli
from ftte.privacy.accountant import AccountantStore, PrivacyStep
from ftte.privacy.audit import parse_anchor, verify_ledger
from ftte.privacy.device_record import append_claim, read_claims
from ftte.privacy.ledger import (
    ROWS_TABLE,
    Ledger,
    LedgerError,
    LedgerRow,
    load_or_create_signing_key,
    load_signing_key,
)
from ftte.privacy.spend import RoundOutcome, SpendRecord, ledger_rows, sign_spend

DELTA = 1e-5


def _spend(dev: str, nm: float, version: int) -> SpendRecord:
    return SpendRecord(device_id=dev, plan_id="plan", version=version, step=PrivacyStep(nm, 0.05, 5),
                       max_grad_norm=1.0, delta=DELTA, accountant="rdp", epsilon_max=50.0, rng_source="chacha20:os")


def _grow(led: Ledger, versions: range) -> None:
    for v in versions:
        items = [(_spend("a", 1.0 + 0.1 * (v % 3), v), RoundOutcome.MERGED, f"c{v}"),
                 (_spend("b", 1.2, v), RoundOutcome.MERGED, f"c{v}")]
        led.append_many(ledger_rows(led, items))


def _cli(args: list[str], capsys) -> tuple[int, str]:
    import argparse

    parser = argparse.ArgumentParser()
    audit_cli.configure(parser)
    code = audit_cli.run(parser.parse_args(args))
    return code, capsys.readouterr().out


def _rewrite(path: Path, key: Ed25519PrivateKey, rows: list[LedgerRow]) -> None:
    """What an operator with ledger.key can do: drop the guards, delete everything, re-append
    ``rows`` (ε recomputed honestly for the new history), re-sign the head."""
    conn = sqlite3.connect(path)
    conn.execute(f"DROP TRIGGER {ROWS_TABLE}_no_delete")
    conn.execute(f"DELETE FROM {ROWS_TABLE}")
    conn.commit()
    conn.close()
    with Ledger(path, key) as led:
        items = []
        for r in rows:
            spend = SpendRecord(device_id=r.device_id, plan_id=r.plan_id, version=r.version,
                                step=PrivacyStep(r.noise_multiplier, r.sample_rate, r.steps),
                                max_grad_norm=r.max_grad_norm, delta=r.delta, accountant=r.accountant,
                                epsilon_max=r.epsilon_max, rng_source=r.rng_source,
                                device_public_key=r.device_public_key, device_signature=r.device_signature)
            items.append((spend, RoundOutcome(r.outcome), r.cohort_id))
        led.append_many(ledger_rows(led, items))


@pytest.fixture
def anchored(tmp_path):
    key = Ed25519PrivateKey.generate()
    path = tmp_path / "ledger.db"
    with Ledger(path, key) as led:
        _grow(led, range(4))  # 8 rows
        anchor = led.anchor()
        rows = [e.row for e in led.entries()]
    assert anchor is not None and anchor[0] == 8
    return {"path": path, "key": key, "anchor": anchor, "rows": rows}


def test_anchor_passes_on_honest_growth_and_json_prints_the_new_anchor(anchored, capsys):
    with Ledger(anchored["path"], anchored["key"]) as led:
        _grow(led, range(4, 6))
    seq, h = anchored["anchor"]
    early = verify_ledger(anchored["path"], anchors=[(seq, h), (3, _hash_at(anchored["path"], 3))])
    assert early.ok, early.summary()
    code, out = _cli([str(anchored["path"]), "--anchor", f"{seq}:{h}", "--json"], capsys)
    doc = json.loads(out)
    assert code == 0 and doc["ok"]
    assert doc["anchor"]["seq"] == 12 and doc["anchor"]["arg"] == f"12:{doc['anchor']['hash']}"
    assert parse_anchor(doc["anchor"]["arg"]) == (12, doc["anchor"]["hash"])
    code, out = _cli([str(anchored["path"])], capsys)
    assert code == 0 and f"anchor (publish): 12:{doc['anchor']['hash']}" in out


def _hash_at(path: Path, seq: int) -> str:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"SELECT row_hash FROM {ROWS_TABLE} WHERE seq = ?", (seq,)).fetchone()[0]
    finally:
        conn.close()


def _edit(rows: list[LedgerRow]) -> list[LedgerRow]:
    out = list(rows)
    out[2] = LedgerRow(**{**out[2].to_dict(), "noise_multiplier": out[2].noise_multiplier + 1.0})
    return out


def _delete(rows: list[LedgerRow]) -> list[LedgerRow]:
    return rows[:3] + rows[4:]


def _reorder(rows: list[LedgerRow]) -> list[LedgerRow]:
    out = list(rows)
    out[1], out[2] = out[2], out[1]
    return out


def _resign_restamped(rows: list[LedgerRow]) -> list[LedgerRow]:
    # Every row re-issued (same parameters, new timestamps) and the whole ledger re-signed.
    # (Re-signing byte-identical rows would reproduce the same hashes: that is no change.)
    return list(rows)


@pytest.mark.parametrize("rewrite", [_edit, _delete, _reorder, _resign_restamped])
def test_rewrite_with_the_ledger_key_passes_plain_audit_but_fails_the_anchor(anchored, rewrite, capsys):
    _rewrite(anchored["path"], anchored["key"], rewrite(anchored["rows"]))
    plain = verify_ledger(anchored["path"])
    assert plain.ok, plain.summary()  # the operator's rewrite is internally consistent
    seq, h = anchored["anchor"]
    result = verify_ledger(anchored["path"], anchors=[(seq, h)])
    assert not result.ok and [i.kind for i in result.issues] == ["anchor"]
    code, out = _cli([str(anchored["path"]), "--anchor", f"{seq}:{h}"], capsys)
    assert code == 1 and "[anchor]" in out


def test_anchor_fails_when_the_ledger_is_cut_below_it_or_the_key_is_swapped(anchored, tmp_path):
    seq, h = anchored["anchor"]
    _rewrite(anchored["path"], anchored["key"], anchored["rows"][:5])
    cut = verify_ledger(anchored["path"], anchors=[(seq, h)])
    assert not cut.ok and "only 5 rows" in cut.issues[0].message
    # a wholly new ledger (new key, new id) with the very same rows
    other = tmp_path / "forged.db"
    with Ledger(other, Ed25519PrivateKey.generate()) as led:
        led.append_many(anchored["rows"])
    assert verify_ledger(other).ok
    assert not verify_ledger(other, anchors=[(seq, h)]).ok


def test_malformed_anchor_argument_exits_2(anchored, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    audit_cli.configure(parser)
    assert audit_cli.run(parser.parse_args([str(anchored["path"]), "--anchor", "8:zz"])) == 2
    assert "SEQ:HASH" in capsys.readouterr().err


# -- device evidence ----------------------------------------------------------------------

def _device_rounds(tmp_path: Path, n: int) -> dict:
    """A device charging its own store, signing each claim with its ε and keeping a record;
    the server writing its rows with the one row builder."""
    device = Ed25519PrivateKey.generate()
    store = AccountantStore(tmp_path / "device-acc.db")
    record = tmp_path / "device-record.jsonl"
    server_key = Ed25519PrivateKey.generate()
    path = tmp_path / "ledger.db"
    with Ledger(path, server_key) as led:
        for v in range(n):
            spend = _spend("phone", 1.0 + 0.2 * (v % 2), v)
            charge = store.charge("phone", spend.step, accountant="rdp", delta=DELTA, epsilon_max=50.0)
            signed, claim = sign_spend(spend, charge.epsilon_after, device)
            append_claim(record, claim, signed.device_public_key, signed.device_signature)
            items = [(signed, RoundOutcome.MERGED, f"c{v}"), (_spend("other", 1.1, v), RoundOutcome.MERGED, f"c{v}")]
            led.append_many(ledger_rows(led, items))
    store.close()
    return {"path": path, "key": server_key, "record": record}


def test_device_signed_rows_verify_and_match_the_device_record(tmp_path, capsys):
    d = _device_rounds(tmp_path, 3)
    result = verify_ledger(d["path"], device_records=[d["record"]])
    assert result.ok, result.summary()
    assert result.signed_rows == 3 and result.unsigned_rows == 3
    assert len(read_claims(d["record"])) == 3
    code, out = _cli([str(d["path"]), "--device-record", str(d["record"])], capsys)
    assert code == 0 and "3 signed rows, 3 unsigned" in out


def test_forged_device_row_fails_even_when_the_ledger_is_re_signed(tmp_path):
    d = _device_rounds(tmp_path, 3)
    with Ledger(d["path"]) as led:
        rows = [e.row for e in led.entries()]
    forged = list(rows)
    i = next(k for k, r in enumerate(rows) if r.device_id == "phone" and r.version == 1)
    forged[i] = LedgerRow(**{**rows[i].to_dict(), "noise_multiplier": 3.0})  # claim more noise than was used
    _rewrite(d["path"], d["key"], forged)
    result = verify_ledger(d["path"])
    kinds = {x.kind for x in result.issues}
    assert not result.ok and "device_signature" in kinds
    assert kinds <= {"device_signature"}  # chain, signatures, ε recomputation all pass: only the device objects
    bad = [x.seq for x in result.issues if x.kind == "device_signature"]
    # the forged row, and the device's later row whose cumulative ε now differs from what it signed
    assert bad[0] == i + 1 and len(bad) == 2


def test_device_key_swap_for_one_device_is_flagged(tmp_path):
    d = _device_rounds(tmp_path, 2)
    with Ledger(d["path"], d["key"]) as led:
        spend, _ = sign_spend(_spend("phone", 1.0, 9), 1.0, Ed25519PrivateKey.generate())
        # a row for "phone" validly signed by some other key
        led.append_many(ledger_rows(led, [(spend, RoundOutcome.MERGED, "c9")]))
    result = verify_ledger(d["path"])
    assert "device_key" in {x.kind for x in result.issues}


def test_device_record_reports_missing_and_altered_rows(tmp_path, capsys):
    d = _device_rounds(tmp_path, 3)
    with Ledger(d["path"]) as led:
        rows = [e.row for e in led.entries()]
    phone = [k for k, r in enumerate(rows) if r.device_id == "phone"]
    # the server drops the device's last round entirely (never written: an honest-looking ledger)
    _rewrite(d["path"], d["key"], rows[: phone[-1]] + rows[phone[-1] + 1:])
    result = verify_ledger(d["path"], device_records=[d["record"]])
    findings = [x for x in result.issues if x.kind == "device_record"]
    assert len(findings) == 1 and findings[0].message.startswith("missing") and findings[0].device_id == "phone"
    code, out = _cli([str(d["path"]), "--device-record", str(d["record"])], capsys)
    assert code == 1 and "[device_record]" in out

    # altered: the row keeps the device's signature but states another plan id
    altered = list(rows)
    altered[phone[0]] = LedgerRow(**{**rows[phone[0]].to_dict(), "plan_id": "other-plan"})
    _rewrite(d["path"], d["key"], altered)
    result = verify_ledger(d["path"], device_records=[d["record"]])
    kinds = [x.message.split(":")[0] for x in result.issues if x.kind == "device_record"]
    assert kinds == ["altered"]


def test_tampered_device_record_file_is_reported(tmp_path):
    d = _device_rounds(tmp_path, 2)
    lines = d["record"].read_text().splitlines()
    doc = json.loads(lines[0])
    doc["claim"]["epsilon_total"] = 0.001
    d["record"].write_text("\n".join([json.dumps(doc)] + lines[1:]) + "\n")
    result = verify_ledger(d["path"], device_records=[d["record"]])
    assert any(x.kind == "device_record" and "bad_record_signature" in x.message for x in result.issues)
    d["record"].write_text("not json\n")
    result = verify_ledger(d["path"], device_records=[d["record"]])
    assert any(x.kind == "device_record" and "unreadable" in x.message for x in result.issues)


# -- the key path -------------------------------------------------------------------------------

def test_signing_key_at_any_path_and_no_silent_creation(tmp_path):
    keydir = tmp_path / "secrets"
    keydir.mkdir()
    made = load_or_create_signing_key(keydir / "ledger.key")
    assert (keydir / "ledger.key").stat().st_mode & 0o777 == 0o600
    again = load_signing_key(keydir / "ledger.key")
    assert made.public_key().public_bytes_raw() == again.public_key().public_bytes_raw()
    with pytest.raises(LedgerError, match="does not exist"):
        load_signing_key(tmp_path / "missing.key")
    with pytest.raises(LedgerError, match="does not exist"):
        load_or_create_signing_key(tmp_path / "missing.key", create=False)
    assert not (tmp_path / "missing.key").exists()
    with pytest.raises(LedgerError, match="directory"):
        load_or_create_signing_key(tmp_path / "no-such-dir" / "ledger.key")
    (tmp_path / "short.key").write_bytes(b"x" * 5)
    with pytest.raises(LedgerError, match="32 raw"):
        load_signing_key(tmp_path / "short.key")


def test_a_ledger_from_before_the_optional_columns_still_audits_and_migrates(tmp_path):
    """Rows written without outcome/device columns keep their hashes: an old file audits as
    before, and a writer opening it adds the columns and extends the same chain."""
    key = Ed25519PrivateKey.generate()
    path = tmp_path / "old.db"
    with Ledger(path, key) as led:
        rows = ledger_rows(led, [(_spend("a", 1.0, v), RoundOutcome.MERGED, f"c{v}") for v in range(2)])
        led.append_many([LedgerRow(**{**r.to_dict(), "outcome": None}) for r in rows])
        anchor = led.anchor()
    conn = sqlite3.connect(path)
    for col in ("outcome", "device_public_key", "device_signature"):
        conn.execute(f"ALTER TABLE {ROWS_TABLE} DROP COLUMN {col}")
    conn.commit()
    conn.close()
    before = verify_ledger(path, anchors=[anchor])
    assert before.ok, before.summary()
    with Ledger(path, key) as led:  # a writer migrates the schema
        _grow(led, range(2, 3))
    after = verify_ledger(path, anchors=[anchor])
    assert after.ok and after.n_rows == 4, after.summary()

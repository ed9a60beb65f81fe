"""One spend record, one row builder, one meaning of epsilon_total, and charging in one call."""

from __future__ import annotations

import json
import math
import threading

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ftte.privacy.accountant import AccountantStore, PrivacyStep, compute_epsilon
from ftte.privacy.audit import verify_ledger
from ftte.privacy.budget import BudgetExceededError
from ftte.privacy.ledger import Ledger, LedgerRow, canonical_row_bytes
from ftte.privacy.spend import (
    RoundOutcome,
    SpendRecord,
    ledger_row,
    ledger_rows,
    row_device_signature_ok,
    sign_spend,
)

DELTA = 1e-5


def spend(dev: str, nm: float = 1.0, q: float = 0.05, steps: int = 5, *, version: int = 0) -> SpendRecord:
    return SpendRecord(device_id=dev, plan_id="plan", version=version, step=PrivacyStep(nm, q, steps),
                       max_grad_norm=1.0, delta=DELTA, accountant="rdp", epsilon_max=50.0,
                       rng_source="chacha20:os")


def test_ledger_rows_use_the_ledger_history_and_pass_the_audit(tmp_path):
    """Interleaved devices, several outcomes, written in batches: every epsilon_total equals the
    accountant over that device's ledger rows so far, which is what the audit recomputes."""
    key = Ed25519PrivateKey.generate()
    path = tmp_path / "ledger.db"
    with Ledger(path, key) as led:
        batches = [
            [(spend("a"), RoundOutcome.MERGED, "c1"), (spend("b", 1.3), RoundOutcome.MERGED, "c1")],
            [(spend("a", 0.9), RoundOutcome.ABORTED, "c2"), (spend("a", 1.1), RoundOutcome.UNMERGED, None)],
            [(spend("b"), RoundOutcome.LOST, None), (spend("a"), RoundOutcome.MERGED, "c3")],
        ]
        for batch in batches:
            led.append_many(ledger_rows(led, batch))
        rows = [e.row for e in led.entries()]
    a_steps = [PrivacyStep(r.noise_multiplier, r.sample_rate, r.steps) for r in rows if r.device_id == "a"]
    a_rows = [r for r in rows if r.device_id == "a"]
    for i, r in enumerate(a_rows):
        assert r.epsilon_total == compute_epsilon(a_steps[: i + 1], DELTA, "rdp")
        prev = a_rows[i - 1].epsilon_total if i else 0.0
        assert r.epsilon_round == pytest.approx(r.epsilon_total - prev, abs=1e-15)
    assert [r.outcome for r in rows] == ["merged", "merged", "aborted", "unmerged", "lost", "merged"]
    assert [r.cohort_id for r in rows] == ["c1", "c1", "c2", "unmerged", "lost", "c3"]
    result = verify_ledger(path)
    assert result.ok, result.summary()
    assert result.unsigned_rows == 6 and result.signed_rows == 0


def test_row_builder_rejects_unknown_outcomes_and_old_rows_keep_their_hash():
    row = ledger_row(spend("a"), outcome=RoundOutcome.MERGED, cohort_id="c", epsilon_before=0.0, epsilon_after=1.0)
    assert row.epsilon_round == 1.0 and row.outcome == "merged"
    with pytest.raises(ValueError):
        LedgerRow(**{**row.to_dict(), "outcome": "vanished"})
    # a row without the optional columns encodes exactly as before they existed
    plain = LedgerRow(**{**row.to_dict(), "outcome": None})
    assert b"outcome" not in canonical_row_bytes(1, "0" * 64, plain)
    assert b"device_signature" not in canonical_row_bytes(1, "0" * 64, row)
    # byte for byte the format-1 encoding that existing ledgers were hashed with
    old_fields = {k: v for k, v in plain.to_dict().items()
                  if k not in ("outcome", "device_public_key", "device_signature")}
    old = json.dumps({"format": "ftte.privacy.ledger/1", "seq": 1, "prev_hash": "0" * 64, "row": old_fields},
                     sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True).encode("ascii")
    assert canonical_row_bytes(1, "0" * 64, plain) == old
    inf_row = ledger_row(spend("a", 0.0), outcome=RoundOutcome.MERGED, cohort_id=None, epsilon_before=math.nan,
                         epsilon_after=math.inf)
    assert inf_row.epsilon_round == math.inf and inf_row.cohort_id is None


def test_device_signed_row_verifies_and_a_changed_field_does_not():
    device = Ed25519PrivateKey.generate()
    signed, claim = sign_spend(spend("a"), 0.75, device)
    row = ledger_row(signed, outcome=RoundOutcome.MERGED, cohort_id="c", epsilon_before=0.0, epsilon_after=0.75)
    assert row_device_signature_ok(row) is True
    assert claim.epsilon_total == 0.75
    for change in ({"noise_multiplier": 0.5}, {"epsilon_total": 0.5}, {"delta": 1e-3}, {"steps": 1},
                   {"device_id": "b"}):
        assert row_device_signature_ok(LedgerRow(**{**row.to_dict(), **change})) is False, change
    unsigned = ledger_row(spend("a"), outcome=RoundOutcome.MERGED, cohort_id="c", epsilon_before=0, epsilon_after=1)
    assert row_device_signature_ok(unsigned) is None


def test_charge_registers_and_records_in_one_call(tmp_path):
    store = AccountantStore(tmp_path / "acc.db")
    step = PrivacyStep(1.0, 0.05, 10)
    first = store.charge("d", step, accountant="rdp", delta=DELTA, epsilon_max=10.0)
    assert first.epsilon_before == 0.0
    assert first.epsilon_after == compute_epsilon([step], DELTA, "rdp")
    second = store.charge("d", step, accountant="rdp", delta=DELTA, epsilon_max=10.0, expected_rounds=1)
    assert second.epsilon_before == first.epsilon_after
    assert second.epsilon_after == compute_epsilon([step, step], DELTA, "rdp")
    assert second.state.history == (step, step) and second.round_cost > 0
    assert second.state == store.state("d")  # what charge returns is what it stored
    # a restarted process sees the same history
    store.close()
    again = AccountantStore(tmp_path / "acc.db")
    assert again.history("d") == (step, step)
    with pytest.raises(ValueError, match="registered with"):
        again.charge("d", step, accountant="rdp", delta=1e-6, epsilon_max=10.0)
    with pytest.raises(RuntimeError, match="changed concurrently"):
        again.charge("d", step, accountant="rdp", delta=DELTA, epsilon_max=10.0, expected_rounds=1)
    assert again.history("d") == (step, step)


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_charge_refuses_over_budget_before_recording_anything(tmp_path):
    store = AccountantStore(tmp_path / "acc.db")
    big = PrivacyStep(0.5, 0.5, 50)
    with pytest.raises(BudgetExceededError) as err:
        store.charge("new", big, accountant="rdp", delta=DELTA, epsilon_max=1.0)
    assert err.value.epsilon_spent == 0.0 and err.value.epsilon_after > 1.0
    assert store.state("new") is None  # not even registered
    small = PrivacyStep(5.0, 0.01, 1)
    store.charge("new", small, accountant="rdp", delta=DELTA, epsilon_max=1.0)
    with pytest.raises(BudgetExceededError):
        store.charge("new", big, accountant="rdp", delta=DELTA, epsilon_max=1.0)
    assert store.history("new") == (small,)


def test_concurrent_charges_never_exceed_the_budget(tmp_path):
    """Two processes' stores on one file charge the same device at once: the transaction
    makes check-and-record atomic, so the budget admits exactly as many rounds as fit."""
    path = tmp_path / "acc.db"
    AccountantStore(path).close()
    step = PrivacyStep(1.0, 0.05, 10)
    cap = compute_epsilon([step] * 3, DELTA, "rdp")  # room for exactly 3 rounds
    outcomes: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        store = AccountantStore(path)
        for _ in range(4):
            try:
                store.charge("d", step, accountant="rdp", delta=DELTA, epsilon_max=cap)
                result = "ok"
            except BudgetExceededError:
                result = "refused"
            with lock:
                outcomes.append(result)
        store.close()

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("ok") == 3 and outcomes.count("refused") == 5
    with AccountantStore(path) as store:
        assert len(store.history("d")) == 3


def test_unrecorded_spends_fill_the_ledger_up_to_the_store(tmp_path):
    """A run stopped with rounds charged but not written: the reconciled ledger holds every
    charged round once, and each device's last epsilon_total equals its store's epsilon."""
    from ftte.privacy.spend import unrecorded_spends

    store = AccountantStore(":memory:")
    steps = {"a": [PrivacyStep(1.0, 0.05, 5), PrivacyStep(1.2, 0.05, 5), PrivacyStep(1.0, 0.05, 5)],
             "b": [PrivacyStep(1.1, 0.05, 5)]}
    for dev, ss in steps.items():
        for s in ss:
            store.charge(dev, s, accountant="rdp", delta=DELTA, epsilon_max=50.0)
    path = tmp_path / "ledger.db"
    with Ledger(path, Ed25519PrivateKey.generate()) as led:
        led.append_many(ledger_rows(led, [(spend("a", 1.0), RoundOutcome.MERGED, "c1")]))  # only a's first round
        missing = unrecorded_spends(led, store, plan_id="plan", version=3, max_grad_norm=1.0, epsilon_max=50.0,
                                    rng_source="chacha20:derived-from-run-seed (simulation)")
        assert [(m.device_id, m.step) for m in missing] == [("a", steps["a"][1]), ("a", steps["a"][2]),
                                                            ("b", steps["b"][0])]
        led.append_many(ledger_rows(led, [(m, RoundOutcome.UNMERGED, None) for m in missing]))
        assert unrecorded_spends(led, store, plan_id="plan", version=3, max_grad_norm=1.0, epsilon_max=50.0,
                                 rng_source="x") == []
        for dev in steps:
            assert led.rows_for(dev)[-1].row.epsilon_total == store.epsilon(dev)
    assert verify_ledger(path).ok

"""The accountant store's ``flush`` durability: rounds reach the file in one transaction per flush,
and what the file holds after a flush equals what ``each_write`` would have written."""

from __future__ import annotations

import sqlite3

import pytest
from hypothesis import given, settings, strategies as st

from ftte.privacy.accountant import AccountantStore, PrivacyStep
from ftte.privacy.budget import BudgetExceededError


def disk_rows(path) -> tuple[list[tuple], list[tuple]]:
    conn = sqlite3.connect(path)
    try:
        devices = conn.execute("SELECT device_id, accountant, delta FROM accountant_devices ORDER BY device_id").fetchall()
        steps = conn.execute("SELECT device_id, seq, noise_multiplier, sample_rate, steps, epsilon_total "
                             "FROM accountant_steps ORDER BY device_id, seq").fetchall()
    finally:
        conn.close()
    return devices, steps


def test_rounds_stay_off_disk_until_flush_then_all_land(tmp_path):
    path = tmp_path / "acc.db"
    store = AccountantStore(path, durability="flush")
    try:
        store.charge("a", PrivacyStep(1.0, 0.1, 2), accountant="rdp", delta=1e-5, epsilon_max=100.0)
        store.charge("a", PrivacyStep(1.0, 0.1, 2), accountant="rdp", delta=1e-5, epsilon_max=100.0)
        store.register("b", accountant="rdp", delta=1e-6)
        assert len(store.history("a")) == 2  # the working copy has them
        assert disk_rows(path) == ([], [])  # the file does not, yet
        assert store.unflushed == 4
        assert store.flush() == 4
        assert store.unflushed == 0
        devices, steps = disk_rows(path)
        assert [d[0] for d in devices] == ["a", "b"]
        assert [(s[0], s[1]) for s in steps] == [("a", 1), ("a", 2)]
        assert store.flush() == 0
    finally:
        store.close()
    again = AccountantStore(path, durability="flush")  # loads the file into memory
    try:
        assert again.history("a") == (PrivacyStep(1.0, 0.1, 2),) * 2
        again.charge("a", PrivacyStep(1.0, 0.1, 2), accountant="rdp", delta=1e-5, epsilon_max=100.0)
    finally:
        again.close()  # close flushes
    assert len(disk_rows(path)[1]) == 3


def test_a_refused_charge_leaves_nothing_pending(tmp_path):
    store = AccountantStore(tmp_path / "acc.db", durability="flush")
    try:
        with pytest.raises(BudgetExceededError):  # a new device whose first round is over budget
            store.charge("x", PrivacyStep(0.3, 1.0, 50), accountant="rdp", delta=1e-5, epsilon_max=0.1)
        assert store.unflushed == 0
        assert store.devices() == []
        with pytest.raises(ValueError):  # the same device under another delta
            store.register("y", accountant="rdp", delta=1e-5)
            store.register("y", accountant="rdp", delta=1e-6)
        assert store.unflushed == 1  # only y's first registration
    finally:
        store.close()
    assert [d[0] for d in disk_rows(tmp_path / "acc.db")[0]] == ["y"]


def test_unknown_durability_is_refused(tmp_path):
    with pytest.raises(ValueError, match="durability"):
        AccountantStore(tmp_path / "acc.db", durability="sometimes")


charges = st.lists(st.tuples(st.sampled_from(["d1", "d2", "d3"]), st.sampled_from([0.8, 1.1, 2.0]),
                             st.sampled_from([0.05, 0.2, 1.0]), st.integers(1, 4), st.booleans()),
                   max_size=12)


@settings(max_examples=20, deadline=None)
@given(charges)
def test_flushed_file_equals_the_each_write_file(tmp_path_factory, ops):
    """Same charges (some refused by the budget), flushed at arbitrary points: the file's rows equal
    the eager store's, value for value."""
    root = tmp_path_factory.mktemp("acc")
    eager = AccountantStore(root / "eager.db")
    lazy = AccountantStore(root / "lazy.db", durability="flush")
    try:
        for device, sigma, q, steps, flush_now in ops:
            outcomes = []
            for store in (eager, lazy):
                try:
                    store.charge(device, PrivacyStep(sigma, q, steps), accountant="rdp", delta=1e-5, epsilon_max=30.0)
                    outcomes.append("ok")
                except BudgetExceededError:
                    outcomes.append("refused")
            assert outcomes[0] == outcomes[1]
            if flush_now:
                lazy.flush()
                assert disk_rows(root / "eager.db") == disk_rows(root / "lazy.db")
    finally:
        eager.close()
        lazy.close()
    assert disk_rows(root / "eager.db") == disk_rows(root / "lazy.db")

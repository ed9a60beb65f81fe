"""``[deploy] keep_versions``: the state file keeps the versions resuming and joins need, and no more.

Real SQLite through the server's own :class:`Database`: every commit prunes, in its own
transaction, the weights of versions older than the retention window; history rows, cohort
records and the ledger are never pruned, and a restarted server still finds every version
a join may cite (``max_staleness``).
"""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
from ftte.pipeline.deploy_config import parse_server_config
from ftte.pipeline.journal import CohortCommit, Database
from ftte.pipeline.state import ServerState


def commit(db: Database, version: int) -> None:
    record = {"cohort_id": f"c-{version}", "close_version": version - 1, "applied_version": version}
    db.call_sync(db.commit_cohort, CohortCommit(
        version=version, elapsed_s=float(version), weights=np.full(8, float(version)), velocity=None,
        reference_variance=None, record=record, history_row={"version": version, "elapsed_s": float(version)},
        rounds=()))


def stored(path) -> tuple[list[int], int, int]:
    conn = sqlite3.connect(path)
    try:
        versions = [r[0] for r in conn.execute("SELECT version FROM server_versions ORDER BY version")]
        history = conn.execute("SELECT COUNT(*) FROM server_history").fetchone()[0]
        cohorts = conn.execute("SELECT COUNT(*) FROM server_cohorts").fetchone()[0]
        return versions, history, cohorts
    finally:
        conn.close()


@pytest.mark.parametrize("keep, expected_first", [(5, 26), (1, 30), (0, 0)])
def test_commits_prune_old_versions_and_keep_history(tmp_path, keep, expected_first):
    (tmp_path / "keys").mkdir()
    db = Database(tmp_path / "state.db", tmp_path / "keys" / "ledger.key", keep_versions=keep)
    db.open()
    try:
        db.call_sync(db.commit_initial, np.zeros(8), "plan-x", "{}")
        for v in range(1, 31):
            commit(db, v)
        rec = db.call_sync(db.recover, 4)  # what a restart with max_staleness = 4 loads
    finally:
        db.close()
    versions, history, cohorts = stored(tmp_path / "state.db")
    assert versions == list(range(expected_first, 31))
    assert history == 31 and cohorts == 30  # reports and cohort records are never pruned
    assert rec.checkpoint is not None and rec.checkpoint.version == 30
    np.testing.assert_array_equal(rec.checkpoint.weights, np.full(8, 30.0))
    assert sorted(rec.recent_weights) == [v for v in range(26, 31) if v >= expected_first]


def test_an_aborted_cohort_prunes_nothing(tmp_path):
    state = ServerState(tmp_path / "s.db", keep_versions=2)
    try:
        for v in range(4):
            state.commit_version(version=v, virtual_time_s=0.0, weights=np.zeros(2), velocity=None,
                                 reference_variance=None, cohort=None, history_row={"version": v})
        state.keep_versions = 1
        state.commit_version(version=3, virtual_time_s=0.0, weights=np.zeros(2), velocity=None,
                             reference_variance=None, cohort={"cohort_id": "c-9", "close_version": 3},
                             history_row=None)
        assert state.versions() == [2, 3]
    finally:
        state.close()


@pytest.mark.parametrize("keep, staleness, kept", [(100, 50, 100), (10, 50, 51), (0, 50, 0), (1, 0, 1)])
def test_retention_never_drops_a_version_a_join_may_cite(tmp_path, keep, staleness, kept):
    text = f"""
[server]
buffer_size = 3
[http]
plaintext = true
[deploy]
keep_versions = {keep}
max_staleness = {staleness}
"""
    assert parse_server_config(text, base_dir=tmp_path).deploy.versions_kept == kept

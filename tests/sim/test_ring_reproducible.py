"""A simulation on the SecAgg+ ring repeats exactly, while a device's secure aggregation stays fresh.

The ring order is a hash of the session id (which binds every advertised key) and of every
member's nonce. When simulated members drew those from the OS, each run masked on another
ring: the neighbour ids, shares and pair seeds a member sent changed the message sizes, the
modelled stage times and so the virtual clock (BENCHMARKS.md, "These runs are not exactly
reproducible"). A simulation now derives them, and the devices' identities, from its run seed.
"""

from __future__ import annotations

import math
import pickle
import sqlite3

import numpy as np
import pytest

from ftte.crypto.primitives import Signer
from ftte.crypto.secagg_local import run_session
from ftte.crypto.secagg_member import MemberSession
from ftte.crypto.secagg_session import SessionParams
from ftte.crypto.stages import Stage
from ftte.pipeline.cohort import member_randomness, simulated_identities
from ftte.pipeline.run_outputs import run_one
from ftte.privacy.secure_random import SOURCE_SEED, SecureRandom
from sim_helpers import tiny

# What a ledger row may differ in between two runs: the wall-clock time it was written, and the
# hash chain and signature over it (a new ledger key per run folder). Everything else must repeat.
LEDGER_WALL_COLUMNS = {"timestamp", "prev_hash", "row_hash", "signature"}


def _ring_config(**overrides):
    # 160 devices: member ids from 128 up take one more byte on the wire, so a member's messages
    # grow or shrink with which neighbours the ring gives it (that is what made runs differ).
    base = {"fleet.devices": 160, "server.buffer_size": 12, "secagg.graph": "ring", "secagg.neighbors": 4,
            "run.max_versions": 8, "privacy.unit": "user", "privacy.user_noise": "distributed",
            "server.variance_penalty": 0.0, "privacy.user_participations": 4, "privacy.user_noise_ratio": math.inf}
    base.update(overrides)
    return tiny(**base)


def _ledger_rows(path) -> list[dict]:
    con = sqlite3.connect(path / "ledger.db")
    try:
        con.row_factory = sqlite3.Row
        rows = [dict(r) for r in con.execute("SELECT * FROM privacy_ledger_rows ORDER BY rowid")]
    finally:
        con.close()
    return [{k: v for k, v in r.items() if k not in LEDGER_WALL_COLUMNS} for r in rows]


def _cohort_records(path) -> list[tuple]:
    con = sqlite3.connect(path / "ledger.db")
    try:
        return con.execute("SELECT * FROM server_cohorts ORDER BY rowid").fetchall()
    finally:
        con.close()


def test_the_same_ring_config_run_twice_gives_the_same_history_ledger_and_cohorts(tmp_path):
    cfg = _ring_config()
    first = run_one(cfg, tmp_path / "a", quiet=True)
    second = run_one(cfg, tmp_path / "b", quiet=True)
    assert first.summary["versions"] == cfg.run.max_versions
    # accuracies, virtual times, cohort durations: the whole history row by row
    assert first.history == second.history
    assert [r["virtual_time_s"] for r in first.history] == [r["virtual_time_s"] for r in second.history]
    assert [r["accuracy"] for r in first.history] == [r["accuracy"] for r in second.history]
    assert _cohort_records(tmp_path / "a") == _cohort_records(tmp_path / "b")
    rows = _ledger_rows(tmp_path / "a")
    assert rows and rows == _ledger_rows(tmp_path / "b")
    np.testing.assert_array_equal(first.weights, second.weights)


def _ring_cohort(seed: int | None, *, drop: float):
    """One simulated ring cohort of members 118..137 (ids either side of 128) with distinct bandwidths."""
    from ftte.edge.profile import DeviceProfile
    from ftte.edge.runtime import LocalUpdate
    from ftte.pipeline.cohort import run_cohort
    from ftte.pipeline.fleet import SimDevice
    from ftte.pipeline.partition import derive_rng
    from ftte.pipeline.strategies import cohort_policy
    from ftte.protocol.cohort import plan_cohort

    policy = cohort_policy(tiny(**{"secagg.graph": "ring", "secagg.neighbors": 4, "server.buffer_size": 20,
                                    "fleet.devices": 20}))
    ids = tuple(range(118, 138))
    idents = simulated_identities(0, ids)
    start = plan_cohort(policy, cohort_id="c-9", plan_id="p", model_hash=bytes(32), close_version=5, members=ids,
                        identity_keys=tuple(idents[m].public_key for m in ids), coordinates=16, reference_variance=0.0)
    stages = ("train", "advertise", "share", "upload", "consistency", "unmask")
    updates = []
    for m in ids:
        prof = DeviceProfile(name="x", memory_bytes=1 << 20, compute_speed=1.0, uplink_bps=1e4 + 37.0 * m,
                             downlink_bps=5e4 + 101.0 * m, availability=1.0)
        dev = SimDevice(m, prof, "x", {s: (0.0 if s in ("train", "share") else drop) for s in stages})
        updates.append((dev, LocalUpdate(m, 5, np.full(16, 0.01 * (m - 120), dtype=np.float32), None)))
    run = run_cohort(start, updates, idents, derive_rng(3, "cohort", "c-9"), secure=True, latency_s=0.05, seed=seed)
    return run.duration_s, run.bytes_up, run.result.aborted


@pytest.mark.parametrize("drop", [0.0, 0.1])
def test_a_simulated_ring_cohort_repeats_its_bytes_and_duration_from_the_seed(drop):
    """The cause, at one cohort: with members drawing from the OS the ring, and with it the bytes each
    member sends and the modelled duration, change between two runs of the same cohort; with the run
    seed they repeat."""
    assert _ring_cohort(4, drop=drop) == _ring_cohort(4, drop=drop)
    unseeded = [_ring_cohort(None, drop=drop) for _ in range(3)]
    assert len({tuple(sorted(b.items())) for _, b, _ in unseeded}) > 1


def test_another_seed_masks_on_another_ring(tmp_path):
    """The repeat comes from the seed, not from randomness switched off: another run seed gives the
    members other keys and nonces, so another ring and other message sizes."""
    identities = simulated_identities(0, range(118, 138))  # ids either side of 128
    members = tuple(sorted(identities))
    params = SessionParams(cohort_id="c-1", plan_id="p", model_hash=bytes(32), close_version=0, members=members,
                           identity_keys=tuple(identities[m].public_key for m in members), threshold=11, dim=8,
                           ring_bits=16, graph="ring", neighbors=4)
    inputs = {m: np.full(8, m, dtype=np.uint16) for m in members}

    def bytes_up(seed: int) -> dict:
        result, stats = run_session(params, identities, inputs, randomness=member_randomness(seed, "c-1", members))
        assert result is not None
        return stats.stage_up

    assert bytes_up(0) == bytes_up(0)
    assert any(bytes_up(0) != bytes_up(s) for s in (1, 2, 3))


def test_simulated_keys_come_from_the_run_seed_and_say_so():
    a, b = simulated_identities(7, [3, 4]), simulated_identities(7, [3, 4])
    assert a[3].public_key == b[3].public_key and a[3].public_key != a[4].public_key
    assert simulated_identities(8, [3])[3].public_key != a[3].public_key
    rngs = member_randomness(7, "c-1", [3, 4])
    assert {r.source for r in rngs.values()} == {SOURCE_SEED}
    assert rngs[3].random_bytes(32) != rngs[4].random_bytes(32)


def _advertise(params: SessionParams, member: int, identity: Signer, rng=None):
    return MemberSession(params, member, identity, lambda: np.zeros(params.dim, np.uint16), rng).reply(
        Stage.ADVERTISE, None)


def test_a_device_session_draws_fresh_keys_and_nonce_from_the_os():
    """The device's path (``MemberSession`` without a generator, as ``EdgeClient.aggregate`` builds it):
    two sessions of the same cohort and member advertise different keys and nonce commitments."""
    signers = {m: Signer() for m in range(6)}
    params = SessionParams(cohort_id="c", plan_id="p", model_hash=bytes(32), close_version=0, members=tuple(range(6)),
                           identity_keys=tuple(signers[m].public_key for m in range(6)), threshold=4, dim=4,
                           ring_bits=16, graph="ring", neighbors=2)
    first, second = _advertise(params, 0, signers[0]), _advertise(params, 0, signers[0])
    assert first.nonce_commitment != second.nonce_commitment
    assert first.c_public != second.c_public and first.s_public != second.s_public
    # and a simulation's seeded generator is what makes them repeat
    seeded = [_advertise(params, 0, signers[0], SecureRandom.from_seed(1, "x")) for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_only_an_unused_generator_can_travel_to_a_worker():
    rng = SecureRandom.from_seed(3, "member")
    copy = pickle.loads(pickle.dumps(rng))
    assert copy.source == rng.source == SOURCE_SEED
    assert copy.random_bytes(64) == rng.random_bytes(64)
    with pytest.raises(TypeError, match="drawn"):
        pickle.dumps(rng)

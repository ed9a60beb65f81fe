"""Issue 11 §3 in deployment: the server enforces its privacy policy and records it; every trained round
reaches the ledger exactly once; a device refuses a task below its own privacy floor.

The coordinator is driven in process with real crypto, real SQLite and the real ledger (as in
test_http_units); no HTTP is needed for these rules, which live in the coordinator and the device.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3

import pytest

pytest.importorskip("starlette")

from ftte import wire  # noqa: E402
from ftte.crypto.primitives import Signer  # noqa: E402
from ftte.deploy_messages import SpentRound  # noqa: E402
from ftte.http_auth import member_id  # noqa: E402
from ftte.pipeline.refusal import Refused  # noqa: E402
from ftte.privacy.audit import verify_ledger  # noqa: E402
from ftte.privacy.ledger import Ledger  # noqa: E402
from ftte.protocol.cohort import CohortRefused, DevicePolicy, check_task  # noqa: E402
from coordinator_helpers import Clock, drive_cohort, join_request, make_coordinator, make_task  # noqa: E402


def ledger_rows(path) -> list:
    with Ledger(path) as ledger:
        return [e.row for e in ledger.entries()]


def state_fingerprint(path) -> tuple:
    """Everything a refused join must leave untouched: journal, ledger, cohorts."""
    c = sqlite3.connect(path)
    try:
        return tuple(c.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                     for t in ("deploy_journal", "privacy_ledger_rows", "server_cohorts"))
    finally:
        c.close()


@pytest.mark.parametrize("change,why", [
    (dict(delta=1e-3), "delta"),
    (dict(noise_multiplier=0.2), "noise multiplier"),
    (dict(accountant="prv"), "accountant"),
    (dict(epsilon_max=500.0), "epsilon_max"),
])
def test_a_join_that_breaks_the_policy_is_refused_before_anything_is_stored(tmp_path, change, why):
    signers = [Signer() for _ in range(4)]

    async def scenario():
        coord, db = make_coordinator(tmp_path, signers, Clock())
        await coord.recover()
        await coord.drain()
        before = state_fingerprint(tmp_path / "state.db")
        bad = dataclasses.replace(join_request(coord, 0), **change)
        with pytest.raises(Refused) as refused:
            await coord.join(member_id(signers[0].public_key), bad, wire.encode(bad))
        await coord.drain()
        db.close()
        return refused.value, before

    refused, before = asyncio.run(scenario())
    assert refused.code in ("policy", "dp_mismatch") and why.split()[0] in refused.detail
    assert state_fingerprint(tmp_path / "state.db") == before


def test_a_round_that_would_pass_the_cap_is_refused(tmp_path):
    signers = [Signer() for _ in range(4)]

    async def scenario():
        coord, db = make_coordinator(tmp_path, signers, Clock())
        await coord.recover()
        late = SpentRound(2000, 1.0, 1.0, 1.0, 1e-5)  # a long round already spent takes the device past 100
        bad = dataclasses.replace(join_request(coord, 0), round_seq=2, unreported=((1, wire.encode(late)),))
        with pytest.raises(Refused, match="cap"):
            await coord.join(member_id(signers[0].public_key), bad, wire.encode(bad))
        await coord.drain()
        db.close()

    asyncio.run(scenario())


def test_the_policy_is_written_into_the_ledger_and_audited(tmp_path):
    signers = [Signer() for _ in range(4)]

    async def scenario():
        coord, db = make_coordinator(tmp_path, signers, Clock())
        await coord.recover()
        joins = {member_id(s.public_key): join_request(coord, 0) for s in signers}
        end = await drive_cohort(coord, signers, joins)
        await coord.drain()
        db.close()
        return end, coord.privacy_policy

    end, policy = asyncio.run(scenario())
    assert end.status == "applied"
    with Ledger(tmp_path / "state.db") as ledger:
        assert ledger.policy() == policy
    result = verify_ledger(tmp_path / "state.db")
    assert result.ok, result.summary()


def test_a_replaced_join_and_a_repeated_late_report_each_reach_the_ledger_once(tmp_path):
    """A device that gave up on its join and joined again (its first round was spent), and that died
    after a join was stored but before noting it, so that it reports that round again as late."""
    signers = [Signer() for _ in range(4)]
    members = [member_id(s.public_key) for s in signers]

    async def scenario():
        coord, db = make_coordinator(tmp_path, signers, Clock())
        await coord.recover()
        m0 = members[0]
        first = dataclasses.replace(join_request(coord, 0), round_seq=1, accountant_id=STATE_A)
        await coord.join(m0, first, wire.encode(first))
        # the same device trained again and joins again: round 2 replaces round 1 in the forming cohort
        second = dataclasses.replace(join_request(coord, 0), round_seq=2, sample_rate=0.06, accountant_id=STATE_A)
        joins = {m: join_request(coord, 0) for m in members}
        joins[m0] = second
        end = await drive_cohort(coord, signers, joins)
        assert end.status == "applied"
        # next round: the device (unsure its round 2 was stored) reports it again as late
        late = SpentRound(2, 0.06, 1.0, 1.0, 1e-5)
        third = dataclasses.replace(join_request(coord, 1), round_seq=3, unreported=((2, wire.encode(late)),),
                                    accountant_id=STATE_A)
        joins = {m: join_request(coord, 1) for m in members}
        joins[m0] = third
        end = await drive_cohort(coord, signers, joins)
        assert end.status == "applied"
        await coord.drain()
        db.close()

    asyncio.run(scenario())
    rows = [r for r in ledger_rows(tmp_path / "state.db") if r.device_id == str(members[0])]
    assert [r.sample_rate for r in rows] == [0.05, 0.06, 0.05]  # rounds 1, 2, 3: each once, in order
    assert [r.outcome for r in rows] == ["unmerged", "merged", "merged"]
    assert verify_ledger(tmp_path / "state.db").ok


STATE_A, STATE_B = b"A" * 16, b"B" * 16


def test_a_device_that_lost_its_state_is_not_taken_for_one_repeating_itself(tmp_path):
    """Review F4: a device that keeps its key but starts a fresh accountant counts its rounds from 1
    again; those are new rounds and must all reach the ledger."""
    signers = [Signer() for _ in range(4)]
    members = [member_id(s.public_key) for s in signers]

    async def scenario():
        coord, db = make_coordinator(tmp_path, signers, Clock())
        await coord.recover()
        for version, state in ((0, STATE_A), (1, STATE_B)):  # round 1 of two accountant states
            joins = {m: join_request(coord, version) for m in members}
            joins[members[0]] = dataclasses.replace(joins[members[0]], round_seq=1, accountant_id=state)
            assert (await drive_cohort(coord, signers, joins)).status == "applied"
        await coord.drain()
        db.close()

    asyncio.run(scenario())
    rows = [r for r in ledger_rows(tmp_path / "state.db") if r.device_id == str(members[0])]
    assert len(rows) == 2


def test_a_device_refuses_a_task_below_its_own_privacy_floor():
    """A server that sends delta 0.5 (the review: the device's own check then admitted 35 rounds
    instead of 2) or a tiny noise multiplier is refused by the device, whatever its policy says."""
    check_task(make_task(), DevicePolicy())
    with pytest.raises(CohortRefused, match="delta"):
        check_task(make_task(delta=0.5), DevicePolicy())
    with pytest.raises(CohortRefused, match="noise"):
        check_task(make_task(noise_multiplier=0.05), DevicePolicy())
    with pytest.raises(CohortRefused, match="noise"):  # target mode: the floor it announces counts
        check_task(make_task(target_epsilon=8.0, planned_rounds=10, min_noise_multiplier=0.1), DevicePolicy())
    check_task(make_task(delta=1e-6, noise_multiplier=2.0), DevicePolicy(max_delta=1e-5, min_noise_multiplier=1.0))


def test_every_ledger_row_of_a_signed_device_verifies(tmp_path):
    """Device evidence: a join carrying the device's signature over its spend claim is stored with it;
    the audit verifies it, and a forged signature is caught."""
    from ftte.privacy.spend import SpendClaim, sign_spend, spend_claim_bytes  # noqa: F401
    from ftte.privacy.spend import SpendRecord
    from ftte.privacy.accountant import PrivacyStep, compute_epsilon

    signers = [Signer() for _ in range(4)]
    members = [member_id(s.public_key) for s in signers]

    async def scenario():
        coord, db = make_coordinator(tmp_path, signers, Clock())
        await coord.recover()
        joins = {}
        for s, m in zip(signers, members):
            j = dataclasses.replace(join_request(coord, 0), round_seq=1)
            eps = compute_epsilon([PrivacyStep(j.noise_multiplier, j.sample_rate, j.steps)], j.delta, "rdp")
            spend = SpendRecord(device_id=str(m), plan_id=j.plan_id, version=0,
                                step=PrivacyStep(j.noise_multiplier, j.sample_rate, j.steps), max_grad_norm=1.0,
                                delta=j.delta, accountant="rdp", epsilon_max=j.epsilon_max, rng_source=j.rng_source)
            signed, _ = sign_spend(spend, eps, s)
            sig = bytes.fromhex(signed.device_signature)
            if m == members[1]:
                sig = bytes(64)  # forged
            joins[m] = dataclasses.replace(j, spend_signature=sig)
        end = await drive_cohort(coord, signers, joins)
        await coord.drain()
        db.close()
        return end

    assert asyncio.run(scenario()).status == "applied"
    result = verify_ledger(tmp_path / "state.db")
    assert not result.ok
    assert result.signed_rows == 4
    assert "device_signature" in result.summary()


def _claim(signer, member, j, history, version, rng_source):
    """What a device signs for the last round of ``history`` (its own accountant's view)."""
    from ftte.privacy.accountant import compute_epsilon
    from ftte.privacy.spend import SpendRecord, sign_spend

    step = history[-1]
    spend = SpendRecord(device_id=str(member), plan_id=j.plan_id, version=version, step=step, max_grad_norm=1.0,
                        delta=j.delta, accountant="rdp", epsilon_max=j.epsilon_max, rng_source=rng_source)
    return sign_spend(spend, compute_epsilon(list(history), j.delta, "rdp"), signer)


def test_a_late_round_carries_its_own_signature_and_the_device_record_matches(tmp_path):
    """Review F7: a round whose join was lost is reported late with the signature the device made when it
    trained it, so every row of a signing device is signed and the device's own record matches the ledger."""
    from ftte.privacy.accountant import PrivacyStep
    from ftte.privacy.device_record import append_claim

    signers = [Signer() for _ in range(4)]
    members = [member_id(s.public_key) for s in signers]
    record = tmp_path / "claims.jsonl"

    async def scenario():
        coord, db = make_coordinator(tmp_path, signers, Clock())
        await coord.recover()
        base = join_request(coord, 0)
        r1 = PrivacyStep(base.noise_multiplier, 0.04, base.steps)  # trained, signed, join lost
        r2 = PrivacyStep(base.noise_multiplier, base.sample_rate, base.steps)
        s1, c1 = _claim(signers[0], members[0], base, [r1], 0, "chacha20:os")
        s2, c2 = _claim(signers[0], members[0], base, [r1, r2], 0, "chacha20:os")
        for s, c in ((s1, c1), (s2, c2)):
            append_claim(record, c, s.device_public_key, s.device_signature)
        late = SpentRound(r1.steps, r1.sample_rate, r1.noise_multiplier, 1.0, base.delta, version=0,
                          rng_source="chacha20:os", signature=bytes.fromhex(s1.device_signature))
        joins = {m: join_request(coord, 0) for m in members}
        joins[members[0]] = dataclasses.replace(base, rng_source="chacha20:os", round_seq=2,
                                                unreported=((1, wire.encode(late)),),
                                                spend_signature=bytes.fromhex(s2.device_signature))
        end = await drive_cohort(coord, signers, joins)
        await coord.drain()
        db.close()
        return end

    assert asyncio.run(scenario()).status == "applied"
    result = verify_ledger(tmp_path / "state.db", device_records=[record])
    assert result.ok and result.signed_rows == 2, result.summary()


def test_an_unsigned_row_of_a_signing_device_fails_the_audit(tmp_path):
    """Review F5: an operator who strips a device's signature from one row (to lower its epsilon
    unnoticed) leaves an unsigned row among that device's signed rows: the audit fails."""
    from ftte.privacy.accountant import PrivacyStep
    from ftte.privacy.ledger import load_or_create_signing_key
    from ftte.privacy.spend import RoundOutcome, SpendRecord, ledger_rows, sign_spend
    from ftte.privacy.accountant import compute_epsilon

    device = Signer()
    steps = [PrivacyStep(1.0, 0.05, 2), PrivacyStep(1.0, 0.05, 2)]
    with Ledger(tmp_path / "l.db", load_or_create_signing_key(tmp_path / "k")) as ledger:
        for i, step in enumerate(steps):
            spend = SpendRecord(device_id="7", plan_id="p", version=i, step=step, max_grad_norm=1.0, delta=1e-5,
                                accountant="rdp", epsilon_max=10.0, rng_source="chacha20:os")
            if i == 0:
                spend, _ = sign_spend(spend, compute_epsilon(steps[:1], 1e-5, "rdp"), device)
            ledger.append_many(ledger_rows(ledger, [(spend, RoundOutcome.MERGED, "c")]))
    result = verify_ledger(tmp_path / "l.db")
    assert not result.ok and "unsigned row of a device that signs" in result.summary()


def test_a_device_with_a_running_cohort_cannot_join_another(tmp_path):
    """One running cohort per device keeps its rounds in the ledger in its own order (the cumulative
    epsilon it signs assumes it): a second join while its cohort aggregates is refused (409, busy)."""
    from ftte.deploy_messages import PollRequest
    from ftte.pipeline.http_errors import http_status

    signers = [Signer() for _ in range(4)]
    members = [member_id(s.public_key) for s in signers]

    async def scenario():
        coord, db = make_coordinator(tmp_path, signers, Clock())
        await coord.recover()
        for m in members:
            j = join_request(coord, 0)
            cid = (await coord.join(m, j, wire.encode(j))).cohort_id
        start = await coord.poll(members[0], PollRequest(cid, 0), wait_s=5)
        assert start.members == tuple(sorted(members))  # the cohort is running
        again = dataclasses.replace(join_request(coord, 0), sample_rate=0.07)
        with pytest.raises(Refused) as refused:
            await coord.join(members[0], again, wire.encode(again))
        await coord.drain()
        db.close()
        return refused.value

    refused = asyncio.run(scenario())
    assert refused.code == "busy" and http_status(refused) == 409


def test_an_edge_client_takes_its_floors_from_the_device_policy(tmp_path):
    """The device's floors have one home (DevicePolicy): the client and ``ftte edge`` only override them."""
    import numpy as np

    from ftte.edge.http_client import EdgeClient

    x, y = np.zeros((4, 64), np.float32), np.arange(4) % 2
    with EdgeClient("https://127.0.0.1:1", Signer(), x, y, state_dir=tmp_path / "a") as client:
        assert client.policy == DevicePolicy()
    with EdgeClient("https://127.0.0.1:1", Signer(), x, y, state_dir=tmp_path / "b", min_members=5) as client:
        assert client.policy.min_members == 5 and client.policy.max_corrupt == DevicePolicy().max_corrupt

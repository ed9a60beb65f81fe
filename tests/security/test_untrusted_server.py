"""Issue 10, findings 2-4: a malicious server (with up to ``max_corrupt`` colluding members) against the real code.

Each test performs the attack the review demonstrated, with real keys, real masks, real
Shamir shares and every message encoded, and shows it refused; the honest cohort still
completes where it can.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ftte.crypto.primitives import Signer
from ftte.crypto.secagg_local import run_session
from ftte.crypto.secagg_member import MemberSession
from ftte.crypto.secagg_server import SecAggServer
from ftte import wire
from ftte.secagg_messages import Roster
from ftte.crypto.secagg_session import ReplayError, SessionAborted
from ftte.crypto.stages import Stage
from ftte.deploy_messages import CohortStart
from ftte.pipeline.merge import ServerOptimizer
from ftte.pipeline.server_model import CohortResult, CohortSum, ServerModel
from ftte.protocol.cohort import (
    CohortPolicy,
    CohortRefused,
    DevicePolicy,
    check_cohort,
    check_own_weight,
    check_task,
    codec_for,
    plan_cohort,
    reference_of,
    session_params,
    weight_rule,
)
from ftte.protocol.encoding import weigh_update
from ftte.protocol.weighting import WeightRule

from coordinator_helpers import CLIP, D, RULE, make_task  # noqa: E402


def cohort(n: int, signers: dict[int, Signer], *, max_corrupt: int = 1, version: int = 5,
           reference: float | None = None) -> CohortStart:
    policy = CohortPolicy(graph="full", neighbors=4, threshold=0, value_bits=12, clip=CLIP, rule=RULE,
                          max_corrupt=max_corrupt)
    members = tuple(sorted(signers))
    return plan_cohort(policy, cohort_id="c-1", plan_id="p", model_hash=bytes(32), close_version=version,
                       members=members, identity_keys=tuple(signers[m].public_key for m in members), coordinates=D,
                       reference_variance=reference)


def encode_for(start: CohortStart, delta: np.ndarray, base_version: int, rng) -> np.ndarray:
    w = weigh_update(delta, base_version, start.close_version, reference_of(start), weight_rule(start), start.clip)
    return codec_for(start).encode(w.weighted, w.weight, w.variance, rng)


def forwarded_roster_session(starts: dict[int, CohortStart], signers, inputs) -> dict[int, str]:
    """A malicious server that forwards every advertisement to every member, each under the context
    that member expects, so that a member shown other terms would still be in the same sum."""
    members = {m: MemberSession(session_params(starts[m]), m, signers[m], lambda m=m: inputs[m]) for m in starts}
    adverts = {m: members[m].reply(Stage.ADVERTISE, None) for m in members}
    outcome: dict[int, str] = {}
    for m in members:
        roster = Roster(session_params(starts[m]).context(), tuple((k, wire.encode(adverts[k])) for k in sorted(adverts)))
        try:
            members[m].reply(Stage.SHARE, roster)
            outcome[m] = "shared"
        except (ReplayError, SessionAborted) as exc:
            outcome[m] = type(exc).__name__
    return outcome


def test_a_member_shown_other_weighting_terms_is_never_summed_with_the_others():
    """Finding 2: the server gives one member a different reference variance and r_min (the review's
    lever to weigh the others' updates down to 0). With the terms bound into the signed context, a
    server forwarding every advertisement gets every member to refuse before sharing anything; a server
    that keeps the target apart runs a session without it, in which the target never uploads."""
    signers = {m: Signer() for m in range(10)}
    rng = np.random.default_rng(0)
    honest = cohort(10, signers, reference=1e-3)
    target = 7
    skewed = dataclasses.replace(honest, reference_variance=1e-9, r_min=1.0)
    assert session_params(honest).context() != session_params(skewed).context()
    starts = {m: (skewed if m == target else honest) for m in signers}
    inputs = {m: encode_for(starts[m], rng.normal(size=D) * 0.05, 5, rng) for m in signers}
    outcome = forwarded_roster_session(starts, signers, inputs)
    assert outcome == {m: "ReplayError" for m in signers}, outcome
    # without the binding (both starts under one context) the same roster would have been accepted
    unbound = {m: honest for m in signers}
    assert set(forwarded_roster_session(unbound, signers, inputs).values()) == {"shared"}
    # the honest session machine refuses the target's advertisement and completes without it
    server = SecAggServer(session_params(honest))
    with pytest.raises(ReplayError):
        server.receive(MemberSession(session_params(skewed), target, signers[target], lambda: inputs[target])
                       .reply(Stage.ADVERTISE, None))
    others = {m: s for m, s in signers.items() if m != target}
    result, _ = run_session(session_params(honest), signers, inputs, drop={target: "advertise"})
    assert result is not None and target not in result.survivors and len(result.survivors) == len(others)


def test_the_device_refuses_terms_that_differ_from_the_task_or_leave_its_policy():
    """Finding 2: terms come from the task (fixed per deployment), bounded by the device's own policy."""
    signers = {m: Signer() for m in range(4)}
    task, policy = make_task(), DevicePolicy()
    start = cohort(4, signers)
    args = dict(member=0, identity_key=signers[0].public_key, plan_id="p", base_version=5, coordinates=D)
    check_task(task, policy)
    check_cohort(start, task, policy, **args)
    for field, value in [("staleness_exponent", 3.0), ("r_min", 0.5), ("clip", 20.0), ("variance_penalty", 9.0),
                         ("value_bits", 16)]:
        with pytest.raises(CohortRefused, match="differ from the task"):
            check_cohort(dataclasses.replace(start, **{field: value}), task, policy, **args)
    with pytest.raises(CohortRefused, match="reference variance"):  # no clipped update has this variance
        check_cohort(dataclasses.replace(start, reference_variance=CLIP**2), task, policy, **args)
    for bad in [make_task(staleness_exponent=100.0), make_task(r_min=1e-38), make_task(max_corrupt=0)]:
        with pytest.raises(CohortRefused):
            check_task(bad, policy)


def test_stale_honest_members_cannot_be_weighted_out_of_the_sum():
    """Finding 2, the review's isolation: every other member's weight driven to ~0 so that the sum
    equals the target's update. Honest members refuse to contribute with a vanishing weight, and
    the target alone (with the colluder the threshold allows) is below T: the session aborts."""
    signers = {m: Signer() for m in range(10)}
    target = 3
    a_max = DevicePolicy().max_staleness_exponent
    start = dataclasses.replace(cohort(10, signers, version=200), staleness_exponent=a_max)
    bases = {m: (200 if m == target else 0) for m in signers}  # the server picked stale members around the target
    refused = []
    for m in signers:
        w = weigh_update(np.full(D, 0.01), bases[m], start.close_version, None, weight_rule(start), CLIP)
        try:
            check_own_weight(w.weight, DevicePolicy())
        except CohortRefused:
            refused.append(m)
    assert sorted(refused) == sorted(set(signers) - {target})
    rng = np.random.default_rng(1)
    inputs = {m: encode_for(start, rng.normal(size=D) * 0.05, bases[m], rng) for m in signers}
    result, stats = run_session(session_params(start), signers, inputs, drop={m: "advertise" for m in refused})
    assert result is None and "threshold" in stats.aborted


def test_a_threshold_that_ignores_colluders_is_refused_and_the_planner_never_makes_one():
    """Finding 3: n=5 with T=3 lets one colluder show two survivor lists; the device (assuming one
    colluder) refuses it, and the planner picks T=4 for the same cohort."""
    signers = {m: Signer() for m in range(5)}
    start = cohort(5, signers, max_corrupt=1)
    assert start.threshold == 4 and start.max_corrupt == 1
    weak = cohort(5, signers, max_corrupt=0)
    assert weak.threshold == 3
    args = dict(member=0, identity_key=signers[0].public_key, plan_id="p", base_version=5, coordinates=D)
    check_cohort(start, make_task(), DevicePolicy(), **args)
    with pytest.raises(CohortRefused, match="colluding"):
        check_cohort(weak, make_task(max_corrupt=0), DevicePolicy(max_corrupt=1), **args)
    with pytest.raises(CohortRefused, match="colluding"):  # a start that claims the colluder but keeps T=3
        check_cohort(dataclasses.replace(weak, max_corrupt=1), make_task(), DevicePolicy(), **args)


def malicious_cohort(start: CohortStart, signers, rng, *, weight_sum_quanta: int | None = None,
                     push_levels: float = 0.0, variance_levels: float | None = None) -> CohortResult:
    """Member 0 crafts its ring vector by hand (any ring element: no range proofs); the others are
    honest. ``weight_sum_quanta`` sets member 0's weight so that the whole cohort's Σw is that many
    quanta; ``push_levels`` puts every coordinate that many quantisation levels (of an honest value's
    range) out; ``variance_levels`` does the same for the variance coordinate. Real secure aggregation."""
    codec = codec_for(start)
    q = codec.quantizer
    top = 2 ** (start.value_bits - 1) - 1
    inputs = {m: encode_for(start, rng.normal(size=D) * 0.05, start.close_version, rng) for m in signers if m}
    signed = q.to_signed(encode_for(start, rng.normal(size=D) * 0.05, start.close_version, rng))
    others = sum(q.to_signed(v) for v in inputs.values())
    if push_levels:
        signed[:D] = int(push_levels * top)
    if weight_sum_quanta is not None:
        signed[D] = weight_sum_quanta - others[D]
    if variance_levels is not None:
        signed[D + 1] = int(variance_levels * top)
    inputs[0] = q.to_ring(signed)
    result, _ = run_session(session_params(start), signers, inputs)
    assert result is not None
    wsum_vec, wsum, vsum = codec.decode_sum(result.total, len(result.survivors))
    total = CohortSum(result.survivors, wsum_vec, wsum, vsum)
    staleness = {m: 0 for m in signers}
    return CohortResult(start.cohort_id, start.close_version, start.members, {}, staleness, 1.0, total, "", start)


ATTACKS = {
    "weight_sum_of_one_quantum": dict(weight_sum_quanta=1, push_levels=1.0),
    "coordinates_at_the_ring_edge": dict(push_levels=10.0),
    "variance_beyond_any_clipped_update": dict(variance_levels=10.0),
    "negative_variance": dict(variance_levels=-10.0),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_one_member_cannot_move_the_model_or_the_reference_without_bound(attack):
    """Finding 4: Σw of one quantum (the review's merged step of norm 7e4), coordinates far beyond a
    clipped update, or a variance coordinate that would steer the next cohort's reference: the
    server core refuses the cohort and merges nothing."""
    signers = {m: Signer() for m in range(6)}
    start = cohort(6, signers)
    rng = np.random.default_rng(2)
    model = ServerModel("p", np.zeros(D), ServerOptimizer(1.0, 0.0), version=start.close_version)
    honest = malicious_cohort(start, signers, rng)  # nothing crafted: member 0 is honest too
    assert model.propose(honest, now=1.0).applied
    crafted = malicious_cohort(start, signers, rng, **ATTACKS[attack])
    unchecked = dataclasses.replace(crafted, start=None)  # the same sum without the cohort's limits
    step = model.propose(unchecked, now=1.0)
    if attack.startswith("weight") or attack.startswith("coord"):
        assert np.linalg.norm(step.state.weights) > CLIP  # what the attack would have done
    applied = model.propose(crafted, now=1.0)
    assert not applied.applied and applied.record.aborted, attack
    assert model.version == start.close_version  # nothing merged


def test_a_malicious_member_inside_the_limits_moves_the_model_at_most_one_clip():
    """The residual risk, measured: without range proofs a member may send any vector the limits
    admit; the merged step then stays within the clip norm, as for an honest cohort."""
    signers = {m: Signer() for m in range(6)}
    start = cohort(6, signers)
    rng = np.random.default_rng(3)
    model = ServerModel("p", np.zeros(D), ServerOptimizer(1.0, 0.0), version=start.close_version)
    crafted = malicious_cohort(start, signers, rng, push_levels=1.0)  # every coordinate at an honest maximum
    applied = model.propose(crafted, now=1.0)
    assert applied.applied
    assert np.linalg.norm(applied.state.weights) <= CLIP * 1.01


def test_a_server_that_claims_huge_staleness_cannot_weigh_the_others_out():
    """Review F1: the server labels versions, so it picks each member's staleness. A member told it is
    990,000 versions stale (or stale enough that its weight falls below its floor) refuses, so the
    cohort of three with one colluder never forms around the victim's update."""
    signers = {m: Signer() for m in range(3)}
    start = cohort(3, signers, version=990_000)
    args = dict(identity_key=None, plan_id="p", coordinates=D)
    with pytest.raises(CohortRefused, match="staleness"):
        check_cohort(start, make_task(), DevicePolicy(), **{**args, "member": 1,
                     "identity_key": signers[1].public_key}, base_version=0)
    # inside the staleness cap, the weight floor holds: a = 1 at 50 versions is below 0.05
    w = weigh_update(np.full(D, 0.01), 0, 50, None, WeightRule(1.0, 1.0, 0.25), CLIP)
    with pytest.raises(CohortRefused, match="weight"):
        check_own_weight(w.weight, DevicePolicy())


def test_a_reference_variance_at_the_edge_of_the_slack_never_stops_training():
    """Review F2: a member sets its variance coordinate so the sum sits just inside the slack; the
    adopted reference is held to [0, clip²/d], so honest devices accept the next cohort."""
    signers = {m: Signer() for m in range(6)}
    start = cohort(6, signers)
    rng = np.random.default_rng(5)
    model = ServerModel("p", np.zeros(D), ServerOptimizer(1.0, 0.0), version=start.close_version)
    crafted = malicious_cohort(start, signers, rng, variance_levels=1.0)  # every member at the honest maximum
    total = dataclasses.replace(crafted.total, variance_sum=crafted.total.variance_sum * 1.0004)
    applied = model.propose(dataclasses.replace(crafted, total=total), now=1.0)
    assert applied.applied
    assert 0.0 <= applied.state.reference_variance <= CLIP**2 / D
    model.adopt(applied)
    nxt = cohort(6, signers, version=model.version, reference=model.reference_variance)
    check_cohort(nxt, make_task(), DevicePolicy(), member=0, identity_key=signers[0].public_key, plan_id="p",
                 base_version=model.version, coordinates=D)


def test_tiny_honest_weights_cannot_turn_the_slack_into_a_long_step():
    """Review F3: with a = 2, r_min = 0.1 and staleness 25 the honest weights are near the quantisation
    slack; a member that makes the weight sum one or two quanta is refused, or its step held to one clip."""
    signers = {m: Signer() for m in range(6)}
    start = dataclasses.replace(cohort(6, signers, version=25), staleness_exponent=2.0, r_min=0.1)
    rng = np.random.default_rng(6)
    model = ServerModel("p", np.zeros(D), ServerOptimizer(1.0, 0.0), version=start.close_version)
    crafted = malicious_cohort(start, signers, rng, weight_sum_quanta=2, push_levels=1.0)
    crafted = dataclasses.replace(crafted, staleness={m: 25 for m in signers})
    applied = model.propose(crafted, now=1.0)
    assert not applied.applied or np.linalg.norm(applied.state.weights) <= CLIP * (1 + 1e-9)

"""The secure-aggregation protocol: exact sums, dropouts at every stage, aborts, rejections."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from scipy import stats

from secagg_helpers import make_params, random_inputs, ring_sum, signer
from ftte import wire
from ftte.crypto.prg import expand_mask, pairwise_seed
from ftte.crypto.secagg_client import SecAggClient, sign_message
from ftte.crypto.secagg_local import STAGES, run_session
from ftte.crypto.secagg_server import SecAggServer, ServerStage
from ftte.crypto.secagg_session import (
    ConfigError,
    MemberError,
    ReplayError,
    SecAggError,
    SessionAborted,
    ShapeError,
    SignatureError,
    session_id,
)
from ftte.secagg_messages import (
    ConsistencyBundle,
    ShareDelivery,
    SurvivorList,
    UnmaskShares,
)


def identities_for(params):
    return {m: signer(m) for m in params.members}


# --- exact sums ---------------------------------------------------------------------------

@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_unmasked_sum_is_exact_ring_sum(data):
    n = data.draw(st.integers(3, 12), label="n")
    graph = data.draw(st.sampled_from(["full", "ring"]), label="graph")
    bits = data.draw(st.sampled_from([16, 32]), label="bits")
    dim = data.draw(st.integers(1, 300), label="dim")
    if graph == "ring":
        neighbors = data.draw(st.sampled_from([k for k in range(2, n, 2)]), label="k")
        threshold = data.draw(st.integers(n // 2 + 1, n), label="T")
        params = make_params(n, threshold=threshold, dim=dim, bits=bits, graph="ring", neighbors=neighbors)
    else:
        threshold = data.draw(st.integers(n // 2 + 1, n), label="T")
        params = make_params(n, threshold=max(threshold, 2), dim=dim, bits=bits)
    inputs = random_inputs(params, seed=data.draw(st.integers(0, 1000)))
    # drop up to n - T members after they shared keys, so their pairwise masks must be removed
    n_drop = data.draw(st.integers(0, n - params.threshold), label="drops")
    drop = {m: "upload" for m in data.draw(st.permutations(params.members))[:n_drop]}
    result, st_ = run_session(params, identities_for(params), inputs, drop)
    if result is None:
        # only the ring graph may fail to recover a member whose neighbourhood lost its majority
        assert graph == "ring" and "shares" in st_.aborted
        return
    assert result.survivors == tuple(m for m in params.members if m not in drop)
    assert result.dropped == tuple(sorted(drop))
    assert np.array_equal(result.total, ring_sum(inputs, result.survivors, bits))


# --- dropouts at every stage ----------------------------------------------------------------

@pytest.mark.parametrize("graph,neighbors", [("full", 0), ("ring", 6)])
@pytest.mark.parametrize("stage", STAGES)
def test_dropouts_up_to_n_minus_t_at_each_stage(stage, graph, neighbors):
    n, t = 9, 6
    params = make_params(n, threshold=t, dim=50, graph=graph, neighbors=neighbors)
    inputs = random_inputs(params, 3)
    drop = {m: stage for m in (1, 4, 7)}  # n - T = 3
    result, st_ = run_session(params, identities_for(params), inputs, drop)
    if graph == "ring" and stage == "share":
        # the ring order needs every advertised member's nonce: a member that drops between
        # advertising and sharing keys aborts a ring session (see secagg_session's docstring)
        assert result is None and "ring order" in st_.aborted
        return
    if graph == "ring" and result is None:
        pytest.fail(f"ring session aborted: {st_.aborted}")
    assert result is not None, st_.aborted
    in_sum = [m for m in params.members if m not in drop or stage in ("consistency", "unmask")]
    assert list(result.survivors) == in_sum
    assert np.array_equal(result.total, ring_sum(inputs, in_sum, 16))


@pytest.mark.parametrize("stage", STAGES)
def test_below_threshold_aborts_and_server_holds_nothing(stage):
    n, t = 7, 4
    params = make_params(n, threshold=t, dim=40)
    inputs = random_inputs(params, 5)
    drop = {m: stage for m in range(n - t + 1)}  # one more than tolerated
    seen: list[SecAggServer] = []
    original_init = SecAggServer.__init__

    def spy(self, p):
        original_init(self, p)
        seen.append(self)

    SecAggServer.__init__ = spy  # observe the real server's state after the abort
    try:
        result, st_ = run_session(params, identities_for(params), inputs, drop)
    finally:
        SecAggServer.__init__ = original_init
    assert result is None and "threshold" in st_.aborted
    server = seen[0]
    assert server.stage is ServerStage.ABORTED
    assert server.masked == {} and server.unmask_msgs == {} and server.share_msgs == {}
    assert server.result is None


# --- masks look uniform and are bound to their session -------------------------------------------

def test_single_masked_vector_is_indistinguishable_from_uniform():
    params = make_params(3, threshold=2, dim=100_000)
    inputs = {m: np.zeros(params.dim, np.uint16) for m in params.members}  # worst case: constant input
    server = SecAggServer(params)
    clients = {m: SecAggClient(params, m, signer(m)) for m in params.members}
    for m in params.members:
        server.receive(clients[m].advertise())
    roster = server.close_advertise()
    for m in params.members:
        server.receive(clients[m].share_keys(roster))
    deliveries = server.close_share()
    masked = clients[0].masked_input(deliveries[0], inputs[0]).vector
    for shift in (0, 8):  # low and high byte over 256 buckets each
        counts = np.bincount(((masked >> shift) & 0xFF).astype(np.int64), minlength=256)
        assert stats.chisquare(counts).pvalue > 1e-4
    assert stats.chisquare(np.bincount((masked >> 12).astype(np.int64), minlength=16)).pvalue > 1e-4


def test_pairwise_masks_cancel_only_within_their_session():
    secret = b"\x07" * 32
    a = expand_mask(pairwise_seed(secret, b"A" * 32, 1, 2), 10_000, 16)
    b = expand_mask(pairwise_seed(secret, b"B" * 32, 1, 2), 10_000, 16)
    assert not np.any(a - expand_mask(pairwise_seed(secret, b"A" * 32, 2, 1), 10_000, 16))  # cancels
    diff = a - b  # +mask in one session, -mask in another: a uniform residue, not zero
    assert np.count_nonzero(diff) > 9_900
    assert stats.chisquare(np.bincount((diff >> 8).astype(np.int64), minlength=256)).pvalue > 1e-4


@pytest.mark.parametrize(
    "change",
    [dict(cohort="other"), dict(version=2), dict(members=(0, 1, 2, 3, 5))],
)
def test_session_context_binds_cohort_members_and_version(change):
    base = make_params(5, threshold=3)
    other = make_params(5, threshold=3, **change)
    assert base.context() != other.context()
    roster = {m: (bytes([m]) * 32, bytes([m + 1]) * 32) for m in range(5)}
    assert session_id(base.context(), roster) != session_id(other.context(), roster)
    assert session_id(base.context(), roster) != session_id(base.context(), {**roster, 0: (b"x" * 32, b"y" * 32)})


# --- configuration validation -------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(threshold=1), "threshold"),
        (dict(threshold=3), "exceed"),  # 2T <= n: two disjoint groups could unmask both kinds
        (dict(threshold=7), "threshold"),
        (dict(graph="ring", neighbors=3, threshold=4), "even"),
        (dict(graph="ring", neighbors=6, threshold=4), "even"),
        (dict(graph="ring", neighbors=2, threshold=3), "exceed"),  # 2T > n holds for the ring too
        (dict(threshold=4, max_corrupt=2), "max_corrupt"),  # 2T must exceed n + colluders
        (dict(graph="star", threshold=4), "graph"),
        (dict(bits=8, threshold=4), "ring bits"),
    ],
)
def test_unsafe_or_impossible_settings_are_refused(kwargs, match):
    with pytest.raises((ConfigError, ValueError), match=match):
        make_params(6, **kwargs)


# --- rejections leave the session intact -----------------------------------------------------------

class Harness:
    """Steps one session by hand so that tests can inject messages between stages."""

    def __init__(self, n=5, t=3, dim=20, cohort="c", version=1):
        self.params = make_params(n, threshold=t, dim=dim, cohort=cohort, version=version)
        self.inputs = random_inputs(self.params, 11)
        self.server = SecAggServer(self.params)
        self.clients = {m: SecAggClient(self.params, m, signer(m)) for m in self.params.members}

    def advertise(self):
        self.adverts = {m: c.advertise() for m, c in self.clients.items()}
        for msg in self.adverts.values():
            self.server.receive(msg)
        self.roster = self.server.close_advertise()

    def share(self):
        self.shares = {m: c.share_keys(self.roster) for m, c in self.clients.items()}
        for msg in self.shares.values():
            self.server.receive(msg)
        self.deliveries = self.server.close_share()

    def upload(self, skip=()):
        self.masked = {m: c.masked_input(self.deliveries[m], self.inputs[m]) for m, c in self.clients.items()}
        for m, msg in self.masked.items():
            if m not in skip:
                self.server.receive(msg)
        self.survivors = self.server.close_upload()

    def finish(self):
        live = self.survivors.survivors
        for m in live:
            self.server.receive(self.clients[m].consistency(self.survivors))
        bundle = self.server.close_consistency()
        for m in live:
            self.server.receive(self.clients[m].unmask(bundle))
        result = self.server.finish()
        assert np.array_equal(result.total, ring_sum(self.inputs, live, 16))
        return result


def test_replayed_message_from_another_session_is_rejected_and_session_completes():
    old = Harness(cohort="old")
    old.advertise(); old.share(); old.upload()
    h = Harness(cohort="new")
    with pytest.raises(ReplayError):
        h.server.receive(old.adverts[0])  # advertisement bound to another cohort context
    h.advertise(); h.share()
    with pytest.raises(ReplayError):
        h.server.receive(old.masked[0])  # wrong stage and wrong session
    h.upload()
    with pytest.raises(ReplayError):
        h.server.receive(old.masked[1])
    h.finish()


def test_replay_across_versions_of_the_same_cohort_is_rejected():
    a = Harness(version=1)
    a.advertise(); a.share(); a.upload()
    b = Harness(version=2)
    b.advertise(); b.share()
    forged = dataclasses.replace(a.masked[0], session=b.server.session)  # relabelled: signature breaks
    with pytest.raises(SignatureError):
        b.server.receive(forged)
    b.upload()
    b.finish()


def test_tampered_vector_and_bad_signature_are_rejected_then_honest_upload_accepted():
    h = Harness()
    h.advertise(); h.share()
    honest = h.clients[2].masked_input(h.deliveries[2], h.inputs[2])
    tampered_vec = honest.vector.copy()
    tampered_vec[0] ^= 1
    with pytest.raises(SignatureError):
        h.server.receive(dataclasses.replace(honest, vector=tampered_vec))
    with pytest.raises(SignatureError):
        h.server.receive(sign_message(signer(3), honest))  # signed by someone else
    assert 2 not in h.server.masked
    h.server.receive(honest)
    with pytest.raises(MemberError, match="second"):
        h.server.receive(honest)
    for m in (0, 1, 3, 4):
        h.server.receive(h.clients[m].masked_input(h.deliveries[m], h.inputs[m]))
    h.survivors = h.server.close_upload()
    h.finish()


def test_wrong_length_dtype_and_unknown_member_are_rejected():
    h = Harness()
    h.advertise(); h.share()
    good = h.clients[0].masked_input(h.deliveries[0], h.inputs[0])
    for bad_vec in (good.vector[:-1], good.vector.astype(np.uint32)):
        forged = sign_message(signer(0), dataclasses.replace(good, vector=bad_vec))
        with pytest.raises(ShapeError):
            h.server.receive(forged)
    stranger = sign_message(signer(42), dataclasses.replace(good, member=42))
    with pytest.raises(MemberError, match="unknown"):
        h.server.receive(stranger)
    with pytest.raises(ShapeError):
        h.clients[1].masked_input(h.deliveries[1], h.inputs[1][:-1])  # the client checks its own input too
    h.server.receive(good)
    for m in (1, 2, 3, 4):
        h.server.receive(h.clients[m].masked_input(h.deliveries[m], h.inputs[m]))
    h.survivors = h.server.close_upload()
    h.finish()


def test_client_rejects_forged_roster_ciphertext_and_consistency_signature():
    h = Harness()
    h.advertise()
    # forged advertisement: member 1's keys re-signed by member 2
    forged_adv = sign_message(signer(2), h.adverts[1])
    bad_roster = dataclasses.replace(
        h.roster, adverts=tuple((m, wire.encode(forged_adv) if m == 1 else blob) for m, blob in h.roster.adverts)
    )
    with pytest.raises(SignatureError):
        h.clients[0].share_keys(bad_roster)
    h.share()  # the same client still proceeds with the honest roster
    # (a tampered ciphertext no longer rejects the whole delivery: see test_secagg_robust.py)
    h.upload()
    live = h.survivors.survivors
    sigs = {m: h.clients[m].consistency(h.survivors) for m in live}
    for msg in sigs.values():
        h.server.receive(msg)
    bundle = h.server.close_consistency()
    forged_bundle = ConsistencyBundle(bundle.session, ((0, bytes(64)),) + bundle.signatures[1:])
    with pytest.raises(SignatureError):
        h.clients[1].unmask(forged_bundle)
    for m in live:
        h.server.receive(h.clients[m].unmask(bundle))
    result = h.server.finish()
    assert np.array_equal(result.total, ring_sum(h.inputs, live, 16))


def test_client_never_releases_both_share_kinds():
    h = Harness(n=5, t=3)
    h.advertise(); h.share(); h.upload(skip=(4,))
    live = h.survivors.survivors
    for m in live:
        h.server.receive(h.clients[m].consistency(h.survivors))
    bundle = h.server.close_consistency()
    replies = {m: h.clients[m].unmask(bundle) for m in live}
    for m, reply in replies.items():
        seed_owners = {o for o, _ in reply.seed_shares}
        key_owners = {o for o, _ in reply.key_shares}
        assert not seed_owners & key_owners
        assert key_owners == {4} and 4 not in seed_owners
    with pytest.raises(ReplayError):
        h.clients[0].unmask(bundle)  # a second unmask request gets nothing
    # a malicious holder that sends both kinds is refused by the server
    both = sign_message(
        signer(0),
        UnmaskShares(replies[0].session, 0, replies[0].seed_shares, replies[0].key_shares + ((1, replies[0].seed_shares[1][1]),)),
    )
    with pytest.raises(MemberError):
        h.server.receive(both)
    for reply in replies.values():
        h.server.receive(reply)
    result = h.server.finish()
    assert result.dropped == (4,)
    assert np.array_equal(result.total, ring_sum(h.inputs, live, 16))


def test_survivor_list_below_threshold_makes_client_abort_without_releasing():
    h = Harness(n=5, t=3)
    h.advertise(); h.share(); h.upload()
    lying = dataclasses.replace(h.survivors, survivors=(0, 1))
    with pytest.raises(SessionAborted):
        h.clients[0].consistency(lying)
    assert h.clients[0].released == {}


def test_out_of_order_calls_raise():
    h = Harness()
    with pytest.raises(SecAggError):
        h.server.close_upload()
    with pytest.raises(ReplayError):
        h.clients[0].consistency(None)  # type: ignore[arg-type]


def test_fresh_keys_per_session():
    a, b = Harness(), Harness()
    assert a.clients[0].c_public != b.clients[0].c_public
    assert a.clients[0].s_public != b.clients[0].s_public


def test_client_refuses_survivors_it_never_masked_with():
    """A server that withholds a peer's shares from u, then lists that peer as a survivor and
    u's real mask partners as dropped, would unmask u alone: u must refuse to sign."""
    h = Harness(n=5, t=3)
    h.advertise(); h.share()
    full = h.deliveries[0]
    withheld = ShareDelivery(full.session, tuple((m, ct) for m, ct in full.ciphertexts if m not in (3, 4)), full.nonces)
    h.clients[0].masked_input(withheld, h.inputs[0])  # masks with 1 and 2 only
    with pytest.raises(MemberError, match="never masked"):
        h.clients[0].consistency(SurvivorList(full.session, (0, 3, 4)))
    assert h.clients[0].released == {}
    # a list within its mask partners is signed
    h.clients[0].consistency(SurvivorList(full.session, (0, 1, 2)))


def test_low_order_x25519_key_is_refused_at_advertisement():
    h = Harness()
    bad = sign_message(signer(1), dataclasses.replace(h.clients[1].advertise(), c_public=bytes(32)))
    with pytest.raises(ShapeError, match="X25519"):
        h.server.receive(bad)
    assert h.server.adverts == {}


def test_out_of_field_share_is_refused_without_touching_state():
    h = Harness(n=5, t=3)
    h.advertise(); h.share(); h.upload()
    live = h.survivors.survivors
    for m in live:
        h.server.receive(h.clients[m].consistency(h.survivors))
    bundle = h.server.close_consistency()
    reply = h.clients[0].unmask(bundle)
    owner, _ = reply.seed_shares[0]
    forged = sign_message(signer(0), dataclasses.replace(reply, seed_shares=((owner, b"\xff" * 33),) + reply.seed_shares[1:]))
    with pytest.raises(ShapeError, match="share"):
        h.server.receive(forged)
    assert 0 not in h.server.unmask_msgs
    h.server.receive(reply)
    for m in live[1:]:
        h.server.receive(h.clients[m].unmask(bundle))
    assert np.array_equal(h.server.finish().total, ring_sum(h.inputs, live, 16))

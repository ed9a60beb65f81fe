"""Issue 10 finding 6: one bad member must not stall a cohort that has T honest survivors.

A malicious member releases wrong (in-field) shares at unmasking, or puts a garbage
ciphertext in its (validly signed) ShareKeys. With at least T honest survivors the session
completes with the exact sum; with fewer it aborts and the server keeps nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from secagg_helpers import make_params, random_inputs, ring_sum, signer
from ftte.crypto import shamir
from ftte.crypto.secagg_client import SecAggClient, sign_message
from ftte.crypto.secagg_server import SecAggServer, ServerStage, settle_complaints
from ftte.crypto.secagg_session import SessionAborted


def _wrong(value: bytes, delta: int, holder: int, owner: int) -> bytes:
    """An in-field share value other than ``value``, shifted by an offset unrelated across
    shares (equal offsets on two shares can cancel in a Lagrange sum and reconstruct the right
    secret, which is the caveat in ``shamir.robust_reconstruct``'s docstring)."""
    digest = hashlib.sha256(f"{delta}/{holder}/{owner}".encode()).digest()
    offset = 1 + int.from_bytes(digest, "big") % (shamir.PRIME - 1)
    return ((int.from_bytes(value, "big") + offset) % shamir.PRIME).to_bytes(shamir.SHARE_BYTES, "big")


def drive(params, inputs, *, drop_upload=(), tamper_share=None, tamper_unmask=None):
    """One session by hand; the hooks replace member messages with re-signed malicious ones."""
    server = SecAggServer(params)
    clients = {m: SecAggClient(params, m, signer(m)) for m in params.members}
    for c in clients.values():
        server.receive(c.advertise())
    roster = server.close_advertise()
    shares = {m: c.share_keys(roster) for m, c in clients.items()}
    if tamper_share:
        shares = tamper_share(shares)
    for msg in shares.values():
        server.receive(msg)
    deliveries = server.close_share()
    masked = {m: clients[m].masked_input(deliveries[m], inputs[m]) for m in params.members if m not in drop_upload}
    for msg in masked.values():
        server.receive(msg)
    survivor_list = server.close_upload()
    live = survivor_list.survivors
    for m in live:
        server.receive(clients[m].consistency(survivor_list))
    bundle = server.close_consistency()
    replies = {m: clients[m].unmask(bundle) for m in live}
    if tamper_unmask:
        replies = tamper_unmask(replies)
    for msg in replies.values():
        server.receive(msg)
    return server, clients, masked, server.finish()


def corrupt_unmask(bad: set[int], delta: int = 1):
    def tamper(replies):
        out = dict(replies)
        for m in bad & set(replies):
            r = replies[m]
            out[m] = sign_message(signer(m), dataclasses.replace(
                r,
                seed_shares=tuple((o, _wrong(v, delta, m, o)) for o, v in r.seed_shares),
                key_shares=tuple((o, _wrong(v, delta, m, o)) for o, v in r.key_shares),
            ))
        return out
    return tamper


# --- wrong shares at unmasking ----------------------------------------------------------------

@pytest.mark.parametrize("graph,neighbors", [("full", 0), ("ring", 4)])
def test_wrong_share_among_the_first_t_is_outvoted_and_the_session_completes(graph, neighbors):
    # member 0 has the lowest share index, so its shares are among the first t of every owner it holds
    params = make_params(8, threshold=5, dim=40, graph=graph, neighbors=neighbors)
    inputs = random_inputs(params, 21)
    server, _, _, result = drive(params, inputs, drop_upload=(6,), tamper_unmask=corrupt_unmask({0}))
    assert result.survivors == (0, 1, 2, 3, 4, 5, 7)
    assert result.dropped == (6,)
    assert np.array_equal(result.total, ring_sum(inputs, result.survivors, 16))
    assert result.bad_shares == (0,)


def test_too_few_right_shares_abort_and_the_server_keeps_nothing():
    # full graph, T = t = 4 of 5: two holders lying leaves three right shares per secret
    params = make_params(5, threshold=4, dim=30)
    inputs = random_inputs(params, 4)
    holder: list[SecAggServer] = []
    original = SecAggServer.__init__

    def spy(self, p):
        original(self, p)
        holder.append(self)

    SecAggServer.__init__ = spy
    try:
        with pytest.raises(SessionAborted, match="cannot be recovered"):
            drive(params, inputs, tamper_unmask=corrupt_unmask({0, 1}))
    finally:
        SecAggServer.__init__ = original
    server = holder[0]
    assert server.stage is ServerStage.ABORTED and server.result is None
    assert server.masked == {} and server.unmask_msgs == {} and server.share_msgs == {}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_completes_exactly_iff_right_shares_reach_t(data):
    n = data.draw(st.integers(4, 9), label="n")
    threshold = data.draw(st.integers(n // 2 + 1, n), label="T")
    params = make_params(n, threshold=max(threshold, 2), dim=data.draw(st.integers(1, 50), label="dim"))
    inputs = random_inputs(params, data.draw(st.integers(0, 1000), label="seed"))
    n_drop = data.draw(st.integers(0, n - params.threshold), label="drops")
    order = data.draw(st.permutations(params.members), label="order")
    drop = set(order[:n_drop])
    survivors = [m for m in params.members if m not in drop]
    bad = set(data.draw(st.lists(st.sampled_from(survivors), unique=True, max_size=len(survivors)), label="bad"))
    delta = data.draw(st.integers(0, 2**32), label="delta")
    right = len(survivors) - len(bad)  # in the full graph every survivor holds a share of every secret
    if right >= params.t:
        _, _, _, result = drive(params, inputs, drop_upload=drop, tamper_unmask=corrupt_unmask(bad, delta))
        assert result.survivors == tuple(survivors)
        assert np.array_equal(result.total, ring_sum(inputs, survivors, 16))
        assert set(result.bad_shares) <= bad
    else:
        with pytest.raises(SessionAborted):
            drive(params, inputs, drop_upload=drop, tamper_unmask=corrupt_unmask(bad, delta))


# --- garbage ciphertexts --------------------------------------------------------------------------

def garbage_to(sender: int, recipients: set[int]):
    def tamper(shares):
        out = dict(shares)
        msg = shares[sender]
        cts = tuple((r, os.urandom(len(ct)) if r in recipients else ct) for r, ct in msg.ciphertexts)
        out[sender] = sign_message(signer(sender), dataclasses.replace(msg, ciphertexts=cts))
        return out
    return tamper


@pytest.mark.parametrize("victims", [{0}, {0, 2, 4}])
def test_garbage_ciphertext_skips_that_sender_only_and_the_session_completes(victims):
    params = make_params(7, threshold=5, dim=30)
    inputs = random_inputs(params, 8)
    server, clients, masked, result = drive(params, inputs, tamper_share=garbage_to(6, victims))
    for v in victims:
        assert masked[v].skipped == (6,)  # the rest of the delivery was used
        assert clients[v].share_peers == tuple(m for m in params.members if m not in (v, 6))
    assert result.excluded == (6,)
    assert result.survivors == (0, 1, 2, 3, 4, 5)
    assert np.array_equal(result.total, ring_sum(inputs, result.survivors, 16))


def test_garbage_ciphertext_in_a_ring_completes():
    params = make_params(9, threshold=5, dim=30, graph="ring", neighbors=4)
    inputs = random_inputs(params, 9)
    # the ring differs per session; member 8 sends garbage to everyone and only its ring
    # neighbours receive (and skip) it
    server, _, masked, result = drive(params, inputs, tamper_share=garbage_to(8, set(range(8))))
    complainers = [m for m, msg in masked.items() if msg.skipped]
    assert complainers and all(masked[m].skipped == (8,) for m in complainers)
    assert result.excluded == (8,)
    assert np.array_equal(result.total, ring_sum(inputs, tuple(range(8)), 16))


def test_garbage_from_too_many_members_aborts_and_reveals_nothing():
    params = make_params(5, threshold=4, dim=20)
    inputs = random_inputs(params, 2)

    def two_bad(shares):
        return garbage_to(4, {0})(garbage_to(3, {1})(shares))

    with pytest.raises(SessionAborted, match="leaving out"):
        drive(params, inputs, tamper_share=two_bad)


# --- who is left out --------------------------------------------------------------------------------

def test_settle_complaints_prefers_the_accused_and_the_busiest():
    assert settle_complaints({0: frozenset({5})}) == (5,)  # lone complaint: the accused
    assert settle_complaints({0: frozenset({5}), 1: frozenset({5}), 2: frozenset({5})}) == (5,)
    assert settle_complaints({5: frozenset({0, 1, 2})}) == (5,)  # a member complaining about many goes
    assert settle_complaints({0: frozenset(), 1: frozenset()}) == ()


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.integers(0, 15), st.frozensets(st.integers(0, 15), max_size=6), max_size=16))
def test_settle_complaints_covers_every_complaint(skipped):
    out = set(settle_complaints(skipped))
    for u, vs in skipped.items():
        for v in vs:
            if u != v:
                assert u in out or v in out


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_one_malicious_member_costs_at_most_one_honest_member(data):
    """With an honest server every complaint involves the malicious member m (it sent garbage,
    or it complains falsely); whatever it does, at most one honest member is left out."""
    members = list(range(data.draw(st.integers(3, 12))))
    m = data.draw(st.sampled_from(members))
    others = [x for x in members if x != m]
    victims = data.draw(st.frozensets(st.sampled_from(others)))  # honest members that got its garbage
    accused = data.draw(st.frozensets(st.sampled_from(others)))  # honest members it falsely accuses
    skipped = {v: frozenset({m}) for v in victims}
    skipped[m] = accused
    out = set(settle_complaints(skipped))
    assert len(out - {m}) <= 1
    if len(victims | accused) >= 2 or (victims and not accused):
        assert out == {m}  # the lone ambiguous case is a single false accusation

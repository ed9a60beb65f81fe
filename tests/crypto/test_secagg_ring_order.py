"""Issue 10 finding 5: the SecAgg+ ring order cannot be ground.

The order used to come from the session id, a hash of the advertised keys, which the
server and colluders can re-roll offline (the review needed 758 re-keys to surround a
target). It now comes from nonces every member commits to before the roster is fixed and
reveals after; these tests run the grinding attack against both derivations.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
from scipy import stats

from secagg_helpers import make_params, random_inputs, ring_sum, signer
from ftte.crypto.primitives import X25519Key
from ftte.crypto.secagg_client import SecAggClient, sign_message
from ftte.crypto.secagg_local import run_session
from ftte.crypto.secagg_server import SecAggServer
from ftte.crypto.secagg_session import (
    ConfigError,
    MemberError,
    SessionAborted,
    SignatureError,
    masking_graph,
    nonce_commitment,
    ring_neighbours,
    session_id,
)
from ftte.secagg_messages import ShareDelivery

N, K, TARGET = 20, 4, 0
COLLUDERS = (18, 19)
TRIES = 2000


def ring_params():
    """20 members, 4 ring neighbours, two colluders (t = 4 = max_corrupt + 2)."""
    base = make_params(N, threshold=12, graph="ring", neighbors=K)
    return dataclasses.replace(base, max_corrupt=len(COLLUDERS), share_threshold=4)


# The attack succeeds when both colluders are among the target's ring neighbours (they then
# hold two of its four shares and see two of its four pairwise masks).
CHANCE = 6 / 171  # C(4, 2) / C(19, 2) for a uniformly random ring


def surrounded(graph: dict[int, frozenset[int]]) -> bool:
    return set(COLLUDERS) <= graph[TARGET]


KEY_POOL = [X25519Key().public_key for _ in range(256)]  # real public keys, drawn from to keep the loops fast
HONEST_KEYS = {m: (KEY_POOL[2 * m], KEY_POOL[2 * m + 1]) for m in range(N) if m not in COLLUDERS}


def honest_adverts(context: bytes, nonces: dict[int, bytes]) -> dict[int, tuple[bytes, bytes, bytes]]:
    return {m: (*keys, nonce_commitment(context, m, nonces[m])) for m, keys in HONEST_KEYS.items()}


def colluder_adverts(context: bytes) -> tuple[dict[int, tuple[bytes, bytes, bytes]], dict[int, bytes]]:
    """One re-roll: new keys (from the pool) and fresh nonces for every colluder."""
    nonces = {m: os.urandom(32) for m in COLLUDERS}
    adverts = {}
    for m in COLLUDERS:
        pick = np.random.default_rng(int.from_bytes(os.urandom(8), "big")).choice(len(KEY_POOL) - 2 * N, 2, replace=False)
        adverts[m] = (KEY_POOL[2 * N + pick[0]], KEY_POOL[2 * N + pick[1]], nonce_commitment(context, m, nonces[m]))
    return adverts, nonces


def test_grinding_succeeded_when_the_order_came_from_the_session_id():
    """The old derivation (ring order seeded by the session id): the server holds the honest
    advertisements and re-keys its colluders offline until they surround the target."""
    params = ring_params()
    context = params.context()
    honest = honest_adverts(context, {m: os.urandom(32) for m in range(N)})
    for tries in range(1, TRIES + 1):
        colluders, _ = colluder_adverts(context)
        roster = {**honest, **colluders}
        session = session_id(context, roster)
        if surrounded(ring_neighbours(session, tuple(roster), K)):
            break
    else:
        pytest.fail(f"{TRIES} offline re-keys never surrounded the target (chance {CHANCE:.3f} each)")
    assert tries < TRIES  # geometric with mean 1/CHANCE ~ 28


def test_grinding_gains_nothing_once_honest_nonces_are_committed():
    """The same adversary, now with the nonce-derived order. Before the roster closes it sees
    every honest advertisement (keys and nonce commitments) and may re-roll its colluders'
    keys and nonces as often as it likes; but each candidate's outcome depends on honest
    nonces it has not seen, so it can only pick one blind. After the reveal its only move is
    to abort the session (a missing reveal aborts a ring session; see the next test), so
    each of its tries costs a whole session, visible to every member. Over TRIES sessions,
    each with fresh honest nonces and 20 offline re-rolls to pick the candidate that would
    win if honest nonces were zero, it surrounds the target at the chance rate."""
    params = ring_params()
    context = params.context()
    wins = 0
    guess = {m: bytes(32) for m in range(N)}
    for _ in range(TRIES):
        honest_nonces = {m: os.urandom(32) for m in range(N) if m not in COLLUDERS}
        honest = honest_adverts(context, honest_nonces)
        chosen = None
        for _ in range(20):
            colluders, colluder_nonces = colluder_adverts(context)
            roster = {**honest, **colluders}
            session = session_id(context, roster)
            chosen = (roster, session, colluder_nonces)
            if surrounded(masking_graph(params, session, tuple(roster), {**guess, **colluder_nonces}).neighbours):
                break
        roster, session, colluder_nonces = chosen
        graph = masking_graph(params, session, tuple(roster), {**honest_nonces, **colluder_nonces})
        wins += surrounded(graph.neighbours)
    # not better than chance (one-sided), and the order is indeed uniform (two-sided)
    assert stats.binomtest(wins, TRIES, CHANCE, alternative="greater").pvalue > 1e-3, wins
    assert stats.binomtest(wins, TRIES, CHANCE).pvalue > 1e-4, wins
    assert wins / TRIES < 0.1  # the old derivation surrounded the target in every session


# --- the protocol enforces it ---------------------------------------------------------------------

class RingSession:
    def __init__(self, n=9, t=5, k=4):
        self.params = make_params(n, threshold=t, dim=24, graph="ring", neighbors=k)
        self.inputs = random_inputs(self.params, 5)
        self.server = SecAggServer(self.params)
        self.clients = {m: SecAggClient(self.params, m, signer(m)) for m in self.params.members}
        for c in self.clients.values():
            self.server.receive(c.advertise())
        self.roster = self.server.close_advertise()
        self.shares = {m: c.share_keys(self.roster) for m, c in self.clients.items()}


def test_members_and_server_derive_the_same_ring_and_only_neighbours_hold_shares():
    s = RingSession()
    for msg in s.shares.values():
        assert sorted(r for r, _ in msg.ciphertexts) == [m for m in s.params.members if m != msg.member]
        s.server.receive(msg)
    deliveries = s.server.close_share()
    masked = {m: s.clients[m].masked_input(deliveries[m], s.inputs[m]) for m in s.params.members}
    for m, c in s.clients.items():
        assert c.neighbours == s.server.graph[m] and len(c.neighbours) == 4
        assert {sender for sender, _ in deliveries[m].ciphertexts} == set(c.neighbours)
        assert set(c._held) == set(c.neighbours) | {m}
        assert c.graph_digest == s.server.graph_digest
    for msg in masked.values():
        s.server.receive(msg)
    survivors = s.server.close_upload()
    for m in survivors.survivors:
        s.server.receive(s.clients[m].consistency(survivors))
    bundle = s.server.close_consistency()
    for m in survivors.survivors:
        s.server.receive(s.clients[m].unmask(bundle))
    assert np.array_equal(s.server.finish().total, ring_sum(s.inputs, s.params.members, 16))


def test_a_reveal_that_does_not_open_its_commitment_is_refused_by_server_and_members():
    s = RingSession()
    forged = sign_message(signer(3), dataclasses.replace(s.shares[3], nonce=os.urandom(32)))
    with pytest.raises(SignatureError, match="commitment"):
        s.server.receive(forged)
    assert 3 not in s.server.share_msgs
    for msg in s.shares.values():
        s.server.receive(msg)
    deliveries = s.server.close_share()
    honest = deliveries[0]
    swapped = tuple((m, os.urandom(32) if m == 3 else nonce) for m, nonce in honest.nonces)
    with pytest.raises(SignatureError, match="commitment"):
        s.clients[0].masked_input(ShareDelivery(honest.session, honest.ciphertexts, swapped), s.inputs[0])
    s.clients[0].masked_input(honest, s.inputs[0])  # refused message left the member unchanged


def test_a_withheld_reveal_aborts_the_ring_session_and_nothing_is_released():
    """The residual move: a colluder that saw the honest nonces and dislikes the ring withholds
    its reveal (or the server hides one). That aborts the session, visibly to every member;
    it does not give another ring in the same session."""
    s = RingSession()
    for m, msg in s.shares.items():
        if m != 8:
            s.server.receive(msg)
    with pytest.raises(SessionAborted, match="ring order"):
        s.server.close_share()
    # a server that hides member 8's nonce from one member's delivery makes that member abort
    s2 = RingSession()
    for msg in s2.shares.values():
        s2.server.receive(msg)
    full = s2.server.close_share()[0]
    hidden = ShareDelivery(full.session, tuple((m, ct) for m, ct in full.ciphertexts if m != 8),
                           tuple((m, n) for m, n in full.nonces if m != 8))
    with pytest.raises(SessionAborted, match="ring order"):
        s2.clients[0].masked_input(hidden, s2.inputs[0])
    assert s2.clients[0]._held == {} and s2.clients[0].released == {}


def test_a_delivery_without_my_own_nonce_is_refused():
    s = RingSession()
    for msg in s.shares.values():
        s.server.receive(msg)
    d = s.server.close_share()[1]
    with pytest.raises(MemberError, match="my own nonce"):
        s.clients[1].masked_input(ShareDelivery(d.session, d.ciphertexts, tuple(x for x in d.nonces if x[0] != 1)), s.inputs[1])


def test_the_full_graph_needs_no_nonces_and_tolerates_drops_before_sharing():
    params = make_params(9, threshold=6, dim=30)
    inputs = random_inputs(params, 3)
    drop = {1: "share", 4: "share"}
    result, st_ = run_session(params, {m: signer(m) for m in params.members}, inputs, drop)
    assert result is not None, st_.aborted
    assert np.array_equal(result.total, ring_sum(inputs, result.survivors, 16))


def test_ring_share_threshold_must_exceed_colluders_plus_one():
    """Shares reach every member before the order is known, so each colluder holds one of every
    secret: with the owner's own, they must stay below t."""
    base = make_params(12, threshold=10, graph="ring", neighbors=4)  # 2T > n + max_corrupt
    dataclasses.replace(base, max_corrupt=3, share_threshold=5)  # 2*5 > 5 + 3 and 5 >= 3 + 2
    with pytest.raises(ConfigError, match="max_corrupt \\+ 2"):
        dataclasses.replace(base, max_corrupt=4, share_threshold=5)  # accepted before: 2*5 > 5 + 4

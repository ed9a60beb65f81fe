"""Secure-aggregation session parameters, their validation, the session id and the masking graph.

Both state machines derive everything here from the same public inputs, so they agree
on the session id, on who shares with whom and on the thresholds without exchanging it.

Ring order (SecAgg+). Who masks with whom, and who holds whose shares, is a ring whose
order must be unpredictable to the server and to colluding members until nothing they
choose can change it any more. Deriving it from the session id (a hash of the advertised
keys) let them re-roll it offline: colluders re-keyed until they surrounded a target.
Now each member commits in ``AdvertiseKeys`` to a fresh 32-byte nonce
(:func:`nonce_commitment`, bound to the context and the member; the commitments are
also in the session id, so the server cannot show two members different commitments
without splitting them into sessions that cannot decrypt each other's shares). Once the
roster is fixed it reveals the nonce in ``ShareKeys``; the order is a hash of the session
id and the nonces of *every* roster member (:func:`ring_seed`). Colluders commit before any
honest nonce is known, and honest nonces are uniform, so whatever they choose the ring
is a uniformly random ring.

Because the order is unknown when ``ShareKeys`` is sent, a member encrypts its shares to
every roster member; each honest member keeps only those of its ring neighbours (so the
holders of a member's secrets are still exactly its ring neighbours). Colluders keep all
of theirs, which is why the ring needs ``t >= max_corrupt + 2``: the owner's own share and
every colluder's together stay below ``t``.

Residual. The ring needs the nonce of every roster member: a member whose reveal is
missing (it dropped, or a colluder withholds it after seeing the honest nonces, or the
server hides it) makes every honest member abort the session. Deriving the order from
whichever nonces arrived instead would let the server pick, after seeing them, among all
the subsets it can claim arrived, and show different members different subsets (then
honest members outside a target's true neighbourhood would hold and release its shares),
which is worse than grinding. So the adversary's only choice is, once per session, to
accept the ring it sees or abort the session, visibly to every member ("no ring order ...
missing [m]"); a new session draws fresh honest nonces. If a favourable ring comes with
chance p per session (both of two colluders among a target's 4 neighbours in a 20-member
ring: p = 6/171), R aborted sessions buy at most ``1 - (1 - p)**(R + 1)``, against
certainty after a few dozen offline re-keys before; the device bounds R by limiting how
many sessions it offers the same update to. The cost to honest members: a member that
drops between advertising and sharing keys aborts a ring session (the full graph ignores
the nonces and tolerates it).

What a favourable ring would still buy. With ``t >= max_corrupt + 2`` and every honest
member on the same ring, no placement of colluders unmasks anyone: unmasking u needs u's
seed (t seed shares: honest holders release them only while u is a survivor, and u's
honest holders are its ring neighbours) and every pairwise mask of u (an honest
neighbour's mask is removable only once that neighbour is out of the survivor list, and
then it releases nothing); so all of u's honest neighbours out leaves u's own share and
the colluders', fewer than t. A ground ring would buy availability attacks (colluders as
most of a target's holders refuse to answer) and break the random-graph assumption of
SecAgg+'s dropout analysis; the unpredictable order removes both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from ftte.crypto.prg import expand_mask, ring_dtype
from ftte.crypto.primitives import hkdf, sha256

GRAPHS = ("full", "ring")


class SecAggError(Exception):
    """Base of every protocol error."""


class ConfigError(SecAggError, ValueError):
    """Parameters under which privacy or recovery cannot be guaranteed."""


class RejectedMessage(SecAggError):
    """A message was refused; the session state is unchanged."""


class ReplayError(RejectedMessage):
    """A message from another session or context, or for a stage already closed."""


class SignatureError(RejectedMessage):
    """A signature or AEAD tag did not verify."""


class MemberError(RejectedMessage):
    """An unknown member, a member outside its role, or a duplicate message."""


class ShapeError(RejectedMessage):
    """A vector or share list of the wrong length, dtype or range."""


class SessionAborted(SecAggError):
    """Too few members remain; the session reveals nothing."""


def _u64(x: int) -> bytes:
    return x.to_bytes(8, "big")


@dataclass(frozen=True)
class SessionParams:
    """What the server announces when a cohort closes; identical on every member.

    ``threshold`` (T) is the minimum number of survivors for the sum to be revealed; it
    must exceed ``(n + max_corrupt) / 2`` in both graphs (see :meth:`validate`).
    ``share_threshold`` (t) is how many of a member's share holders must answer to
    recover its secrets: T in the full graph; in the ring graph it defaults to a strict
    majority of the ``neighbors + 1`` holders (SecAgg+).
    """

    cohort_id: str
    plan_id: str
    model_hash: bytes
    close_version: int
    members: tuple[int, ...]
    identity_keys: tuple[bytes, ...]
    threshold: int
    dim: int
    ring_bits: int
    graph: str = "full"
    neighbors: int = 0
    share_threshold: int = 0
    max_corrupt: int = 0  # members that may collude with the server (sign anything, reveal anything)
    # Digest of every other parameter that shapes a member's input (weighting, clip, precision),
    # fixed by the layer above; in the context, so members shown different values never agree.
    binding: bytes = b""
    _index: dict[int, int] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.validate()
        self._index.update({m: i for i, m in enumerate(self.members)})

    def validate(self) -> None:
        n = len(self.members)
        if list(self.members) != sorted(set(self.members)):
            raise ConfigError("members must be sorted and unique")
        if any(not 0 <= m < 2**63 for m in self.members):
            raise ConfigError("member ids must be in [0, 2^63)")
        if len(self.identity_keys) != n or any(len(k) != 32 for k in self.identity_keys):
            raise ConfigError("one 32-byte Ed25519 identity key per member is required")
        if len(self.model_hash) != 32:
            raise ConfigError("model_hash must be 32 bytes")
        if self.dim < 1:
            raise ConfigError("dim must be >= 1")
        ring_dtype(self.ring_bits)
        if self.graph not in GRAPHS:
            raise ConfigError(f"graph must be one of {GRAPHS}, got {self.graph!r}")
        if n < 2:
            raise ConfigError("a cohort needs at least 2 members")
        if not 2 <= self.threshold <= n:
            raise ConfigError(
                f"threshold T={self.threshold} must be in [2, {n}]: a sum of one input reveals it, "
                "and more than n survivors can never arrive"
            )
        if self.max_corrupt < 0 or self.max_corrupt >= n:
            raise ConfigError(f"max_corrupt must be in [0, {n - 1}], got {self.max_corrupt}")
        # Any two survivor lists that honest members sign must share an honest signer, or a
        # server could show two disjoint groups different lists and collect a member's seed
        # shares from one and its neighbours' key shares from the other. With up to
        # max_corrupt members signing anything, that needs 2T > n + max_corrupt, whatever
        # the masking graph.
        if 2 * self.threshold <= n + self.max_corrupt:
            raise ConfigError(
                f"threshold T={self.threshold} must exceed (n + max_corrupt)/2 = {(n + self.max_corrupt) / 2}: "
                "otherwise a server can collect both a member's seed shares and the key shares that unmask it "
                "from groups shown different survivor lists"
            )
        if self.graph == "full":
            if self.neighbors not in (0, n - 1):
                raise ConfigError("the full graph masks with every member; leave neighbors at 0")
            if self.share_threshold not in (0, self.threshold):
                raise ConfigError("in the full graph the share threshold equals T")
        else:
            k = self.neighbors
            if k < 2 or k % 2 or k >= n:
                raise ConfigError(f"ring graph needs an even neighbors count in [2, {n - 1}], got {k}")
            holders = k + 1
            t = self.share_threshold or self.default_share_threshold(k)
            if not 2 * t > holders + self.max_corrupt:
                raise ConfigError(
                    f"share threshold {t} must exceed (holders + max_corrupt)/2 = {(holders + self.max_corrupt) / 2} "
                    f"for the {holders} holders"
                )
            if t > holders:
                raise ConfigError(f"share threshold {t} exceeds the {holders} holders: recovery impossible")
            if t < self.max_corrupt + 2:
                raise ConfigError(
                    f"share threshold {t} must be at least max_corrupt + 2 = {self.max_corrupt + 2}: shares are sent "
                    "to every member before the ring order is known, so every colluder holds one"
                )

    @staticmethod
    def default_share_threshold(neighbors: int) -> int:
        return (neighbors + 1) // 2 + 1

    @property
    def t(self) -> int:
        if self.graph == "full":
            return self.threshold
        return self.share_threshold or self.default_share_threshold(self.neighbors)

    def identity_key(self, member: int) -> bytes:
        return self.identity_keys[self._index[member]]

    def is_member(self, member: int) -> bool:
        return member in self._index

    def context(self) -> bytes:
        """Everything known before keys are advertised; advertisements sign it."""
        parts = [
            b"ftte/secagg/context/v1",
            self.cohort_id.encode(),
            self.plan_id.encode(),
            self.model_hash,
            _u64(self.close_version),
            _u64(self.threshold),
            _u64(self.t),
            _u64(self.dim),
            _u64(self.ring_bits),
            self.graph.encode(),
            _u64(self.neighbors),
            _u64(self.max_corrupt),
            _u64(len(self.binding)),
            self.binding,
        ]
        for m, key in zip(self.members, self.identity_keys):
            parts += [_u64(m), key]
        return sha256(*parts)


def nonce_commitment(context: bytes, member: int, nonce: bytes) -> bytes:
    """What ``AdvertiseKeys`` carries: hiding (the nonce is 32 random bytes) and binding."""
    return sha256(b"ftte/secagg/nonce-commitment/v1", context, _u64(member), nonce)


def session_id(context: bytes, roster: Mapping[int, tuple[bytes, ...]]) -> bytes:
    """Binds the context to the sorted advertised members and everything they advertised
    (fresh public keys and nonce commitment)."""
    parts = [b"ftte/secagg/session/v1", context]
    for m in sorted(roster):
        parts += [_u64(m), *roster[m]]
    return sha256(*parts)


def ring_seed(session: bytes, nonces: Mapping[int, bytes]) -> bytes:
    """The ring order's seed: the session id and every roster member's revealed nonce."""
    parts = [b"ftte/secagg/ring-order/v2", session]
    for m in sorted(nonces):
        parts += [_u64(m), nonces[m]]
    return sha256(*parts)


def ring_neighbours(seed: bytes, members: tuple[int, ...], neighbors: int) -> dict[int, frozenset[int]]:
    """``neighbors/2`` members on each side of each member on the ring ordered by ``seed``."""
    members = tuple(sorted(members))
    order_key = hkdf(seed, salt=b"ftte/secagg/ring-order/v1", info=b"")
    draws = expand_mask(order_key, len(members), 32)
    ring = [members[i] for i in np.argsort(draws, kind="stable")]
    half = neighbors // 2
    n = len(ring)
    return {m: frozenset(ring[(pos + d) % n] for d in range(-half, half + 1) if d != 0) for pos, m in enumerate(ring)}


def ring_applies(graph: str, neighbors: int, members: int) -> bool:
    """The one rule for when a ring is used: asked for, and smaller than the full graph. The
    cohort planner applies it to the closing members, the session to the advertised roster."""
    return graph == "ring" and neighbors < members - 1


def uses_ring(params: SessionParams, roster_size: int) -> bool:
    """Whether this roster is masked on a ring (else everyone masks with everyone)."""
    return ring_applies(params.graph, params.neighbors, roster_size)


@dataclass(frozen=True)
class MaskingGraph:
    """Who masks with (and holds the shares of) whom, and a digest that consistency
    signatures cover, so members who derived different graphs never count each other."""

    neighbours: dict[int, frozenset[int]]
    digest: bytes


def masking_graph(params: SessionParams, session: bytes, roster: tuple[int, ...], nonces: Mapping[int, bytes]) -> MaskingGraph:
    """The graph among the advertised members ``roster``, given every revealed nonce.

    Full graph: everyone, nonces unused. Ring: needs the nonce of every roster member
    (see the module docstring for why a missing one aborts rather than being skipped).
    """
    members = tuple(sorted(roster))
    if not uses_ring(params, len(members)):
        everyone = frozenset(members)
        return MaskingGraph({m: everyone - {m} for m in members}, sha256(b"ftte/secagg/graph/full/v1", session))
    missing = [m for m in members if m not in nonces]
    if missing or len(nonces) != len(members):
        raise ValueError(f"the ring order needs every roster member's nonce; missing {missing}")
    seed = ring_seed(session, nonces)
    return MaskingGraph(ring_neighbours(seed, members, params.neighbors), sha256(b"ftte/secagg/graph/ring/v1", seed))


def share_index(member: int) -> int:
    """The Shamir x coordinate of a holder: never zero, never repeated."""
    return member + 1


def share_aad(session: bytes, sender: int, recipient: int) -> bytes:
    return b"ftte/secagg/share/v1" + session + _u64(sender) + _u64(recipient)


def share_key(shared_secret: bytes, session: bytes, sender: int, recipient: int) -> bytes:
    """AEAD key for shares from ``sender`` to ``recipient`` (direction-bound)."""
    return hkdf(shared_secret, salt=session, info=b"ftte/secagg/share-key/v1" + _u64(sender) + _u64(recipient))


def seed_commitment(session: bytes, member: int, seed: bytes) -> bytes:
    return sha256(b"ftte/secagg/seed-commitment/v1", session, _u64(member), seed)


def _binomial_cdf_below(k: int, p: float, t: int) -> float:
    """P[Binomial(k, p) < t]."""
    from math import comb

    return sum(comb(k, i) * p**i * (1 - p) ** (k - i) for i in range(min(t, k + 1)))


def suggest_ring_neighbors(members: int, dropout: float, failure_bits: int = 20) -> int:
    """The smallest even neighbour count for which, with members dropping independently at
    rate ``dropout``, the chance that some member's secrets cannot be recovered (fewer
    than a strict majority of its neighbours answer) stays below 2^-failure_bits (union
    bound over members). Returns ``members - 1`` (the full graph) when no ring does better.
    """
    if members < 3:
        return members - 1
    if not 0.0 <= dropout < 1.0:
        raise ConfigError("dropout must be in [0, 1)")
    for k in range(2, members - 1, 2):
        t = SessionParams.default_share_threshold(k)
        if members * _binomial_cdf_below(k, 1.0 - dropout, t) <= 2.0**-failure_bits:
            return k
    return members - 1

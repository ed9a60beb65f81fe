"""The server side of secure aggregation, as a transport-free state machine.

``receive`` checks a message completely (stage, session, member, signature, shape)
before it touches any state, so a refused message leaves the session as it was. Each
``close_*`` method ends a stage, returns what to send next, and aborts the session when
fewer than T members remain; an aborted session drops every masked input and share it
held, so nothing it keeps could be unmasked.

One bad member must not stall a cohort that has T honest survivors:

* A member may report (``MaskedInput.skipped``) neighbours whose shares it could not use;
  it did not mask with them and will refuse a survivor list naming both. ``close_upload``
  leaves out of the sum a small set of members covering every such complaint (see
  :func:`settle_complaints`). Left-out members are treated as dropped: their seed is never
  recovered, so their masked input stays masked. Survivors send the seeds of their masks
  with dropped partners (``UnmaskShares.pair_seeds``, only for partners outside the signed
  survivor list, as key shares are), so a member that sent garbage to most of its holders
  can be left out although its key cannot be rebuilt. These seeds tell the server nothing
  that the dropped partner's key shares (released by every honest holder) would not.
* At unmasking, each secret is reconstructed by :func:`shamir.robust_reconstruct` and
  checked against its commitment (the seed commitment, or the advertised mask public key);
  a wrong share among the first t makes it try other t-subsets (bounded, see there) instead
  of aborting. Holders whose shares were off the verified polynomial are listed in the
  result and tried last for every later secret.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from ftte import wire
from ftte.crypto import shamir
from ftte.crypto.prg import expand_mask, pairwise_seed, ring_dtype, self_mask_seed
from ftte.crypto.primitives import (
    CryptoError,
    X25519Key,
    constant_time_equal,
    ed25519_verify,
    x25519_check_public,
    x25519_public_from_private,
)
from ftte.crypto.secagg_session import (
    MemberError,
    ReplayError,
    SecAggError,
    SessionAborted,
    SessionParams,
    ShapeError,
    SignatureError,
    masking_graph,
    nonce_commitment,
    seed_commitment,
    session_id,
    share_index,
)
from ftte.secagg_messages import (
    AdvertiseKeys,
    ConsistencyBundle,
    ConsistencySignature,
    MaskedInput,
    Roster,
    ShareDelivery,
    ShareKeys,
    SurvivorList,
    UnmaskShares,
    consistency_bytes,
    signing_bytes,
)


class ServerStage(enum.Enum):
    ADVERTISE = "advertise"
    SHARE = "share"
    UPLOAD = "upload"
    CONSISTENCY = "consistency"
    UNMASK = "unmask"
    DONE = "done"
    ABORTED = "aborted"


_STAGE_OF = {
    AdvertiseKeys: ServerStage.ADVERTISE,
    ShareKeys: ServerStage.SHARE,
    MaskedInput: ServerStage.UPLOAD,
    ConsistencySignature: ServerStage.CONSISTENCY,
    UnmaskShares: ServerStage.UNMASK,
}


@dataclass(frozen=True)
class AggregateResult:
    """The only thing the server learns: the ring sum of the survivors' inputs."""

    total: np.ndarray
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]  # shared keys but are not in the sum: their pairwise masks were removed
    excluded: tuple[int, ...] = ()  # uploaded, but left out to settle complaints about unusable shares
    bad_shares: tuple[int, ...] = ()  # holders that released a share off the polynomial of a verified secret


class SecAggServer:
    def __init__(self, params: SessionParams) -> None:
        self.params = params
        self.stage = ServerStage.ADVERTISE
        self._context = params.context()
        self.session = b""
        self.adverts: dict[int, AdvertiseKeys] = {}
        self.roster: dict[int, tuple[bytes, bytes, bytes]] = {}  # member -> (c_public, s_public, nonce commitment)
        self.graph: dict[int, frozenset[int]] = {}
        self.graph_digest = b""
        self.skipped: dict[int, frozenset[int]] = {}  # uploader -> neighbours it did not mask with
        self.excluded: tuple[int, ...] = ()
        self._suspects: set[int] = set()  # holders caught releasing a wrong share
        self.share_msgs: dict[int, ShareKeys] = {}
        self.masked: dict[int, np.ndarray] = {}
        self.survivors: tuple[int, ...] = ()
        self.consistency_sigs: dict[int, bytes] = {}
        self.unmask_msgs: dict[int, UnmaskShares] = {}
        self.result: AggregateResult | None = None
        self.abort_reason = ""

    # -- receiving ---------------------------------------------------------------------------
    def receive(self, msg: object) -> None:
        """Validate and store one member message; raises a ``RejectedMessage`` without changing state."""
        expected = _STAGE_OF.get(type(msg))
        if expected is None:
            raise ShapeError(f"not a member message: {type(msg).__name__}")
        if self.stage is not expected:
            raise ReplayError(f"{type(msg).__name__} arrived in stage {self.stage.value}")
        member = msg.member  # type: ignore[attr-defined]
        if not self.params.is_member(member):
            raise MemberError(f"unknown member {member}")
        if isinstance(msg, AdvertiseKeys):
            if msg.context != self._context:
                raise ReplayError(f"advertisement of member {member} belongs to another cohort context")
            try:
                x25519_check_public(msg.c_public)
                x25519_check_public(msg.s_public)
            except CryptoError as exc:
                raise ShapeError(f"advertisement of member {member}: {exc}") from None
        elif msg.session != self.session:  # type: ignore[attr-defined]
            raise ReplayError(f"{type(msg).__name__} from member {member} belongs to another session")
        if isinstance(msg, ConsistencySignature):
            self._check_consistency(msg)
            self.consistency_sigs[member] = msg.signature
            return
        self._check_signature(msg, member)
        if isinstance(msg, AdvertiseKeys):
            self._once(self.adverts, member)
            self.adverts[member] = msg
        elif isinstance(msg, ShareKeys):
            self._check_share_keys(msg)
            self.share_msgs[member] = msg
        elif isinstance(msg, MaskedInput):
            self._check_masked(msg)
            self.masked[member] = msg.vector
            self.skipped[member] = frozenset(msg.skipped)
        elif isinstance(msg, UnmaskShares):
            self._check_unmask(msg)
            self.unmask_msgs[member] = msg

    @staticmethod
    def _once(store: dict, member: int) -> None:
        if member in store:
            raise MemberError(f"second message from member {member} in this stage")

    def _check_signature(self, msg: object, member: int) -> None:
        try:
            ed25519_verify(self.params.identity_key(member), msg.signature, signing_bytes(msg))  # type: ignore[attr-defined]
        except CryptoError:
            raise SignatureError(f"{type(msg).__name__} from member {member}: bad signature") from None

    def _check_share_keys(self, msg: ShareKeys) -> None:
        self._once(self.share_msgs, msg.member)
        if msg.member not in self.roster:
            raise MemberError(f"member {msg.member} did not advertise keys")
        recipients = [r for r, _ in msg.ciphertexts]
        if sorted(recipients) != sorted(set(self.roster) - {msg.member}) or len(set(recipients)) != len(recipients):
            raise MemberError(f"member {msg.member} must address shares to every other roster member, once")
        if not constant_time_equal(nonce_commitment(self._context, msg.member, msg.nonce), self.roster[msg.member][2]):
            raise SignatureError(f"nonce of member {msg.member} does not open its commitment")

    def _check_masked(self, msg: MaskedInput) -> None:
        self._once(self.masked, msg.member)
        if msg.member not in self.share_msgs:
            raise MemberError(f"member {msg.member} did not share keys")
        dtype = ring_dtype(self.params.ring_bits)
        if msg.vector.dtype != dtype or msg.vector.shape != (self.params.dim,):
            raise ShapeError(
                f"masked input of member {msg.member}: expected {dtype} x {self.params.dim}, "
                f"got {msg.vector.dtype} x {msg.vector.shape[0]}"
            )
        skipped = msg.skipped
        if list(skipped) != sorted(set(skipped)) or not set(skipped) <= (self.graph[msg.member] & set(self.share_msgs)):
            raise MemberError(f"member {msg.member} skipped members that are not neighbours that shared keys")

    def _check_consistency(self, msg: ConsistencySignature) -> None:
        self._once(self.consistency_sigs, msg.member)
        if msg.member not in self.masked:
            raise MemberError(f"member {msg.member} is not a survivor")
        try:
            ed25519_verify(self.params.identity_key(msg.member), msg.signature, consistency_bytes(self.session, self.survivors, self.graph_digest))
        except CryptoError:
            raise SignatureError(f"consistency signature of member {msg.member} does not verify") from None

    def _check_unmask(self, msg: UnmaskShares) -> None:
        self._once(self.unmask_msgs, msg.member)
        if msg.member not in self.consistency_sigs:
            raise MemberError(f"member {msg.member} did not pass the consistency check")
        survivors = set(self.survivors)
        # The shares this member holds: its own and those of every member that shared with it.
        held = {o for o in self.share_msgs if o == msg.member or msg.member in self.graph[o]}
        seed_owners = [o for o, _ in msg.seed_shares]
        key_owners = [o for o, _ in msg.key_shares]
        if set(seed_owners) & set(key_owners):
            raise MemberError(f"member {msg.member} released both share kinds for one owner")
        if len(set(seed_owners)) != len(seed_owners) or len(set(key_owners)) != len(key_owners):
            raise MemberError(f"member {msg.member} repeated an owner")
        if not set(seed_owners) <= (held & survivors) or not set(key_owners) <= (held - survivors):
            raise MemberError(f"member {msg.member} released shares of owners it does not hold or of the wrong kind")
        partners = self._partners(msg.member)
        pair_owners = [o for o, _ in msg.pair_seeds]
        if len(set(pair_owners)) != len(pair_owners) or not set(pair_owners) <= (partners - survivors):
            raise MemberError(f"member {msg.member} sent mask seeds for members it did not mask with or that survived")
        x = share_index(msg.member)
        try:
            for _, value in msg.seed_shares + msg.key_shares:
                shamir.Share.from_bytes(x, value)
        except shamir.ShamirError as exc:
            raise ShapeError(f"member {msg.member} sent a malformed share: {exc}") from None

    def _partners(self, member: int) -> set[int]:
        """Whom ``member`` masked with: neighbours that shared keys, less those it skipped."""
        return (set(self.graph[member]) & set(self.share_msgs)) - self.skipped.get(member, frozenset())

    # -- closing stages ----------------------------------------------------------------------
    def _abort(self, why: str) -> SessionAborted:
        self.stage = ServerStage.ABORTED
        self.abort_reason = why
        self.masked.clear()
        self.unmask_msgs.clear()
        self.share_msgs.clear()
        return SessionAborted(why)

    def _require(self, count: int, what: str) -> None:
        if count < self.params.threshold:
            raise self._abort(f"{count} {what}, threshold is {self.params.threshold}: session aborted, nothing revealed")

    def close_advertise(self) -> Roster:
        if self.stage is not ServerStage.ADVERTISE:
            raise SecAggError(f"cannot close advertise in stage {self.stage.value}")
        self._require(len(self.adverts), "members advertised keys")
        self.roster = {m: (a.c_public, a.s_public, a.nonce_commitment) for m, a in self.adverts.items()}
        self.session = session_id(self._context, self.roster)
        if len(self.roster) < self.params.t:
            raise self._abort(f"too few members advertised to reach share threshold {self.params.t}")
        self.stage = ServerStage.SHARE
        return Roster(self._context, tuple((m, wire.encode(self.adverts[m])) for m in sorted(self.adverts)))

    def close_share(self) -> dict[int, ShareDelivery]:
        if self.stage is not ServerStage.SHARE:
            raise SecAggError(f"cannot close share in stage {self.stage.value}")
        self._require(len(self.share_msgs), "members shared keys")
        nonces = {m: self.share_msgs[m].nonce for m in sorted(self.share_msgs)}
        try:
            graph = masking_graph(self.params, self.session, tuple(self.roster), nonces)
        except ValueError as exc:
            raise self._abort(f"no ring order: {exc}; session aborted, nothing revealed") from None
        self.graph, self.graph_digest = graph.neighbours, graph.digest
        inbox: dict[int, list[tuple[int, bytes]]] = {m: [] for m in self.share_msgs}
        for sender in sorted(self.share_msgs):
            for recipient, ciphertext in self.share_msgs[sender].ciphertexts:
                if recipient in inbox and recipient in self.graph[sender]:  # only neighbours hold shares
                    inbox[recipient].append((sender, ciphertext))
        revealed = tuple(nonces.items())
        self.stage = ServerStage.UPLOAD
        return {m: ShareDelivery(self.session, tuple(box), revealed) for m, box in inbox.items()}

    def close_upload(self) -> SurvivorList:
        if self.stage is not ServerStage.UPLOAD:
            raise SecAggError(f"cannot close upload in stage {self.stage.value}")
        self._require(len(self.masked), "masked inputs")
        self.excluded = settle_complaints({m: self.skipped.get(m, frozenset()) & set(self.masked) for m in self.masked})
        for m in self.excluded:
            del self.masked[m]  # its masks with members that skipped it cannot cancel
        self._require(len(self.masked), "masked inputs after leaving out members with unusable shares")
        self.survivors = tuple(sorted(self.masked))
        self.stage = ServerStage.CONSISTENCY
        return SurvivorList(self.session, self.survivors)

    def close_consistency(self) -> ConsistencyBundle:
        if self.stage is not ServerStage.CONSISTENCY:
            raise SecAggError(f"cannot close consistency in stage {self.stage.value}")
        self._require(len(self.consistency_sigs), "consistency signatures")
        self.stage = ServerStage.UNMASK
        return ConsistencyBundle(self.session, tuple(sorted(self.consistency_sigs.items())))

    def finish(self) -> AggregateResult:
        """Remove every mask and return the survivors' sum, or abort if some secret cannot be recovered."""
        if self.stage is not ServerStage.UNMASK:
            raise SecAggError(f"cannot unmask in stage {self.stage.value}")
        self._require(len(self.unmask_msgs), "unmask responses")
        t = self.params.t
        seed_shares: dict[int, list[shamir.Share]] = {}
        key_shares: dict[int, list[shamir.Share]] = {}
        for holder in sorted(self.unmask_msgs):
            msg = self.unmask_msgs[holder]
            x = share_index(holder)
            for owner, value in msg.seed_shares:
                seed_shares.setdefault(owner, []).append(shamir.Share.from_bytes(x, value))
            for owner, value in msg.key_shares:
                key_shares.setdefault(owner, []).append(shamir.Share.from_bytes(x, value))
        survivors = self.survivors
        dropped = tuple(sorted(set(self.share_msgs) - set(survivors)))
        cache = shamir.LagrangeCache()
        seeds = {m: self._recover(m, seed_shares.get(m, []), t, cache, "seed") for m in survivors}
        survivor_set = set(survivors)
        # a dropped member's key is needed only if some survivor masked with it (one that
        # skipped it holds none of its shares either)
        partners = {j: sorted(i for i in self.graph[j] & survivor_set if j not in self.skipped.get(i, ())) for j in dropped}
        pair_seeds = {(i, j): seed for i in survivors if i in self.unmask_msgs for j, seed in self.unmask_msgs[i].pair_seeds}
        # a dropped member's key is rebuilt only if some survivor masked with it and did not
        # send the mask's seed itself (it dropped before unmasking)
        keys = {
            j: self._recover(j, key_shares.get(j, []), t, cache, "key")
            for j in dropped
            if any((i, j) not in pair_seeds for i in partners[j])
        }

        dim, bits = self.params.dim, self.params.ring_bits
        total = np.zeros(dim, dtype=ring_dtype(bits))
        for m in survivors:
            np.add(total, self.masked[m], out=total)
        for m in survivors:
            np.subtract(total, expand_mask(self_mask_seed(seeds[m], self.session, m), dim, bits), out=total)
        for j in dropped:
            key_j = X25519Key(keys[j]) if j in keys else None
            for i in partners[j]:
                seed = pair_seeds.get((i, j))
                if seed is None:
                    assert key_j is not None
                    seed = pairwise_seed(key_j.agree(self.roster[i][1]), self.session, i, j)
                mask = expand_mask(seed, dim, bits)
                # member i added +mask if i < j, else -mask: undo it.
                if i < j:
                    np.subtract(total, mask, out=total)
                else:
                    np.add(total, mask, out=total)
        self.masked.clear()
        self.unmask_msgs.clear()
        self.stage = ServerStage.DONE
        self.result = AggregateResult(total, survivors, dropped, self.excluded, tuple(sorted(self._suspects)))
        return self.result

    def _recover(self, owner: int, shares: list[shamir.Share], t: int, cache: shamir.LagrangeCache, kind: str) -> bytes:
        if len(shares) < t:
            raise self._abort(f"only {len(shares)} {kind} shares of member {owner}, need {t}: session aborted")
        # Holders already caught with a wrong share go last: the first t usually verify at once.
        ordered = sorted(shares, key=lambda s: (s.index - 1) in self._suspects)
        try:
            secret, wrong = shamir.robust_reconstruct(
                ordered, t, lambda secret: self._matches(owner, secret, kind), cache=cache
            )
        except shamir.ShamirError as exc:
            raise self._abort(f"{kind} of member {owner} cannot be recovered from its shares ({exc}): session aborted") from None
        self._suspects.update(s.index - 1 for s in wrong)  # share index = member id + 1
        return secret

    def _matches(self, owner: int, secret: bytes, kind: str) -> bool:
        if kind == "seed":
            return constant_time_equal(seed_commitment(self.session, owner, secret), self.share_msgs[owner].seed_commitment)
        return constant_time_equal(x25519_public_from_private(secret), self.roster[owner][1])


def settle_complaints(skipped: dict[int, frozenset[int]]) -> tuple[int, ...]:
    """Members to leave out so that no member in the sum skipped another member in it.

    ``skipped[u]`` holds the uploaders whose shares u could not use. Greedy vertex cover of
    the complaint graph: repeatedly leave out whoever is in the most open complaints, the
    accused before the accuser on a tie (a garbage ciphertext is the common case), then the
    lower id. With an honest server every complaint has a malicious end. One malicious member
    costs at most one honest member, and only by a single false complaint (which the server
    cannot tell from a single garbage ciphertext); two or more complaints filed by or about it
    put it out alone. Colluders can cost more (greedy cover is within a factor ln(d) + 1 of
    the smallest, d the most complaints touching one member); the session still aborts,
    revealing nothing, if fewer than T remain.
    """
    edges = {(u, v) for u, vs in skipped.items() for v in vs if u != v}
    out: list[int] = []
    while edges:
        degree: dict[int, int] = {}
        accused: dict[int, int] = {}
        for u, v in edges:
            degree[u] = degree.get(u, 0) + 1
            degree[v] = degree.get(v, 0) + 1
            accused[v] = accused.get(v, 0) + 1
        worst = max(degree, key=lambda m: (degree[m], accused.get(m, 0), -m))
        out.append(worst)
        edges = {(u, v) for u, v in edges if worst not in (u, v)}
    return tuple(sorted(out))

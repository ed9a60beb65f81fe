"""The member side of secure aggregation, as a transport-free state machine.

Stages: advertise keys -> share keys -> masked input -> consistency check -> unmask.
Each method consumes the server's message for one stage and returns this member's reply;
calling a method out of order raises, and a refused message leaves the state unchanged.
Fresh X25519 keys, a fresh self-mask seed and a fresh ring-order nonce are drawn per
session, and the member never releases both a seed share and a key share for the same owner.

Where those four draws come from (:class:`RandomSource`): a deployed member passes nothing and
draws each from the operating system. A simulation passes a generator derived from its run
seed, because the ring order is a hash of the session id (which binds the advertised keys) and
of the nonces: with OS draws every run masked on another ring, so which neighbours' ids, shares
and pair seeds a member sent, and with them the modelled stage times and sometimes whether a
cohort aborted, changed from run to run. The generator replaces the OS only for these draws;
Shamir coefficients and AEAD nonces still come from the OS, and change no size or result.

A neighbour whose shares do not decrypt (or do not parse) is treated exactly like one whose
shares never arrived: this member keeps none of its shares, does not mask with it, names it
in ``MaskedInput.skipped`` so the server can leave one of the two out of the sum, and refuses
any survivor list that names it. So a malicious server that corrupts or drops ciphertexts
gains nothing it could not get by withholding them (which it always could): each such
neighbour must leave the sum, or this member stops before releasing anything.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Protocol, TypeVar

import numpy as np

from ftte import wire
from ftte.crypto import shamir
from ftte.crypto.prg import expand_mask, pairwise_seed, ring_dtype, self_mask_seed
from ftte.crypto.primitives import (
    CryptoError,
    Signer,
    aead_decrypt,
    aead_encrypt,
    ed25519_verify,
    X25519Key,
    constant_time_equal,
    random_bytes,
    x25519_check_public,
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
    share_aad,
    share_index,
    share_key,
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


M = TypeVar("M")


class RandomSource(Protocol):
    """A cryptographic byte stream (``ftte.privacy.secure_random.SecureRandom`` is one)."""

    def random_bytes(self, n: int) -> bytes: ...


class ClientStage(enum.Enum):
    NEW = "new"
    ADVERTISED = "advertised"
    SHARED = "shared"
    MASKED = "masked"
    SIGNED = "signed"
    DONE = "done"
    ABORTED = "aborted"


def sign_message(signer: Signer, msg: M) -> M:
    """``msg`` with its identity signature filled in."""
    return dataclasses.replace(msg, signature=signer.sign(signing_bytes(msg)))


class SecAggClient:
    def __init__(self, params: SessionParams, member: int, identity: Signer, rng: RandomSource | None = None) -> None:
        """``rng``: where this session's keys, self-mask seed and ring nonce come from; None (a
        deployment) draws each from the OS. Only a simulation passes one (see the module docstring)."""
        if not params.is_member(member):
            raise MemberError(f"member {member} is not in this cohort")
        if params.identity_key(member) != identity.public_key:
            raise MemberError(f"identity key of member {member} does not match the cohort's")
        self.params = params
        self.member = member
        self._identity = identity
        self._context = params.context()
        self.stage = ClientStage.NEW
        draw = random_bytes if rng is None else rng.random_bytes
        # keys from cryptography's own generator unless a source is given
        self._c = X25519Key(None if rng is None else draw(32))  # encrypts shares
        self._s = X25519Key(None if rng is None else draw(32))  # pairwise masks
        self.c_public, self.s_public = self._c.public_key, self._s.public_key
        self._c_secrets: dict[int, bytes] = {}  # peer -> X25519(c) secret, agreed once per session
        self._seed = draw(32)
        self._nonce = draw(32)  # ring-order contribution, revealed once the roster is fixed
        self.nonce_commitment = nonce_commitment(self._context, member, self._nonce)
        self.session: bytes = b""
        self.roster: dict[int, tuple[bytes, bytes, bytes]] = {}  # member -> (c_public, s_public, nonce commitment)
        self.neighbours: frozenset[int] = frozenset()
        self.graph_digest: bytes = b""
        self.share_peers: tuple[int, ...] = ()  # members whose shares I hold (and who mask with me)
        self.skipped: tuple[int, ...] = ()  # neighbours that shared keys but whose shares I could not use
        self._held: dict[int, tuple[shamir.Share, shamir.Share]] = {}  # owner -> (seed share, key share)
        self._survivors: tuple[int, ...] = ()
        self.released: dict[int, str] = {}  # owner -> "seed" | "key"

    # -- helpers ---------------------------------------------------------------------------
    def _expect(self, stage: ClientStage) -> None:
        if self.stage is not stage:
            raise ReplayError(f"member {self.member}: message for another stage (now {self.stage.value})")

    def _abort(self, why: str) -> SessionAborted:
        self.stage = ClientStage.ABORTED
        self._held.clear()
        return SessionAborted(why)

    def _check_session(self, session: bytes) -> None:
        if session != self.session:
            raise ReplayError(f"member {self.member}: message from another session")

    # -- stage 0 ---------------------------------------------------------------------------
    def advertise(self) -> AdvertiseKeys:
        self._expect(ClientStage.NEW)
        msg = sign_message(
            self._identity,
            AdvertiseKeys(self._context, self.member, self.c_public, self.s_public, nonce_commitment=self.nonce_commitment),
        )
        self.stage = ClientStage.ADVERTISED
        return msg

    # -- stage 1 ---------------------------------------------------------------------------
    def share_keys(self, roster_msg: Roster) -> ShareKeys:
        """Check every advertisement, derive the session, and send encrypted shares to my holders."""
        self._expect(ClientStage.ADVERTISED)
        if roster_msg.context != self._context:
            raise ReplayError("roster for another cohort context")
        roster: dict[int, tuple[bytes, bytes, bytes]] = {}
        for member, blob in roster_msg.adverts:
            try:
                advert = wire.decode(blob, expect=AdvertiseKeys)
                x25519_check_public(advert.c_public)
                x25519_check_public(advert.s_public)
            except (wire.WireError, CryptoError) as exc:
                raise ShapeError(f"advertisement of member {member}: {exc}") from None
            if advert.member != member or not self.params.is_member(member) or member in roster:
                raise MemberError(f"roster lists unknown or duplicate member {member}")
            if advert.context != self._context:
                raise ReplayError(f"advertisement of member {member} belongs to another context")
            try:
                ed25519_verify(self.params.identity_key(member), advert.signature, signing_bytes(advert))
            except CryptoError as exc:
                raise SignatureError(f"advertisement of member {member}: {exc}") from None
            roster[member] = (advert.c_public, advert.s_public, advert.nonce_commitment)
        if roster.get(self.member) != (self.c_public, self.s_public, self.nonce_commitment):
            raise MemberError("roster does not carry my own advertisement")
        if len(roster) < self.params.threshold:
            raise self._abort(f"only {len(roster)} members advertised keys, threshold is {self.params.threshold}")
        if len(roster) < self.params.t:
            raise self._abort(f"{len(roster)} members cannot reach share threshold {self.params.t}")
        session = session_id(self._context, roster)
        self.session, self.roster = session, roster
        # The ring order is not known yet (it needs every member's nonce, revealed below), so
        # shares go to every member; holders keep only their ring neighbours' (see secagg_session).
        holders = sorted(roster)
        indices = [share_index(h) for h in holders]
        seed_shares = shamir.split(self._seed, self.params.t, indices)
        key_shares = shamir.split(self._s.private_bytes(), self.params.t, indices)
        ciphertexts = []
        for holder, s_share, k_share in zip(holders, seed_shares, key_shares):
            if holder == self.member:
                self._held[self.member] = (s_share, k_share)
                continue
            secret = self._c_secrets[holder] = self._c.agree(roster[holder][0])
            key = share_key(secret, session, self.member, holder)
            plaintext = s_share.value_bytes() + k_share.value_bytes()
            ciphertexts.append((holder, aead_encrypt(key, plaintext, share_aad(session, self.member, holder))))
        msg = ShareKeys(
            session, self.member, seed_commitment(session, self.member, self._seed), tuple(ciphertexts), nonce=self._nonce
        )
        self.stage = ClientStage.SHARED
        return sign_message(self._identity, msg)

    def _revealed_nonces(self, delivery: ShareDelivery) -> dict[int, bytes]:
        """Every nonce in the delivery, each checked against its member's commitment."""
        nonces: dict[int, bytes] = {}
        for member, nonce in delivery.nonces:
            if member not in self.roster or member in nonces:
                raise MemberError(f"nonce from unknown or repeated member {member}")
            if not constant_time_equal(nonce_commitment(self._context, member, nonce), self.roster[member][2]):
                raise SignatureError(f"nonce of member {member} does not open its commitment")
            nonces[member] = nonce
        if nonces.get(self.member) != self._nonce:
            raise MemberError("delivery does not carry my own nonce")
        return nonces

    def _open_shares(self, sender: int, ciphertext: bytes) -> tuple[shamir.Share, shamir.Share] | None:
        """The (seed, key) shares ``sender`` sent me, or None if they do not decrypt or parse."""
        secret = self._c_secrets.get(sender) or self._c.agree(self.roster[sender][0])
        key = share_key(secret, self.session, sender, self.member)
        try:
            plain = aead_decrypt(key, ciphertext, share_aad(self.session, sender, self.member))
            index = share_index(self.member)
            return (
                shamir.Share.from_bytes(index, plain[: shamir.SHARE_BYTES]),
                shamir.Share.from_bytes(index, plain[shamir.SHARE_BYTES :]),
            )
        except (CryptoError, shamir.ShamirError):
            return None

    # -- stage 2 ---------------------------------------------------------------------------
    def masked_input(self, delivery: ShareDelivery, vector: np.ndarray) -> MaskedInput:
        """Decrypt the shares I hold, then add my self mask and pairwise masks to ``vector``."""
        self._expect(ClientStage.SHARED)
        self._check_session(delivery.session)
        dtype = ring_dtype(self.params.ring_bits)
        vector = np.asarray(vector)
        if vector.dtype != dtype or vector.shape != (self.params.dim,):
            raise ShapeError(f"input must be a {dtype} vector of length {self.params.dim}, got {vector.dtype} {vector.shape}")
        nonces = self._revealed_nonces(delivery)
        senders: set[int] = set()
        for sender, _ in delivery.ciphertexts:
            if sender not in nonces or sender == self.member or sender in senders:
                raise MemberError(f"shares from member {sender}, who did not reveal a nonce, is me, or repeats")
            senders.add(sender)
        try:
            graph = masking_graph(self.params, self.session, tuple(self.roster), nonces)
        except ValueError as exc:
            raise self._abort(f"no ring order: {exc}") from None
        neighbours = graph.neighbours[self.member]
        held: dict[int, tuple[shamir.Share, shamir.Share]] = {}
        for sender, ciphertext in delivery.ciphertexts:
            if sender in neighbours:  # shares of non-neighbours are not mine to hold: never opened
                shares = self._open_shares(sender, ciphertext)
                if shares is not None:
                    held[sender] = shares
        if len(held) + 1 < self.params.t:
            raise self._abort(f"only {len(held) + 1} of my share holders shared keys, share threshold is {self.params.t}")
        self.neighbours, self.graph_digest = neighbours, graph.digest
        self.skipped = tuple(sorted(m for m in neighbours if m in nonces and m not in held))
        self._held.update(held)
        self.share_peers = tuple(sorted(held))
        masked = vector + expand_mask(self_mask_seed(self._seed, self.session, self.member), self.params.dim, self.params.ring_bits)
        for peer in self.share_peers:
            secret = self._s.agree(self.roster[peer][1])
            mask = expand_mask(pairwise_seed(secret, self.session, self.member, peer), self.params.dim, self.params.ring_bits)
            if self.member < peer:
                np.add(masked, mask, out=masked)
            else:
                np.subtract(masked, mask, out=masked)
        self.stage = ClientStage.MASKED
        return sign_message(self._identity, MaskedInput(self.session, self.member, masked, skipped=self.skipped))

    # -- stage 3 ---------------------------------------------------------------------------
    def consistency(self, survivors_msg: SurvivorList) -> ConsistencySignature:
        """Sign the survivor list, so that no two members can be shown different lists."""
        self._expect(ClientStage.MASKED)
        self._check_session(survivors_msg.session)
        survivors = survivors_msg.survivors
        if list(survivors) != sorted(set(survivors)) or any(m not in self.roster for m in survivors):
            raise MemberError("survivor list is unsorted, repeats or names members outside the roster")
        if self.member not in survivors:
            raise MemberError("survivor list omits me")
        # A neighbour I did not mask with (the server withheld its shares from me) must not
        # count as a survivor: otherwise the server could declare every peer I did mask with
        # dropped, collect their key shares and my seed shares, and strip all masks off my input.
        unmasked = [m for m in survivors if m in self.neighbours and m not in self.share_peers]
        if unmasked:
            raise MemberError(f"survivor list names neighbours I never masked with: {unmasked}")
        if len(survivors) < self.params.threshold:
            raise self._abort(f"{len(survivors)} survivors, threshold is {self.params.threshold}")
        self._survivors = tuple(survivors)
        self.stage = ClientStage.SIGNED
        return ConsistencySignature(
            self.session, self.member, self._identity.sign(consistency_bytes(self.session, self._survivors, self.graph_digest))
        )

    # -- stage 4 ---------------------------------------------------------------------------
    def unmask(self, bundle: ConsistencyBundle) -> UnmaskShares:
        """Release, per owner I hold shares of, the seed share if it survived, else the key share."""
        self._expect(ClientStage.SIGNED)
        self._check_session(bundle.session)
        signed: set[int] = set()
        message = consistency_bytes(self.session, self._survivors, self.graph_digest)
        for member, signature in bundle.signatures:
            if member not in self._survivors or member in signed:
                raise MemberError(f"consistency signature from non-survivor or duplicate member {member}")
            try:
                ed25519_verify(self.params.identity_key(member), signature, message)
            except CryptoError:
                raise SignatureError(f"consistency signature of member {member} does not verify") from None
            signed.add(member)
        if len(signed) < self.params.threshold:
            raise self._abort(f"{len(signed)} consistency signatures, threshold is {self.params.threshold}")
        survivors = set(self._survivors)
        kinds = {owner: "seed" if owner in survivors else "key" for owner in self._held}
        for owner, kind in kinds.items():
            if self.released.get(owner, kind) != kind:
                raise SecAggError(f"refusing to release both share kinds of member {owner}")
        self.released.update(kinds)
        seed_shares, key_shares = [], []
        for owner in sorted(self._held):
            seed_share, key_share = self._held[owner]
            if kinds[owner] == "seed":
                seed_shares.append((owner, seed_share.value_bytes()))
            else:
                key_shares.append((owner, key_share.value_bytes()))
        # My masks with partners outside the list: the server removes them from my input. (Their
        # key shares, released above by every honest holder, would give the server the same masks.)
        pair_seeds = tuple(
            (peer, pairwise_seed(self._s.agree(self.roster[peer][1]), self.session, self.member, peer))
            for peer in self.share_peers
            if peer not in survivors
        )
        self._held.clear()
        self.stage = ClientStage.DONE
        return sign_message(
            self._identity,
            UnmaskShares(self.session, self.member, tuple(seed_shares), tuple(key_shares), pair_seeds=pair_seeds),
        )

"""Messages of the secure-aggregation protocol (tags 1-19): the only messages ``ftte.crypto`` knows.

Client-to-server messages carry an Ed25519 signature by the member's long-term identity
over :func:`signing_bytes`, which is the encoded message with an empty signature under a
per-type domain label; so a message cannot be moved to another type, session or member.
"""

from __future__ import annotations

import dataclasses
import hashlib

from ftte.wire import (
    IDS,
    KEY32,
    RING_VECTOR,
    SIG64,
    U64,
    Message,
    encode,
    field,
    fixed_bytes,
    message,
    pairs,
    var_bytes,
)

import numpy as np

SHARE_BYTES = 33  # a Shamir share value in the 257-bit prime field
SHARE_CIPHERTEXT_BYTES = 12 + 2 * SHARE_BYTES + 16  # nonce + (seed share, key share) + tag
EMPTY_SIGNATURE = bytes(64)
NO_NONCE = bytes(32)  # default of the ring-order fields: commits to nothing anyone can open

SHARE = fixed_bytes(SHARE_BYTES)
CIPHERTEXT = fixed_bytes(SHARE_CIPHERTEXT_BYTES)


@message(1)
class AdvertiseKeys(Message):
    """Stage 0: a member's fresh X25519 keys (c: share encryption, s: pairwise masks), and a
    hash commitment to a fresh nonce that it reveals in :class:`ShareKeys` once the roster is
    fixed (the ring order comes from all revealed nonces, so no one can grind it)."""

    context: bytes = field(KEY32)
    member: int = field(U64)
    c_public: bytes = field(KEY32)
    s_public: bytes = field(KEY32)
    signature: bytes = field(SIG64, default=EMPTY_SIGNATURE)
    nonce_commitment: bytes = field(KEY32, default=NO_NONCE)  # covered by the signature


@message(2)
class Roster(Message):
    """Server to all: every advertisement received, so members can check them and derive the session id."""

    context: bytes = field(KEY32)
    adverts: tuple = field(pairs(var_bytes(512)))  # (member, encoded AdvertiseKeys)


@message(3)
class ShareKeys(Message):
    """Stage 1: AEAD-encrypted Shamir shares for every other roster member (holders keep only
    those of their ring neighbours), a commitment to the self-mask seed, and the nonce
    committed to in :class:`AdvertiseKeys`."""

    session: bytes = field(KEY32)
    member: int = field(U64)
    seed_commitment: bytes = field(KEY32)
    ciphertexts: tuple = field(pairs(CIPHERTEXT))  # (recipient, ciphertext)
    signature: bytes = field(SIG64, default=EMPTY_SIGNATURE)
    nonce: bytes = field(KEY32, default=NO_NONCE)  # covered by the signature


@message(4)
class ShareDelivery(Message):
    """Server to one member: the ciphertexts addressed to it, by sender, and the nonce every
    member that shared keys revealed (the same list for every member)."""

    session: bytes = field(KEY32)
    ciphertexts: tuple = field(pairs(CIPHERTEXT))  # (sender, ciphertext)
    nonces: tuple = field(pairs(KEY32), default=())  # (member, revealed nonce)


@message(5)
class MaskedInput(Message):
    """Stage 2: the member's input plus its self mask and pairwise masks, in the ring, and the
    neighbours whose shares it could not use (so it did not mask with them)."""

    session: bytes = field(KEY32)
    member: int = field(U64)
    vector: np.ndarray = field(RING_VECTOR)
    signature: bytes = field(SIG64, default=EMPTY_SIGNATURE)
    skipped: tuple = field(IDS, default=())  # sorted; covered by the signature


@message(6)
class SurvivorList(Message):
    """Server to survivors: who uploaded a masked input (U2)."""

    session: bytes = field(KEY32)
    survivors: tuple = field(IDS)


@message(7)
class ConsistencySignature(Message):
    """Stage 3: a member's signature on the survivor list, checked by the other members."""

    session: bytes = field(KEY32)
    member: int = field(U64)
    signature: bytes = field(SIG64)


@message(8)
class ConsistencyBundle(Message):
    """Server to survivors: the consistency signatures it collected."""

    session: bytes = field(KEY32)
    signatures: tuple = field(pairs(SIG64))  # (member, signature)


@message(9)
class UnmaskShares(Message):
    """Stage 4: seed shares of survivors and key shares of dropped members, never both for one
    member, and the pairwise mask seeds shared with dropped mask partners."""

    session: bytes = field(KEY32)
    member: int = field(U64)
    seed_shares: tuple = field(pairs(SHARE))  # (owner, share of owner's self-mask seed)
    key_shares: tuple = field(pairs(SHARE))  # (owner, share of owner's mask private key)
    signature: bytes = field(SIG64, default=EMPTY_SIGNATURE)
    # (partner, seed of my pairwise mask with it) for each mask partner outside the survivor
    # list: lets the server remove that mask even when the partner's key cannot be rebuilt
    # (say, it sent garbage to most of its holders). Covered by the signature.
    pair_seeds: tuple = field(pairs(KEY32), default=())


SIGNED_TYPES = (AdvertiseKeys, ShareKeys, MaskedInput, UnmaskShares)


def signing_bytes(msg: Message) -> bytes:
    """What a member signs: a domain label and the digest of the message with an empty signature."""
    unsigned = dataclasses.replace(msg, signature=EMPTY_SIGNATURE)
    label = f"ftte/secagg/{type(msg).__name__}/v1".encode()
    return label + hashlib.sha256(encode(unsigned)).digest()


def consistency_bytes(session: bytes, survivors: tuple[int, ...], order: bytes = b"") -> bytes:
    """What a member signs in the consistency check: the session, the sorted survivor list and
    (when given) the digest of the masking graph it used, so that members who derived
    different graphs never count each other's signatures."""
    body = b"".join(m.to_bytes(8, "big") for m in sorted(survivors))
    label = b"ftte/secagg/consistency/v2" if order else b"ftte/secagg/consistency/v1"
    return label + session + hashlib.sha256(body).digest() + order

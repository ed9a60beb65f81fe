"""Thin, safe recipes over ``cryptography``'s primitives.

Every key comes from ``cryptography``; every derivation is HKDF-SHA256 with the session id
as salt and a labelled ``info`` so that keys for different purposes and sessions never
coincide. Callers never touch raw primitive objects outside this module.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
SIGNATURE_BYTES = 64
AEAD_NONCE_BYTES = 12

_RAW = serialization.Encoding.Raw
_RAW_PUB = serialization.PublicFormat.Raw
_RAW_PRIV = serialization.PrivateFormat.Raw
_NO_ENC = serialization.NoEncryption()


class CryptoError(ValueError):
    """A signature, tag or key failed to verify."""


def random_bytes(n: int) -> bytes:
    return os.urandom(n)


def sha256(*parts: bytes) -> bytes:
    """Hash of length-prefixed parts, so that ("ab", "c") and ("a", "bc") differ."""
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.digest()


def constant_time_equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


# --- X25519 ---------------------------------------------------------------------------

def x25519_keypair() -> tuple[bytes, bytes]:
    """A fresh ephemeral key pair as (private raw 32 bytes, public raw 32 bytes)."""
    sk = X25519PrivateKey.generate()
    return sk.private_bytes(_RAW, _RAW_PRIV, _NO_ENC), sk.public_key().public_bytes(_RAW, _RAW_PUB)


def x25519_public_from_private(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(_RAW, _RAW_PUB)


class X25519Key:
    """An X25519 private key parsed once: a member agrees with up to n-1 peers per session."""

    def __init__(self, private: bytes | None = None) -> None:
        self._sk = X25519PrivateKey.from_private_bytes(private) if private else X25519PrivateKey.generate()
        self.public_key = self._sk.public_key().public_bytes(_RAW, _RAW_PUB)

    def private_bytes(self) -> bytes:
        return self._sk.private_bytes(_RAW, _RAW_PRIV, _NO_ENC)

    def agree(self, peer_public: bytes) -> bytes:
        """Raw shared secret; never used directly as a key, always through :func:`hkdf`."""
        if len(peer_public) != KEY_BYTES:
            raise CryptoError("X25519 public key must be 32 bytes")
        return self._sk.exchange(X25519PublicKey.from_public_bytes(peer_public))


_P25519 = 2**255 - 19
# u-coordinates (mod p) of the points whose X25519 product with every clamped scalar is
# zero: 0 (order 1 and 2), 1 and p - 1 (order 4, on the curve or its twist), and the two
# points of order 8. The twist's cofactor is 4, so it has no others. An exchange with any
# of them yields the all-zero secret that ``cryptography`` refuses.
_SMALL_ORDER_U = frozenset({
    0,
    1,
    _P25519 - 1,
    0x00B8495F16056286FDB1329CEB8D09DA6AC49FF1FAE35616AEB8413B7C7AEBE0,
    0x57119FD0DD4E22D8868E1C58C45C44045BEF839C55B1D0B1248C50A3BC959C5F,
})


def x25519_check_public(public: bytes) -> None:
    """Refuse a public key no honest party could have made (wrong length, low order):
    agreeing with it fails for everyone, so one bad advertisement would stall a cohort.

    Arithmetic on the u-coordinate, as X25519 reads it (RFC 7748: the top bit ignored, the
    value taken mod p), instead of an exchange with a throwaway key pair: the same keys are
    refused (a property test compares the two) at a fraction of the cost."""
    if type(public) is not bytes or len(public) != KEY_BYTES:
        raise CryptoError("X25519 public key must be 32 bytes")
    u = (int.from_bytes(public, "little") & ((1 << 255) - 1)) % _P25519
    if u in _SMALL_ORDER_U:
        raise CryptoError("unusable X25519 public key: it has small order (every shared secret would be zero)")


def x25519_agree(private: bytes, peer_public: bytes) -> bytes:
    """Raw shared secret; never used directly as a key, always through :func:`hkdf`."""
    return X25519Key(private).agree(peer_public)


# --- HKDF -----------------------------------------------------------------------------

def hkdf(ikm: bytes, *, salt: bytes, info: bytes, length: int = KEY_BYTES) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


# --- Ed25519 --------------------------------------------------------------------------

def ed25519_keypair() -> tuple[bytes, bytes]:
    sk = Ed25519PrivateKey.generate()
    return sk.private_bytes(_RAW, _RAW_PRIV, _NO_ENC), sk.public_key().public_bytes(_RAW, _RAW_PUB)


def ed25519_public_from_private(private: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(private).public_key().public_bytes(_RAW, _RAW_PUB)


class Signer:
    """An Ed25519 identity; keeps the parsed key so signing many messages stays cheap."""

    def __init__(self, private: bytes | None = None) -> None:
        self._sk = Ed25519PrivateKey.from_private_bytes(private) if private else Ed25519PrivateKey.generate()
        self.public_key = self._sk.public_key().public_bytes(_RAW, _RAW_PUB)

    def private_bytes(self) -> bytes:
        return self._sk.private_bytes(_RAW, _RAW_PRIV, _NO_ENC)

    def sign(self, data: bytes) -> bytes:
        return self._sk.sign(data)


def ed25519_verify(public: bytes, signature: bytes, data: bytes) -> None:
    """Raise :class:`CryptoError` unless ``signature`` is ``public``'s signature on ``data``."""
    if len(public) != KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        raise CryptoError("malformed Ed25519 key or signature")
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, data)
    except InvalidSignature as exc:
        raise CryptoError("bad Ed25519 signature") from exc


# --- AEAD -----------------------------------------------------------------------------

def aead_encrypt(key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """ChaCha20-Poly1305 with a random nonce prepended (keys here are single-use per pair and session)."""
    nonce = os.urandom(AEAD_NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated_data)


def aead_decrypt(key: bytes, ciphertext: bytes, associated_data: bytes) -> bytes:
    if len(ciphertext) < AEAD_NONCE_BYTES + 16:
        raise CryptoError("ciphertext too short")
    try:
        return ChaCha20Poly1305(key).decrypt(ciphertext[:AEAD_NONCE_BYTES], ciphertext[AEAD_NONCE_BYTES:], associated_data)
    except InvalidTag as exc:
        raise CryptoError("AEAD tag mismatch: wrong key, session or tampered ciphertext") from exc

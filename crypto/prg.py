"""Mask expansion: a cryptographic PRG over the ring Z_(2^m).

Masks come from the AES-256-CTR keystream (OpenSSL, AES-NI where present). Reading the
keystream as little-endian uint16 / uint32 gives values exactly uniform over Z_(2^m) for
m in {16, 32}, because 2^m divides 2^8k; no rejection sampling is needed and numpy's
unsigned arithmetic wraps modulo 2^m for free.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from ftte.crypto.primitives import KEY_BYTES, hkdf

RING_DTYPES: dict[int, np.dtype] = {16: np.dtype("<u2"), 32: np.dtype("<u4")}


def ring_dtype(bits: int) -> np.dtype:
    try:
        return RING_DTYPES[bits]
    except KeyError:
        raise ValueError(f"ring bits must be one of {sorted(RING_DTYPES)}, got {bits}") from None


def expand_mask(seed: bytes, length: int, bits: int) -> np.ndarray:
    """``length`` ring elements from the AES-CTR keystream under a 32-byte ``seed``.

    The seed must already be a derived, single-use key (see :func:`pairwise_seed`,
    :func:`self_mask_seed`); the all-zero IV is safe only because of that.
    """
    if len(seed) != KEY_BYTES:
        raise ValueError("PRG seed must be 32 bytes")
    if length < 0:
        raise ValueError("mask length must be >= 0")
    dtype = ring_dtype(bits)
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(b"\x00" * 16)).encryptor()
    stream = encryptor.update(bytes(length * dtype.itemsize)) + encryptor.finalize()
    return np.frombuffer(stream, dtype=dtype)


def pairwise_seed(shared_secret: bytes, session_id: bytes, a: int, b: int) -> bytes:
    """The mask key of an unordered pair, bound to the session and the ordered ids (min, max)."""
    lo, hi = (a, b) if a < b else (b, a)
    info = b"ftte/secagg/pairwise-mask/v1" + lo.to_bytes(8, "big") + hi.to_bytes(8, "big")
    return hkdf(shared_secret, salt=session_id, info=info)


def self_mask_seed(seed: bytes, session_id: bytes, member: int) -> bytes:
    """The self-mask key: the member's random seed, bound to the session and member id."""
    info = b"ftte/secagg/self-mask/v1" + member.to_bytes(8, "big")
    return hkdf(seed, salt=session_id, info=info)

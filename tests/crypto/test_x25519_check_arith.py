"""``x25519_check_public`` refuses exactly the keys an exchange with a throwaway key pair refuses."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from hypothesis import given, settings, strategies as st

from ftte.crypto.primitives import CryptoError, x25519_check_public

P = 2**255 - 19
# small-order u-coordinates (RFC 7748 / libsodium's list), written independently of the module
SMALL = [0, 1, P - 1,
         int.from_bytes(bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"), "little"),
         int.from_bytes(bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"), "little")]


def exchange_refuses(public: bytes) -> bool:
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(public))
        return False
    except ValueError:
        return True


def check_refuses(public: bytes) -> bool:
    try:
        x25519_check_public(public)
        return False
    except CryptoError:
        return True


def encodings() -> list[bytes]:
    """Every 32-byte encoding of a small-order point: canonical, + p where it fits in 255 bits, top bit set."""
    out = []
    for u in SMALL:
        for v in (u, u + P):
            for top in (0, 1 << 255):
                if v < 1 << 255:
                    out.append((v | top).to_bytes(32, "little"))
    out += [(P + k).to_bytes(32, "little") for k in range(19)]  # every non-canonical value
    return out


@pytest.mark.parametrize("public", encodings(), ids=lambda b: b.hex()[:12])
def test_small_order_and_non_canonical_encodings_match_the_exchange(public):
    assert check_refuses(public) == exchange_refuses(public)


def test_every_small_order_point_is_refused():
    for u in SMALL:
        assert check_refuses(u.to_bytes(32, "little"))


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=32, max_size=32))
def test_random_keys_are_refused_exactly_when_the_exchange_refuses(public):
    assert check_refuses(public) == exchange_refuses(public)


def test_real_keys_pass_and_malformed_lengths_fail():
    x25519_check_public(X25519PrivateKey.generate().public_key().public_bytes_raw())
    for bad in (b"", b"\x09" * 31, b"\x09" * 33):
        assert check_refuses(bad)
    with pytest.raises(CryptoError):
        x25519_check_public(bytearray(32))  # type: ignore[arg-type]

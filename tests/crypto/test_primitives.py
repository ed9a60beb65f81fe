import numpy as np
import pytest
from scipy import stats

from ftte.crypto import primitives as p
from ftte.crypto.prg import expand_mask, pairwise_seed, self_mask_seed


def test_x25519_agreement_is_symmetric_and_fresh():
    a_sk, a_pk = p.x25519_keypair()
    b_sk, b_pk = p.x25519_keypair()
    assert p.x25519_agree(a_sk, b_pk) == p.x25519_agree(b_sk, a_pk)
    assert p.x25519_keypair()[1] != a_pk
    assert p.x25519_public_from_private(a_sk) == a_pk


def test_signatures_reject_tampering():
    s = p.Signer()
    sig = s.sign(b"hello")
    p.ed25519_verify(s.public_key, sig, b"hello")
    with pytest.raises(p.CryptoError):
        p.ed25519_verify(s.public_key, sig, b"hellp")
    with pytest.raises(p.CryptoError):
        p.ed25519_verify(p.Signer().public_key, sig, b"hello")
    with pytest.raises(p.CryptoError):
        p.ed25519_verify(s.public_key, sig[:-1], b"hello")


def test_aead_binds_associated_data():
    key = p.random_bytes(32)
    ct = p.aead_encrypt(key, b"secret", b"session-1")
    assert p.aead_decrypt(key, ct, b"session-1") == b"secret"
    with pytest.raises(p.CryptoError):
        p.aead_decrypt(key, ct, b"session-2")
    flipped = ct[:-1] + bytes([ct[-1] ^ 1])
    with pytest.raises(p.CryptoError):
        p.aead_decrypt(key, flipped, b"session-1")


def test_hkdf_separates_sessions_and_pairs():
    secret = p.random_bytes(32)
    s1 = pairwise_seed(secret, b"A" * 32, 1, 2)
    assert s1 == pairwise_seed(secret, b"A" * 32, 2, 1)  # unordered pair, ordered in the derivation
    assert s1 != pairwise_seed(secret, b"B" * 32, 1, 2)
    assert s1 != pairwise_seed(secret, b"A" * 32, 1, 3)
    assert self_mask_seed(secret, b"A" * 32, 1) != self_mask_seed(secret, b"A" * 32, 2)


@pytest.mark.parametrize("bits,dtype", [(16, np.uint16), (32, np.uint32)])
def test_prg_is_deterministic_and_uniform(bits, dtype):
    seed = p.random_bytes(32)
    a = expand_mask(seed, 200_000, bits)
    assert a.dtype == dtype and a.shape == (200_000,)
    assert np.array_equal(a, expand_mask(seed, 200_000, bits))
    assert not np.array_equal(a, expand_mask(p.random_bytes(32), 200_000, bits))
    # chi-square over 256 buckets of the top byte: uniform keystream passes at 1e-4.
    top = (a.astype(np.uint64) >> (bits - 8)).astype(np.int64)
    counts = np.bincount(top, minlength=256)
    assert stats.chisquare(counts).pvalue > 1e-4


def test_prg_rejects_bad_input():
    with pytest.raises(ValueError):
        expand_mask(b"short", 10, 16)
    with pytest.raises(ValueError):
        expand_mask(bytes(32), 10, 8)

import os

import pytest
from hypothesis import given, settings, strategies as st

from ftte.crypto import shamir


@settings(max_examples=60, deadline=None)
@given(
    secret=st.binary(min_size=32, max_size=32),
    n=st.integers(min_value=1, max_value=20),
    data=st.data(),
)
def test_any_threshold_subset_reconstructs(secret, n, data):
    t = data.draw(st.integers(min_value=1, max_value=n))
    indices = data.draw(st.lists(st.integers(min_value=1, max_value=2**64), min_size=n, max_size=n, unique=True))
    shares = shamir.split(secret, t, indices)
    subset = data.draw(st.permutations(shares))[: data.draw(st.integers(min_value=t, max_value=n))]
    assert shamir.reconstruct(subset, t) == secret


def test_fewer_than_threshold_is_refused():
    shares = shamir.split(os.urandom(32), 3, [1, 2, 3, 4])
    with pytest.raises(shamir.ShamirError, match="need 3"):
        shamir.reconstruct(shares[:2], 3)


def test_inconsistent_extra_share_is_detected():
    shares = shamir.split(os.urandom(32), 2, [1, 2, 3])
    bad = shamir.Share(shares[2].index, (shares[2].value + 1) % shamir.PRIME)
    with pytest.raises(shamir.ShamirError, match="inconsistent"):
        shamir.reconstruct([shares[0], shares[1], bad], 2)


@pytest.mark.parametrize("indices", [[0, 1, 2], [1, 1, 2], [1, 2, 2**64 + 1]])
def test_bad_indices_are_refused(indices):
    with pytest.raises(shamir.ShamirError):
        shamir.split(os.urandom(32), 2, indices)


def test_repeated_indices_in_reconstruction_refused():
    shares = shamir.split(os.urandom(32), 2, [1, 2])
    with pytest.raises(shamir.ShamirError, match="repeat"):
        shamir.reconstruct([shares[0], shares[0]], 2)


def test_share_bytes_round_trip_and_range():
    share = shamir.split(os.urandom(32), 1, [9])[0]
    assert shamir.Share.from_bytes(9, share.value_bytes()) == share
    with pytest.raises(shamir.ShamirError):
        shamir.Share.from_bytes(9, b"\xff" * 33)  # >= PRIME
    with pytest.raises(shamir.ShamirError):
        shamir.Share.from_bytes(9, b"\x00" * 32)


def test_lagrange_cache_gives_same_result():
    cache = shamir.LagrangeCache()
    secrets = [os.urandom(32) for _ in range(5)]
    for s in secrets:
        shares = shamir.split(s, 3, [4, 8, 15, 16])
        assert shamir.reconstruct(shares[:3], 3, cache=cache) == s

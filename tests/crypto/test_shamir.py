import hashlib
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


@settings(max_examples=80, deadline=None)
@given(secret=st.binary(min_size=32, max_size=32), data=st.data())
def test_robust_reconstruct_finds_the_committed_secret_despite_wrong_shares(secret, data):
    t = data.draw(st.integers(1, 8), label="t")
    n = data.draw(st.integers(t, 14), label="n")
    shares = shamir.split(secret, t, list(range(1, n + 1)))
    bad = set(data.draw(st.lists(st.integers(0, n - 1), unique=True, max_size=n), label="bad"))
    # offsets unrelated across shares: equal ones can cancel in a Lagrange sum (see the next test)
    salt = data.draw(st.binary(min_size=8, max_size=8), label="salt")
    offsets = [1 + int.from_bytes(hashlib.sha256(salt + bytes([i])).digest(), "big") % (shamir.PRIME - 1) for i in range(n)]
    tampered = [shamir.Share(s.index, (s.value + offsets[i]) % shamir.PRIME) if i in bad else s for i, s in enumerate(shares)]
    order = data.draw(st.permutations(tampered), label="order")
    verify = lambda candidate: candidate == secret  # stands for the commitment check
    if n - len(bad) >= t:
        got, wrong = shamir.robust_reconstruct(order, t, verify, max_candidates=10**6)
        assert got == secret
        assert {s.index for s in wrong} <= {shares[i].index for i in bad}
        if any(shares[i].index in {s.index for s in order[:t]} for i in bad):
            # the first t held a wrong share, so the rest were examined: every wrong one is named
            assert {s.index for s in wrong} == {shares[i].index for i in bad}
    else:
        with pytest.raises(shamir.ShamirError):
            shamir.robust_reconstruct(order, t, verify, max_candidates=10**6)


def test_robust_reconstruct_bounds_its_work():
    secret = os.urandom(32)
    shares = shamir.split(secret, 20, list(range(1, 31)))
    # three wrong shares at the front: the all-right subset is candidate 1 + 21 + C(22, 2) + 1 = 254
    bad = [shamir.Share(s.index, (s.value + 7 * (i + 1)) % shamir.PRIME) for i, s in enumerate(shares[:3])]
    mixed = bad + shares[3:]
    tried = []

    def verify(candidate):
        tried.append(candidate)
        return candidate == secret

    with pytest.raises(shamir.ShamirError, match="within 100 candidates"):
        shamir.robust_reconstruct(mixed, 20, verify, max_candidates=100)
    assert len(tried) <= 100
    got, wrong = shamir.robust_reconstruct(mixed, 20, verify)  # the default bound (4096) suffices
    assert got == secret and {s.index for s in wrong} == {1, 2, 3}


def test_colluding_wrong_shares_can_cancel_and_blame_right_ones():
    """The documented caveat: the Lagrange coefficients at zero over x = 1, 2, 3 are 3, -3, 1,
    so shares at x = 1 and 2 shifted by the same amount cancel and {1, 2, 3} reconstructs the
    right secret; the right shares at x = 4 and 5 are then named as wrong. The secret is right;
    the server only uses the names to try those holders last."""
    secret = os.urandom(32)
    shares = shamir.split(secret, 3, [1, 2, 3, 4, 5])
    assert shamir.lagrange_at_zero((1, 2, 3)) == [3, shamir.PRIME - 3, 1]
    shifted = {s.index: shamir.Share(s.index, (s.value + 5) % shamir.PRIME) if s.index <= 2 else s for s in shares}
    order = [shifted[x] for x in (1, 2, 4, 3, 5)]  # the first three, {1, 2, 4}, do not verify
    got, wrong = shamir.robust_reconstruct(order, 3, lambda c: c == secret)
    assert got == secret and [s.index for s in wrong] == [4, 5]

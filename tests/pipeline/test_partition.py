"""Partitions: exact cover, minimum sizes, determinism, and skew that follows alpha."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ftte.pipeline.partition import (
    derive_rng,
    dirichlet_partition,
    iid_partition,
    label_skew,
    partition_labels,
)


def _labels(n_samples: int, n_classes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n_classes, size=n_samples)


def _assert_exact_cover(parts, n):
    allidx = np.concatenate(parts)
    assert allidx.dtype == np.int64
    assert len(allidx) == n
    assert np.array_equal(np.sort(allidx), np.arange(n))
    for p in parts:
        assert np.all(np.diff(p) > 0)  # sorted, no repeats


@settings(max_examples=60, deadline=None)
@given(
    n_devices=st.integers(1, 40),
    n_classes=st.integers(1, 12),
    extra=st.integers(0, 300),
    min_samples=st.integers(0, 5),
    alpha=st.floats(0.01, 100.0),
    seed=st.integers(0, 2**40),
    method=st.sampled_from(["iid", "dirichlet"]),
)
def test_cover_exactly_once_and_min_size(n_devices, n_classes, extra, min_samples, alpha, seed, method):
    n = n_devices * min_samples + extra
    if n == 0:
        return
    labels = _labels(n, n_classes, seed % 1000)
    parts = partition_labels(labels, n_devices, method, seed=seed, alpha=alpha, min_samples=min_samples)
    assert len(parts) == n_devices
    _assert_exact_cover(parts, n)
    assert min(len(p) for p in parts) >= min_samples
    again = partition_labels(labels, n_devices, method, seed=seed, alpha=alpha, min_samples=min_samples)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_iid_sizes_differ_by_at_most_one():
    parts = iid_partition(_labels(1003, 10, 0), 10, seed=1)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_seed_changes_partition():
    labels = _labels(500, 10, 0)
    a = dirichlet_partition(labels, 20, 0.5, seed=1)
    b = dirichlet_partition(labels, 20, 0.5, seed=2)
    assert any(not np.array_equal(x, y) for x, y in zip(a, b))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_small_alpha_is_more_skewed(seed):
    labels = np.repeat(np.arange(10), 100)
    skewed = dirichlet_partition(labels, 20, 0.05, seed=seed, min_samples=2)
    mild = dirichlet_partition(labels, 20, 100.0, seed=seed, min_samples=2)
    iid = iid_partition(labels, 20, seed=seed)
    s_skewed, s_mild, s_iid = (label_skew(labels, p, 10) for p in (skewed, mild, iid))
    assert s_skewed > 0.6
    assert s_mild < 0.3
    assert s_skewed > s_mild + 0.3
    assert s_iid < 0.35


def test_too_few_samples_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 3 samples"):
        dirichlet_partition(np.zeros(20, dtype=int), 10, 0.5, seed=0, min_samples=3)
    with pytest.raises(ValueError, match="unknown partition"):
        partition_labels(np.zeros(10, dtype=int), 2, "shards", seed=0)  # type: ignore[arg-type]


def test_derive_rng_streams_are_stable_and_distinct():
    a = derive_rng(7, "dropout", 3).random(4)
    assert np.array_equal(a, derive_rng(7, "dropout", 3).random(4))
    assert not np.array_equal(a, derive_rng(7, "dropout", 4).random(4))
    assert not np.array_equal(a, derive_rng(8, "dropout", 3).random(4))
    assert not np.array_equal(derive_rng(7, "3").random(4), derive_rng(7, 3).random(4))

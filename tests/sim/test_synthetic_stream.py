"""The streamed synthetic builder gives the arrays the whole-fleet construction gave, and
``[data] eval_samples`` bounds the server's evaluation set."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ftte.pipeline.config import DataConfig
from ftte.pipeline.datasets import load_dataset, synthetic_shards
from ftte.pipeline.partition import derive_rng


def whole_fleet_reference(cfg: DataConfig, seed: int, n_devices: int):
    """The construction the streamed builder replaced: every shard in memory, concatenated, then standardised."""
    total_min = math.ceil(cfg.min_samples_per_device / (1.0 - cfg.test_fraction)) + 1
    shards = synthetic_shards(n_devices, cfg.synthetic_alpha, cfg.synthetic_beta, seed,
                              median_samples=cfg.synthetic_samples, sigma=cfg.synthetic_sigma, min_samples=total_min)
    split_rng = derive_rng(seed, "data", "synthetic-split")
    xs_tr, ys_tr, xs_te, ys_te, sizes = [], [], [], [], []
    for x, y in shards:
        n = len(y)
        k = min(int(round(cfg.test_fraction * n)), n - cfg.min_samples_per_device)
        perm = split_rng.permutation(n)
        te, tr = perm[:k], np.sort(perm[k:])
        xs_tr.append(x[tr]), ys_tr.append(y[tr]), xs_te.append(x[te]), ys_te.append(y[te])
        sizes.append(len(tr))
    x_train, x_test = np.concatenate(xs_tr), np.concatenate(xs_te)
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    return ((x_train - mean) / std, np.concatenate(ys_tr), (x_test - mean) / std, np.concatenate(ys_te), sizes)


@pytest.mark.parametrize("seed", [0, 3])
def test_streamed_synthetic_equals_the_whole_fleet_construction(seed):
    cfg = DataConfig(name="synthetic", eval_samples=0)
    d = load_dataset(cfg, seed, 120)
    x_tr, y_tr, x_te, y_te, sizes = whole_fleet_reference(cfg, seed, 120)
    assert d.x_train.dtype == np.float32 and d.x_test.dtype == np.float32
    assert np.array_equal(d.y_train, y_tr) and np.array_equal(d.y_test, y_te)
    assert [len(ix) for ix in d.device_indices] == sizes
    # statistics combined per device instead of over the concatenation: equal to float32 rounding
    np.testing.assert_allclose(d.x_train, x_tr, rtol=0, atol=2e-6)
    np.testing.assert_allclose(d.x_test, x_te, rtol=0, atol=2e-6)
    assert abs(d.x_train.astype(np.float64).mean()) < 1e-6


def test_eval_samples_bounds_the_test_set_with_a_seeded_sample():
    full = load_dataset(DataConfig(name="synthetic", eval_samples=0), 0, 200)
    n = len(full.y_test)
    small = load_dataset(DataConfig(name="synthetic", eval_samples=n // 4), 0, 200)
    again = load_dataset(DataConfig(name="synthetic", eval_samples=n // 4), 0, 200)
    assert len(small.y_test) == n // 4
    assert np.array_equal(small.x_test, again.x_test)
    # a subset of the full test set's rows, and the training data is untouched
    rows = {r.tobytes() for r in full.x_test}
    assert all(r.tobytes() in rows for r in small.x_test)
    assert np.array_equal(small.x_train, full.x_train)
    # the default keeps a small fleet's whole test set; a bundled dataset likewise
    assert len(load_dataset(DataConfig(name="synthetic"), 0, 200).y_test) == n
    digits = load_dataset(DataConfig(name="digits"), 0, 10)
    assert len(load_dataset(DataConfig(name="digits", eval_samples=100), 0, 10).y_test) == 100 < len(digits.y_test)


def test_eval_samples_must_not_be_negative():
    from ftte.pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="eval_samples"):
        DataConfig(name="synthetic", eval_samples=-1)

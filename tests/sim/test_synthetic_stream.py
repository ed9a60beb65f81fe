"""The synthetic source generates each device's shard on demand from that device's own seed:
deterministic, independent of the order devices are asked in, and the memory it holds does
not grow with the fleet; ``[data] eval_samples`` bounds the server's evaluation set."""

from __future__ import annotations

import numpy as np
import pytest

from ftte.pipeline.config import DataConfig
from ftte.pipeline.datasets import load_dataset


def test_shards_are_deterministic_per_seed_and_order_independent():
    cfg = DataConfig(name="synthetic")
    a, b = load_dataset(cfg, 0, 300), load_dataset(cfg, 0, 300)
    other = load_dataset(cfg, 1, 300)
    order = [250, 3, 99, 3, 0]
    got_a = [a.device_arrays(k) for k in order]
    got_b = [b.device_arrays(k) for k in reversed(order)][::-1]
    for (xa, ya), (xb, yb) in zip(got_a, got_b):
        assert xa.dtype == np.float32 and ya.dtype == np.int64
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    assert not np.array_equal(a.device_arrays(3)[0], other.device_arrays(3)[0])
    assert np.array_equal(a.x_test, b.x_test) and np.array_equal(a.y_test, b.y_test)
    # each device holds as many records as its index list says, and the fleet is heterogeneous
    sizes = [len(a.device_arrays(k)[1]) for k in range(40)]
    assert sizes == [len(a.device_indices[k]) for k in range(40)]
    assert len(set(sizes)) > 10


def test_memory_held_does_not_grow_with_the_fleet_and_eval_is_bounded():
    cfg = DataConfig(name="synthetic", eval_samples=2000)
    small, large = load_dataset(cfg, 0, 1_000), load_dataset(cfg, 0, 20_000)
    for d in (small, large):
        assert d.x_train.nbytes == 0 and d.y_train.nbytes == 0  # no fleet-sized training array
        assert len(d.y_test) == 2000 and d.x_test.shape == (2000, 60)
    # standardised with the statistics of the devices behind the evaluation set
    x = np.concatenate([large.device_arrays(k)[0] for k in range(300)])
    assert abs(float(x.mean())) < 0.2 and 0.6 < float(x.std()) < 1.4
    # with no bound, every device's held-out rows are kept
    full = load_dataset(DataConfig(name="synthetic", eval_samples=0), 0, 200)
    assert len(full.y_test) == sum(int(n) for n in full.shards.n_test)
    assert full.training_head(64)[0].shape == (64, 60)


def test_bundled_datasets_keep_their_arrays():
    digits = load_dataset(DataConfig(name="digits"), 0, 10)
    assert digits.shards is None and len(digits.x_train) > 0
    assert len(load_dataset(DataConfig(name="digits", eval_samples=100), 0, 10).y_test) == 100 < len(digits.y_test)


def test_eval_samples_must_not_be_negative():
    from ftte.pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="eval_samples"):
        DataConfig(name="synthetic", eval_samples=-1)

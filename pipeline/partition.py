"""Splitting a labelled training set over simulated devices.

Pure functions on a label vector: they return, for every device, a sorted ``int64``
array of indices into that vector. Every index appears on exactly one device, and the
result depends only on the arguments (``seed`` included).

Minimum size guarantee: every device receives at least ``min_samples`` indices. IID
splits are near-equal (sizes differ by at most one), so the guarantee holds whenever
``len(labels) >= n_devices * min_samples``. Dirichlet splits first draw the label skew,
then top up every short device with samples taken at random from the currently largest
devices (never pushing a donor below ``min_samples``); this slightly dilutes the skew of
the largest shards but never leaves a device empty. Too few samples is a ``ValueError``.
"""

from __future__ import annotations

import zlib
from typing import Literal, Sequence

import numpy as np

__all__ = ["derive_rng", "iid_partition", "dirichlet_partition", "partition_labels", "label_skew"]


def derive_rng(seed: int, *tags: str | int) -> np.random.Generator:
    """An independent generator for stream ``tags`` under master ``seed``.

    Stable across processes and Python versions (tags are hashed with CRC-32, not
    ``hash()``), so e.g. ``derive_rng(seed, "dropout", device_id)`` gives every device
    its own reproducible stream whatever order devices are visited in.
    """
    words = [int(seed) & 0xFFFFFFFF, (int(seed) >> 32) & 0xFFFFFFFF]
    for tag in tags:
        if isinstance(tag, (int, np.integer)) and not isinstance(tag, bool):
            words += [1, int(tag) & 0xFFFFFFFF, (int(tag) >> 32) & 0xFFFFFFFF]
        else:
            words += [2, zlib.crc32(str(tag).encode("utf-8"))]
    return np.random.default_rng(np.random.SeedSequence(words))


def _check(labels: np.ndarray, n_devices: int, min_samples: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
    if n_devices < 1:
        raise ValueError(f"n_devices must be >= 1, got {n_devices}")
    if min_samples < 0:
        raise ValueError(f"min_samples must be >= 0, got {min_samples}")
    if len(labels) < n_devices * min_samples:
        raise ValueError(
            f"cannot give each of {n_devices} devices at least {min_samples} samples from {len(labels)} "
            "training samples; use fewer devices, a lower min_samples_per_device or more data"
        )
    return labels


def _finish(owner: np.ndarray, n_devices: int) -> list[np.ndarray]:
    order = np.argsort(owner, kind="stable")
    counts = np.bincount(owner, minlength=n_devices)
    return [part.astype(np.int64) for part in np.split(order, np.cumsum(counts)[:-1])]


def iid_partition(labels: Sequence | np.ndarray, n_devices: int, seed: int, min_samples: int = 1) -> list[np.ndarray]:
    """Shuffle and deal the samples into ``n_devices`` near-equal shards."""
    labels = _check(np.asarray(labels), n_devices, min_samples)
    rng = derive_rng(seed, "partition", "iid")
    perm = rng.permutation(len(labels))
    return [np.sort(part).astype(np.int64) for part in np.array_split(perm, n_devices)]


def dirichlet_partition(
    labels: Sequence | np.ndarray,
    n_devices: int,
    alpha: float,
    seed: int,
    min_samples: int = 1,
) -> list[np.ndarray]:
    """Label-skewed shards: each class is spread over devices by a Dirichlet(alpha) draw.

    Small ``alpha`` (0.1) gives each device few classes; large ``alpha`` approaches IID.
    Devices left with fewer than ``min_samples`` are then topped up (see module doc).
    """
    labels = _check(np.asarray(labels), n_devices, min_samples)
    if not alpha > 0 or not np.isfinite(alpha):
        raise ValueError(f"alpha must be > 0 and finite, got {alpha}")
    rng = derive_rng(seed, "partition", "dirichlet")
    owner = np.empty(len(labels), dtype=np.int64)
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        p = rng.dirichlet(np.full(n_devices, float(alpha)))
        if not np.all(np.isfinite(p)) or p.sum() <= 0:  # extreme alpha underflow: one device
            p = np.zeros(n_devices)
            p[rng.integers(n_devices)] = 1.0
        cuts = np.floor(np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
        cuts = np.clip(cuts, 0, len(idx))
        for device, chunk in enumerate(np.split(idx, cuts)):
            owner[chunk] = device
    _top_up(owner, n_devices, min_samples, rng)
    return _finish(owner, n_devices)


def _top_up(owner: np.ndarray, n_devices: int, min_samples: int, rng: np.random.Generator) -> None:
    """Move random samples from the largest devices to devices below ``min_samples``."""
    counts = np.bincount(owner, minlength=n_devices)
    for device in np.flatnonzero(counts < min_samples):
        need = int(min_samples - counts[device])
        while need > 0:
            donor = int(np.argmax(counts))  # ties: lowest id
            spare = int(counts[donor] - min_samples)
            if spare <= 0:  # unreachable: _check guarantees enough samples overall
                raise AssertionError("not enough samples to top up devices")
            take = min(need, spare)
            moved = rng.choice(np.flatnonzero(owner == donor), size=take, replace=False)
            owner[moved] = device
            counts[donor] -= take
            counts[device] += take
            need -= take


def partition_labels(
    labels: Sequence | np.ndarray,
    n_devices: int,
    method: Literal["iid", "dirichlet"],
    *,
    seed: int,
    alpha: float = 0.5,
    min_samples: int = 1,
) -> list[np.ndarray]:
    """Dispatch to :func:`iid_partition` or :func:`dirichlet_partition`."""
    if method == "iid":
        return iid_partition(labels, n_devices, seed, min_samples)
    if method == "dirichlet":
        return dirichlet_partition(labels, n_devices, alpha, seed, min_samples)
    raise ValueError(f"unknown partition method {method!r}; expected 'iid' or 'dirichlet'")


def label_skew(labels: Sequence | np.ndarray, parts: Sequence[np.ndarray], n_classes: int | None = None) -> float:
    """Mean total-variation distance between each device's label distribution and the
    overall one: 0 = every device mirrors the whole, near 1 = devices hold disjoint
    classes. Empty devices are skipped.
    """
    labels = np.asarray(labels)
    n_classes = int(n_classes if n_classes is not None else labels.max() + 1)
    overall = np.bincount(labels, minlength=n_classes) / max(len(labels), 1)
    distances = []
    for part in parts:
        if len(part) == 0:
            continue
        local = np.bincount(labels[part], minlength=n_classes) / len(part)
        distances.append(0.5 * np.abs(local - overall).sum())
    return float(np.mean(distances)) if distances else 0.0

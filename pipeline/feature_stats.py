"""The feature statistics a deployment's model expects (``[deploy] standardize``).

Standardisation belongs to the model, not to each device's app: if every device scaled its
own columns, the same pixel would mean different things on different devices and training
would swing with whichever scaling won. So the server decides the statistics once, sends
them in the task, and standardises its own test data with the same numbers.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ftte.pipeline.config import ConfigError
from ftte.pipeline.deploy_config import ServerSettings
from ftte.protocol.features import check_stats, standardise

__all__ = ["compute_stats", "check_stats", "standardise", "load_feature_stats"]

EMPTY = np.zeros(0, dtype=np.float32)


def compute_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std of flattened records; a constant feature gets std 1 (left unscaled)."""
    flat = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    mean = flat.mean(axis=0)
    std = flat.std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)
    return mean.astype(np.float32), std.astype(np.float32)


def load_feature_stats(settings: ServerSettings) -> tuple[np.ndarray, np.ndarray]:
    """The (mean, std) the task carries, empty arrays when ``standardize = "none"``."""
    d = settings.deploy
    features = math.prod(d.input_shape)
    if d.standardize == "none":
        return EMPTY, EMPTY
    source = d.feature_stats if d.standardize == "file" else d.test_data
    path: Path = settings.path(source)
    key = "feature_stats" if d.standardize == "file" else "test_data"
    try:
        with np.load(path) as data:
            if d.standardize == "file":
                mean = np.atleast_1d(np.asarray(data["mean"], dtype=np.float32)).reshape(-1)
                std = np.atleast_1d(np.asarray(data["std"], dtype=np.float32)).reshape(-1)
            else:
                mean, std = compute_stats(np.asarray(data["x"]))
    except (OSError, KeyError, ValueError) as exc:
        raise ConfigError(f"[deploy] {key}: cannot read statistics from {path}: {exc}") from None
    try:
        check_stats(mean, std, features)
    except ValueError as exc:
        raise ConfigError(f"[deploy] {key}: {path}: {exc}") from None
    return mean, std

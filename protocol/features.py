"""Feature standardisation shared by the server and the device: the one formula both apply.

The server fixes the statistics once (``[deploy] standardize``) and sends them in the task;
the device applies them to its raw records and the server to its test data, so both see the
same inputs the model was built for. The statistics come from the network, so the device
checks them (:func:`check_stats`) before use.
"""

from __future__ import annotations

import numpy as np


def check_stats(mean: np.ndarray, std: np.ndarray, features: int) -> None:
    """One value per feature (or one for all), finite, std positive; else ``ValueError``."""
    if mean.shape != std.shape or mean.ndim != 1 or len(mean) not in (1, features):
        raise ValueError(f"mean and std must both hold 1 or {features} values, got {mean.shape} and {std.shape}")
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and np.all(std > 0)):
        raise ValueError("mean must be finite and std finite and > 0")


def standardise(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``(x - mean) / std`` over each flattened record, returned in the records' own shape
    (float32); empty statistics return the records unchanged."""
    x = np.asarray(x, dtype=np.float32)
    if len(mean) == 0:
        return x
    flat = x.reshape(len(x), -1)
    return ((flat - mean.astype(np.float32)) / std.astype(np.float32)).astype(np.float32).reshape(x.shape)

"""The server's merge of one buffer: Δ̄ = Σ w·Δ / Σ w, then a server optimizer step."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ServerOptimizer:
    """θ ← θ + η·(Δ̄ + β·m) with optional server momentum m ← β·m + Δ̄ (FedAvgM-style)."""

    lr: float = 1.0
    momentum: float = 0.0
    _velocity: np.ndarray | None = None

    def step(self, params: np.ndarray, mean_delta: np.ndarray) -> np.ndarray:
        if self.momentum:
            self._velocity = mean_delta if self._velocity is None else self.momentum * self._velocity + mean_delta
            direction = self._velocity
        else:
            direction = mean_delta
        return params + self.lr * direction

    def state(self) -> np.ndarray | None:
        return self._velocity

    def load_state(self, velocity: np.ndarray | None) -> None:
        self._velocity = velocity


def weighted_mean(weighted_sum: np.ndarray, weight_sum: float) -> np.ndarray:
    """Δ̄ = Σ w·Δ / Σ w."""
    if not weight_sum > 0:
        raise ValueError("the sum of weights must be positive to merge a buffer")
    return weighted_sum / weight_sum

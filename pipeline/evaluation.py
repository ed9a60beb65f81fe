"""Accuracy and loss of a version on the server's held-out data (simulation and deployment alike)."""

from __future__ import annotations

import copy

import numpy as np
import torch

from ftte.edge.plan import SubsetPlan, apply_subset_vector


def evaluate(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(x))
        loss = float(torch.nn.functional.cross_entropy(logits, torch.as_tensor(y)))
        acc = float((logits.argmax(1).numpy() == y).mean())
    return acc, loss


class Evaluator:
    """Evaluates the plan's weights of a version on a fixed test set, in a private copy of the model."""

    def __init__(self, model: torch.nn.Module, plan: SubsetPlan, x: np.ndarray, y: np.ndarray) -> None:
        self.model = copy.deepcopy(model)
        self.plan = plan
        self.x = np.asarray(x, dtype=np.float32)
        self.y = np.asarray(y, dtype=np.int64)

    def __call__(self, weights: np.ndarray) -> tuple[float, float]:
        with torch.no_grad():
            apply_subset_vector(self.model, self.plan, np.asarray(weights).astype(np.float32))
        return evaluate(self.model, self.x, self.y)

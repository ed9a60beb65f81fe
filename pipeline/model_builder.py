"""The shared architecture a run trains, built the same way by the simulator and the deployment.

The factory arguments follow from the input shape and the class count alone, so a
deployment (which has no dataset) and a simulation (which has one) build the same model
from the same configuration and seed.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ftte.edge.models import build_model, make_dp_compatible


def model_kwargs(name: str, input_shape: tuple[int, ...], num_classes: int) -> dict[str, Any]:
    """The bundled factory's arguments for ``name`` on records of ``input_shape``."""
    if name in ("logistic", "mlp"):
        return {"in_features": int(math.prod(input_shape)), "num_classes": num_classes}
    if name in ("cnn8", "cnn28"):
        side = 8 if name == "cnn8" else 28
        if len(input_shape) != 3 or tuple(input_shape[1:]) != (side, side):
            raise ValueError(f"model {name} needs (C, {side}, {side}) inputs, the data has {tuple(input_shape)}")
        return {"in_channels": int(input_shape[0]), "num_classes": num_classes}
    return {"input_shape": list(input_shape), "num_classes": num_classes}


def build_global_model(name: str, seed: int, input_shape: tuple[int, ...], num_classes: int) -> torch.nn.Sequential:
    """The shared architecture with seeded initial weights, made DP-compatible."""
    kwargs = model_kwargs(name, tuple(input_shape), num_classes)
    torch.manual_seed(seed)
    model = make_dp_compatible(build_model(name, **kwargs))
    if not isinstance(model, torch.nn.Sequential):
        raise ValueError(f"model {name!r} must be an nn.Sequential so a subset plan can split it")
    return model


def full_vector(model: torch.nn.Module) -> np.ndarray:
    """Every parameter in ``named_parameters`` order, float32 (what a device loads first)."""
    with torch.no_grad():
        return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()]).numpy().copy()

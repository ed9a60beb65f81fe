"""Virtual compute cost of a local round, from multiply-accumulate counts.

Time in the simulator is charged, not measured, so that runs are reproducible: a round
costs ``steps · batch · macs_per_sample`` where a sample costs the forward pass of the
whole model, plus twice the forward MACs of the trainable suffix for backward, plus the
suffix's parameter layers once more under DP (per-sample gradients). A device with
``compute_speed`` 1.0 performs :data:`REFERENCE_MACS_PER_S` MACs per second.

Under ghost clipping (:mod:`ftte.edge.step`) the suffix's backward runs twice
(:func:`ftte.edge.step.clipping_compute_factor`); ``Linear`` layers then need only their
per-sample gradient norms (``in + out`` MACs a sample instead of ``in x out``), while other
parameter layers still form per-sample gradients to take their norms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ftte.edge.step import clipping_compute_factor

REFERENCE_MACS_PER_S = 20e6  # a microcontroller-class core; phones are compute_speed > 1


@dataclass(frozen=True)
class LayerMacs:
    name: str
    macs: int
    has_params: bool
    ghost_norm_macs: int | None = None  # per-sample gradient-norm MACs under ghost clipping (Linear only)


def layer_macs(model: nn.Sequential, input_shape: tuple[int, ...]) -> list[LayerMacs]:
    """MACs of each top-level layer for one sample (Linear and Conv2d; others counted as free)."""
    out: list[LayerMacs] = []
    x = torch.zeros((1, *input_shape))
    with torch.no_grad():
        for name, layer in model.named_children():
            y = layer(x)
            macs = 0
            ghost = None
            if isinstance(layer, nn.Linear):
                macs = layer.in_features * layer.out_features
                ghost = layer.in_features + layer.out_features
            elif isinstance(layer, nn.Conv2d):
                k = layer.kernel_size[0] * layer.kernel_size[1] * (layer.in_channels // layer.groups)
                macs = int(y[0].numel()) * k
            out.append(LayerMacs(name, macs, any(True for _ in layer.parameters()), ghost))
            x = y
    return out


def macs_per_sample(layers: list[LayerMacs], first_trainable: str, dp: bool, clipping: str = "per_sample") -> int:
    """MACs of one sample's training step: forward of the whole model, backward of the
    suffix (twice under ghost clipping), and DP's per-sample gradients (or, for ``Linear``
    under ghost clipping, only their norms)."""
    names = [layer.name for layer in layers]
    k = names.index(first_trainable)
    forward = sum(layer.macs for layer in layers)
    suffix = sum(layer.macs for layer in layers[k:])
    backward = int(round(2 * suffix * clipping_compute_factor(clipping, dp)))
    per_sample_grads = 0
    if dp:
        ghost = clipping == "ghost"
        for layer in layers[k:]:
            if not layer.has_params:
                continue
            use_norm = ghost and layer.ghost_norm_macs is not None
            per_sample_grads += layer.ghost_norm_macs if use_norm else layer.macs  # type: ignore[operator]
    return forward + backward + per_sample_grads


def round_seconds(steps: int, batch: float, macs: int, compute_speed: float) -> float:
    return steps * batch * macs / (REFERENCE_MACS_PER_S * compute_speed)

"""Subset plans: which parameter tensors of a shared model a device trains.

A :class:`SubsetPlan` names the trainable parameter tensors (layer-wise, by the names
``model.named_parameters()`` gives) and records the name and shape of *every*
parameter of the model it was made for. The content hash covers both, so a plan can
never be applied to a different architecture by accident, and two plans that train the
same tensors of the same model have the same id on every machine and in every process.

**Channel slices.** A plan may train only the first ``k`` output channels of a
``Conv2d`` (or output features of a ``Linear``) layer: ``slices`` maps the layer to
``k``, and every trainable tensor of that layer (weight and bias) is trained in rows
``[0, k)`` of its first dimension only; the other rows stay frozen. That lets a memory
budget buy part of a layer (per-sample gradients, optimizer state and the update scale
with ``k``). For training, :func:`split_model` swaps the layer in the suffix for a
:class:`ChannelSlice` of two ordinary layers (trained rows, frozen rows) whose
parameters are views of the model's own tensors, so Opacus sees plain ``Conv2d``/``Linear``
modules and training updates the model in place. A plan without slices hashes exactly
as before slices existed.

:func:`split_model` turns a plan into the two halves training needs. The model must be
an ``nn.Sequential``; its top-level children are the *layers*. Everything before the
first layer that holds a trainable parameter is the frozen *prefix*: it runs in eval
mode under ``torch.no_grad()``, so autograd keeps none of its activations and Opacus
never sees it. The rest is the *suffix*: it holds the trainable tensors
(``requires_grad=True``), every other tensor in it is frozen, and norm layers whose
parameters are all frozen stay in eval mode whatever ``train()`` says.

The update a device sends is the flat float32 vector of the plan's tensors in model
order (:func:`subset_vector`); the server applies the aggregate with
:func:`apply_subset_vector`.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

__all__ = [
    "PLAN_FORMAT",
    "PlanMismatchError",
    "SubsetPlan",
    "FrozenPrefix",
    "TrainableSuffix",
    "PlannedModel",
    "ChannelSlice",
    "model_signature",
    "layer_names",
    "layer_of",
    "split_model",
    "subset_vector",
    "apply_subset_vector",
]

PLAN_FORMAT = "ftte-subset-plan/1"

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)


class PlanMismatchError(ValueError):
    """The plan was made for a model with different parameter names or shapes."""


Signature = tuple[tuple[str, tuple[int, ...]], ...]


def model_signature(model: nn.Module) -> Signature:
    """``((name, shape), ...)`` for every parameter of ``model`` in registration order."""
    return tuple((name, tuple(int(s) for s in p.shape)) for name, p in model.named_parameters())


def layer_of(param_name: str) -> str:
    """Top-level layer (child name) that owns ``param_name``; ``""`` for a parameter on the root."""
    return param_name.split(".", 1)[0] if "." in param_name else ""


def layer_names(model: nn.Module) -> list[str]:
    """Names of the top-level children (the layers a split can happen between)."""
    return [name for name, _ in model.named_children()]


@dataclass(frozen=True)
class SubsetPlan:
    """The trainable subset of one model architecture.

    ``trainable`` lists parameter names in model order; ``parameters`` is the model's full
    signature. Build one with :meth:`from_names`, :meth:`from_layers` or :meth:`full`.
    """

    trainable: tuple[str, ...]
    parameters: Signature
    slices: tuple[tuple[str, int], ...] = ()  # (layer, leading output channels trained), model order

    def __post_init__(self) -> None:
        names = [n for n, _ in self.parameters]
        known, wanted = set(names), set(self.trainable)
        if len(known) != len(names):
            raise ValueError("SubsetPlan: duplicate parameter names in the model signature")
        if not self.trainable:
            raise ValueError("SubsetPlan: the trainable set must not be empty")
        unknown = [n for n in self.trainable if n not in known]
        if unknown:
            raise ValueError(f"SubsetPlan: parameters not in the model: {unknown}")
        ordered = tuple(n for n in names if n in wanted)
        if ordered != tuple(self.trainable):
            raise ValueError("SubsetPlan: trainable names must be unique and in model order")
        self._check_slices()

    def _check_slices(self) -> None:
        shapes = dict(self.parameters)
        layers = [layer for layer, _ in self.slices]
        if len(set(layers)) != len(layers):
            raise ValueError("SubsetPlan: at most one channel slice per layer")
        order = {layer: i for i, layer in enumerate(self.trainable_layers)}
        for layer, k in self.slices:
            if layer not in order:
                raise ValueError(f"SubsetPlan: channel slice of layer {layer!r}, which has no trainable tensor")
            rows = {shapes[n][0] for n in self.trainable if layer_of(n) == layer if shapes[n]}
            if len(rows) != 1:
                raise ValueError(f"SubsetPlan: layer {layer!r} tensors do not share an output dimension to slice")
            (out,) = rows
            if not (isinstance(k, int) and 1 <= k < out):
                raise ValueError(f"SubsetPlan: slice of layer {layer!r} must keep 1..{out - 1} channels, got {k!r}")
        if layers != sorted(layers, key=lambda layer: order[layer]):
            raise ValueError("SubsetPlan: channel slices must be in model order")

    # -- construction -----------------------------------------------------------------
    @classmethod
    def from_names(cls, model: nn.Module, names: Iterable[str]) -> "SubsetPlan":
        """Plan training exactly the parameter tensors called ``names`` (any order)."""
        wanted = set(names)
        sig = model_signature(model)
        known = {n for n, _ in sig}
        missing = sorted(wanted - known)
        if missing:
            raise ValueError(f"unknown parameter names {missing}; the model has {sorted(known)}")
        return cls(trainable=tuple(n for n, _ in sig if n in wanted), parameters=sig)

    @classmethod
    def from_layers(cls, model: nn.Module, layers: Iterable[str | int]) -> "SubsetPlan":
        """Plan training every parameter of the given top-level layers (by name or index)."""
        children = layer_names(model)
        chosen: set[str] = set()
        for layer in layers:
            name = children[layer] if isinstance(layer, int) else str(layer)
            if name not in children:
                raise ValueError(f"unknown layer {layer!r}; layers are {children}")
            chosen.add(name)
        names = [n for n, _ in model.named_parameters() if layer_of(n) in chosen]
        if not names:
            raise ValueError(f"layers {sorted(chosen)} hold no parameters")
        return cls.from_names(model, names)

    @classmethod
    def with_slices(cls, model: nn.Module, names: Iterable[str], slices: dict[str, int]) -> "SubsetPlan":
        """Plan training ``names`` with the given layers cut to their first ``k`` output channels.

        Only top-level ``Conv2d`` (ungrouped) and ``Linear`` layers can be sliced.
        """
        plan = cls.from_names(model, names)
        children = dict(model.named_children())
        for layer in slices:
            module = children.get(layer)
            if not isinstance(module, (nn.Conv2d, nn.Linear)) or getattr(module, "groups", 1) != 1:
                raise ValueError(f"only top-level ungrouped Conv2d or Linear layers can be sliced, not {layer!r}")
        order = {layer: i for i, layer in enumerate(layer_names(model))}
        ordered = tuple(sorted(((str(l), int(k)) for l, k in slices.items()), key=lambda lk: order[lk[0]]))
        return cls(trainable=plan.trainable, parameters=plan.parameters, slices=ordered)

    @classmethod
    def full(cls, model: nn.Module) -> "SubsetPlan":
        """Plan training every parameter (the full-model baseline)."""
        return cls.from_names(model, [n for n, _ in model.named_parameters()])

    # -- identity ---------------------------------------------------------------------
    def canonical_bytes(self) -> bytes:
        """Canonical encoding hashed for :attr:`content_hash` (sorted-key compact JSON, UTF-8)."""
        doc: dict = {
            "format": PLAN_FORMAT,
            "parameters": [[n, list(s)] for n, s in self.parameters],
            "trainable": list(self.trainable),
        }
        if self.slices:  # absent when empty, so plans without slices keep their old hash
            doc["slices"] = [[layer, k] for layer, k in self.slices]
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("utf-8")

    @property
    def content_hash(self) -> str:
        """SHA-256 (hex) of :meth:`canonical_bytes`: binds the trainable set to the architecture."""
        return hashlib.sha256(self.canonical_bytes()).hexdigest()

    @property
    def plan_id(self) -> str:
        """Short stable id (``plan-`` + 16 hex digits of the content hash) used to group cohorts."""
        return "plan-" + self.content_hash[:16]

    # -- shape facts ------------------------------------------------------------------
    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self.parameters)

    @property
    def slice_map(self) -> dict[str, int]:
        """Layer -> leading output channels trained (only sliced layers)."""
        return dict(self.slices)

    def trained_rows(self, name: str) -> int | None:
        """Rows (first dimension) of tensor ``name`` that are trained, ``None`` for all of them."""
        return self.slice_map.get(layer_of(name))

    def trained_shape(self, name: str) -> tuple[int, ...]:
        """Shape of the trained part of tensor ``name`` (its rows cut by a channel slice)."""
        shape = self.shapes[name]
        k = self.trained_rows(name)
        return shape if k is None else (k,) + tuple(shape[1:])

    @property
    def num_coordinates(self) -> int:
        """Length of the update vector: scalars in the trained parts of the trainable tensors."""
        return int(sum(int(np.prod(self.trained_shape(n), dtype=np.int64)) for n in self.trainable))

    @property
    def total_coordinates(self) -> int:
        return int(sum(int(np.prod(s, dtype=np.int64)) for _, s in self.parameters))

    @property
    def trainable_layers(self) -> tuple[str, ...]:
        """Top-level layers holding at least one trainable tensor, in model order."""
        out: list[str] = []
        for n in self.trainable:
            layer = layer_of(n)
            if layer not in out:
                out.append(layer)
        return tuple(out)

    def is_full(self) -> bool:
        return len(self.trainable) == len(self.parameters) and not self.slices

    def check(self, model: nn.Module) -> None:
        """Raise :class:`PlanMismatchError` unless ``model`` has exactly this plan's parameter names and shapes."""
        sig = model_signature(model)
        if sig != self.parameters:
            have, want = dict(sig), dict(self.parameters)
            diffs = sorted(set(have) ^ set(want)) + sorted(n for n in set(have) & set(want) if have[n] != want[n])
            raise PlanMismatchError(f"{self.plan_id} was made for another model; differing parameters: {diffs[:8]}")

    # -- serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "plan_id": self.plan_id,
            "content_hash": self.content_hash,
            "parameters": [[n, list(s)] for n, s in self.parameters],
            "trainable": list(self.trainable),
            **({"slices": [[layer, k] for layer, k in self.slices]} if self.slices else {}),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "SubsetPlan":
        if data.get("format") != PLAN_FORMAT:
            raise ValueError(f"not a subset plan (format {data.get('format')!r}, expected {PLAN_FORMAT!r})")
        raw_slices = data.get("slices", [])
        if not isinstance(raw_slices, list) or not all(
            isinstance(s, list) and len(s) == 2 and isinstance(s[1], int) and not isinstance(s[1], bool)
            for s in raw_slices
        ):
            raise ValueError("subset plan slices must be a list of [layer, channels] pairs")
        plan = cls(
            trainable=tuple(str(n) for n in data["trainable"]),
            parameters=tuple((str(n), tuple(int(x) for x in s)) for n, s in data["parameters"]),
            slices=tuple((str(layer), int(k)) for layer, k in raw_slices),
        )
        for key in ("content_hash", "plan_id"):
            if key in data and data[key] != getattr(plan, key):
                raise ValueError(f"subset plan {key} does not match its content ({data[key]!r})")
        return plan

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "SubsetPlan":
        return cls.from_dict(json.loads(text))


class FrozenPrefix(nn.Module):
    """The layers before the first trainable one: always eval mode, always ``no_grad``.

    Running without autograd is the point: these activations are dropped as soon as the
    next layer has consumed them, so their memory cost is one layer's input and output,
    not the whole stack's.

    ``chunk_size`` runs the prefix over micro-batches of that many samples and writes
    the results into one output tensor, so the prefix's working set shrinks from the
    batch's widest layer to a chunk's. The result is the same function: the prefix is
    frozen, in eval mode, and GroupNorm (never BatchNorm) normalises each sample alone.
    (Kernels may pick different algorithms for different batch sizes, so outputs can
    differ in the last float bits.)
    """

    def __init__(self, layers: nn.Sequential, chunk_size: int | None = None) -> None:
        super().__init__()
        if chunk_size is not None and int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
        self.layers = layers
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        self.layers.eval()

    def train(self, mode: bool = True) -> "FrozenPrefix":
        self.training = mode
        self.layers.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.layers.eval()  # even if someone called train() on the full model these layers belong to
        with torch.no_grad():
            c = self.chunk_size
            if c is None or x.shape[0] <= c or len(self.layers) == 0:
                return self.layers(x)
            out: torch.Tensor | None = None
            for start in range(0, x.shape[0], c):
                part = self.layers(x[start : start + c])
                if out is None:
                    out = part.new_empty((x.shape[0],) + tuple(part.shape[1:]))
                out[start : start + part.shape[0]].copy_(part)
                del part
            assert out is not None
            return out

    def __len__(self) -> int:
        return len(self.layers)


def _is_frozen_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) and not any(p.requires_grad for p in module.parameters(recurse=False))


class TrainableSuffix(nn.Sequential):
    """The layers from the first trainable one on, under their original names.

    Keeping the names (``"9.weight"``, not ``"0.weight"``) means the suffix's
    ``named_parameters()`` agree with the full model's and with the plan.
    """

    def train(self, mode: bool = True) -> "TrainableSuffix":
        super().train(mode)
        self._freeze_norms()
        return self

    def _freeze_norms(self) -> None:
        for module in self.modules():
            if _is_frozen_norm(module) and module.training:
                module.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._freeze_norms()  # also after a train() call on the full model, which bypasses ours
        return super().forward(x)


class ChannelSlice(nn.Module):
    """A ``Conv2d``/``Linear`` layer split into its first ``k`` output channels (trained) and
    the rest (frozen), outputs concatenated back in order.

    Both halves are ordinary layers whose parameters are *views* of the original tensors'
    rows, so Opacus hooks them like any layer, its per-sample gradients cover only the
    trained rows, and the optimizer's in-place updates land in the original model.
    """

    def __init__(self, layer: nn.Module, k: int) -> None:
        super().__init__()
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"ChannelSlice needs a Conv2d or Linear layer, got {type(layer).__name__}")
        self.k = int(k)
        self.dim = 1 if isinstance(layer, nn.Conv2d) else -1
        self.trained = self._part(layer, slice(0, self.k))
        self.frozen = self._part(layer, slice(self.k, None))

    @staticmethod
    def _part(layer: nn.Module, rows: slice) -> nn.Module:
        """A fresh layer with ``layer``'s hyper-parameters whose tensors are views of ``rows``."""
        weight = layer.weight.data[rows]
        bias = layer.bias.data[rows] if layer.bias is not None else None
        part: nn.Module
        if isinstance(layer, nn.Conv2d):
            part = nn.Conv2d(
                layer.in_channels, weight.shape[0], layer.kernel_size, stride=layer.stride, padding=layer.padding,
                dilation=layer.dilation, groups=layer.groups, bias=bias is not None, padding_mode=layer.padding_mode,
                device="meta",
            )
        else:
            part = nn.Linear(layer.in_features, weight.shape[0], bias=bias is not None, device="meta")
        part.weight = nn.Parameter(weight, requires_grad=layer.weight.requires_grad)
        if bias is not None:
            part.bias = nn.Parameter(bias, requires_grad=layer.bias.requires_grad)
        part.train(layer.training)
        return part

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.trained(x), self.frozen(x)], dim=self.dim)


class PlannedModel(nn.Module):
    """``suffix(prefix(x))`` as one module (for evaluation, or non-private training)."""

    def __init__(self, prefix: FrozenPrefix, suffix: nn.Module) -> None:
        super().__init__()
        self.prefix = prefix
        self.suffix = suffix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.suffix(self.prefix(x))


def split_model(
    model: nn.Module, plan: SubsetPlan, *, prefix_chunk: int | None = None
) -> tuple[FrozenPrefix, TrainableSuffix]:
    """Split ``model`` into ``(prefix, suffix)`` for training the plan's subset.

    The halves share parameters with ``model`` (no copies), so training the suffix
    trains the model. Side effect, on purpose: every parameter's ``requires_grad`` is set
    from the plan, since that flag is what Opacus and the optimizer read.
    ``prefix_chunk`` micro-batches the prefix (see :class:`FrozenPrefix`). A channel-sliced
    layer appears in the suffix as a :class:`ChannelSlice` (its parameters are then named
    ``<layer>.trained.*`` / ``<layer>.frozen.*`` in the suffix). Only an
    ``nn.Sequential`` has layer boundaries to cut at; anything else raises ``TypeError``.
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError(
            f"split_model needs an nn.Sequential of layers, got {type(model).__name__}; "
            "build the model as nn.Sequential(...) so the plan can cut it between layers"
        )
    plan.check(model)
    wanted = set(plan.trainable)
    for name, p in model.named_parameters():
        p.requires_grad_(name in wanted)
    children = list(model.named_children())
    if plan.slices:
        cut = plan.slice_map
        sliced = []
        for name, child in children:
            if name in cut:
                part = ChannelSlice(child, cut[name])  # trained rows keep requires_grad; the rest are frozen
                for p in part.frozen.parameters():
                    p.requires_grad_(False)
                for p in child.parameters():
                    p.requires_grad_(False)  # the original tensors are trained through the views
                child = part
            sliced.append((name, child))
        children = sliced
    first_layer = plan.trainable_layers[0]
    if first_layer == "":
        raise ValueError("a parameter registered directly on the Sequential cannot be planned layer-wise")
    k = [name for name, _ in children].index(first_layer)
    prefix = FrozenPrefix(nn.Sequential(OrderedDict(children[:k])), chunk_size=prefix_chunk)
    suffix = TrainableSuffix(OrderedDict(children[k:]))
    suffix.train(model.training)
    return prefix, suffix


def _planned_tensors(model: nn.Module, plan: SubsetPlan) -> list[torch.Tensor]:
    """The trained part of each planned tensor (rows cut by a channel slice), in plan order."""
    plan.check(model)
    params = dict(model.named_parameters())
    out = []
    for n in plan.trainable:
        k = plan.trained_rows(n)
        out.append(params[n] if k is None else params[n][:k])
    return out


def subset_vector(model: nn.Module, plan: SubsetPlan) -> np.ndarray:
    """The plan's tensors of ``model`` flattened in model order into one float32 vector."""
    tensors = _planned_tensors(model, plan)
    with torch.no_grad():
        flat = torch.cat([t.detach().reshape(-1).to(torch.float32).cpu() for t in tensors])
    return flat.numpy().copy()


def apply_subset_vector(model: nn.Module, plan: SubsetPlan, vec: np.ndarray | torch.Tensor | Sequence[float]) -> None:
    """Write ``vec`` (as produced by :func:`subset_vector`) back into the plan's tensors, in place."""
    tensors = _planned_tensors(model, plan)
    flat = torch.as_tensor(np.asarray(vec, dtype=np.float32) if not isinstance(vec, torch.Tensor) else vec)
    if flat.dim() != 1 or flat.numel() != plan.num_coordinates:
        raise ValueError(f"expected a 1-D vector of {plan.num_coordinates} values, got shape {tuple(flat.shape)}")
    if not torch.isfinite(flat).all():
        raise ValueError("subset vector contains NaN or infinity")
    offset = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t).to(t.dtype))
            offset += n

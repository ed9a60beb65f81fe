"""Bundled reference models, a model registry, and DP-compatibility repair.

Every bundled model is an ``nn.Sequential`` of top-level *layers*: a subset plan (see
:mod:`ftte.edge.plan`) splits a model at a layer boundary into a frozen prefix that runs
without autograd and a trainable suffix, and only a flat sequence of layers makes that
split (and the memory estimate in :mod:`ftte.edge.memory`) well defined.

Normalisation is always ``GroupNorm``: BatchNorm mixes statistics across the samples of
a batch, so one example's gradient depends on the others and DP-SGD's per-example
clipping no longer bounds any single record's influence. Opacus refuses BatchNorm for
this reason; :func:`make_dp_compatible` swaps it out of a user's model.

Users bring their own model as ``"package.module:factory"``; the factory is called with
the keyword arguments given to :func:`build_model` and must return an ``nn.Module``.
That path imports and calls arbitrary code, so it is for the device's (or the operator's)
*own* configuration only. A model named by the network (a server's ``TaskInfo``) goes
through :func:`build_registered_model`, which accepts only the bundled registry's names
and checks every keyword argument's name, type and range, and the parameter count the
arguments imply, before any factory is called.
"""

from __future__ import annotations

import copy
import importlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

__all__ = [
    "ModelSpec",
    "MODELS",
    "UnsupportedModelError",
    "build_model",
    "build_registered_model",
    "check_model_kwargs",
    "parse_model_kwargs",
    "UntrustedModelError",
    "MAX_REGISTERED_PARAMETERS",
    "load_factory",
    "model_input_shape",
    "logistic",
    "mlp",
    "cnn8",
    "cnn28",
    "make_dp_compatible",
    "parameter_count",
]


class UnsupportedModelError(ValueError):
    """A model that DP-SGD (Opacus) cannot train, and that we cannot repair automatically."""


class UntrustedModelError(ValueError):
    """A model name or argument from an untrusted source (the network) that is not allowed."""


MAX_REGISTERED_PARAMETERS = 16 * 1024 * 1024  # what one TaskInfo can carry (wire.MAX_COORDINATES)
MAX_KWARGS_JSON = 4096  # characters; TaskInfo.model_kwargs_json is bounded the same way on the wire


@dataclass(frozen=True)
class IntArg:
    """An integer keyword argument in ``[lo, hi]`` (bools are refused: ``True`` is not a width)."""

    lo: int
    hi: int

    def check(self, key: str, value: Any) -> int:
        if type(value) is not int or not self.lo <= value <= self.hi:
            raise UntrustedModelError(f"model argument {key!r} must be an integer in [{self.lo}, {self.hi}], "
                                      f"got {value!r}")
        return value


@dataclass(frozen=True)
class IntListArg:
    """A list of 1 to ``max_len`` integers, each in ``[lo, hi]``."""

    lo: int
    hi: int
    max_len: int

    def check(self, key: str, value: Any) -> tuple[int, ...]:
        if type(value) not in (list, tuple) or not 1 <= len(value) <= self.max_len:
            raise UntrustedModelError(f"model argument {key!r} must be a list of 1 to {self.max_len} integers")
        return tuple(IntArg(self.lo, self.hi).check(key, v) for v in value)


def _groups_for(channels: int, max_groups: int = 8) -> int:
    """Largest divisor of ``channels`` not above ``max_groups`` (GroupNorm needs an exact divisor)."""
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


def logistic(in_features: int = 64, num_classes: int = 10) -> nn.Sequential:
    """Multinomial logistic regression: ``Flatten -> Linear``. Input any shape with ``in_features`` values."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))


def mlp(in_features: int = 64, hidden: tuple[int, ...] | list[int] = (128, 64), num_classes: int = 10) -> nn.Sequential:
    """Fully connected ReLU network: ``Flatten -> (Linear -> ReLU)* -> Linear``."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, int(h)), nn.ReLU()]
        width = int(h)
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def cnn8(in_channels: int = 1, num_classes: int = 10) -> nn.Sequential:
    """Small CNN for 8x8 images (sklearn ``digits``): two 3x3 conv blocks, a 2x2 pool, two linears.

    About 30k parameters; the first linear holds most of them, the convs most of the
    activations -- the contrast a memory-budgeted plan exploits.
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1),
        nn.GroupNorm(_groups_for(16), 16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.GroupNorm(_groups_for(32), 32),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 32 x 4 x 4
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 48),
        nn.ReLU(),
        nn.Linear(48, num_classes),
    )


def cnn28(in_channels: int = 1, num_classes: int = 10, width: int = 32) -> nn.Sequential:
    """CNN for 28x28 images (MNIST-like): three conv blocks and two linears, ~131k parameters at width 32."""
    w1, w2 = width, 2 * width
    return nn.Sequential(
        nn.Conv2d(in_channels, w1, 3, padding=1),
        nn.GroupNorm(_groups_for(w1), w1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 14 x 14
        nn.Conv2d(w1, w2, 3, padding=1),
        nn.GroupNorm(_groups_for(w2), w2),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 7 x 7
        nn.Conv2d(w2, w2, 3, padding=1),
        nn.GroupNorm(_groups_for(w2), w2),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 3 x 3, keeps the classifier head small
        nn.Flatten(),
        nn.Linear(w2 * 9, 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )


@dataclass(frozen=True)
class ModelSpec:
    """A bundled model: its factory and the per-sample input shape it expects (no batch dimension)."""

    name: str
    factory: Callable[..., nn.Module]
    input_shape: Callable[..., tuple[int, ...]]
    description: str
    # the keyword arguments a remote task may set, and the values each may take
    args: Mapping[str, IntArg | IntListArg] = field(default_factory=dict)


def _flat_shape(in_features: int = 64, **_: Any) -> tuple[int, ...]:
    return (in_features,)


def _image_shape(side: int) -> Callable[..., tuple[int, ...]]:
    def shape(in_channels: int = 1, **_: Any) -> tuple[int, ...]:
        return (in_channels, side, side)

    return shape


_FEATURES = IntArg(1, 1 << 20)
_CLASSES = IntArg(2, 100_000)
_CHANNELS = IntArg(1, 64)

MODELS: dict[str, ModelSpec] = {
    "logistic": ModelSpec("logistic", logistic, _flat_shape, "Flatten -> Linear (logistic regression)",
                          {"in_features": _FEATURES, "num_classes": _CLASSES}),
    "mlp": ModelSpec("mlp", mlp, _flat_shape, "ReLU MLP, hidden (128, 64)",
                     {"in_features": _FEATURES, "hidden": IntListArg(1, 1 << 16, 16), "num_classes": _CLASSES}),
    "cnn8": ModelSpec("cnn8", cnn8, _image_shape(8), "2-conv CNN for 8x8 single-channel images (digits)",
                      {"in_channels": _CHANNELS, "num_classes": _CLASSES}),
    "cnn28": ModelSpec("cnn28", cnn28, _image_shape(28), "3-conv CNN for 28x28 single-channel images",
                       {"in_channels": _CHANNELS, "num_classes": _CLASSES, "width": IntArg(1, 512)}),
}


def parse_model_kwargs(text: Any) -> dict[str, Any]:
    """The JSON object of a task's model arguments, refused unless it is a small, flat-enough object."""
    if not isinstance(text, str) or len(text) > MAX_KWARGS_JSON:
        raise UntrustedModelError(f"model arguments must be a JSON object of at most {MAX_KWARGS_JSON} characters")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise UntrustedModelError(f"model arguments are not valid JSON: {exc}") from None
    if type(value) is not dict:
        raise UntrustedModelError("model arguments must be a JSON object")
    return value


def check_model_kwargs(name: Any, kwargs: Any) -> dict[str, Any]:
    """Validate a remote model choice against the registry; returns the checked arguments.

    Nothing is imported or called here: the name must be a bundled model, every key one
    that model allows, every value of the allowed type and range, and the parameter count
    the arguments imply (counted on the ``meta`` device, which allocates nothing) at most
    :data:`MAX_REGISTERED_PARAMETERS`.
    """
    if type(name) is not str or name not in MODELS:
        shown = name[:80] if isinstance(name, str) else type(name).__name__
        raise UntrustedModelError(f"model {shown!r} is not a bundled model ({sorted(MODELS)}); a custom model can "
                                  "only come from this device's own configuration (--model-factory)")
    spec = MODELS[name]
    if type(kwargs) is not dict:
        raise UntrustedModelError("model arguments must be a mapping")
    unknown = sorted(str(k)[:40] for k in kwargs if k not in spec.args)
    if unknown:
        raise UntrustedModelError(f"model {name!r} takes no argument(s) {unknown}; allowed: {sorted(spec.args)}")
    checked = {key: spec.args[key].check(key, value) for key, value in kwargs.items()}
    with torch.device("meta"):
        count = sum(p.numel() for p in spec.factory(**checked).parameters())
    if count > MAX_REGISTERED_PARAMETERS:
        raise UntrustedModelError(f"model {name!r} with {checked} would have {count} parameters, "
                                  f"more than the {MAX_REGISTERED_PARAMETERS} a task may carry")
    return checked


def build_registered_model(name: Any, kwargs: Any) -> nn.Module:
    """Build a bundled model from an untrusted (network) description, checked before anything runs."""
    checked = check_model_kwargs(name, kwargs)
    return MODELS[name].factory(**checked)


def load_factory(ref: str) -> Callable[..., nn.Module]:
    """Resolve ``"package.module:factory"`` (``factory`` may be dotted, e.g. ``Class.method``)."""
    if not isinstance(ref, str) or ref.count(":") != 1:
        raise ValueError(f"model reference must look like 'package.module:factory', got {ref!r}")
    module_name, attr_path = ref.split(":")
    if not module_name or not attr_path:
        raise ValueError(f"model reference must look like 'package.module:factory', got {ref!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import module {module_name!r} for model {ref!r}: {exc}") from exc
    obj: Any = module
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"module {module_name!r} has no attribute {attr_path!r} (model {ref!r})") from None
    if not callable(obj):
        raise ValueError(f"{ref!r} is not callable (got {type(obj).__name__})")
    return obj


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a bundled model by name, or a user's model from ``"package.module:factory"``.

    For local configuration only (a simulation config, the device's own flags): the
    ``"package.module:factory"`` form imports and calls code. Names and arguments that come
    from the network must go through :func:`build_registered_model` instead.
    Keyword arguments go to the factory. The result is always checked to be an
    ``nn.Module``; use :func:`make_dp_compatible` before DP training a user's model.
    """
    if name in MODELS:
        model = MODELS[name].factory(**kwargs)
    elif ":" in name:
        model = load_factory(name)(**kwargs)
        if not isinstance(model, nn.Module):
            raise TypeError(f"factory {name!r} returned {type(model).__name__}, expected a torch.nn.Module")
    else:
        raise ValueError(f"unknown model {name!r}; bundled models: {sorted(MODELS)}, or give 'package.module:factory'")
    return model


def model_input_shape(name: str, **kwargs: Any) -> tuple[int, ...]:
    """Per-sample input shape (no batch dimension) of a bundled model built with ``kwargs``."""
    if name not in MODELS:
        raise ValueError(f"no default input shape for {name!r}; bundled models: {sorted(MODELS)}")
    return tuple(MODELS[name].input_shape(**kwargs))


def _replace_batchnorm(module: nn.Module, max_groups: int) -> int:
    """Swap every ``_BatchNorm`` child for a GroupNorm in place; returns how many were swapped."""
    swapped = 0
    for child_name, child in list(module.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            channels = int(child.num_features)
            # BatchNorm1d usually sees (N, C): each group then needs >= 2 channels, or
            # GroupNorm normalises single values to zero
            cap = max(1, min(max_groups, channels // 2)) if isinstance(child, nn.BatchNorm1d) else max_groups
            gn = nn.GroupNorm(_groups_for(channels, cap), channels, eps=child.eps, affine=child.affine)
            if child.affine:
                # BatchNorm's gamma/beta play the same role after normalisation; keep them.
                with torch.no_grad():
                    gn.weight.copy_(child.weight)
                    gn.bias.copy_(child.bias)
                gn.weight.requires_grad_(child.weight.requires_grad)
                gn.bias.requires_grad_(child.bias.requires_grad)
            gn.train(child.training)
            setattr(module, child_name, gn)
            swapped += 1
        else:
            swapped += _replace_batchnorm(child, max_groups)
    return swapped


def make_dp_compatible(model: nn.Module, *, max_groups: int = 8) -> nn.Module:
    """Return a copy of ``model`` that Opacus can train with per-sample gradients.

    BatchNorm (1d/2d/3d, SyncBatchNorm) becomes GroupNorm with the largest group count
    up to ``max_groups`` that divides the channel count (for BatchNorm1d, which usually
    sees ``(N, C)`` features, at least two channels per group), keeping the affine
    parameters.
    Note the running statistics are dropped: GroupNorm normalises each sample by itself,
    so a pre-trained BatchNorm model changes its function and needs fine-tuning.

    Anything else Opacus's ``ModuleValidator`` rejects raises :class:`UnsupportedModelError`
    listing the problems, rather than failing later inside a training step. The input
    model is never modified.
    """
    from opacus.validators import ModuleValidator

    for name, module in model.named_modules():
        if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
            kind = "lazy BatchNorm" if isinstance(module, nn.modules.batchnorm._BatchNorm) else "lazy module"
            raise UnsupportedModelError(
                f"{kind} {name!r} has no parameters yet; run one forward pass before making the model DP-compatible"
            )
    fixed = copy.deepcopy(model)
    if isinstance(fixed, nn.modules.batchnorm._BatchNorm):
        wrapper = nn.Sequential(fixed)
        _replace_batchnorm(wrapper, max_groups)
        fixed = wrapper[0]
    else:
        _replace_batchnorm(fixed, max_groups)
    errors = ModuleValidator.validate(fixed, strict=False)
    if errors:
        lines = "; ".join(str(e) for e in errors)
        raise UnsupportedModelError(f"model is not DP-SGD compatible after replacing BatchNorm: {lines}")
    return fixed


def parameter_count(model: nn.Module) -> int:
    """Number of scalar parameters (all, trainable or not)."""
    return int(sum(p.numel() for p in model.parameters()))


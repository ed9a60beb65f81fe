"""Peak training memory of one (DP-)SGD step on a subset plan: estimated and measured.

Both functions answer the same question -- how many bytes does a device need to run one
training step of ``model`` under ``plan`` -- and both count the same things:

* **baseline** (held before the step starts and after it ends): every parameter of the
  whole model (the frozen part must be in memory to run the forward pass), the optimizer
  state of the trainable tensors (SGD momentum: one buffer per tensor; Adam: two) and
  the input batch with its int64 labels;
* **plus the highest point, during the step, of everything the step allocates**: the
  prefix's activations while it runs without autograd (one layer's input and output at a
  time), the activations autograd saves for backward in the suffix, gradients flowing
  backward, ``.grad`` of the trainable tensors, Opacus's per-sample gradients
  (``batch x trainable`` values) and the temporaries Opacus needs to compute them (e.g.
  the unfolded input of a convolution), the clipped sum and the noise of DP-SGD.

:func:`measure_training_memory` runs a real step (:class:`ftte.edge.step.SubsetStep`,
Opacus ``GradSampleModule`` + ``DPOptimizer``) under ``torch.profiler`` with
``profile_memory=True``: every CPU allocation and free of the step is an event, the
running sum of the events in time order is the step's live memory above the baseline,
and its maximum is the peak. The baseline is counted from the tensors themselves
(distinct storages). The measured step is the second one, so lazily created optimizer
state exists, and it starts with gradients cleared (``set_to_none``). As a cross-check it
also records, with ``torch.autograd.graph.saved_tensors_hooks``, the distinct storages
autograd saves during forward (parameters excluded), which is what "the activations
backward must keep" means.

:func:`estimate_training_memory` predicts the same peak without running the step. It
probes per-layer shapes with one batch-1 forward (no autograd), then simulates the step
layer by layer -- prefix, suffix forward, backward in reverse layer order, optimizer
step -- with, per layer type, which tensors autograd saves (found by inspecting torch's
autograd for ``Linear``/``Conv2d``/``GroupNorm``/activations/pooling), which buffers a
kernel allocates, and what Opacus's grad samplers allocate. Tensors shared between
layers (a ReLU output is also the next layer's saved input; ``Flatten`` returns a view)
are counted once. Layer types without a rule are costed conservatively and listed in
``MemoryEstimate.approximate_layers``. Allocator overhead, Python objects and the
interpreter are not counted by either side.

Tests hold the two within 15% on every bundled model, several plans, with and without DP.
"""

from __future__ import annotations

import copy
import gc
import math
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from ftte.edge.plan import SubsetPlan, layer_of
from ftte.edge.step import OptimizerKind, StepConfig, SubsetStep

__all__ = [
    "TrainingSetup",
    "MemoryEstimate",
    "MemoryMeasurement",
    "estimate_training_memory",
    "measure_training_memory",
    "relative_error",
]


@dataclass(frozen=True)
class TrainingSetup:
    """What a memory figure depends on besides model and plan.

    ``input_shape`` is one sample's shape (no batch dimension). ``num_classes`` is taken
    from the model's output when ``None``.
    """

    batch_size: int
    input_shape: tuple[int, ...]
    dp: bool = True
    optimizer: OptimizerKind = "momentum"
    num_classes: int | None = None

    def __post_init__(self) -> None:
        if int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.optimizer not in ("sgd", "momentum", "adam"):
            raise ValueError(f"optimizer must be 'sgd', 'momentum' or 'adam', got {self.optimizer!r}")
        object.__setattr__(self, "input_shape", tuple(int(s) for s in self.input_shape))

    def step_config(self, **overrides: float) -> StepConfig:
        return StepConfig(dp=self.dp, optimizer=self.optimizer, **overrides)


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak bytes of one step and the terms it is made of (all in bytes)."""

    peak_bytes: int
    baseline_bytes: int
    parameter_bytes: int
    optimizer_state_bytes: int
    batch_bytes: int
    trainable_bytes: int
    gradient_bytes: int
    per_sample_gradient_bytes: int
    saved_activation_bytes: int
    peak_phase: str
    phase_peaks: dict[str, int] = field(default_factory=dict)
    approximate_layers: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class MemoryMeasurement:
    """Measured peak bytes of one real step, with the baseline and the held-state terms."""

    peak_bytes: int
    baseline_bytes: int
    parameter_bytes: int
    optimizer_state_bytes: int
    batch_bytes: int
    gradient_bytes: int
    per_sample_gradient_bytes: int
    saved_activation_bytes: int
    peak_phase: str
    phase_peaks: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.__dict__.items()}


def relative_error(estimate: int | float, measured: int | float) -> float:
    """``(estimate - measured) / measured``: positive when the estimator over-predicts."""
    return (float(estimate) - float(measured)) / float(measured)


# --------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return (s.data_ptr(), s.nbytes())


def _distinct_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen: dict[tuple[int, int], int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel() > 0:
            key = _storage_key(t)
            seen[key] = key[1]
    return int(sum(seen.values()))


def _optimizer_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    inner = getattr(opt, "original_optimizer", opt)
    out: list[torch.Tensor] = []
    for state in inner.state.values():
        out.extend(v for v in state.values() if isinstance(v, torch.Tensor))
    return out


def _grad_samples(params: list[nn.Parameter]) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for p in params:
        gs = getattr(p, "grad_sample", None)
        if isinstance(gs, torch.Tensor):
            out.append(gs)
        elif isinstance(gs, list):
            out.extend(gs)
    return out


def _num_classes(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros((1,) + tuple(input_shape)))
    finally:
        model.train(was_training)
    return int(out.shape[-1])


def measure_training_memory(
    model: nn.Module,
    plan: SubsetPlan,
    setup: TrainingSetup,
    *,
    seed: int = 0,
    noise_multiplier: float = 1.0,
    max_grad_norm: float = 1.0,
) -> MemoryMeasurement:
    """Run two real steps on a copy of ``model`` and measure the second one's peak memory.

    ``model`` itself is not touched. See the module docstring for what is counted.
    """
    from torch.profiler import ProfilerActivity, profile

    plan.check(model)
    num_classes = setup.num_classes or _num_classes(model, setup.input_shape)
    work = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    b = setup.batch_size
    x = torch.randn((b,) + setup.input_shape, generator=gen)
    y = torch.randint(0, num_classes, (b,), generator=gen)
    cfg = setup.step_config(noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm)
    step = SubsetStep(work, plan, cfg, expected_batch_size=b, generator=torch.Generator().manual_seed(seed + 1))

    step(x, y)  # warm-up: optimizer state and Opacus bookkeeping now exist, as on a device mid-training
    step.zero_grad()
    gc.collect()

    params = list(work.parameters())
    param_keys = {_storage_key(p) for p in params}
    parameter_bytes = _distinct_bytes(params)
    optimizer_state_bytes = _distinct_bytes(_optimizer_tensors(step.optimizer))
    batch_bytes = _distinct_bytes([x, y])
    baseline = parameter_bytes + optimizer_state_bytes + batch_bytes

    saved: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in param_keys and t.numel() > 0:
            saved[key] = key[1]
        return t

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            step(x, y)
    gradient_bytes = _distinct_bytes([p.grad for p in step.params if p.grad is not None])
    per_sample_bytes = _distinct_bytes(_grad_samples(step.params))

    peak, phase, phase_peaks = _replay_allocations(prof)
    return MemoryMeasurement(
        peak_bytes=baseline + peak,
        baseline_bytes=baseline,
        parameter_bytes=parameter_bytes,
        optimizer_state_bytes=optimizer_state_bytes,
        batch_bytes=batch_bytes,
        gradient_bytes=gradient_bytes,
        per_sample_gradient_bytes=per_sample_bytes,
        saved_activation_bytes=int(sum(saved.values())),
        peak_phase=phase,
        phase_peaks={k: baseline + v for k, v in phase_peaks.items()},
    )


def _replay_allocations(prof: "torch.profiler.profile") -> tuple[int, str, dict[str, int]]:
    """Peak of the running sum of CPU allocation events, and the step phase it falls in."""
    try:
        events = prof.profiler.kineto_results.events()  # type: ignore[union-attr]
    except AttributeError as exc:  # pragma: no cover - depends on the torch build
        raise RuntimeError("this torch build's profiler exposes no allocation events; cannot measure memory") from exc
    ranges: list[tuple[int, int, str]] = []
    allocs: list[tuple[int, int]] = []
    for e in events:
        name = e.name()
        if name == "[memory]":
            if e.device_type() == torch.autograd.DeviceType.CPU:
                allocs.append((e.start_ns(), int(e.nbytes())))
        elif name in ("prefix", "forward", "backward", "step"):
            ranges.append((e.start_ns(), e.end_ns(), name))
    if not allocs:
        raise RuntimeError("the profiler recorded no CPU allocations; was profile_memory=True honoured?")
    allocs.sort(key=lambda a: a[0])
    ranges.sort()
    cur = peak = 0
    peak_phase = "other"
    phase_peaks: dict[str, int] = {}
    for t, nbytes in allocs:
        cur += nbytes
        phase = next((n for a, b, n in ranges if a <= t <= b), "other")
        if cur > phase_peaks.get(phase, -1):
            phase_peaks[phase] = cur
        if cur > peak:
            peak, peak_phase = cur, phase
    return peak, peak_phase, phase_peaks


# --------------------------------------------------------------------------------------
# estimator
# --------------------------------------------------------------------------------------

_SAVES_OUTPUT = (nn.ReLU, nn.Sigmoid, nn.Tanh)
_SAVES_INPUT = (nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Hardswish, nn.ReLU6, nn.Softplus, nn.Mish, nn.AvgPool2d)
_VIEWS = (nn.Flatten, nn.Unflatten, nn.Identity)


@dataclass
class _Layer:
    """One leaf layer of the flattened Sequential, with batch-1 shapes from the probe."""

    path: str
    top: str
    module: nn.Module
    in_numel: int  # per sample
    in_elem: int
    in_shape: tuple[int, ...]  # per sample
    out_numel: int
    out_elem: int
    out_shape: tuple[int, ...]
    params: dict[str, int] = field(default_factory=dict)  # local name -> numel
    trainable: dict[str, int] = field(default_factory=dict)
    elem: int = 4


def _leaves(model: nn.Sequential) -> list[tuple[str, str, nn.Module]]:
    """(dotted path, top-level layer, module) for every leaf in execution order.

    Nested ``nn.Sequential`` are opened; any other module with children is treated as one
    opaque layer (its internal data flow is unknown).
    """
    out: list[tuple[str, str, nn.Module]] = []

    def walk(prefix: str, top: str, mod: nn.Module) -> None:
        if isinstance(mod, nn.Sequential):
            for name, child in mod.named_children():
                walk(f"{prefix}.{name}" if prefix else name, top or name, child)
        else:
            out.append((prefix, top, mod))

    walk("", "", model)
    return out


def _probe(model: nn.Sequential, input_shape: tuple[int, ...], plan: SubsetPlan) -> list[_Layer]:
    leaves = _leaves(model)
    shapes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = []
    for i, (_, _, mod) in enumerate(leaves):
        def hook(m: nn.Module, inp: tuple, out: torch.Tensor, i: int = i) -> None:
            shapes[i] = (inp[0], out)

        hooks.append(mod.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros((1,) + tuple(input_shape)))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    trainable = set(plan.trainable)
    layers: list[_Layer] = []
    for i, (path, top, mod) in enumerate(leaves):
        if i not in shapes:
            raise ValueError(f"layer {path!r} was not called by forward; the estimator needs every layer used once")
        xin, xout = shapes[i]
        if not isinstance(xout, torch.Tensor):
            raise ValueError(f"layer {path!r} returns {type(xout).__name__}; the estimator needs tensor outputs")
        params = {n: p.numel() for n, p in mod.named_parameters()}
        full = {n: (f"{path}.{n}" if path else n) for n in params}
        layers.append(
            _Layer(
                path=path,
                top=top,
                module=mod,
                in_numel=xin.numel(),
                in_elem=xin.element_size(),
                in_shape=tuple(xin.shape[1:]),
                out_numel=xout.numel(),
                out_elem=xout.element_size(),
                out_shape=tuple(xout.shape[1:]),
                params=params,
                trainable={n: k for n, k in params.items() if full[n] in trainable},
                elem=next((p.element_size() for p in mod.parameters()), 4),
            )
        )
    return layers


@dataclass
class _Costs:
    """Per-layer byte costs for a batch of ``b`` samples (see :func:`_layer_costs`)."""

    fwd_work: int  # allocated transiently by forward, besides the output
    out_alloc: int  # new storage for the output (0 for a view / in-place layer)
    saves_in: bool  # autograd (or Opacus) keeps the input storage
    saves_out: bool  # autograd keeps the output storage
    saved_extra: int  # other saved tensors (pool indices, norm statistics)
    node_work: int  # transient during the autograd node's backward
    grad_in: int  # gradient w.r.t. the input (0 if a view of the output gradient or not needed)
    grads: int  # .grad of trainable tensors
    hook_work: int  # transient inside Opacus's per-sample-gradient hook
    grad_sample: int  # per-sample gradients kept until the optimizer step
    is_view: bool = False  # output (and input gradient) share storage with the input (gradient)
    approximate: bool = False


def _conv_uses_mkldnn(m: nn.Conv2d, layer: _Layer, b: int) -> bool:
    """Whether torch picks its oneDNN convolution (it does for batches > 1 on float32 CPU).

    Mirrors the CPU heuristic in ATen's ``ConvParams::use_mkldnn`` (torch 2.x): grouped or
    large-kernel convolutions, batches above one, or inputs above 20480 values; otherwise
    the im2col ``slow_conv2d`` kernel runs, which allocates differently.
    """
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled) or layer.in_elem != 4:
        return False
    kh, kw = m.kernel_size
    return m.groups > 1 or (kh > 3 and kw > 3) or b > 1 or b * layer.in_numel > 20480


def _layer_costs(layer: _Layer, b: int, *, grad_mode: bool, rg_in: bool, dp: bool) -> _Costs:
    """Byte costs of one layer in one step; ``rg_in``: its input requires grad."""
    m = layer.module
    e = layer.elem
    inb = b * layer.in_numel * layer.in_elem
    outb = b * layer.out_numel * layer.out_elem
    tr = layer.trainable
    any_tr = bool(tr)
    node = grad_mode and (rg_in or any_tr)
    grads = sum(tr.values()) * e
    gs = b * grads
    hook = dp and any_tr and grad_mode
    c = _Costs(0, outb, False, False, 0, 0, inb if rg_in else 0, grads if node else 0, 0, gs if hook else 0)

    if isinstance(m, nn.Linear):
        c.saves_in = node and ("weight" in tr or hook)
        if hook:
            w = b * tr.get("weight", 0) * e
            bias = b * tr.get("bias", 0) * e
            # backprops * batch (loss_reduction="mean"), einsum result, then zeros() it is copied into
            c.hook_work = outb + 2 * w + bias
    elif isinstance(m, nn.Conv2d):
        cin, h, w_ = layer.in_shape
        kh, kw = m.kernel_size
        positions = layer.out_numel // m.out_channels
        unfolded = b * (cin // m.groups) * m.groups * kh * kw * positions * layer.in_elem
        c.saves_in = node
        if _conv_uses_mkldnn(m, layer, b):
            c.fwd_work = outb  # oneDNN writes into its own buffer, then copies out
            if node:
                c.node_work = outb + inb + 2 * sum(tr.values()) * e
        else:
            # torch's im2col kernel ("slow_conv2d"): an unfolded-input buffer, forward and backward
            c.fwd_work = unfolded
            if node:
                c.node_work = unfolded
        if hook:
            ph, pw = (m.padding if isinstance(m.padding, tuple) else (0, 0)) if m.padding != "same" else (kh // 2, kw // 2)
            padded = b * cin * (h + 2 * ph) * (w_ + 2 * pw) * layer.in_elem
            gw = b * tr.get("weight", 0) * e
            gb = b * tr.get("bias", 0) * e
            c.hook_work = outb + max(padded + unfolded, unfolded + gw + gb, 2 * gw + 2 * gb)
    elif isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
        if isinstance(m, nn.GroupNorm):
            stats = 2 * b * m.num_groups * 4
        else:
            stats = 2 * b * (layer.in_numel // max(1, math.prod(m.normalized_shape))) * 4
        c.fwd_work = stats
        c.saves_in = node
        c.saved_extra = stats if node else 0
        if hook:
            # backprops * batch, the recomputed normalised input, their product
            c.hook_work = 3 * outb + 4 * b * sum(tr.values()) * e
    elif isinstance(m, _SAVES_OUTPUT):
        if getattr(m, "inplace", False):
            c.out_alloc = 0
        c.saves_out = node
    elif isinstance(m, nn.MaxPool2d):
        idx = b * layer.out_numel * 8  # int64 argmax indices, allocated even without autograd
        c.fwd_work = 0 if node else idx
        c.saves_in = node
        c.saved_extra = idx if node else 0
    elif isinstance(m, _SAVES_INPUT):
        c.saves_in = node
    elif isinstance(m, nn.AdaptiveAvgPool2d):
        size = m.output_size if isinstance(m.output_size, tuple) else (m.output_size, m.output_size)
        c.saves_in = node and tuple(size) != (1, 1)
    elif isinstance(m, nn.Dropout):
        if m.training and m.p > 0:
            c.saves_out = False
            c.saved_extra = outb if node else 0  # the scaled keep-mask
            c.fwd_work = 0 if node else outb
        else:
            c.out_alloc, c.grad_in, c.is_view = 0, 0, True
    elif isinstance(m, _VIEWS):
        c.out_alloc, c.grad_in, c.is_view = 0, 0, True  # the input gradient is a view of the output gradient
    else:
        # Unknown layer: assume it keeps input and output and that a per-sample gradient
        # (functorch path under Opacus) costs three copies at its peak.
        c.approximate = True
        c.fwd_work = outb
        c.saves_in = node
        c.saves_out = node
        c.node_work = inb + outb
        if hook:
            c.hook_work = outb + 3 * gs
    return c


def estimate_training_memory(model: nn.Module, plan: SubsetPlan, setup: TrainingSetup) -> MemoryEstimate:
    """Predict the peak bytes of one step; see the module docstring for the model of a step."""
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"the estimator needs an nn.Sequential of layers, got {type(model).__name__}")
    plan.check(model)
    b = setup.batch_size
    layers = _probe(model, setup.input_shape, plan)
    first_top = plan.trainable_layers[0]
    k = next(i for i, l in enumerate(layers) if l.top == first_top)

    all_params = list(model.parameters())
    parameter_bytes = _distinct_bytes(all_params)
    named = dict(model.named_parameters())
    trainable_bytes = sum(named[n].numel() * named[n].element_size() for n in plan.trainable)
    opt_factor = {"sgd": 0, "momentum": 1, "adam": 2}[setup.optimizer]
    optimizer_state_bytes = opt_factor * trainable_bytes + (4 * len(plan.trainable) if setup.optimizer == "adam" else 0)
    x_bytes = b * math.prod(setup.input_shape) * 4
    batch_bytes = x_bytes + b * 8
    baseline = parameter_bytes + optimizer_state_bytes + batch_bytes

    num_classes = layers[-1].out_numel
    phase_peaks: dict[str, int] = {}

    # -- prefix: no autograd; one layer's input and output (and kernel buffers) at a time
    cur = 0  # bytes of the live activation (the batch itself is in the baseline)
    peak = 0
    for layer in layers[:k]:
        c = _layer_costs(layer, b, grad_mode=False, rg_in=False, dp=False)
        peak = max(peak, cur + c.out_alloc + c.fwd_work)
        if c.out_alloc:
            cur = c.out_alloc
    phase_peaks["prefix"] = peak

    # -- suffix forward: storages are ids; a view keeps its input's id
    costs: list[_Costs] = []
    storage_of_in: list[int] = []
    storage_of_out: list[int] = []
    sizes: dict[int, int] = {0: cur}  # storage 0: the suffix input (prefix output, or the batch)
    if k == 0:
        sizes[0] = 0
    refs: dict[int, set[int]] = {}  # storage id -> layer indices (suffix-relative) that keep it
    extras: dict[int, int] = {}  # suffix layer -> bytes of its private saved tensors
    live_store = 0
    kept: set[int] = set()
    cur_id = 0
    rg = False
    peak = 0
    for j, layer in enumerate(layers[k:]):
        c = _layer_costs(layer, b, grad_mode=True, rg_in=rg, dp=setup.dp)
        costs.append(c)
        out_id = cur_id if c.out_alloc == 0 else len(sizes)
        if c.out_alloc:
            sizes[out_id] = c.out_alloc
        storage_of_in.append(cur_id)
        storage_of_out.append(out_id)
        live_now = sum(sizes[s] for s in kept | {cur_id, out_id})
        peak = max(peak, live_now + c.fwd_work + c.saved_extra)
        if c.saves_in:
            refs.setdefault(cur_id, set()).add(j)
            kept.add(cur_id)
        if c.saves_out:
            refs.setdefault(out_id, set()).add(j)
            kept.add(out_id)
        extras[j] = c.saved_extra
        cur_id = out_id
        rg = rg or bool(layer.trainable)
    saved_activation_bytes = sum(sizes[s] for s in kept) + sum(extras.values())
    logits = b * num_classes * 4
    forward_end = sum(sizes[s] for s in kept | {cur_id}) + sum(extras.values()) + logits  # + log-softmax
    phase_peaks["forward"] = max(peak, forward_end)

    # -- backward, last layer first
    held_grads = 0
    held_gs = 0
    extras_live = sum(extras.values())
    alive = set(kept) | {cur_id}
    g = logits  # gradient w.r.t. the current layer's output
    peak = forward_end + logits
    suffix = layers[k:]
    for j in range(len(suffix) - 1, -1, -1):
        c = costs[j]
        base = sum(sizes[s] for s in alive) + extras_live + held_grads + held_gs
        hook_first = j == 0  # the first suffix layer's input needs no grad: Opacus's hook fires before its node
        if hook_first:
            peak = max(peak, base + g + c.hook_work)
            held_gs += c.grad_sample
            peak = max(peak, base + c.grad_sample + g + c.node_work + c.grad_in + c.grads)
            held_grads += c.grads
        else:
            peak = max(peak, base + g + c.node_work + c.grad_in + c.grads)
            held_grads += c.grads
            peak = max(peak, base + c.grads + g + c.grad_in + c.hook_work)
            held_gs += c.grad_sample
        # release what only this layer (and later ones) kept
        extras_live -= extras[j]
        for s in (storage_of_in[j], storage_of_out[j]):
            refs.get(s, set()).discard(j)
        alive = {s for s in alive if refs.get(s)}
        if not c.is_view:
            g = c.grad_in  # a view layer passes on a view of the same gradient
    phase_peaks["backward"] = peak
    after_backward = held_grads + held_gs

    # -- optimizer step
    sizes_tr = sorted((named[n].numel() * named[n].element_size() for n in plan.trainable), reverse=True)
    # torch's single-tensor Adam keeps sqrt(v) and the step direction per tensor, one
    # tensor's buffer outliving into the next; SGD (with or without momentum) is in place
    optimizer_work = (2 * sizes_tr[0] + (sizes_tr[1] if len(sizes_tr) > 1 else 0)) if setup.optimizer == "adam" else 0
    step_peak = after_backward + optimizer_work
    if setup.dp:
        # clipped sums (kept until zero_grad) plus one tensor's noise and noised grad at a time
        dp_held = after_backward + trainable_bytes
        step_peak = max(dp_held + 2 * sizes_tr[0], dp_held + optimizer_work)
    phase_peaks["step"] = step_peak

    phase = max(phase_peaks, key=lambda p: phase_peaks[p])
    return MemoryEstimate(
        peak_bytes=int(baseline + phase_peaks[phase]),
        baseline_bytes=int(baseline),
        parameter_bytes=int(parameter_bytes),
        optimizer_state_bytes=int(optimizer_state_bytes),
        batch_bytes=int(batch_bytes),
        trainable_bytes=int(trainable_bytes),
        gradient_bytes=int(trainable_bytes),
        per_sample_gradient_bytes=int(b * trainable_bytes) if setup.dp else 0,
        saved_activation_bytes=int(saved_activation_bytes),
        peak_phase=phase,
        phase_peaks={p: int(baseline + v) for p, v in phase_peaks.items()},
        approximate_layers=tuple(l.path for l, c in zip(suffix, costs) if c.approximate),
    )

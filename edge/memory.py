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
autograd saves during forward (parameters excluded) together with the layer inputs
Opacus keeps for per-sample gradients, which is what "the activations backward must
keep" means.

:func:`estimate_training_memory` predicts the same peak without running the step. It
probes per-layer shapes with one batch-1 forward (no autograd), then simulates the step
layer by layer -- prefix, suffix forward, backward in reverse layer order, optimizer
step -- with, per layer type, which tensors autograd saves (found by inspecting torch's
autograd for ``Linear``/``Conv2d``/``GroupNorm``/activations/pooling), which buffers a
kernel allocates, and what Opacus's grad samplers allocate. Tensors shared between
layers (a ReLU output is also the next layer's saved input; ``Flatten`` returns a view)
are counted once. Layer types without a rule are costed conservatively and listed in
``MemoryEstimate.approximate_layers``.

Under ghost clipping (``TrainingSetup.clipping = "ghost"``, see :mod:`ftte.edge.step`)
the step runs two backward passes: the first keeps the whole graph (``retain_graph``)
while Opacus computes per-sample gradient *norms* -- for ``Linear`` layers from output
gradients and activations only, for other layers by forming one layer's per-sample
gradients at a time and dropping them -- and writes ``.grad``; the second backpropagates
the re-weighted per-sample losses with hooks off, freeing the graph as it goes. No
per-sample gradient survives to the optimizer step. The estimator simulates both passes.
A channel-sliced layer (:class:`ftte.edge.plan.ChannelSlice`) is costed as its trained and
frozen halves reading one input, with outputs concatenated.

Not counted by either side: allocator overhead and fragmentation, Python objects, the
interpreter and torch runtime. The batch is exactly ``batch_size`` samples; with
Poisson sampling the batch varies, so budget with a high quantile of the batch size.
The measurement attributes every CPU allocation during the step to it, so run it in a
process that is not allocating tensors on other threads at the same time.

The per-layer rules were read off torch 2.13 (CPU, oneDNN convolution for batches above
one) and Opacus 1.6 (hook-based grad samplers); other versions can allocate different
temporaries. Tests hold estimate and measurement within 15% on every bundled model,
several plans, with and without DP, in both clipping modes and for channel-slice plans,
so a drift shows up there.
"""

from __future__ import annotations

import copy
import gc
import math
from dataclasses import asdict, dataclass, field
from typing import Iterable

import torch
from torch import nn

from ftte.edge.plan import SubsetPlan
from ftte.edge.step import CLIPPING_MODES, ClippingMode, OptimizerKind, StepConfig, SubsetStep

__all__ = [
    "TrainingSetup",
    "MemoryEstimator",
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
    prefix_chunk: int | None = None
    clipping: ClippingMode = "per_sample"

    def __post_init__(self) -> None:
        if self.clipping not in CLIPPING_MODES:
            raise ValueError(f"clipping must be one of {CLIPPING_MODES}, got {self.clipping!r}")
        if self.prefix_chunk is not None and int(self.prefix_chunk) < 1:
            raise ValueError(f"prefix_chunk must be >= 1 or None, got {self.prefix_chunk}")
        if int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.optimizer not in ("sgd", "momentum", "adam"):
            raise ValueError(f"optimizer must be 'sgd', 'momentum' or 'adam', got {self.optimizer!r}")
        object.__setattr__(self, "input_shape", tuple(int(s) for s in self.input_shape))

    def step_config(self, **overrides: float) -> StepConfig:
        return StepConfig(
            dp=self.dp, optimizer=self.optimizer, prefix_chunk=self.prefix_chunk, clipping=self.clipping, **overrides
        )


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak bytes of one step and the terms it is made of (all in bytes).

    ``peak_bytes = baseline_bytes + the highest phase``; ``phase_peaks`` holds each
    phase's peak (``prefix``, ``forward``, ``backward``, ``step``) including the
    baseline, and ``peak_phase`` names the highest. The held-state terms
    (``gradient_bytes``, ``per_sample_gradient_bytes``, ``saved_activation_bytes``) are
    what exists at their own high point, not parts that sum to the peak.
    ``approximate_layers`` lists layers costed without a specific rule.
    """

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
    clipping: str = "per_sample"  # the DP clipping mode costed (see ftte.edge.step)
    prefix_chunk: int | None = None  # the frozen prefix's micro-batch size costed (None: whole batch or no prefix)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MemoryMeasurement:
    """Measured peak bytes of one real step, with the baseline and the held-state terms.

    Same fields as :class:`MemoryEstimate`; ``phase_peaks`` has an ``other`` entry for
    allocations outside the four phases (the end of the step). ``gradient_bytes`` and
    ``per_sample_gradient_bytes`` are read after the optimizer step (before
    ``zero_grad``), ``saved_activation_bytes`` during forward.
    """

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
    clipping: str = "per_sample"  # the DP clipping mode measured (see ftte.edge.step)
    prefix_chunk: int | None = None  # the frozen prefix's micro-batch size in the measured step

    def to_dict(self) -> dict:
        return asdict(self)


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
    suffix_modules = list(step.suffix_module.modules())

    def note(t: torch.Tensor) -> None:
        key = _storage_key(t)
        if key not in param_keys and t.numel() > 0:
            saved[key] = key[1]

    def pack(t: torch.Tensor) -> torch.Tensor:
        note(t)
        # layer inputs Opacus keeps for per-sample gradients (mostly the same storages)
        for m in suffix_modules:
            for group in getattr(m, "activations", None) or ():
                for a in group:
                    if isinstance(a, torch.Tensor):
                        note(a)
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
        clipping=setup.clipping,
        prefix_chunk=setup.prefix_chunk if len(step.prefix) else None,
    )


def _replay_allocations(prof: "torch.profiler.profile") -> tuple[int, str, dict[str, int]]:
    """Peak of the running sum of this step's CPU allocations, and the step phase it falls in.

    Read from the profiler's event tree rather than its flat event list because the tree
    gives each allocation's address: torch's CPU allocator remembers block sizes from any
    earlier profiling session and never forgets a block freed while profiling was off, so
    a block reused at such an address and freed during this step is reported with a stale,
    unrelated size. Only frees of blocks allocated inside this session count.
    """
    try:
        roots = prof.profiler.kineto_results.experimental_event_tree()  # type: ignore[union-attr]
    except AttributeError as exc:  # pragma: no cover - depends on the torch build
        raise RuntimeError("this torch build's profiler exposes no allocation events; cannot measure memory") from exc
    events: list[tuple[int, int, int]] = []
    ranges: list[tuple[int, int, str]] = []
    stack = list(roots)
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        fields = node.extra_fields
        if type(fields).__name__ == "_ExtraFields_Allocation":
            if fields.device.type == "cpu":
                events.append((node.start_time_ns, int(fields.ptr), int(fields.alloc_size)))
        elif node.name in ("prefix", "forward", "backward", "step"):
            ranges.append((node.start_time_ns, node.end_time_ns, node.name))
    if not events:
        raise RuntimeError("the profiler recorded no CPU allocations; was profile_memory=True honoured?")
    events.sort(key=lambda e: e[0])
    return replay_allocation_events(events, sorted(ranges))


def replay_allocation_events(
    events: list[tuple[int, int, int]], ranges: list[tuple[int, int, str]]
) -> tuple[int, str, dict[str, int]]:
    """Peak live bytes over time-ordered ``(time_ns, address, signed_bytes)`` events.

    A free (negative size) counts only if its address was allocated earlier in the same
    list, with the size of that allocation: frees of blocks from before the measurement,
    or reported with a stale size, would lower the peak by memory the step never held.
    """
    live: dict[int, int] = {}
    cur = peak = 0
    peak_phase = "other"
    phase_peaks: dict[str, int] = {}
    for t, ptr, nbytes in events:
        if nbytes >= 0:
            live[ptr] = live.get(ptr, 0) + nbytes
            cur += nbytes
        else:
            cur -= live.pop(ptr, 0)
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


@dataclass(frozen=True)
class _Layer:
    """One leaf layer of the flattened Sequential, with per-sample shapes from the probe."""

    path: str  # dotted module path, e.g. "3" or "block.1"
    top: str  # top-level layer (what a plan splits at)
    module: nn.Module
    in_numel: int  # per sample
    in_elem: int
    in_shape: tuple[int, ...]  # per sample
    out_numel: int
    out_elem: int
    params: dict[str, str]  # local parameter name -> full model name
    elem: int  # parameter element size


def _leaves(model: nn.Sequential) -> list[tuple[str, str, nn.Module]]:
    """(dotted path, top-level layer, module) for every leaf in execution order.

    Nested ``nn.Sequential`` are opened; any other module with children is treated as one
    opaque layer (its internal data flow is unknown, so it is costed by the generic rule).
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


def _probe(model: nn.Sequential, input_shape: tuple[int, ...]) -> list[_Layer]:
    """Per-layer input/output sizes from one batch-1 forward pass without autograd."""
    leaves = _leaves(model)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = []
    for i, (_, _, mod) in enumerate(leaves):

        def hook(m: nn.Module, inp: tuple, out: torch.Tensor, i: int = i) -> None:
            if i in seen:
                raise ValueError(f"layer {leaves[i][0]!r} is called twice; the estimator needs each layer used once")
            seen[i] = (inp[0], out)

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
    layers: list[_Layer] = []
    for i, (path, top, mod) in enumerate(leaves):
        if i not in seen:
            raise ValueError(f"layer {path!r} was not called by forward; the estimator needs every layer used once")
        xin, xout = seen[i]
        if not isinstance(xin, torch.Tensor) or not isinstance(xout, torch.Tensor):
            raise ValueError(f"layer {path!r} does not map a tensor to a tensor; the estimator cannot cost it")
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
                params={n: (f"{path}.{n}" if path else n) for n, _ in mod.named_parameters()},
                elem=next((p.element_size() for p in mod.parameters()), 4),
            )
        )
    return layers


@dataclass
class _Costs:
    """Byte costs of one layer in one step for a batch of ``b`` samples (see :func:`_layer_costs`)."""

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


def _layer_costs(layer: _Layer, tr: dict[str, int], b: int, *, grad_mode: bool, rg_in: bool, dp: bool) -> _Costs:
    """Byte costs of one layer; ``tr``: its trainable tensors (local name -> numel); ``rg_in``: input needs grad."""
    m = layer.module
    e = layer.elem
    inb = b * layer.in_numel * layer.in_elem
    outb = b * layer.out_numel * layer.out_elem
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
                # reordered copies of output gradient and input for the weight gradient, or a
                # second weight-sized buffer when .grad is written
                c.node_work = max(outb + inb, tr.get("weight", 0) * e)
        else:
            # torch's im2col kernel ("slow_conv2d"): an unfolded-input buffer, forward and backward
            # (backward re-unfolds only for the weight gradient; the input gradient and the bias
            # gradient need no columns buffer: measured on torch 2.13)
            c.fwd_work = unfolded
            if node and "weight" in tr:
                c.node_work = unfolded
        if hook:
            if m.padding == "same":
                ph, pw = kh // 2, kw // 2
            elif isinstance(m.padding, tuple):
                ph, pw = m.padding
            else:  # "valid"
                ph = pw = 0
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
        c.approximate = hook and isinstance(m, nn.LayerNorm)  # Opacus's LayerNorm sampler: assumed like GroupNorm's
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
        if grad_mode and m.p > 0:  # active in the (training) suffix, identity in the eval prefix
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


def _sliced_costs(layer: _Layer, tr: dict[str, int], b: int, k: int, *, rg_in: bool, dp: bool) -> _Costs:
    """Costs of a channel-sliced layer (:class:`ftte.edge.plan.ChannelSlice`): a trained
    layer with ``k`` outputs and a frozen one with the rest, both reading the same input,
    outputs concatenated. ``tr`` already holds the trained part's sizes."""
    from ftte.edge.plan import ChannelSlice

    split = ChannelSlice(layer.module, k)  # views only: no parameter memory
    out = layer.out_numel
    rows = layer.module.weight.shape[0]
    parts = []
    for module, n_out, part_tr in ((split.trained, k, tr), (split.frozen, rows - k, {})):
        part = _Layer(layer.path, layer.top, module, layer.in_numel, layer.in_elem, layer.in_shape,
                      out * n_out // rows, layer.out_elem, layer.params, layer.elem)
        parts.append(_layer_costs(part, part_tr, b, grad_mode=True, rg_in=rg_in, dp=dp))
    t, f = parts
    outb = b * out * layer.out_elem
    inb = b * layer.in_numel * layer.in_elem
    return _Costs(
        fwd_work=outb,  # both halves' outputs, alive while they are concatenated
        out_alloc=outb,
        saves_in=t.saves_in or f.saves_in,
        saves_out=False,
        saved_extra=0,
        # trained half's backward, or the frozen half's while the first input gradient is held
        node_work=max(t.node_work, f.node_work + (inb if rg_in else 0)),
        grad_in=inb if rg_in else 0,
        grads=t.grads,
        hook_work=t.hook_work,
        grad_sample=t.grad_sample,
        approximate=t.approximate or f.approximate,
    )


def _single_backward(
    costs: list[_Costs],
    sizes: dict[int, int],
    kept: set[int],
    cur_id: int,
    refs: dict[int, set[int]],
    in_id: list[int],
    out_id: list[int],
    extras: list[int],
    forward_end: int,
    logits: int,
) -> tuple[int, int, int]:
    """One backward pass, last layer first, freeing saved storages as it goes (non-private
    or per-sample DP). Returns ``(peak, held .grad bytes, held per-sample-gradient bytes)``."""
    refs = {k: set(v) for k, v in refs.items()}
    held_grads = held_gs = 0
    extras_live = sum(extras)
    alive = kept | {cur_id}
    g = logits  # gradient w.r.t. the current layer's output
    peak = forward_end + g
    for j in range(len(costs) - 1, -1, -1):
        c = costs[j]
        live = sum(sizes[s] for s in alive) + extras_live + held_grads + held_gs + g
        if j == 0:
            # the suffix input needs no grad, so Opacus's hook fires before the layer's node
            peak = max(peak, live + c.hook_work)
            held_gs += c.grad_sample
            peak = max(peak, live + c.grad_sample + c.node_work + c.grad_in + c.grads)
            held_grads += c.grads
        else:
            peak = max(peak, live + c.node_work + c.grad_in + c.grads)
            held_grads += c.grads
            peak = max(peak, live + c.grads + c.grad_in + c.hook_work)
            held_gs += c.grad_sample
        extras_live -= extras[j]
        for sid in (in_id[j], out_id[j]):
            refs.get(sid, set()).discard(j)
        alive = {sid for sid in alive if refs.get(sid)}
        if not c.is_view:
            g = c.grad_in  # a view layer passes on a view of the same gradient
    return peak, held_grads, held_gs


def _ghost_norm_work(layer: _Layer, c: _Costs, b: int) -> int:
    """Transient bytes of Opacus's fast-clipping hook on one trainable layer.

    Layers with a ghost norm sampler (``Linear`` on per-sample vectors) compute each
    sample's gradient norm from ``backprops * batch`` and the activations without forming
    per-sample gradients: one output-sized buffer plus a few batch-sized vectors. Every
    other layer computes its per-sample gradients as in per-sample mode (``hook_work``),
    takes their norms and drops them before the next layer's hook.
    """
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    if type(layer.module) in GradSampleModuleFastGradientClipping.NORM_SAMPLERS and len(layer.in_shape) == 1:
        outb = b * layer.out_numel * layer.out_elem
        return outb + 4 * b * 4
    return c.hook_work


def _ghost_backward(
    suffix: list[_Layer],
    costs: list[_Costs],
    sizes: dict[int, int],
    kept: set[int],
    cur_id: int,
    refs: dict[int, set[int]],
    in_id: list[int],
    out_id: list[int],
    extras: list[int],
    forward_end: int,
    logits: int,
    b: int,
) -> tuple[int, int, int]:
    """Ghost clipping's two backward passes (Opacus ``DPTensorFastGradientClipping.backward``).

    Pass one runs with ``retain_graph=True``, so every saved storage stays alive while the
    hooks compute per-sample gradient norms and ``.grad`` is written; no per-sample
    gradient outlives its layer's hook. ``.grad`` is then zeroed in place (kept), and pass
    two backpropagates the re-weighted per-sample losses with hooks off, freeing saved
    storages as it goes; each layer's new gradient is a transient buffer added into ``.grad``.
    Returns ``(peak, held .grad bytes, 0)``.
    """
    all_saved = sum(sizes[s] for s in kept | {cur_id}) + sum(extras)
    loss_vectors = 4 * b * 4  # per-sample losses, clipping factors, their product
    held_grads = 0
    g = logits
    peak = forward_end + g + loss_vectors
    for j in range(len(costs) - 1, -1, -1):
        c = costs[j]
        work = _ghost_norm_work(suffix[j], c, b) if c.grad_sample else 0
        live = all_saved + loss_vectors + held_grads + g
        if j == 0:
            peak = max(peak, live + work)
            peak = max(peak, live + c.node_work + c.grad_in + c.grads)
        else:
            peak = max(peak, live + c.node_work + c.grad_in + c.grads)
            peak = max(peak, live + c.grads + c.grad_in + work)
        held_grads += c.grads
        if not c.is_view:
            g = c.grad_in
    # pass two: the graph is freed layer by layer; new gradients are added into the held .grad
    refs = {k: set(v) for k, v in refs.items()}
    extras_live = sum(extras)
    alive = kept | {cur_id}
    g = logits
    for j in range(len(costs) - 1, -1, -1):
        c = costs[j]
        live = sum(sizes[s] for s in alive) + extras_live + loss_vectors + held_grads + g
        peak = max(peak, live + c.node_work + c.grad_in + c.grads)
        extras_live -= extras[j]
        for sid in (in_id[j], out_id[j]):
            refs.get(sid, set()).discard(j)
        alive = {sid for sid in alive if refs.get(sid)}
        if not c.is_view:
            g = c.grad_in
    return peak, held_grads, 0


class MemoryEstimator:
    """Estimates peak step memory for any plan of one model, probing layer shapes only once.

    The simulation follows one step (see the module docstring): the prefix without
    autograd; the suffix forward, tracking which activation storages autograd or Opacus
    keep; backward in reverse layer order, where a layer's saved storages are freed once
    no earlier layer still needs them, its ``.grad`` and per-sample gradients appear, and
    kernel/Opacus temporaries come and go; then the optimizer step. The peak of each phase
    plus the baseline is reported, the largest being the estimate.
    """

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...]) -> None:
        if not isinstance(model, nn.Sequential):
            raise TypeError(f"the estimator needs an nn.Sequential of layers, got {type(model).__name__}")
        self.model = model
        self.input_shape = tuple(int(s) for s in input_shape)
        self.layers = _probe(model, self.input_shape)
        self._named = {n: (p.numel(), p.element_size()) for n, p in model.named_parameters()}
        self.parameter_bytes = _distinct_bytes(model.parameters())
        self.num_classes = self.layers[-1].out_numel

    def estimate(
        self,
        plan: SubsetPlan,
        batch_size: int,
        *,
        dp: bool = True,
        optimizer: OptimizerKind = "momentum",
        prefix_chunk: int | None = None,
        clipping: ClippingMode = "per_sample",
    ) -> MemoryEstimate:
        plan.check(self.model)
        setup = TrainingSetup(
            batch_size, self.input_shape, dp=dp, optimizer=optimizer, prefix_chunk=prefix_chunk, clipping=clipping
        )
        b = setup.batch_size
        trainable = set(plan.trainable)
        # trained part of each tensor (a channel slice trains only its first rows)
        sizes_tr = [math.prod(plan.trained_shape(n)) * self._named[n][1] for n in plan.trainable]
        trainable_bytes = sum(sizes_tr)
        optimizer_state_bytes = {"sgd": 0, "momentum": 1, "adam": 2}[optimizer] * trainable_bytes
        if optimizer == "adam":
            optimizer_state_bytes += 4 * len(plan.trainable)  # the float32 step counters
        x_bytes = b * math.prod(self.input_shape) * 4
        batch_bytes = x_bytes + b * 8  # int64 labels
        baseline = self.parameter_bytes + optimizer_state_bytes + batch_bytes
        logits = b * self.num_classes * 4
        k = next(i for i, l in enumerate(self.layers) if l.top == plan.trainable_layers[0])

        cuts = plan.slice_map

        def tr_of(layer: _Layer) -> dict[str, int]:
            return {local: math.prod(plan.trained_shape(full)) for local, full in layer.params.items()
                    if full in trainable}

        def costs_of(layer: _Layer, tr: dict[str, int], rg: bool) -> _Costs:
            if layer.path in cuts and layer.path == layer.top:
                return _sliced_costs(layer, tr, b, cuts[layer.path], rg_in=rg, dp=dp)
            return _layer_costs(layer, tr, b, grad_mode=True, rg_in=rg, dp=dp)

        phase_peaks: dict[str, int] = {}

        # prefix: no autograd, so one layer's input and output (and kernel buffers) at a time
        # (micro-batched: a chunk's working set on top of the full output being filled in)
        chunked = k > 0 and prefix_chunk is not None and b > prefix_chunk
        cb = int(prefix_chunk) if chunked else b  # type: ignore[arg-type]
        cur = 0  # bytes of the live activation; the batch itself is in the baseline
        input_is_batch = True  # the suffix input is (a view of) the batch
        peak = 0
        for layer in self.layers[:k]:
            c = _layer_costs(layer, {}, cb, grad_mode=False, rg_in=False, dp=False)
            peak = max(peak, cur + c.out_alloc + c.fwd_work)
            if c.out_alloc:
                cur, input_is_batch = c.out_alloc, False
        if chunked:
            last = self.layers[k - 1]
            cur = b * last.out_numel * last.out_elem
            peak, input_is_batch = peak + cur, False
        phase_peaks["prefix"] = peak

        # suffix forward; storages get ids (0 = the suffix input), a view keeps its input's id
        suffix = self.layers[k:]
        sizes: dict[int, int] = {0: cur}
        costs: list[_Costs] = []
        in_id: list[int] = []
        out_id: list[int] = []
        refs: dict[int, set[int]] = {}  # storage id -> suffix layers whose backward still needs it
        extras: list[int] = []  # per suffix layer: its private saved tensors (indices, statistics)
        kept: set[int] = set()
        cur_id, rg, peak = 0, False, 0
        for j, layer in enumerate(suffix):
            tr = tr_of(layer)
            c = costs_of(layer, tr, rg)
            costs.append(c)
            new_id = cur_id if c.out_alloc == 0 else len(sizes)
            sizes[new_id] = sizes[cur_id] if c.out_alloc == 0 else c.out_alloc
            in_id.append(cur_id)
            out_id.append(new_id)
            peak = max(peak, sum(sizes[s] for s in kept | {cur_id, new_id}) + sum(extras) + c.fwd_work + c.saved_extra)
            for flag, sid in ((c.saves_in, cur_id), (c.saves_out, new_id)):
                if flag:
                    refs.setdefault(sid, set()).add(j)
                    kept.add(sid)
            extras.append(c.saved_extra)
            cur_id, rg = new_id, rg or bool(tr)
        # logits, and the log-softmax output cross-entropy saves
        forward_end = sum(sizes[s] for s in kept | {cur_id}) + sum(extras) + logits
        phase_peaks["forward"] = max(peak, forward_end)
        saved_activation_bytes = sum(sizes[s] for s in kept) + sum(extras) + logits + b * 8
        if input_is_batch and 0 in kept:
            saved_activation_bytes += x_bytes  # the batch itself is saved (counted in the baseline)

        ghost = dp and clipping == "ghost"
        if ghost:
            peak, held_grads, held_gs = _ghost_backward(
                suffix, costs, sizes, kept, cur_id, refs, in_id, out_id, extras, forward_end, logits, b
            )
        else:
            peak, held_grads, held_gs = _single_backward(
                costs, sizes, kept, cur_id, refs, in_id, out_id, extras, forward_end, logits
            )
        phase_peaks["backward"] = peak
        after_backward = held_grads + held_gs

        # optimizer step. torch's single-tensor Adam allocates sqrt(v) and the step direction
        # per tensor, one outliving into the next tensor's update; SGD (momentum or not) is in place
        optimizer_work = 0
        if optimizer == "adam":
            optimizer_work = max(2 * sz + (sizes_tr[i - 1] if i else 0) for i, sz in enumerate(sizes_tr))
        step_peak = after_backward + optimizer_work
        if dp:
            # clipped sums (kept until zero_grad), then one tensor's noise and noised grad at a time
            dp_held = after_backward + trainable_bytes
            step_peak = max(dp_held + 2 * max(sizes_tr), dp_held + optimizer_work)
        phase_peaks["step"] = step_peak

        phase = max(phase_peaks, key=lambda name: phase_peaks[name])
        return MemoryEstimate(
            peak_bytes=int(baseline + phase_peaks[phase]),
            baseline_bytes=int(baseline),
            parameter_bytes=int(self.parameter_bytes),
            optimizer_state_bytes=int(optimizer_state_bytes),
            batch_bytes=int(batch_bytes),
            trainable_bytes=int(trainable_bytes),
            gradient_bytes=int(trainable_bytes),
            per_sample_gradient_bytes=int(b * trainable_bytes) if dp and not ghost else 0,
            saved_activation_bytes=int(saved_activation_bytes),
            peak_phase=phase,
            phase_peaks={name: int(baseline + v) for name, v in phase_peaks.items()},
            approximate_layers=tuple(l.path for l, c in zip(suffix, costs) if c.approximate),
            clipping=clipping,
            prefix_chunk=int(prefix_chunk) if k > 0 and prefix_chunk is not None else None,
        )


def estimate_training_memory(model: nn.Module, plan: SubsetPlan, setup: TrainingSetup) -> MemoryEstimate:
    """Predict the peak bytes of one step (see :class:`MemoryEstimator` and the module docstring)."""
    return MemoryEstimator(model, setup.input_shape).estimate(
        plan,
        setup.batch_size,
        dp=setup.dp,
        optimizer=setup.optimizer,
        prefix_chunk=setup.prefix_chunk,
        clipping=setup.clipping,
    )

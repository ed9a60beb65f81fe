"""One training step on a subset plan, private (Opacus DP-SGD) or not.

This is the step that memory measurement (:mod:`ftte.edge.memory`) and the benchmarks
(``bench/``) run, so they measure the same thing a device would do: the frozen prefix
runs under ``no_grad`` and only the trainable suffix is wrapped by Opacus's
``GradSampleModule`` (per-sample gradients and saved activations exist only for the
suffix), then ``DPOptimizer`` clips each sample's gradient, adds Gaussian noise and
takes the optimizer step.

Two clipping modes (:data:`ClippingMode`), same clipped-and-noised update:

``per_sample`` (default)
    Opacus's ``GradSampleModule`` materialises every sample's gradient of every
    trainable tensor (``batch x trainable`` values held until the step), which
    ``DPOptimizer`` clips and sums.
``ghost``
    Opacus's fast gradient clipping ("ghost clipping", Li et al. 2022; Bu et al.
    2023): ``GradSampleModuleFastGradientClipping`` computes only each sample's
    gradient *norm* in a first backward pass (for ``Linear`` from activations and
    output gradients without forming the per-sample gradient; for other layers one
    layer's per-sample gradient at a time, dropped after its norm is taken), then
    ``DPLossFastGradientClipping`` runs a second backward pass on the per-sample losses
    re-weighted by the clipping factors, which yields the sum of clipped gradients
    directly; ``DPOptimizerFastGradientClipping`` only adds noise. Less memory, one
    more backward pass of the suffix (see :func:`clipping_compute_factor`).

The full privacy machinery (Poisson sampling over a dataset, accountants, ledger) lives
in ``ftte.privacy``; this module deliberately depends on Opacus directly so that the
memory planner does not depend on the trainer. The model is wrapped once, at
construction, and reused for every step (wrapping again stacks hooks).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.profiler import record_function

from ftte.edge.plan import FrozenPrefix, SubsetPlan, split_model

__all__ = ["OptimizerKind", "ClippingMode", "CLIPPING_MODES", "StepConfig", "SubsetStep", "PHASES",
           "clipping_compute_factor"]

OptimizerKind = Literal["sgd", "momentum", "adam"]
ClippingMode = Literal["per_sample", "ghost"]
CLIPPING_MODES: tuple[str, ...] = ("per_sample", "ghost")

#: ``record_function`` labels of a step's phases (the memory measurement attributes its peak to one).
PHASES = ("prefix", "forward", "backward", "step")

# Opacus hooks the first suffix layer, whose input comes from the no-grad prefix and so
# does not require grad; torch warns that the hook then sees output gradients only. That
# is exactly what Opacus's per-sample gradient needs (activations + output gradient).
warnings.filterwarnings(
    "ignore",
    message="Full backward hook is firing when gradients are computed with respect to module outputs",
    category=UserWarning,
)


@dataclass(frozen=True)
class StepConfig:
    """Hyper-parameters of a step. ``noise_multiplier``/``max_grad_norm`` matter only with ``dp``."""

    dp: bool = True
    optimizer: OptimizerKind = "momentum"
    lr: float = 0.05
    momentum: float = 0.9
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    prefix_chunk: int | None = None  # micro-batch size for the frozen prefix (None: whole batch)
    clipping: ClippingMode = "per_sample"  # how DP-SGD clips (see the module docstring); ignored without dp

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "momentum", "adam"):
            raise ValueError(f"optimizer must be 'sgd', 'momentum' or 'adam', got {self.optimizer!r}")
        if self.clipping not in CLIPPING_MODES:
            raise ValueError(f"clipping must be one of {CLIPPING_MODES}, got {self.clipping!r}")
        if self.dp and (self.noise_multiplier < 0 or self.max_grad_norm <= 0):
            raise ValueError("DP needs noise_multiplier >= 0 and max_grad_norm > 0")


def clipping_compute_factor(clipping: str, dp: bool = True) -> float:
    """Backward passes of the trainable suffix per step, relative to one.

    Ghost clipping runs the suffix's backward twice (norms, then the re-weighted loss),
    so the simulator charges the suffix's backward MACs twice; per-sample clipping and
    non-private steps run it once. The per-sample-gradient (or norm) work is charged
    separately by the caller.
    """
    if clipping not in CLIPPING_MODES:
        raise ValueError(f"clipping must be one of {CLIPPING_MODES}, got {clipping!r}")
    return 2.0 if (dp and clipping == "ghost") else 1.0


def _make_optimizer(params: list[nn.Parameter], cfg: StepConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr)
    if cfg.optimizer == "momentum":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.Adam(params, lr=cfg.lr)


class SubsetStep:
    """A model split by a plan, wrapped for (DP-)SGD once, ready to run steps.

    ``model`` is used in place (its parameters' ``requires_grad`` are set from the plan
    and, with DP, Opacus hooks the suffix's modules); pass a copy to keep the original.
    ``expected_batch_size`` is the mean (Poisson) batch size DP-SGD normalises the
    noisy gradient sum by.
    """

    def __init__(
        self,
        model: nn.Module,
        plan: SubsetPlan,
        config: StepConfig = StepConfig(),
        *,
        expected_batch_size: int,
        loss_fn: nn.Module | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self.config = config
        self.plan = plan
        self.model = model
        model.train()
        self.prefix: FrozenPrefix
        self.prefix, suffix = split_model(model, plan, prefix_chunk=config.prefix_chunk)
        self.suffix_module = suffix
        self.params = [p for p in suffix.parameters() if p.requires_grad]
        base = _make_optimizer(self.params, config)
        self.loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
        self._ghost = config.dp and config.clipping == "ghost"
        self._dp_loss = None
        self.suffix: nn.Module
        self.optimizer: torch.optim.Optimizer
        # what either Opacus optimizer is given: the same noise, clip and batch for both clipping modes
        dp_terms = dict(noise_multiplier=config.noise_multiplier, max_grad_norm=config.max_grad_norm,
                        expected_batch_size=int(expected_batch_size), loss_reduction="mean", generator=generator)
        if self._ghost:
            from opacus.grad_sample import GradSampleModuleFastGradientClipping
            from opacus.optimizers import DPOptimizerFastGradientClipping
            from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

            self.suffix = GradSampleModuleFastGradientClipping(
                suffix, batch_first=True, loss_reduction="mean", max_grad_norm=config.max_grad_norm,
                use_ghost_clipping=True,
            )
            self.optimizer = DPOptimizerFastGradientClipping(base, **dp_terms)
            # the loss must reduce by the mean (Opacus checks the criterion agrees)
            self._dp_loss = DPLossFastGradientClipping(self.suffix, self.optimizer, self.loss_fn, loss_reduction="mean")
        elif config.dp:
            from opacus import GradSampleModule
            from opacus.optimizers import DPOptimizer

            self.suffix = GradSampleModule(suffix, batch_first=True, loss_reduction="mean")
            self.optimizer = DPOptimizer(base, **dp_terms)
        else:
            self.suffix = suffix
            self.optimizer = base

    def zero_grad(self) -> None:
        """Drop ``.grad`` (and, with DP, ``grad_sample``/``summed_grad``) so the next step starts clean."""
        self.optimizer.zero_grad(set_to_none=True)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One step on batch ``(x, y)``; returns the loss (``nan`` for an empty batch).

        Gradients left by a previous step are cleared first (Opacus must not accumulate
        per-sample gradients across Poisson batches). An empty batch (Poisson sampling
        can draw one) still takes a DP step: the clipped sum is zero, so the update is
        pure noise, which is what the accountant charged.
        """
        self.zero_grad()
        if x.shape[0] == 0:
            if not self.config.dp:
                return float("nan")
            for p in self.params:
                if self._ghost:  # the fast-clipping optimizer noises p.grad (the clipped sum)
                    p.grad = torch.zeros_like(p)
                else:
                    p.grad_sample = torch.zeros((0,) + tuple(p.shape), dtype=p.dtype, device=p.device)
            with record_function("step"):
                self.optimizer.step()
            return float("nan")
        with record_function("prefix"):
            h = self.prefix(x)
        with record_function("forward"):
            out = self.suffix(h)
            loss = self._dp_loss(out, y) if self._dp_loss is not None else self.loss_fn(out, y)
            del h, out
        with record_function("backward"):
            loss.backward()  # ghost: both passes (norms, then the re-weighted loss)
        with record_function("step"):
            self.optimizer.step()
        return float(loss.detach())

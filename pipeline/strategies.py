"""Strategies on one engine: what differs between ftte, fedbuff and fedavg.

A :class:`Strategy` names three choices and nothing else: which parameters devices train
(the plan), how updates are weighted, and whether rounds are synchronous. Secure
aggregation and DP are switched by the config for every strategy, so their cost and
effect can be measured in isolation.

* ``ftte``: the plan is the best subset under the memory budget of the weakest device
  class, with the DP clipping mode and the frozen prefix's micro-batch size that give it
  the lowest estimated peak (:func:`ftte.edge.plan_search.search_plan`, ``prefix_chunk="auto"``);
  weights ``(1+τ)^(-a) · r(σ²)``; buffered and asynchronous.
* ``fedbuff``: the full model; age-only weights ``(1+τ)^(-1/2)``; buffered and asynchronous.
* ``fedavg``: the full model; every update weighs 1 (all train from the same version);
  synchronous rounds. With ``[server] fedavg_fit_only`` it selects only the devices whose
  memory holds one measured training step of the full model (what FedAvg can honestly do on
  a fleet where the model does not fit everywhere).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from torch import nn

from ftte.edge.plan import SubsetPlan
from ftte.pipeline.config import Config
from ftte.protocol.cohort import CohortPolicy
from ftte.protocol.weighting import WeightRule

if TYPE_CHECKING:  # the deployment imports this module and must not load the simulator's fleet
    from ftte.edge.memory import TrainingSetup
    from ftte.pipeline.datasets import FederatedData
    from ftte.pipeline.fleet import SimDevice


@dataclass(frozen=True)
class TrainingChoice:
    """What a strategy decided devices train and how: the plan, the DP clipping mode and the
    frozen prefix's micro-batch size (``None``: the whole batch, or no prefix)."""

    plan: SubsetPlan
    clipping: str
    prefix_chunk: int | None = None


@dataclass(frozen=True)
class Strategy:
    name: str
    synchronous: bool
    subset: bool
    weight_rule: WeightRule
    cfg: Config
    fit_only: bool = False

    def memory_budget(self, fleet: "Sequence[SimDevice]") -> int:
        """Training memory allowed on the weakest admitted device class."""
        from ftte.pipeline.fleet import weakest_memory_bytes

        return int(weakest_memory_bytes(fleet) * self.cfg.train.memory_budget_fraction)

    def choose_plan(self, model: nn.Sequential, data: "FederatedData",
                    fleet: "Sequence[SimDevice]") -> tuple[SubsetPlan, str]:
        """(plan, clipping mode) of :meth:`choose_training`."""
        choice = self.choose_training(model, data, fleet)
        return choice.plan, choice.clipping

    def choose_training(self, model: nn.Sequential, data: "FederatedData",
                        fleet: "Sequence[SimDevice]") -> TrainingChoice:
        """The full model for the baselines, else the best subset under the weakest class's budget,
        costed (``[train] clipping = "auto"``) in both DP clipping modes and at each prefix
        micro-batch size (the lowest estimated peak; ties: the whole batch). A full-model plan has
        no frozen prefix, so the rule leaves the baselines' step as it was; the batch size is the
        config's for every strategy."""
        mode = self.cfg.train.clipping
        from ftte.edge.memory import TrainingSetup

        # what the device's step really runs: no DP-SGD under user-level DP (the noise is in the sum)
        dp_sgd = self.cfg.privacy.dp_config().enabled
        setup = TrainingSetup(batch_size=self.cfg.train.batch_size, input_shape=data.input_shape,
                              dp=dp_sgd, optimizer="sgd", num_classes=data.n_classes)
        if not self.subset:
            full = SubsetPlan.full(model)
            if mode != "auto":
                return TrainingChoice(full, mode)
            # "auto" gives the baselines the same choice as ftte: the cheaper mode in memory
            return TrainingChoice(full, cheaper_clipping(model, full, setup) if dp_sgd else "per_sample")
        from ftte.edge.plan_search import search_plan

        if len(data.x_calib):  # server-held data, apart from devices and the test set
            calib = data.x_calib, data.y_calib
        else:  # simulation only: a few training records stand in for server-owned data
            calib = data.training_head(64)
        choice = search_plan(model, self.memory_budget(fleet), setup, calibration=calib, clipping=mode,
                             prefix_chunk="auto")
        return TrainingChoice(choice.plan, choice.clipping, choice.prefix_chunk)

    def admitted_devices(self, fleet: "Sequence[SimDevice]", peak_bytes: Callable[[], int]) -> frozenset[int]:
        """Devices this strategy may select: all of them, or (``fit_only``) those whose memory holds
        ``peak_bytes()``, the measured peak of one training step of the run's plan."""
        if not self.fit_only:
            return frozenset(d.device_id for d in fleet)
        need = peak_bytes()
        fits = frozenset(d.device_id for d in fleet if d.profile.memory_bytes >= need)
        if not fits:
            raise ValueError(f"[server] fedavg_fit_only: no device holds the {need} bytes one training step of the "
                             "full model needs")
        return fits


def cheaper_clipping(model: nn.Module, plan: SubsetPlan, setup: "TrainingSetup") -> str:
    """The DP clipping mode whose estimated training peak is lower for ``plan`` (ties: per-sample)."""
    from ftte.edge.memory import MemoryEstimator

    est = MemoryEstimator(model, setup.input_shape)
    costs = {m: est.estimate(plan, setup.batch_size, dp=setup.dp, optimizer=setup.optimizer, clipping=m).peak_bytes
             for m in ("per_sample", "ghost")}
    return "ghost" if costs["ghost"] < costs["per_sample"] else "per_sample"


def strategy_for(cfg: Config) -> Strategy:
    name = cfg.run.strategy
    server = cfg.server
    if name == "ftte":
        return Strategy(name, False, True, WeightRule(server.staleness_exponent, server.variance_penalty, server.r_min), cfg)
    if name == "fedbuff":
        return Strategy(name, False, False, WeightRule(0.5, 0.0, server.r_min), cfg)
    if name == "fedavg":
        return Strategy(name, True, False, WeightRule(0.0, 0.0, server.r_min), cfg, fit_only=server.fedavg_fit_only)
    raise ValueError(f"unknown strategy {name!r}")


def cohort_policy(cfg: Config) -> CohortPolicy:
    """The run's cohort policy, the same in simulation and deployment: ``[secagg]`` and the strategy's weights."""
    sa = cfg.secagg
    return CohortPolicy(graph=sa.graph, neighbors=sa.neighbors, threshold=sa.threshold, value_bits=sa.value_bits,
                        clip=sa.clip, rule=strategy_for(cfg).weight_rule, max_corrupt=sa.max_corrupt)

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
from typing import TYPE_CHECKING, Any, Callable, Sequence

from torch import nn

from ftte.edge.plan import SubsetPlan
from ftte.pipeline.config import Config, ConfigError
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
        from ftte.edge.plan_search import CoordinateCapError, search_plan

        full_size = SubsetPlan.full(model).num_coordinates
        user_cap = user_coordinate_cap(self.cfg, upper=full_size)
        caps = [c for c in (self.cfg.train.max_coordinates or None, user_cap) if c is not None]
        if len(data.x_calib):  # server-held data, apart from devices and the test set
            calib = data.x_calib, data.y_calib
        else:  # simulation only: a few training records stand in for server-owned data
            calib = data.training_head(64)
        try:
            choice = search_plan(model, self.memory_budget(fleet), setup, calibration=calib, clipping=mode,
                                 prefix_chunk="auto", max_coordinates=min(caps) if caps else None)
        except CoordinateCapError as exc:
            if user_cap is not None and user_cap == min(caps):
                raise ConfigError(no_user_plan_message(self.cfg, user_cap, exc.smallest,
                                                       plan_label="the smallest plan within memory")) from None
            raise ConfigError(f"[train] max_coordinates = {self.cfg.train.max_coordinates}: {exc}") from None
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


def user_noise_terms(cfg: Config, *, threshold: int | None = None) -> dict[str, Any]:
    """What the user-level noise on a cohort's mean depends on, for this run: the multiplier each
    participation is charged at, the cohort size, the survivor threshold (``threshold``: the one the
    noise is calibrated to, when it is not the cohort's own, as in a deployment), the colluders and
    whether a trusted server adds the noise. The keywords of :func:`~ftte.privacy.distributed_dp.mean_noise_ratio`."""
    p = cfg.privacy
    return dict(noise_multiplier=p.user_noise_multiplier(), members=cfg.cohort_size,
                threshold=cfg.secagg_threshold if threshold is None else threshold,
                max_corrupt=cfg.secagg.max_corrupt, central=p.user_noise == "server")


def user_coordinate_cap(cfg: Config, *, threshold: int | None = None, upper: int = 1 << 24) -> int | None:
    """The user-level plan rule: the most coordinates a plan may train so that the predicted noise
    std per coordinate on a cohort's mean stays within ``[privacy] user_noise_ratio`` times a clipped
    update's per-coordinate signal ``C / sqrt(d)`` (:func:`~ftte.privacy.distributed_dp.mean_noise_ratio`).
    ``None`` when the run is not user-level. One definition: the simulator's plan search
    (:meth:`Strategy.choose_training`) and the deployment's plan check (``deploy_task``) both call it.
    The memory budget alone picks plans that drown in user-level noise (the default task's
    112,202-coordinate plan has a ratio near 9 at epsilon 8 with cohorts of 100)."""
    from ftte.privacy.distributed_dp import max_coordinates_for_ratio

    if not cfg.privacy.user_level:
        return None
    return max_coordinates_for_ratio(cfg.privacy.user_noise_ratio, upper=upper,
                                     **user_noise_terms(cfg, threshold=threshold))


def no_user_plan_message(cfg: Config, cap: int, smallest: int, *, threshold: int | None = None,
                         plan_label: str = "the smallest plan", advice: str = "") -> str:
    """Why no plan (or ``plan_label``, of ``smallest`` coordinates) is admissible under the user-level
    rule, with the numbers that decided it."""
    from ftte.privacy.distributed_dp import mean_noise_ratio

    p = cfg.privacy
    terms = user_noise_terms(cfg, threshold=threshold)
    ratio = mean_noise_ratio(smallest, **terms)
    return (f"[privacy] user_noise_ratio = {p.user_noise_ratio:g} admits no plan ({plan_label} is too large): at user_epsilon {p.user_epsilon:g}, "
            f"user_delta {p.user_delta:g}, {p.user_participations} participations (noise multiplier "
            f"{terms['noise_multiplier']:.4g}), cohorts of {terms['members']} with threshold {terms['threshold']} and "
            f"max_corrupt {terms['max_corrupt']} ({p.user_noise} noise), a plan may train at most {cap} coordinates, "
            f"and {plan_label} trains {smallest} (predicted noise/signal {ratio:.3g}). Raise user_noise_ratio, "
            "user_epsilon or buffer_size, or lower user_participations" + (f", or {advice}" if advice else ""))


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

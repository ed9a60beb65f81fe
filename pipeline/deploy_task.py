"""What a deployment trains: the model, its subset plan, the initial weights and the task devices receive.

Built once when the server starts, from the configuration alone, so a restarted server
derives the same plan (its id is checked against the one stored in the state file) and
devices of any restart receive the same architecture and frozen weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from ftte.edge.plan import SubsetPlan, subset_vector
from ftte.pipeline.deploy_config import ServerSettings
from ftte.pipeline.feature_stats import load_feature_stats
from ftte.pipeline.model_builder import build_global_model, full_vector, model_kwargs
from ftte.pipeline.config import ConfigError
from ftte.pipeline.strategies import cohort_policy, no_user_plan_message, strategy_for, user_coordinate_cap
from ftte.protocol.cohort import UserLevelPlan, deployment_user_level
from ftte.protocol.weighting import WeightRule

from ftte.deploy_messages import TaskInfo


@dataclass(frozen=True)
class DeployTask:
    model: torch.nn.Sequential
    plan: SubsetPlan
    initial_subset: np.ndarray  # float64, the plan's coordinates at version 0
    initial_full: np.ndarray  # float32, every parameter
    kwargs: dict[str, Any]
    rule: WeightRule
    settings: ServerSettings
    # the standardisation the model expects ([deploy] standardize); empty: none
    feature_mean: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    feature_std: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    user: UserLevelPlan | None = None  # [privacy] unit = "user": the one mechanism every cohort uses

    @property
    def dim(self) -> int:
        return self.plan.num_coordinates

    def task_info(self, member: int, stage_timeout_s: float, poll_wait_s: float) -> TaskInfo:
        cfg = self.settings.run
        p = cfg.privacy
        return TaskInfo(
            member=member,
            plan_json=self.plan.to_json(),
            model_name=cfg.model.name,
            model_kwargs_json=json.dumps(self.kwargs, sort_keys=True),
            input_shape=tuple(self.settings.deploy.input_shape),
            num_classes=self.settings.deploy.num_classes,
            initial_weights=self.initial_full,
            local_steps=cfg.train.local_steps,
            batch_size=cfg.train.batch_size,
            lr=cfg.train.lr,
            dp_enabled=int(p.enabled),
            noise_multiplier=p.noise_multiplier,
            max_grad_norm=p.max_grad_norm,
            delta=p.delta,
            accountant=p.accountant,
            epsilon_max=p.epsilon_max if math.isfinite(p.epsilon_max) else 0.0,
            buffer_size=cfg.server.buffer_size,
            stage_timeout_ms=int(stage_timeout_s * 1000),
            poll_wait_ms=int(poll_wait_s * 1000),
            clip=cfg.secagg.clip,
            value_bits=cfg.secagg.value_bits,
            staleness_exponent=self.rule.staleness_exponent,
            variance_penalty=self.rule.variance_penalty,
            r_min=self.rule.r_min,
            max_corrupt=cfg.secagg.max_corrupt,
            target_epsilon=p.target_epsilon if p.enabled else 0.0,
            planned_rounds=p.planned_rounds if p.enabled and p.target_epsilon else 0,
            min_noise_multiplier=p.min_noise_multiplier,
            clipping=cfg.train.settings().clipping,
            feature_mean=self.feature_mean,
            feature_std=self.feature_std,
            **self._user_terms(),
        )

    def _user_terms(self) -> dict[str, Any]:
        u = self.user
        if u is None:
            return {}
        p = self.settings.run.privacy
        return dict(unit="user", user_noise_multiplier=u.noise_multiplier, user_epsilon=p.user_epsilon,
                    user_delta=p.user_delta, user_members=u.params.members,
                    user_calibrated_for=u.params.calibrated_for)


def build_task(settings: ServerSettings) -> DeployTask:
    cfg = settings.run
    d = settings.deploy
    shape = tuple(d.input_shape)
    mean, std = load_feature_stats(settings)
    model = build_global_model(cfg.model.name, cfg.run.seed, shape, d.num_classes)
    plan = SubsetPlan.from_layers(model, d.trainable_layers) if d.trainable_layers else SubsetPlan.full(model)
    check_user_plan(settings, plan)
    return DeployTask(
        model=model,
        plan=plan,
        initial_subset=subset_vector(model, plan).astype(np.float64),
        initial_full=full_vector(model),
        kwargs=model_kwargs(cfg.model.name, shape, d.num_classes),
        rule=strategy_for(cfg).weight_rule,
        settings=settings,
        feature_mean=mean,
        feature_std=std,
        user=user_level_of(settings, plan.num_coordinates),
    )


def check_user_plan(settings: ServerSettings, plan: SubsetPlan) -> None:
    """The user-level plan rule (:func:`~ftte.pipeline.strategies.user_coordinate_cap`) on the operator's
    plan: an ftte deployment under ``unit = "user"`` refuses to start with a plan that trains more
    coordinates than the rule admits for its cohorts (noise calibrated to the honest survivors of its
    smallest cohort, as :func:`user_level_of` plans it). The full-model baselines are not capped."""
    cfg = settings.run
    if not cfg.privacy.user_level or not strategy_for(cfg).subset:
        return
    threshold = cohort_policy(cfg).threshold_for(min_cohort(settings))
    cap = user_coordinate_cap(cfg, threshold=threshold, upper=plan.num_coordinates)
    assert cap is not None
    if plan.num_coordinates > cap:
        raise ConfigError(no_user_plan_message(cfg, cap, plan.num_coordinates, threshold=threshold,
                                               plan_label="the plan of [deploy] trainable_layers",
                                               advice="name fewer [deploy] trainable_layers"))


def min_cohort(settings: ServerSettings) -> int:
    """The smallest cohort the coordinator starts (at its deadline)."""
    return max(2, settings.run.secagg_threshold)


def user_level_of(settings: ServerSettings, coordinates: int) -> UserLevelPlan | None:
    """The deployment's user-level plan (None for example-level DP): planned once, for its largest
    cohort and the honest survivors of its smallest, so a device can sign for it at join."""
    cfg = settings.run
    if not cfg.privacy.user_level:
        return None
    return deployment_user_level(cohort_policy(cfg), coordinates=coordinates,
                                 noise_multiplier=cfg.privacy.user_noise_multiplier(),
                                 min_members=min_cohort(settings), max_members=cfg.server.buffer_size)

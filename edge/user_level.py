"""The device's side of user-level DP in a deployment: plan, charge, check and encode.

Order on the device, and why:

1. At the task, the device computes the mechanism itself from the task's terms
   (:func:`ftte.protocol.cohort.task_user_level`, the function the server planned with) and
   checks it against its own floors: ``min_user_noise_multiplier``, a wrap bound and, if the
   device sets one, ``max_user_noise_ratio`` (the plan's predicted noise/signal on a cohort mean).
2. After training, before anything leaves the device, one participation at the task's
   multiplier is charged to the device's own accountant (SQLite, written through) against
   ``min(device budget, task budget)``; a participation past it raises
   :class:`~ftte.privacy.budget.BudgetExceededError` and the device never joins. The round's
   stats become the user-level row (q = 1, one step, the mechanism in ``rng_source``), which
   the device signs as it signs an example-level round.
3. At the cohort start, :func:`ftte.protocol.cohort.check_cohort` requires the start's
   mechanism to equal that plan exactly (what the device signed for) and the device's floors
   for this cohort's threshold and its own colluder assumption.
4. The update is clipped, weighted (staleness only), rotated, rounded and noised with a
   generator keyed from the OS (:class:`~ftte.protocol.user_encoding.UserCodec`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from ftte.privacy.accountant import AccountantStore, PrivacyStep
from ftte.privacy.distributed_dp import USER_ACCOUNTANT, UserMechanism, params_noise_ratio, user_rng_source
from ftte.privacy.secure_random import SOURCE_OS, SecureRandom
from ftte.protocol.cohort import (
    CohortRefused,
    DevicePolicy,
    UserLevelPlan,
    check_user_params,
    contribution_binding,
    task_user_level,
)
from ftte.protocol.user_encoding import UserCodec, rotation_seed

from ftte.deploy_messages import CohortStart, TaskInfo


@dataclass(frozen=True)
class DeviceUserLevel:
    """A device's user-level terms for one task."""

    plan: UserLevelPlan
    delta: float
    epsilon_max: float  # the smaller of the device's own budget and the task's

    @classmethod
    def from_task(cls, task: TaskInfo, coordinates: int, policy: DevicePolicy,
                  device_epsilon_max: float) -> "DeviceUserLevel":
        """Raises :class:`CohortRefused` if the task's mechanism is below this device's floors."""
        plan = task_user_level(task, coordinates)
        p = plan.params
        # the largest cohort the plan allows, with the threshold that calibrates its noise: the
        # per-cohort check (check_user_cohort) repeats this with the real threshold and colluders
        check_user_params(p, members=p.members, threshold=p.calibrated_for, max_corrupt=0,
                          min_noise_multiplier=max(policy.min_user_noise_multiplier, plan.noise_multiplier))
        ratio = params_noise_ratio(p)
        if ratio > policy.max_user_noise_ratio:
            raise CohortRefused(f"the task's plan of {coordinates} coordinates has a predicted noise/signal of "
                                f"{ratio:.3g} on the mean of a full cohort of {p.members}, above this device's "
                                f"ceiling max_user_noise_ratio = {policy.max_user_noise_ratio:g}")
        budget = min(device_epsilon_max, task.user_epsilon)
        if not (budget > 0 and math.isfinite(budget)):
            raise CohortRefused("user-level DP needs a finite positive budget")
        return cls(plan, task.user_delta, budget)

    @property
    def step(self) -> PrivacyStep:
        return PrivacyStep(self.plan.noise_multiplier, 1.0, 1)

    @property
    def rng_source(self) -> str:
        return user_rng_source(SOURCE_OS, UserMechanism.of(self.plan.params))

    def charge(self, store: AccountantStore, member: int, stats):
        """Record one participation durably (before the update is released) and return the round's
        stats as the user-level row the device signs and the server writes. Raises
        ``BudgetExceededError`` (nothing recorded) when it would pass the budget."""
        c = store.charge(str(member), self.step, accountant=USER_ACCOUNTANT, delta=self.delta,
                         epsilon_max=self.epsilon_max)
        return dataclasses.replace(stats, enabled=True, steps=1, sample_rate=1.0,
                                   noise_multiplier=self.plan.noise_multiplier,
                                   max_grad_norm=self.plan.params.clip, epsilon_round=c.round_cost,
                                   epsilon_total=c.epsilon_after, delta=self.delta, epsilon_max=self.epsilon_max,
                                   accountant=USER_ACCOUNTANT, rng_source=self.rng_source)

    def input_vector(self, start: CohortStart, delta: np.ndarray, weight: float) -> np.ndarray:
        """The ring vector this device masks: its noise and rounding keyed from the OS, never a seed."""
        codec = UserCodec(self.plan.params, rotation_seed(start.cohort_id, contribution_binding(start)))
        return codec.encode(delta, weight, SecureRandom.from_os()).ring

"""One device's local round: load the pulled subset weights, train it with DP-SGD, return the update.

A :class:`LocalTrainer` is built once per device process and per subset plan, because
Opacus must wrap the trainable suffix exactly once (re-wrapping stacks hooks). The
simulator runs many virtual devices in one process; they share one trainer and differ
only in device id, data and seed, which is all a round depends on: every round starts
from the pulled weights and a fresh optimizer state.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ftte.edge.plan import SubsetPlan, apply_subset_vector, split_model, subset_vector
from ftte.privacy.accountant import AccountantStore
from ftte.privacy.dpsgd import DPConfig, PrivateTrainer, RoundPlan, RoundStats
from ftte.privacy.secure_random import SecureRandom


@dataclass(frozen=True)
class TrainSettings:
    """Local training of one round; built from ``[train]`` or a deployment's task (no defaults here)."""

    local_steps: int
    batch_size: int
    lr: float
    clipping: str = "per_sample"  # "per_sample" or "ghost": the mode the plan was costed with
    prefix_chunk: int | None = None  # the frozen prefix's micro-batch size the plan was costed with (None: whole batch)

    def __post_init__(self) -> None:
        if self.local_steps < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError("local_steps and batch_size must be >= 1 and lr > 0")
        if self.prefix_chunk is not None and self.prefix_chunk < 1:
            raise ValueError(f"prefix_chunk must be >= 1 or None, got {self.prefix_chunk}")


@dataclass(frozen=True)
class LocalUpdate:
    """What training produced on a device, before clipping, weighting and masking."""

    device_id: int
    base_version: int
    delta: np.ndarray  # float32, the plan's coordinates
    stats: RoundStats

    @property
    def loss(self) -> float:
        return self.stats.mean_loss


class LocalTrainer:
    """Trains a plan's subset of a private copy of the model."""

    def __init__(self, model: nn.Sequential, plan: SubsetPlan, dp: DPConfig, settings: TrainSettings,
                 store: AccountantStore) -> None:
        self.model = copy.deepcopy(model)
        self.plan = plan
        self.settings = settings
        prefix, suffix = split_model(self.model, plan, prefix_chunk=settings.prefix_chunk)
        self._trainer = PrivateTrainer(suffix, dp, prefix=prefix, store=store, clipping=settings.clipping)

    @property
    def store(self) -> AccountantStore:
        return self._trainer.store

    @store.setter
    def store(self, store: AccountantStore) -> None:
        """Swap the accountant store (a simulator worker hands each round a store seeded with that device's history)."""
        self._trainer.store = store

    def plan_round(self, device_id: int, n_records: int) -> RoundPlan:
        """What :meth:`train` would do and cost for this device; raises ``BudgetExceededError`` if over budget.
        Stores nothing."""
        self._trainer.device_id = str(device_id)
        return self._trainer.plan_round(n_records, batch_size=self.settings.batch_size, steps=self.settings.local_steps)

    def epsilon(self, device_id: int) -> float:
        self._trainer.device_id = str(device_id)
        return self._trainer.epsilon()

    def train(self, device_id: int, base_version: int, weights: np.ndarray, x: np.ndarray, y: np.ndarray,
              seed: int | None = None, plan: RoundPlan | None = None, *, key: bytes | None = None) -> LocalUpdate:
        """One round from the pulled subset ``weights``; raises ``BudgetExceededError`` before training if over budget.
        ``plan``: a :meth:`plan_round` result the caller already checked (no second check).

        Randomness (Poisson sampling and DP noise) comes from a ChaCha20 generator keyed by:
        ``key`` (32 bytes the caller vouches for), else an integer ``seed`` (simulation only: the
        key is derived from it, so the round is reproducible and only as secret as the seed),
        else ``os.urandom`` (deployment: pass neither). ``RoundStats.rng_source`` says which.
        """
        if len(x) == 0:
            raise ValueError(f"device {device_id} has no training records")
        if seed is not None and key is not None:
            raise ValueError("give at most one of seed (simulation) and key")
        if key is not None:
            rng = SecureRandom.from_key(key)
        elif seed is not None:
            rng = SecureRandom.from_seed(seed, "ftte.edge.runtime.train", str(device_id), str(base_version))
            torch.manual_seed(seed)  # any other torch randomness (none in DP-SGD) stays reproducible
        else:
            rng = SecureRandom.from_os()
        apply_subset_vector(self.model, self.plan, weights)
        self._trainer.device_id = str(device_id)
        stats = self._trainer.train_round(
            (torch.as_tensor(x), torch.as_tensor(y)),
            loss_fn=F.cross_entropy,
            lr=self.settings.lr,
            batch_size=self.settings.batch_size,
            steps=self.settings.local_steps,
            plan=plan,
            rng=rng,
        )
        delta = subset_vector(self.model, self.plan) - weights.astype(np.float32)
        return LocalUpdate(device_id, base_version, delta, stats)

    def close(self) -> None:
        self._trainer.close()

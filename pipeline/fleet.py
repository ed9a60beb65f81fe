"""A simulated fleet: devices drawn from classes in configured proportions.

Device classes come from ``[fleet]`` (see :class:`ftte.pipeline.config.FleetConfig`):
either explicit ``[[fleet.classes]]`` tables or the ``stragglers = s`` shorthand, which
expands into the ``fast`` and ``straggler`` classes of
:data:`ftte.pipeline.config.FAST_CLASS` / :data:`~ftte.pipeline.config.STRAGGLER_CLASS`.

Class sizes follow the fractions exactly (largest-remainder rounding, ties to the
earlier class), and which device id lands in which class is a seeded shuffle, so slow
devices are not bunched at the end of the id range. Devices of one class share one
:class:`~ftte.edge.profile.DeviceProfile` whose ``name`` is the class name.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ftte.edge.profile import DeviceProfile
from ftte.pipeline.config import (
    FAST_CLASS,
    STAGES,
    STRAGGLER_CLASS,
    DeviceClass,
    FleetConfig,
    StageDropout,
    shorthand_classes,
)
from ftte.pipeline.partition import derive_rng

__all__ = [
    "STAGES",
    "DeviceClass",
    "StageDropout",
    "FAST_CLASS",
    "STRAGGLER_CLASS",
    "shorthand_classes",
    "SimDevice",
    "class_counts",
    "fleet_summary",
    "build_fleet",
    "profile_of",
    "weakest_memory_bytes",
]


@dataclass(frozen=True)
class SimDevice:
    """One simulated device.

    ``dropout`` maps every stage in :data:`STAGES` to the probability that the device
    drops out at that stage of a round (independent per round and stage).
    """

    device_id: int
    profile: DeviceProfile
    class_name: str
    dropout: dict[str, float] = field(default_factory=lambda: {s: 0.0 for s in STAGES})

    def __post_init__(self) -> None:
        unknown = set(self.dropout) - set(STAGES)
        if unknown:
            raise ValueError(f"unknown dropout stage(s) {sorted(unknown)}; stages are {', '.join(STAGES)}")
        full = {s: float(self.dropout.get(s, 0.0)) for s in STAGES}
        for stage, p in full.items():
            if not 0.0 <= p < 1.0:
                raise ValueError(f"device {self.device_id}: dropout[{stage!r}] must be in [0, 1), got {p}")
        object.__setattr__(self, "dropout", full)

    def dropout_at(self, stage: str) -> float:
        """Drop probability at ``stage`` (a name from :data:`STAGES`)."""
        try:
            return self.dropout[stage]
        except KeyError:
            raise KeyError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}") from None

    def drops_at(self, stage: str, rng: np.random.Generator) -> bool:
        """Draw whether the device drops out at ``stage`` using ``rng``."""
        p = self.dropout_at(stage)
        return bool(p > 0.0 and rng.random() < p)


def profile_of(cls: DeviceClass) -> DeviceProfile:
    """The :class:`DeviceProfile` shared by the devices of ``cls``."""
    return DeviceProfile(
        name=cls.name,
        memory_bytes=int(cls.memory_bytes),
        compute_speed=float(cls.compute_speed),
        uplink_bps=float(cls.uplink_bps),
        downlink_bps=float(cls.downlink_bps),
        availability=float(cls.availability),
    )


def class_counts(fractions: Sequence[float], n_devices: int) -> list[int]:
    """Split ``n_devices`` into integer class sizes proportional to ``fractions``.

    Largest-remainder rounding: every count is ``floor`` or ``ceil`` of its exact share,
    the counts sum to ``n_devices``, and ties go to the earlier class.
    """
    if n_devices < 0:
        raise ValueError(f"n_devices must be >= 0, got {n_devices}")
    fr = np.asarray(fractions, dtype=float)
    if fr.ndim != 1 or len(fr) == 0 or np.any(fr < 0) or not math.isclose(fr.sum(), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions must be non-negative and sum to 1, got {list(fractions)}")
    exact = fr / fr.sum() * n_devices
    counts = np.floor(exact + 1e-9).astype(int)
    remainder = n_devices - int(counts.sum())
    if remainder > 0:
        order = sorted(range(len(fr)), key=lambda i: (-(exact[i] - counts[i]), i))
        for i in order[:remainder]:
            counts[i] += 1
    return [int(c) for c in counts]


def build_fleet(fleet_cfg: FleetConfig, n_devices: int | None, seed: int) -> list[SimDevice]:
    """Devices ``0 .. n_devices-1`` (default ``fleet_cfg.devices``) drawn from the
    configured classes in exact proportion, assigned by a seeded shuffle."""
    n = fleet_cfg.devices if n_devices is None else int(n_devices)
    if n < 1:
        raise ValueError(f"n_devices must be >= 1, got {n}")
    classes = fleet_cfg.device_classes()
    counts = class_counts([c.fraction for c in classes], n)
    assignment = np.repeat(np.arange(len(classes)), counts)
    assignment = derive_rng(seed, "fleet", "assignment").permutation(assignment)
    profiles = [profile_of(c) for c in classes]
    dropouts = [c.dropout.as_dict() for c in classes]
    return [
        SimDevice(device_id=i, profile=profiles[k], class_name=classes[k].name, dropout=dict(dropouts[k]))
        for i, k in enumerate(assignment.tolist())
    ]


def fleet_summary(fleet: Sequence[SimDevice]) -> dict[str, int]:
    """Devices per class name, in first-seen order."""
    return dict(Counter(d.class_name for d in fleet))


def weakest_memory_bytes(fleet: Sequence[SimDevice]) -> int:
    """Smallest ``memory_bytes`` among devices actually present in ``fleet``."""
    if not fleet:
        raise ValueError("empty fleet")
    return min(d.profile.memory_bytes for d in fleet)

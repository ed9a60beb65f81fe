"""Small simulation configs shared by the simulator and backend tests."""

from __future__ import annotations

from typing import Any

from ftte.pipeline.config import load_config

NO_DROPOUT = {"train": 0.0, "advertise": 0.0, "share": 0.0, "upload": 0.0, "consistency": 0.0, "unmask": 0.0}


def tiny(**overrides: Any):
    """A small, fast run: the quick "digits" preset on 16 devices with a logistic model."""
    base = {
        "fleet.devices": 16,
        "fleet.stragglers": 0.5,
        "model.name": "logistic",
        "server.buffer_size": 4,
        "server.fedavg_clients_per_round": 4,
        "server.fedavg_over_selection": 0.25,
        "run.max_versions": 3,
        "train.local_steps": 2,
        "train.batch_size": 4,
        "privacy.epsilon_max": 1000.0,
        "privacy.target_epsilon": 0.0,  # a fixed noise multiplier: budgets in these tests are set directly
    }
    base.update(overrides)
    return load_config(None, preset="digits").with_overrides(**base)


def reliable(**overrides: Any):
    """Every device always online and never dropping: every device trains at its first attempt."""
    classes = [
        {"name": "fast", "fraction": 0.5, "compute_speed": 1.0, "memory_bytes": 64 << 20, "uplink_bps": 2e6,
         "downlink_bps": 1e7, "availability": 1.0, "dropout": NO_DROPOUT},
        {"name": "slow", "fraction": 0.5, "compute_speed": 0.1, "memory_bytes": 2 << 20, "uplink_bps": 1e5,
         "downlink_bps": 5e5, "availability": 1.0, "dropout": NO_DROPOUT},
    ]
    return tiny(**{"fleet.classes": classes, **overrides})

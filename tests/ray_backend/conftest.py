"""Ray backend tests: one local Ray instance with 2 CPUs per test module that asks for it."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="module")
def ray_2cpu():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():  # pragma: no cover - another module left it running
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()

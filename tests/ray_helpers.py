"""Small configs and run helpers shared by the Ray backend tests."""

from __future__ import annotations

from typing import Any

from ftte.pipeline.backends import LocalBackend
from ftte.pipeline.simulator import Simulation

from sim_helpers import NO_DROPOUT, reliable, tiny  # noqa: F401  (re-exported to the Ray tests)


class RecordingLocal(LocalBackend):
    """The local backend, remembering which (device, attempt) rounds it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.submitted: list[tuple[int, int]] = []

    def submit(self, task, pull):
        self.submitted.append((task.device_id, task.attempt))
        return super().submit(task, pull)


def run_traced(cfg, backend, out=None, lazy=None):
    """Run to the end; returns (result, popped events as (time, kind, key), simulation) and closes it."""
    sim = Simulation(cfg, out, backend=backend, lazy=lazy)
    events: list[tuple[float, str, Any]] = []
    pop = sim.clock.pop

    def traced_pop():
        now, (kind, payload) = pop()
        if kind in ("ready", "deadline"):
            key = payload
        elif kind == "trained":  # a DeviceRound
            key = payload.device.device_id
        elif sim.lazy:  # merged: (start, modelled cohort, members)
            key = payload[0].cohort_id
        else:  # merged: (run, members)
            key = payload[0].result.cohort_id
        events.append((now, kind, key))
        return now, (kind, payload)

    try:
        sim.clock = _TracedClock(sim.clock, traced_pop)  # VirtualClock has __slots__: wrap it
        result = sim.run()
        extra = {"epsilon_max": sim.epsilon_max(), "train_rounds": sim.train_rounds, "retired": sorted(sim.retired),
                 "lost": list(sim.backend.lost), "puts": dict(sim.backend.puts),
                 "resubmitted": getattr(sim.backend, "resubmitted", 0),
                 "worker_pids": list(getattr(sim.backend, "worker_pids", [])), "lazy": sim.lazy,
                 "unmodelled_cohorts": sim.unmodelled_cohorts}
        if hasattr(sim.backend, "_actors") and sim.backend._actors:
            import ray

            extra["pids_after"] = ray.get([a.handle.ping.remote() for a in sim.backend._actors])
        return result, events, extra
    finally:
        sim.close()


class _TracedClock:
    def __init__(self, clock, pop):
        self._clock = clock
        self.pop = pop

    def __getattr__(self, name):
        return getattr(self._clock, name)

    def __bool__(self):
        return bool(self._clock)

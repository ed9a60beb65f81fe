"""The server's progress lines: one per finished cohort, applied or aborted, none twice."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

pytest.importorskip("starlette")

from ftte.pipeline.coordinator import Counters  # noqa: E402
from ftte.pipeline.http_server import ProgressLog  # noqa: E402

from ftte.deploy_messages import CohortEnd  # noqa: E402


def test_one_line_per_cohort_with_version_accuracy_counts_and_active_devices():
    coordinator = SimpleNamespace(ended={"c-1": CohortEnd("c-1", "applied", 1, (5, 6, 7), "")},
                                  counters=Counters(cohorts_applied=1), version=1,
                                  recent_history={})
    api = SimpleNamespace(last_seen={})
    log = ProgressLog(coordinator, api, None)
    log.start()  # c-1 finished before this process started (recovered): not repeated
    assert log.lines() == []
    now = time.time()
    api.last_seen.update({5: now, 6: now - 1, 7: now - ProgressLog.ACTIVE_WINDOW_S - 5})
    coordinator.ended["c-2"] = CohortEnd("c-2", "applied", 2, (5, 6), "")
    coordinator.counters.cohorts_applied = 2
    coordinator.recent_history[2] = {"version": 2, "accuracy": 0.8125}
    coordinator.version = 2
    coordinator.ended["c-3"] = CohortEnd("c-3", "aborted", 0, (), "only 1 survivor, threshold 2")
    coordinator.counters.cohorts_aborted = 1
    lines = log.lines()
    assert lines == [
        "ftte server: cohort c-2 applied (2 members): version 2, test accuracy 0.8125; "
        "cohorts applied 2, aborted 1; devices active 2",
        "ftte server: cohort c-3 aborted (only 1 survivor, threshold 2): version 2; "
        "cohorts applied 2, aborted 1; devices active 2",
    ]
    assert log.lines() == []  # nothing new, nothing printed


def test_cohorts_that_end_between_two_looks_each_get_their_own_accuracy():
    """Under load several cohorts end between two looks; each line names its own version's accuracy."""
    coordinator = SimpleNamespace(ended={}, counters=Counters(), version=0, recent_history={})
    log = ProgressLog(coordinator, SimpleNamespace(last_seen={}), None)
    log.start()
    for v, acc in ((1, 0.5), (2, 0.625), (3, 0.75)):
        coordinator.ended[f"c-{v}"] = CohortEnd(f"c-{v}", "applied", v, (1, 2, 3), "")
        coordinator.recent_history[v] = {"version": v, "accuracy": acc}
    coordinator.counters.cohorts_applied = 3
    lines = log.lines()
    assert [ln.split("test accuracy ")[1][:6] for ln in lines] == ["0.5000", "0.6250", "0.7500"]

"""pytest-benchmark: refusing a 16 MiB hostile body (issue 10, finding 8).

The timed region is :func:`ftte.wire.decode` on each hostile body of
:mod:`ftte.bench.hostile_body`; memory is measured separately in a fresh child process
(``hostile_body.run_case``), because a process's peak RSS can only be read once, and the
figures go into the benchmark's ``extra_info``. Targets: refused, peak RSS growth under
64 MiB, under one second.
"""

from __future__ import annotations

import pytest

from ftte import wire
from ftte.bench import hostile_body
from ftte.deploy_messages import JoinRequest, Submit
from ftte.secagg_messages import SurvivorList

MIB = 1024 * 1024
SIZE = 16 * MIB
EXPECT = {"join_with_junk_pairs": JoinRequest, "submit_wrapping_junk": Submit, "ids_of_arrays": SurvivorList}


def _refuse(body: bytes, expect) -> None:
    try:
        msg = wire.decode(body, expect=expect)
        if isinstance(msg, Submit):
            wire.decode(msg.payload)
    except wire.WireError:
        return
    raise AssertionError("a hostile body was accepted")


@pytest.mark.parametrize("case", hostile_body.CASES)
def test_hostile_16mib_body_is_refused_fast_and_small(benchmark, case):
    body = hostile_body.BUILDERS[case](SIZE)
    benchmark.pedantic(_refuse, args=(body, EXPECT.get(case)), rounds=5, iterations=1)
    figures = hostile_body.run_case(case, SIZE / MIB)
    benchmark.extra_info.update(figures)
    assert figures["refused"]
    assert figures["rss_growth_bytes"] < 64 * MIB, figures
    assert figures["seconds"] < 1.0, figures

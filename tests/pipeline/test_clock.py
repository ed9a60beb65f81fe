"""Virtual clock: ordering, deterministic ties, no time travel, cancellation."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ftte.pipeline.clock import TimeTravelError, VirtualClock, compute_time, transfer_time


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0.0, 1e6, allow_nan=False), min_size=1, max_size=60))
def test_pops_in_time_order_with_fifo_ties(times):
    clock: VirtualClock[int] = VirtualClock()
    for i, t in enumerate(times):
        clock.schedule(t, i)
    out = []
    while clock:
        t, i = clock.pop()
        assert t == clock.now
        out.append((t, i))
    assert out == sorted(((t, i) for i, t in enumerate(times)))  # time, then insertion order
    assert len(out) == len(times)


def test_ties_keep_insertion_order_for_uncomparable_events():
    clock = VirtualClock()
    events = [{"name": n} for n in "abcde"]  # dicts are not orderable
    for e in events:
        clock.schedule(5.0, e)
    assert [clock.pop()[1] for _ in events] == events


def test_no_time_travel():
    clock = VirtualClock()
    clock.schedule(10.0, "a")
    clock.pop()
    assert clock.now == 10.0
    with pytest.raises(TimeTravelError, match="before now"):
        clock.schedule(9.999, "late")
    with pytest.raises(TimeTravelError):
        clock.schedule_in(-1.0, "late")
    with pytest.raises(TimeTravelError):
        clock.advance_to(5.0)
    clock.schedule(10.0, "same instant is fine")
    with pytest.raises(ValueError):
        clock.schedule(float("nan"), "x")
    with pytest.raises(ValueError, match="past a pending event"):
        clock.advance_to(11.0)
    assert clock.pop() == (10.0, "same instant is fine")
    clock.advance_to(12.0)
    assert clock.now == 12.0


def test_cancel_and_empty():
    clock = VirtualClock()
    h = clock.schedule(1.0, "deadline")
    clock.schedule_in(2.0, "arrival")
    clock.cancel(h)
    assert len(clock) == 1
    assert clock.peek_time() == 2.0
    assert clock.pop() == (2.0, "arrival")
    assert not clock and len(clock) == 0 and clock.peek_time() is None
    with pytest.raises(IndexError):
        clock.pop()


def test_transfer_and_compute_time():
    assert transfer_time(1_000_000, 1_000_000.0, 0.05) == pytest.approx(1.05)
    assert transfer_time(0, 10.0) == 0.0
    assert compute_time(3.0, 0.1) == pytest.approx(30.0)
    for bad in [(-1, 1.0, 0.0), (1, 0.0, 0.0), (1, 1.0, -0.1)]:
        with pytest.raises(ValueError):
            transfer_time(*bad)
    with pytest.raises(ValueError):
        compute_time(1.0, 0.0)

"""Discrete-event virtual clock for the simulator.

Simulated time is a float number of seconds that only moves when an event is popped.
Events scheduled for the same instant come out in the order they were scheduled (a
monotone sequence number breaks ties), so a run is reproducible whatever the events
are; events themselves are never compared.

    clock = VirtualClock()
    clock.schedule(clock.now + transfer_time(nbytes, profile.uplink_bps, latency_s), msg)
    t, event = clock.pop()      # clock.now == t afterwards

Scheduling before ``now`` raises :class:`TimeTravelError`: a message cannot arrive
before it was sent. :meth:`cancel` removes a pending event (e.g. a deadline timer that
a full buffer made moot) lazily.
"""

from __future__ import annotations

import heapq
import math
from typing import Generic, TypeVar

__all__ = ["TimeTravelError", "VirtualClock", "transfer_time", "compute_time"]

E = TypeVar("E")


class TimeTravelError(ValueError):
    """An event was scheduled before the clock's current time."""


class VirtualClock(Generic[E]):
    """A heap of ``(time, sequence, event)`` with a current time that never decreases."""

    __slots__ = ("_now", "_heap", "_seq", "_cancelled")

    def __init__(self, start: float = 0.0) -> None:
        start = float(start)
        if not math.isfinite(start):
            raise ValueError(f"start time must be finite, got {start}")
        self._now = start
        self._heap: list[tuple[float, int, E]] = []
        self._seq = 0
        self._cancelled: set[int] = set()

    @property
    def now(self) -> float:
        """Virtual time of the last popped event (or the start time)."""
        return self._now

    def schedule(self, at: float, event: E) -> int:
        """Schedule ``event`` at absolute virtual time ``at`` (>= :attr:`now`).

        Returns a handle for :meth:`cancel`.
        """
        at = float(at)
        if math.isnan(at) or math.isinf(at):
            raise ValueError(f"event time must be finite, got {at}")
        if at < self._now:
            raise TimeTravelError(f"cannot schedule an event at t={at!r} s, before now={self._now!r} s")
        handle = self._seq
        self._seq += 1
        heapq.heappush(self._heap, (at, handle, event))
        return handle

    def schedule_in(self, delay: float, event: E) -> int:
        """Schedule ``event`` ``delay`` (>= 0) seconds after :attr:`now`."""
        delay = float(delay)
        if not delay >= 0:
            raise TimeTravelError(f"delay must be >= 0, got {delay!r}")
        return self.schedule(self._now + delay, event)

    def cancel(self, handle: int) -> None:
        """Drop a pending event; cancelling a popped or unknown handle is a no-op."""
        if 0 <= handle < self._seq:
            self._cancelled.add(handle)

    def _discard_cancelled(self) -> None:
        while self._heap and self._heap[0][1] in self._cancelled:
            self._cancelled.discard(heapq.heappop(self._heap)[1])

    def pop(self) -> tuple[float, E]:
        """Remove the earliest event, advance :attr:`now` to its time, return both.

        Raises ``IndexError`` when nothing is pending.
        """
        self._discard_cancelled()
        if not self._heap:
            raise IndexError("pop from an empty VirtualClock")
        at, handle, event = heapq.heappop(self._heap)
        self._now = at
        return at, event

    def peek_time(self) -> float | None:
        """Time of the next pending event, or None."""
        self._discard_cancelled()
        return self._heap[0][0] if self._heap else None

    def advance_to(self, at: float) -> None:
        """Move :attr:`now` forward to ``at`` without popping (e.g. to a stop time).

        Refuses to go backwards or to skip past a pending event.
        """
        at = float(at)
        if at < self._now:
            raise TimeTravelError(f"cannot move the clock back from {self._now!r} s to {at!r} s")
        nxt = self.peek_time()
        if nxt is not None and at > nxt:
            raise ValueError(f"cannot advance to {at!r} s past a pending event at {nxt!r} s")
        self._now = at

    def __len__(self) -> int:
        self._discard_cancelled()
        return len(self._heap) - sum(1 for _, h, _ in self._heap if h in self._cancelled)

    def __bool__(self) -> bool:
        return self.peek_time() is not None


def transfer_time(nbytes: int | float, bps: float, latency_s: float = 0.0) -> float:
    """Seconds to deliver ``nbytes`` over a link of ``bps`` bytes per second plus a
    one-way ``latency_s``."""
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    if not bps > 0:
        raise ValueError(f"bandwidth must be > 0 bytes/s, got {bps}")
    if not latency_s >= 0:
        raise ValueError(f"latency must be >= 0 s, got {latency_s}")
    return float(latency_s) + float(nbytes) / float(bps)


def compute_time(work: float, compute_speed: float) -> float:
    """Seconds a device of relative ``compute_speed`` needs for ``work`` units (the
    reference device, speed 1.0, does one unit per second)."""
    if work < 0:
        raise ValueError(f"work must be >= 0, got {work}")
    if not compute_speed > 0:
        raise ValueError(f"compute_speed must be > 0, got {compute_speed}")
    return float(work) / float(compute_speed)

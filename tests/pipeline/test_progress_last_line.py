"""The progress bar's last line appears once in a log, and Ctrl-C is not reported as a failure."""

import io

from ftte.pipeline.progress import Progress


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_last_line_is_written_once_to_a_log():
    """A plain stream whose last periodic line already shows the final state gets no copy of it."""
    stream, clock = io.StringIO(), FakeClock()
    with Progress(total=3, desc="sim", stream=stream, clock=clock, plain_interval_s=10.0) as bar:
        for _ in range(3):
            clock.t += 20.0  # every update is due for a line
            bar.update(1, status="acc 0.5")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    assert sum("3/3 100%" in line for line in lines) == 1


def test_final_line_still_written_when_the_last_update_was_not_drawn():
    stream, clock = io.StringIO(), FakeClock()
    with Progress(total=3, desc="sim", stream=stream, clock=clock, plain_interval_s=10.0) as bar:
        for _ in range(3):
            clock.t += 1.0  # only the first update is due
            bar.update(1)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and "1/3" in lines[0] and "3/3 100%" in lines[1]


class RunStopped(KeyboardInterrupt):
    """Like run_outputs.RunInterrupted: a KeyboardInterrupt subclass."""


def test_interrupt_is_not_reported_as_a_failure():
    stream = io.StringIO()
    try:
        with Progress(total=5, desc="sim", stream=stream) as bar:
            bar.update(1)
            raise RunStopped
    except KeyboardInterrupt:
        pass
    assert "failed" not in stream.getvalue()

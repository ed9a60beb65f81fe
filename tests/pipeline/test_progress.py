"""Progress bar: carriage-return redraws on a TTY, sparse plain lines otherwise."""

import io

from ftte.pipeline.progress import Progress, format_duration


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class TTYStream(io.StringIO):
    def isatty(self):
        return True


def test_plain_output_is_sparse():
    stream, clock = io.StringIO(), FakeClock()
    with Progress(total=1000, desc="sim", stream=stream, clock=clock, plain_interval_s=10.0) as bar:
        for i in range(1000):
            clock.t += 0.05  # 50 s in all
            bar.update(1, status=f"acc {i}")
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert 3 <= len(lines) <= 8  # first, every ~10 s, final
    assert lines[-1].startswith("sim [") and "1000/1000 100%" in lines[-1] and "acc 999" in lines[-1]
    assert "0:50" in lines[-1]


def test_tty_redraws_in_place():
    stream, clock = TTYStream(), FakeClock()
    with Progress(total=10, desc="run", stream=stream, clock=clock) as bar:
        for _ in range(10):
            clock.t += 1.0
            bar.update()
        bar.set_status("done")
    out = stream.getvalue()
    assert out.count("\r") >= 10 and out.endswith("\n") and out.count("\n") == 1
    assert "10/10" in out and "| done" in out
    assert "eta" in out  # shown while unfinished


def test_unknown_total_disabled_and_failure():
    stream = io.StringIO()
    with Progress(stream=stream, clock=FakeClock()) as bar:
        bar.update(5)
    assert stream.getvalue().splitlines()[-1].startswith("5 ")
    quiet = io.StringIO()
    with Progress(total=3, stream=quiet, enabled=False) as bar:
        bar.update(3)
    assert quiet.getvalue() == ""
    failed = io.StringIO()
    try:
        with Progress(total=3, stream=failed, clock=FakeClock()) as bar:
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert "failed: RuntimeError" in failed.getvalue()
    assert format_duration(3725) == "1:02:05" and format_duration(75.2) == "1:15"

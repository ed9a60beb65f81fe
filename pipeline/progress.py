"""A dependency-free progress bar for long work, written to stderr.

On a terminal it redraws one line in place (carriage return) at most every
``min_interval_s``; on a pipe or log file it writes a plain line at most every
``plain_interval_s`` plus a final line (unless the last line written already showed the
final count and status), so logs stay short and the last line appears once.

    with Progress(total=200, desc="simulate") as bar:
        for version in ...:
            bar.update(1, status=f"acc {acc:.3f}  t={clock.now:.0f}s")

The line shows ``desc``, a bar when ``total`` is known, ``count/total``, elapsed wall
time, an estimate of the time left, and the status string (cut to the terminal width).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from types import TracebackType
from typing import Callable, TextIO

__all__ = ["Progress", "format_duration"]


def format_duration(seconds: float) -> str:
    """``75.2 -> '1:15'``, ``3725 -> '1:02:05'``."""
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Count/total, elapsed time and a status string on ``stream`` (default stderr)."""

    def __init__(
        self,
        total: int | None = None,
        desc: str = "",
        *,
        stream: TextIO | None = None,
        enabled: bool = True,
        tty: bool | None = None,
        min_interval_s: float = 0.1,
        plain_interval_s: float = 10.0,
        bar_width: int = 20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if total is not None and total < 0:
            raise ValueError(f"total must be >= 0, got {total}")
        self.total = total
        self.desc = desc
        self.count = 0
        self.status = ""
        self._stream = stream
        self._enabled = enabled
        self._tty = tty
        self._min_interval = min_interval_s
        self._plain_interval = plain_interval_s
        self._bar_width = bar_width
        self._clock = clock
        self._start = clock()
        self._last_draw = -float("inf")
        self._last_len = 0
        self._drawn: tuple[int, str] | None = None  # (count, status) of the last line written
        self._closed = False

    # stream helpers ------------------------------------------------------------------
    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    @property
    def is_tty(self) -> bool:
        if self._tty is not None:
            return self._tty
        isatty = getattr(self.stream, "isatty", None)
        try:
            return bool(isatty and isatty()) and os.environ.get("TERM") != "dumb"
        except (ValueError, OSError):  # closed stream
            return False

    def _width(self) -> int:
        return max(40, shutil.get_terminal_size((100, 24)).columns - 1)

    # public API -----------------------------------------------------------------------
    @property
    def elapsed(self) -> float:
        return self._clock() - self._start

    def update(self, n: int = 1, status: str | None = None) -> None:
        """Advance the count by ``n`` (may be 0) and optionally replace the status."""
        self.count += n
        if status is not None:
            self.status = status
        self._maybe_draw()

    def set_status(self, status: str) -> None:
        self.status = status
        self._maybe_draw()

    def line(self) -> str:
        """The text of the progress line as it would be drawn now."""
        parts = [self.desc] if self.desc else []
        elapsed = self.elapsed
        if self.total:
            frac = min(1.0, self.count / self.total)
            filled = int(round(frac * self._bar_width))
            parts.append("[" + "#" * filled + "." * (self._bar_width - filled) + "]")
            parts.append(f"{self.count}/{self.total} {frac * 100:3.0f}%")
        elif self.total == 0:
            parts.append(f"{self.count}/0")
        else:
            parts.append(str(self.count))
        timing = format_duration(elapsed)
        if self.total and 0 < self.count < self.total:
            timing += f" eta {format_duration(elapsed / self.count * (self.total - self.count))}"
        parts.append(timing)
        if self.status:
            parts.append("| " + self.status)
        return " ".join(parts)

    def close(self) -> None:
        """Draw the final state and end the line; idempotent."""
        if self._closed:
            return
        self._closed = True
        if not self._enabled:
            return
        self._draw(final=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None and not issubclass(exc_type, KeyboardInterrupt) and not self.status:
            self.status = f"failed: {exc_type.__name__}"
        self.close()

    # drawing --------------------------------------------------------------------------
    def _maybe_draw(self) -> None:
        if not self._enabled or self._closed:
            return
        interval = self._min_interval if self.is_tty else self._plain_interval
        if self._clock() - self._last_draw >= interval:
            self._draw(final=False)

    def _draw(self, final: bool) -> None:
        state = (self.count, self.status)
        if final and not self.is_tty and state == self._drawn:
            return  # a log already holds this line: write the last line once
        self._last_draw = self._clock()
        self._drawn = state
        text = self.line()
        try:
            if self.is_tty:
                width = self._width()
                if len(text) > width:
                    text = text[: width - 1] + "~"
                pad = " " * max(0, self._last_len - len(text))
                self.stream.write("\r" + text + pad + ("\n" if final else ""))
                self._last_len = len(text)
            else:
                self.stream.write(text + "\n")
            self.stream.flush()
        except (ValueError, OSError):  # stream closed under us: progress is best-effort
            self._enabled = False

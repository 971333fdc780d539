"""A small progress bar on stderr: position, loss, accuracy, tasks per second and ETA.

On a terminal the bar is redrawn in place (at most ``refresh`` times a second); elsewhere (a log file,
CI) it prints a plain line every ``log_interval`` seconds and at the end, so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Optional


def format_duration(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(max(0.0, seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """``update(done, loss=..., accuracy=...)`` after each iteration; ``close()`` at the end.

    ``tasks_per_step``: tasks per iteration, for the tasks/s figure (measured over this session only,
    so a resumed run does not count the iterations it did not do).
    """

    def __init__(self, total: int, initial: int = 0, desc: str = "", tasks_per_step: int = 1,
                 stream: Optional[IO[str]] = None, refresh: float = 0.1, log_interval: float = 30.0,
                 width: int = 24, enabled: bool = True) -> None:
        self.total = max(1, total)
        self.initial = initial
        self.done = initial
        self.desc = desc
        self.tasks_per_step = tasks_per_step
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = refresh if self.tty else log_interval
        self.width = width
        self.enabled = enabled
        self.start = time.perf_counter()
        self.last_draw = 0.0
        self.rate = 0.0          # iterations per second, smoothed
        self._last_t = self.start
        self._last_done = initial
        self.postfix = ""
        self._drawn = False
        self._drawn_at = -1

    def update(self, done: int, loss: Optional[float] = None, accuracy: Optional[float] = None,
               force: bool = False) -> None:
        self.done = done
        now = time.perf_counter()
        dt = now - self._last_t
        if dt >= 0.5 or self.rate == 0.0:
            inst = (done - self._last_done) / dt if dt > 0 else 0.0
            if inst > 0:
                self.rate = inst if self.rate == 0.0 else 0.7 * self.rate + 0.3 * inst
            self._last_t, self._last_done = now, done
        parts = []
        if loss is not None:
            parts.append(f"loss {loss:.4g}")
        if accuracy is not None:
            parts.append(f"acc {100 * accuracy:.1f}%")
        self.postfix = " ".join(parts)
        if force or now - self.last_draw >= self.interval or done >= self.total:
            self.draw(now)

    def line(self, now: Optional[float] = None) -> str:
        now = time.perf_counter() if now is None else now
        frac = min(1.0, self.done / self.total)
        filled = int(round(frac * self.width))
        bar = "#" * filled + "-" * (self.width - filled)
        elapsed = now - self.start
        session = self.done - self.initial
        overall = session / elapsed if elapsed > 0 and session > 0 else 0.0
        rate = self.rate or overall
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        tasks = rate * self.tasks_per_step
        head = f"{self.desc} " if self.desc else ""
        post = f" {self.postfix}" if self.postfix else ""
        return (f"{head}{100 * frac:3.0f}% |{bar}| {self.done}/{self.total}{post} "
                f"{tasks:.1f} tasks/s elapsed {format_duration(elapsed)} ETA {format_duration(eta)}")

    def draw(self, now: Optional[float] = None) -> None:
        if not self.enabled:
            return
        now = time.perf_counter() if now is None else now
        self.last_draw = now
        text = self.line(now)
        if self.tty:
            self.stream.write("\r\x1b[K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self._drawn = True
        self._drawn_at = self.done

    def write(self, message: str) -> None:
        """Print a message line without garbling the bar."""
        if self.tty and self._drawn:
            self.stream.write("\r\x1b[K")
        self.stream.write(message + "\n")
        if self.tty and self._drawn:
            self.stream.write(self.line())
        self.stream.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self.tty or self._drawn_at != self.done:
            self.draw()
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def tasks_per_second(self) -> float:
        elapsed = time.perf_counter() - self.start
        return (self.done - self.initial) * self.tasks_per_step / elapsed if elapsed > 0 else 0.0

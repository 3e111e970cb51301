"""Progress of a long stage (capture, a layer's distillation, a probe, the search, test scores).

On a terminal one line is rewritten in place; without one (a log file, CI, a Prefect worker) a
line is logged every ``PERIODIC_SECONDS``, so a short stage adds no line at all. The stage's own
closing line (the runner's "capture: … in 125s") ends it either way.

The time left is measured seconds per unit × units left, where only the units that did work count
(a cached evaluation costs nothing and must not make the rest look cheap). A ``total`` that is an
upper bound (a search that may stop early, a budget the data may not fill) is said to be one.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TextIO, TypeVar

from .runner import Log

T = TypeVar("T")

PERIODIC_SECONDS = 30.0  # between two logged lines without a terminal
IN_PLACE_SECONDS = 0.2  # between two redraws of the in-place line


class Progress:
    """``label: done/total unit (elapsed, time left); detail`` for one stage."""

    def __init__(self, label: str, total: int | None, log: Log | None, *, unit: str = "", bound: bool = False,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        """
        Args:
            total: the units the stage will do (None: unknown, no time left is given).
            log: where the periodic lines go; None: shown nowhere (a library call nobody watches).
            bound: ``total`` is an upper bound: the line says "at most".
            stream: where the in-place line goes when it is a terminal (default: stderr).
        """
        self.label, self.total, self.log, self.unit, self.bound = label, total, log, unit, bound
        self.stream = sys.stderr if stream is None else stream
        self.in_place = log is not None and self.stream.isatty()
        self.clock = clock
        self.started = self.last_advance = self.last_shown = clock()
        self.done = self.worked = 0
        self.work_seconds = 0.0
        self.drawn = False

    def advance(self, count: int = 1, *, worked: bool = True, detail: str = "") -> None:
        """``count`` more units done; ``worked=False`` for units that cost nothing (cache hits)."""
        now = self.clock()
        self.done += count
        if worked:
            self.worked += count
            self.work_seconds += now - self.last_advance
        self.last_advance = now
        finished = self.total is not None and self.done >= self.total  # the stage's closing line says it
        period = IN_PLACE_SECONDS if self.in_place else PERIODIC_SECONDS
        if self.log is not None and not finished and now - self.last_shown >= period:
            self.last_shown = now
            self._show(self.line(detail))

    def seconds_left(self) -> float | None:
        if self.total is None or self.worked == 0:
            return None
        return self.work_seconds / self.worked * max(self.total - self.done, 0)

    def line(self, detail: str = "") -> str:
        of = "" if self.total is None else f"/{self.total:,}" if not self.bound else f" of at most {self.total:,}"
        timing = f"{self.clock() - self.started:.0f}s"
        left = self.seconds_left()
        if left is not None:
            timing += f", {'at most ' if self.bound else ''}~{_duration(left)} left"
        unit = f" {self.unit}" if self.unit else ""
        return f"{self.label}: {self.done:,}{of}{unit} ({timing})" + (f"; {detail}" if detail else "")

    def _show(self, line: str) -> None:
        if self.in_place:
            self.stream.write("\r\033[K" + line)
            self.stream.flush()
            self.drawn = True
        else:
            self.log(line)

    def close(self) -> None:
        """Clears the in-place line (the stage's closing line follows through the log)."""
        if self.drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.drawn = False

    def track(self, items: Iterable[T], size: Callable[[T], int] = lambda item: 1) -> Iterator[T]:
        """``items``, advancing by ``size(item)`` as each one is done (when the next is asked for)."""
        try:
            for item in items:
                yield item
                self.advance(size(item))
        finally:
            self.close()


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"

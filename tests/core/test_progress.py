"""A long stage's progress line: periodic log lines without a terminal, one line in place on one,
and a time left measured on the units that did work."""

import io
import os

from dtr_core.progress import PERIODIC_SECONDS, Progress


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_without_a_terminal_a_line_is_logged_only_every_period_with_an_honest_time_left():
    lines, clock = [], Clock()
    progress = Progress("search", 10, lines.append, unit="evaluations", bound=True, stream=io.StringIO(), clock=clock)
    for _ in range(2):  # cached: done at once, and they say nothing about how long the rest takes
        progress.advance(worked=False)
    for _ in range(2):
        clock.now += 10
        progress.advance()
    assert lines == []  # 20 s: a short stage adds no line
    clock.now += 10
    progress.advance(detail="3 linear [0, 1, 2]")
    # 10 s per evaluation that did work, 5 left; "at most": the search may stop before its last round.
    assert lines == ["search: 5 of at most 10 evaluations (30s, at most ~50s left); 3 linear [0, 1, 2]"]
    clock.now += PERIODIC_SECONDS - 1
    progress.advance()
    assert len(lines) == 1


def test_on_a_terminal_one_line_is_redrawn_in_place_and_cleared_at_the_end():
    lines, clock = [], Clock()
    main, side = os.openpty()
    with os.fdopen(side, "w") as terminal:
        progress = Progress("distill layer 2", 4, lines.append, unit="steps", stream=terminal, clock=clock)
        for _ in range(4):
            clock.now += 1
            progress.advance()
        progress.close()
        written = os.read(main, 4096).decode()
    os.close(main)
    assert lines == []  # nothing through the log: the stage's closing line follows there
    # Redrawn after each step but the last (the stage's closing line reports that one), then cleared.
    assert written.count("\r\x1b[K") == 4 and "distill layer 2: 3/4 steps (3s, ~1s left)" in written
    assert written.endswith("\r\x1b[K")


def test_track_counts_an_item_once_its_work_is_done():
    clock = Clock()
    progress = Progress("capture", 100, None, unit="tokens", clock=clock)
    seen = []
    for batch in progress.track([30, 50], size=lambda tokens: tokens):
        seen.append(progress.done)
        clock.now += 2
    assert seen == [0, 30] and progress.done == 80
    assert progress.seconds_left() == 4 / 80 * 20

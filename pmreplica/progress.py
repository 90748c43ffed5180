"""Progress of long operations (create, sync, verify, resync) as people and tools see it.

Three renderings, chosen by :func:`mode_for`: a bar (tqdm) on a terminal, sized from the
terminal and 80 columns when it reports none (many CI and remote terminals report 0, on
which a bar that follows the terminal's width draws nothing); a plain line every few
seconds when the output is not a terminal (a log keeps a line, not carriage returns); and
JSON lines (``{"event": "progress", ...}``) for tools. Operations report through the
``pmreplica_sync_progress`` hook; :class:`HookRenderer` turns those calls into a rendering.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import IO, Any

from .hookspecs import hookimpl

BAR, LINES, JSON, OFF = "bar", "lines", "json", "off"
#: seconds between two plain lines (PMREPLICA_PROGRESS_INTERVAL overrides it)
LINE_INTERVAL = float(os.environ.get("PMREPLICA_PROGRESS_INTERVAL", "5"))
#: seconds between two JSON progress events of one task
JSON_INTERVAL = 1.0


def mode_for(stream: IO[str], wanted: bool | None, as_json: bool = False) -> str:
    """The rendering for ``stream``: ``wanted`` False is none, JSON when asked for, else a
    bar on a terminal and plain lines elsewhere."""
    if wanted is False:
        return OFF
    if as_json:
        return JSON
    return BAR if stream.isatty() else LINES


def _screen(stream: IO[str]) -> tuple[int, int]:
    """The terminal's columns and rows, 80 and 24 where it reports none (tqdm draws nothing
    in 0 columns, and hides a bar below the last of 0 rows)."""
    try:
        cols, rows = os.get_terminal_size(stream.fileno())
    except (OSError, ValueError, AttributeError):
        cols = rows = 0
    return cols if cols > 0 else 80, rows if rows > 0 else 24


def _size(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


class Task:
    """One operation's progress: ``done`` of ``total`` bytes."""

    def __init__(self, mode: str, stream: IO[str], label: str, total: int,
                 fields: dict[str, Any]) -> None:
        self.mode, self.stream, self.label, self.total = mode, stream, label, total
        self.fields = fields
        self.done = 0
        self.start = self._last = time.monotonic()
        self._bar: Any = None
        self._lines = 0
        if mode == BAR:
            from tqdm import tqdm
            cols, rows = _screen(stream)
            self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                             desc=label, file=stream, leave=False, ncols=cols, nrows=rows,
                             mininterval=0.2)
        elif mode == JSON:
            self._event("start")

    def update(self, done: int) -> None:
        if done == self.done:
            return
        step, self.done = done - self.done, done
        if self._bar is not None:
            self._bar.update(step)
            return
        now = time.monotonic()
        if self.mode == LINES and now - self._last >= LINE_INTERVAL:
            self._last = now
            self._lines += 1
            self._line(now)
        elif self.mode == JSON and now - self._last >= JSON_INTERVAL:
            self._last = now
            self._event("progress")

    def close(self) -> None:
        now = time.monotonic()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.mode == LINES and self._lines:
            self._line(now)  # the end, of what was said to be under way
        elif self.mode == JSON:
            self._event("end")

    def _rate(self, now: float) -> float:
        return self.done / max(now - self.start, 1e-9)

    def _line(self, now: float) -> None:
        rate = self._rate(now)
        pct = 100 * self.done / self.total if self.total else 100
        left = (self.total - self.done) / rate if rate else 0
        text = (f"{self.label}: {_size(self.done)} of {_size(self.total)} ({pct:.0f}%), "
                f"{_size(rate)}/s" + (f", {left:.0f} s left" if self.done < self.total else ""))
        self.stream.write(text + "\n")
        self.stream.flush()

    def _event(self, event: str) -> None:
        now = time.monotonic()
        doc = {"event": event, "task": self.label, **self.fields, "done": self.done,
               "total": self.total, "elapsed": round(now - self.start, 3),
               "bytes_per_second": round(self._rate(now))}
        self.stream.write(json.dumps(doc) + "\n")
        self.stream.flush()


class HookRenderer:
    """A plugin that renders ``pmreplica_sync_progress`` calls: a task per replica and
    phase, closed when it completes or another begins."""

    def __init__(self, mode: str, stream: IO[str] | None = None) -> None:
        self.mode = mode
        self.stream = stream if stream is not None else sys.stderr
        self._task: Task | None = None
        self._key: tuple[int, str] | None = None

    @hookimpl
    def pmreplica_sync_progress(self, replica: Any, phase: str, done: int, total: int) -> None:
        if self.mode == OFF:
            return
        key = (replica.index, phase)
        if key != self._key or self._task is None or done < self._task.done:
            self.close()
            self._key = key
            self._task = Task(self.mode, self.stream, f"{phase} {replica.name}", total,
                              {"phase": phase, "replica": replica.index})
        self._task.total = total
        self._task.update(done)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self._task is not None:
            self._task.close()
            self._task = None
            self._key = None

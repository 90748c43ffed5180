"""The durable image, kept apart from the live one, of every file under one directory.

The live image is what the page cache holds (what a mapping or ``pread`` sees); the durable
image is what would survive a power failure. Bytes become durable only by the events that
make them so on persistent memory:

* ``Mapping.persist``/``deep_persist``: the range, at once;
* ``Mapping.flush``: the range as it is at the flush, at the mapping's next ``drain``;
* ``os.fdatasync``/``os.fsync`` of a file: the whole file.

Everything else a workload stores (through a mapping, ``pwrite``, anything) stays pending:
a power failure may keep any subset of the pending 8-byte words. Creating, extending and
removing files counts as durable at once (file system metadata is journalled).

Just before each such event (a *durability point*) the :class:`Simulation` may record the
pending words; which subsets become crash images is chosen later, by the checker. Stores
are never intercepted: pending words are found by comparing the live and durable images,
64 KiB blocks first, then 4 KiB pages, then words, and only when a point is recorded.
"""

from __future__ import annotations

import mmap
import os
import random
from array import array
from dataclasses import dataclass, field
from typing import Any, Callable

from .. import pmem
from .stream import Recorder

_BLOCK = 64 << 10
_PAGE = 4096


class PowerCut(BaseException):
    """Raised at the durability point a workload scheduled a power cut for
    (:attr:`Simulation.cut_at`); a BaseException, so that no error handler of the code
    under test takes it for its own failure."""


@dataclass(eq=False)
class TrackedFile:
    """One file: its durable image and a read-only shared view of its live one."""

    rel: str
    path: str
    ino: int
    durable: bytearray
    live: mmap.mmap | None = None
    #: flush snapshots waiting for a drain: (file offset, bytes)
    flushed: list[tuple[int, bytes]] = field(default_factory=list)

    def remap(self) -> None:
        """Map the file as it is now (again, when its size changed)."""
        if self.live is not None:
            self.live.close()
            self.live = None
        size = os.stat(self.path).st_size
        if size:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                self.live = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
            finally:
                os.close(fd)

    @property
    def size(self) -> int:
        return len(self.live) if self.live is not None else 0

    def pending_words(self, lo: int = 0, hi: int | None = None) -> list[int]:
        """Offsets of the 8-byte words in ``[lo, hi)`` whose live and durable values differ."""
        live, dur = self.live, self.durable
        if live is None:
            return []
        hi = len(live) if hi is None else hi
        out: list[int] = []
        for b in range(lo & ~(_BLOCK - 1), hi, _BLOCK):
            b0, b1 = max(b, lo), min(b + _BLOCK, hi)
            if live[b0:b1] == dur[b0:b1]:
                continue
            for p in range(b0 & ~(_PAGE - 1), b1, _PAGE):
                p0, p1 = max(p, b0) & ~7, min(p + _PAGE, b1)
                if live[p0:p1] == dur[p0:p1]:
                    continue
                n = (p1 - p0) // 8
                a, d = array("Q", live[p0:p0 + 8 * n]), array("Q", dur[p0:p0 + 8 * n])
                out.extend(p0 + 8 * i for i in range(n) if a[i] != d[i])
        return out


class Simulation:
    """Tracks the durable image of the files under ``workdir`` while a workload runs.

    ``sample`` is the chance that a durability point is recorded (at most ``max_points``
    of them); :meth:`point` records one on demand. ``context`` (any picklable value the
    workload sets, e.g. which states a crash may leave) travels with each point to the
    checker."""

    def __init__(self, workdir: str | os.PathLike[str], recorder: Recorder, *,
                 sample: float = 1.0, max_points: int = 1 << 30, seed: int = 0) -> None:
        self.workdir = os.path.realpath(workdir)
        self.recorder = recorder
        self.sample = sample
        self.max_points = max_points
        self.rng = random.Random(seed)
        self.context: Any = None
        #: the durability point at which to raise PowerCut (-1: none)
        self.cut_at = -1
        self.files: dict[str, TrackedFile] = {}
        self.points = 0          # durability points passed
        self.recorded = 0        # points recorded
        self._saved: dict[str, Callable[..., Any]] = {}
        self._previous_observer: Any = None
        self._active = False

    # -- start and stop -------------------------------------------------------------------
    def __enter__(self) -> "Simulation":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop(final_point=exc[0] is None)

    def start(self) -> None:
        """Take the files as they are as durable; observe new mappings and file syncs."""
        for rel in self._walk():
            self._track(rel, initial=True)
        self._previous_observer = pmem.set_observer(self)
        for name in ("fdatasync", "fsync"):
            self._saved[name] = getattr(os, name)
            setattr(os, name, self._sync_wrapper(self._saved[name], name))
        self._active = True

    def stop(self, final_point: bool = True) -> None:
        """Record the end state's point (stores never made durable show there) and stop."""
        if not self._active:
            return
        try:
            if final_point:
                self.point("end")
        finally:
            self._active = False
            for name, fn in self._saved.items():
                setattr(os, name, fn)
            pmem.set_observer(self._previous_observer)
            for f in self.files.values():
                if f.live is not None:
                    f.live.close()
            self.recorder.close()

    # -- files ----------------------------------------------------------------------------
    def _walk(self) -> list[str]:
        out = []
        for dirpath, _dirs, names in os.walk(self.workdir):
            for name in names:
                path = os.path.join(dirpath, name)
                if os.path.isfile(path) and not os.path.islink(path):
                    out.append(os.path.relpath(path, self.workdir))
        return sorted(out)

    def _rel(self, path: str) -> str | None:
        real = os.path.realpath(path)
        if real.startswith(self.workdir + os.sep):
            return os.path.relpath(real, self.workdir)
        return None

    def _track(self, rel: str, initial: bool = False) -> TrackedFile | None:
        """The tracked file at ``rel``, noticing a new file (its content not durable yet,
        unless it was there when the simulation started), one replaced under the name, or
        a change of size."""
        path = os.path.join(self.workdir, rel)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            if self.files.pop(rel, None) is not None:
                self.recorder.gone(rel)
            return None
        f = self.files.get(rel)
        if f is not None and f.ino == st.st_ino:
            if f.size != st.st_size:
                f.remap()
                if len(f.durable) > f.size:
                    del f.durable[f.size:]
                else:
                    f.durable.extend(bytes(f.size - len(f.durable)))
                f.flushed = [(o, b) for o, b in f.flushed if o + len(b) <= f.size]
                self.recorder.resize(rel, f.size)
            return f
        if f is not None and f.live is not None:  # replaced under its name
            f.live.close()
        f = TrackedFile(rel, path, st.st_ino, bytearray())
        f.remap()
        f.durable = bytearray(f.live[:]) if initial and f.live is not None else \
            bytearray(f.size)
        self.files[rel] = f
        self.recorder.file(rel, bytes(f.durable) if initial else f.size)
        return f

    def _refresh(self) -> None:
        """Notice files made, renamed, resized or removed since the last look. A renamed
        file keeps its durable content (a rename is durable at once, like file creation)."""
        current = {}
        for rel in self._walk():
            try:
                current[rel] = os.stat(os.path.join(self.workdir, rel)).st_ino
            except FileNotFoundError:
                pass
        where = {ino: rel for rel, ino in current.items()}
        moved = [(f, where[f.ino]) for f in self.files.values()
                 if current.get(f.rel) != f.ino and where.get(f.ino, f.rel) != f.rel]
        for f, _ in moved:
            del self.files[f.rel]
            self.recorder.gone(f.rel)
        for f, rel in moved:
            if self.files.pop(rel, None) is not None:
                self.recorder.gone(rel)
            f.rel, f.path = rel, os.path.join(self.workdir, rel)
            self.files[rel] = f
            self.recorder.file(rel, bytes(f.durable))
        for rel in sorted(set(current) | set(self.files)):
            self._track(rel)

    def _make_durable(self, f: TrackedFile, off: int, data: bytes | memoryview) -> None:
        end = off + len(data)
        if f.durable[off:end] != data:
            f.durable[off:end] = data
            self.recorder.durable(f.rel, off, bytes(data))

    # -- durability points ------------------------------------------------------------------
    def point(self, kind: str, force: bool = True) -> None:
        """A durability point: record the pending words (always when ``force``, else with
        the sampling chance)."""
        self.points += 1
        if self.points == self.cut_at:
            raise PowerCut(f"power cut at durability point {self.points} ({kind})")
        if not force and (self.recorded >= self.max_points or self.rng.random() >= self.sample):
            return
        self._refresh()
        pending = []
        for rel in sorted(self.files):
            f = self.files[rel]
            offs = f.pending_words()
            if offs:
                live = f.live
                assert live is not None
                vals = b"".join(live[o:o + 8] for o in offs)
                pending.append((rel, array("Q", offs).tobytes(), vals))
        self.recorded += 1
        self.recorder.point(self.points, kind, self.context, pending)

    # -- mappings (pmem.set_observer) -------------------------------------------------------
    def attach(self, mapping: pmem.Mapping) -> None:
        """Wrap a new mapping's durability calls, if it maps files under the directory."""
        segs = []
        for s in mapping.segments:
            rel = self._rel(s.path)
            if rel is not None:
                segs.append((rel, s.file_offset, s.length, s.pool_offset))
        if not segs:
            return
        sim = self
        persist, flush, drain = mapping.persist, mapping.flush, mapping.drain
        deep = mapping.deep_persist

        def pieces(off: int, n: int):
            for rel, foff, length, poff in segs:
                lo, hi = max(off, poff), min(off + n, poff + length)
                if lo < hi:
                    f = sim._track(rel)
                    if f is not None and f.live is not None:
                        yield f, foff + lo - poff, hi - lo

        def traced_persist(off: int, n: int) -> None:
            sim.point("persist", force=False)
            persist(off, n)
            for f, fo, ln in pieces(off, n):
                sim._make_durable(f, fo, f.live[fo:fo + ln])  # type: ignore[index]

        def traced_deep_persist(off: int, n: int) -> None:
            sim.point("persist", force=False)
            deep(off, n)
            for f, fo, ln in pieces(off, n):
                sim._make_durable(f, fo, f.live[fo:fo + ln])  # type: ignore[index]

        def traced_flush(off: int, n: int) -> None:
            sim.point("flush", force=False)
            flush(off, n)
            for f, fo, ln in pieces(off, n):
                f.flushed.append((fo, f.live[fo:fo + ln]))  # type: ignore[index]

        def traced_drain() -> None:
            sim.point("drain", force=False)
            drain()
            for rel, *_ in segs:
                f = sim.files.get(rel)
                if f is not None:
                    done, f.flushed = f.flushed, []
                    for fo, data in done:
                        sim._make_durable(f, fo, data)

        mapping.persist = traced_persist  # type: ignore[method-assign]
        mapping.deep_persist = traced_deep_persist  # type: ignore[method-assign]
        mapping.flush = traced_flush  # type: ignore[method-assign]
        mapping.drain = traced_drain  # type: ignore[method-assign]
        mapping.flush_needed = True

    # -- file syncs ---------------------------------------------------------------------------
    def _sync_wrapper(self, fn: Callable[[int], None], kind: str) -> Callable[[int], None]:
        sim = self

        def traced_sync(fd: int) -> None:
            try:
                rel = sim._rel(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                rel = None
            if rel is None:
                fn(fd)
                return
            sim.point(kind, force=False)
            fn(fd)
            sim._refresh()
            f = sim.files.get(rel)
            if f is not None and f.live is not None:
                for off in f.pending_words():
                    sim._make_durable(f, off, f.live[off:off + 8])
                f.flushed.clear()
        return traced_sync

    # -- a power cut the workload goes on after ---------------------------------------------
    def power_cut(self, rng: random.Random) -> int:
        """Lose a random subset of the pending words now, in the live files too, as a power
        failure would, so that the workload restarts from a crash image (its mappings of the
        files must be closed). Returns how many pending words were lost."""
        self._refresh()
        lost = 0
        for f in self.files.values():
            offs = f.pending_words()
            if not offs:
                continue
            keep_p = rng.choice((0.1, 0.5, 0.9))
            fd = os.open(f.path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                for off in offs:
                    if rng.random() < keep_p:
                        self._make_durable(f, off, f.live[off:off + 8])  # type: ignore[index]
                    else:
                        os.pwrite(fd, f.durable[off:off + 8], off)
                        lost += 1
            finally:
                os.close(fd)
            f.flushed.clear()
        return lost


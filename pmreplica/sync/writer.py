"""Copying from the source into one replica under repair (:class:`Writer`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable

from .. import copier
from ..health import Probe
from ..status import close_quietly

if TYPE_CHECKING:
    from .run import Run


class Writer:
    """Copies from the source into one replica under repair, through the replica's target
    bound to the source's buffer. A replica that keeps its header pages is repaired in
    place: its storage restored, then its header cleared (it is no pool until
    :meth:`finish`); any other is created again when broken. Source pages are let go as
    each batch is taken: written (``write_through``) into a replica that keeps its pages,
    whose copy is made durable once, at the end; sent and drained into any other."""

    def __init__(self, run: Run, p: Probe, create: bool = False,
                 session: Any = None) -> None:
        self.run, self.p = run, p
        self.view = run.data.view()
        self.target: Any = session  # one bound to the source's buffer already: its own
        try:
            if session is None:
                if p.target is not None:  # the probe's is bound to the scratch buffer
                    close_quietly(p.target)
                    p.target = None
                if p.keeps_pages:
                    self.target = run.new_target(p, self.view)
                    self.target.restore()
                else:
                    self.target = run.open_target(p, self.view, create=create)
            if p.keeps_pages:
                self._clear_header()
        except BaseException:
            self.close()
            raise

    def _clear_header(self) -> None:
        """Rule 3 of :mod:`pmreplica.sync`: the header goes before the data is touched, the
        record staying in its page."""
        run, p = self.run, self.p
        state = run.record.state
        assert state is not None
        self.target.clear_header(state.pack() if p.index == 0 else state.pack_copy())
        if p.index == 0:
            run.record.places.add(0)  # the master's record counts even while it is broken
            if not run.master_locked:
                run.lock()
        else:
            run.record.places.discard(p.index)  # a broken replica's copy does not count

    def copy(self, ranges: Iterable[tuple[int, int]],
             advance: Callable[[int], None] | None = None) -> None:
        data, view = self.run.data, self.view

        keeps = self.p.keeps_pages
        target = self.target

        def write(off: int, n: int) -> None:
            data.fill(view, off, n)
            if keeps:
                target.write_through(off, n)
            else:
                target.flush(off, n, 0, 0)

        def settle(off: int, n: int) -> None:
            if not keeps:
                target.drain(0)  # sent and durable: the source's pages may go
            data.release(off, n)

        copier.copy(ranges, write, settle, advance)

    def finish(self) -> None:
        """Make what was copied durable and write the replica's headers."""
        self.target.drain(0)
        self.run.headers.write(self.p, self.target)

    def close(self) -> None:
        if self.target is not None:
            close_quietly(self.target)
            self.target = None
        self.view.release()

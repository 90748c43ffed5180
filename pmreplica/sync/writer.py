"""Copying from the source into one replica under repair (:class:`Writer`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable

from .. import copier
from ..health import Probe
from ..replica import ReplicaWriter
from ..status import close_quietly

if TYPE_CHECKING:
    from .run import Run


class Writer:
    """Copies from the source into one replica under repair. A local replica loses its
    header first (it is no pool until :meth:`finish`) and its parts are written with
    pwrite; any other gets the ranges through its target, bound to the source's buffer.
    Source pages are let go as each batch is durable or sent."""

    def __init__(self, run: Run, p: Probe, create: bool = False,
                 session: Any = None) -> None:
        self.run, self.p = run, p
        self.view = run.data.view()
        self.io: ReplicaWriter | None = None
        self.target: Any = session  # one bound to the source's buffer already: its own
        try:
            if p.is_remote:
                if session is None:
                    if p.target is not None:  # the probe's is bound to the scratch buffer
                        close_quietly(p.target)
                        p.target = None
                    self.target = run.open_target(p, self.view, create=create)
            else:
                self._clear_local()
                self.io = ReplicaWriter(p.files)  # type: ignore[arg-type]
        except BaseException:
            self.close()
            raise

    def _clear_local(self) -> None:
        run, p = self.run, self.p
        files, state = p.files, run.record.state
        assert files is not None and state is not None
        files.restore_parts()
        files.clear_header(state.pack() if p.index == 0 else state.pack_copy())
        if p.index == 0:
            run.record.places.add(0)  # the master's record counts even while it is broken
            if run.lock_fd < 0:
                run.lock()
        else:
            run.record.places.discard(p.index)  # a broken replica's copy does not count

    def copy(self, ranges: Iterable[tuple[int, int]],
             advance: Callable[[int], None] | None = None) -> None:
        data, view = self.run.data, self.view

        def write(off: int, n: int) -> None:
            data.fill(view, off, n)
            if self.io is not None:
                self.io.write(off, view[off:off + n])
            else:
                self.target.flush(off, n, 0, 0)

        def settle(off: int, n: int) -> None:
            if self.target is not None:
                self.target.drain(0)  # sent and durable: the source's pages may go
            data.release(off, n)

        copier.copy(ranges, write, settle, advance)

    def finish(self) -> None:
        """Make what was copied durable and write the replica's headers."""
        if self.io is not None:
            self.io.sync()
            self.run.headers.write(self.p)
        else:
            self.run.headers.write(self.p, self.target)

    def close(self) -> None:
        if self.io is not None:
            self.io.close()
            self.io = None
        if self.target is not None:
            close_quietly(self.target)
            self.target = None
        self.view.release()

"""The source's data as a repair reads it: mapped once per run when its target lends a
mapping (:class:`~pmreplica.target.MappedTarget`, a local source), else read through its
target range by range into a scratch buffer the size of the pool. The targets being
repaired copy from that view; those that need no source are bound to the scratch buffer.
Pages of a range are let go once it is copied, so a run's memory stays bounded whatever
the pool's size."""

from __future__ import annotations

import logging
import mmap
from typing import Callable

import pluggy

from ..pmem import MAP_NORESERVE, Mapping
from ..setfile import PoolSetFile
from ..target import MappedTarget, ReplicaTarget
from ..target_host import TargetHost

log = logging.getLogger("pmreplica.sync")


class SourceData:
    """The scratch buffer, the source's open target and its mapping once asked."""

    def __init__(self, set_file: PoolSetFile, pm: pluggy.PluginManager, size: int) -> None:
        self.set_file, self.pm = set_file, pm
        self.scratch = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | MAP_NORESERVE)
        #: the source's open target, when asked (given by the run once the source is chosen)
        self.target: Callable[[], ReplicaTarget] | None = None
        self._map: Mapping | None = None
        self._mapped: bool | None = None  # whether the source lends a mapping (once known)

    def host(self, buf: memoryview) -> TargetHost:
        """What a plugin's target is handed as its pool: ``buf`` is what it copies from."""
        return TargetHost(self.set_file, buf, self.pm)

    def mapping(self) -> Mapping | None:
        """The source mapped (once per run), when its target lends a mapping; else None."""
        if self._mapped is None:
            assert self.target is not None
            target = self.target()
            self._mapped = isinstance(target, MappedTarget)
            if self._mapped:
                self._map = target.map_replica()  # type: ignore[union-attr]
        return self._map

    def view(self) -> memoryview:
        """The pool as the source holds it: its mapping, or the scratch buffer that
        :meth:`fill` reads it into (a view of its own: released by the caller)."""
        mapping = self.mapping()
        return mapping.buf[:] if mapping is not None else memoryview(self.scratch)

    def fill(self, view: memoryview, off: int, n: int) -> None:
        """Bring ``[off, off + n)`` of a source that is not mapped into ``view``."""
        assert self.target is not None
        if self.mapping() is None:
            self.target().read(view[off:off + n], off, 0)

    def release(self, off: int, n: int) -> None:
        """Let go of the source's pages of a range copied: the run's memory stays bounded."""
        mapping = self.mapping()
        if mapping is not None:
            mapping.release(off, n)
        else:
            self.scratch.madvise(mmap.MADV_DONTNEED, off, n)

    def close(self) -> None:
        if self._map is not None:
            close_mapping(self._map)
        try:
            self.scratch.close()
        except BufferError:
            log.debug("scratch buffer still referenced")


def close_mapping(mapping: Mapping) -> None:
    """Unmap ``mapping``, or leave it to be unmapped when its last view is released."""
    try:
        mapping.close()
    except BufferError:
        log.debug("mapping still referenced; unmapped when released")

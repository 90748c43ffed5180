"""The source's data as a repair reads it: a local source mapped once per run, a source
reached through its target read range by range into a scratch buffer the size of the pool.
Targets that need no local source are bound to the scratch buffer too. Pages of a range are
let go once it is copied, so a run's memory stays bounded whatever the pool's size."""

from __future__ import annotations

import logging
import mmap

import pluggy

from ..health import Probe
from ..pmem import MAP_NORESERVE, Mapping
from ..setfile import PoolSetFile
from ..target_host import TargetHost

log = logging.getLogger("pmreplica.sync")


class SourceData:
    """The scratch buffer, the mapped local source, and the source's probe once chosen."""

    def __init__(self, set_file: PoolSetFile, pm: pluggy.PluginManager, size: int) -> None:
        self.set_file, self.pm = set_file, pm
        self.scratch = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | MAP_NORESERVE)
        self.probe: Probe | None = None
        self._map: Mapping | None = None

    def host(self, buf: memoryview) -> TargetHost:
        """What a plugin's target is handed as its pool: ``buf`` is what it copies from."""
        src = self._map if buf.obj is not self.scratch else None
        return TargetHost(self.set_file, buf, self.pm, src)

    def view(self) -> memoryview:
        """The pool as the source holds it: the mapped local source, or the scratch buffer
        that :meth:`fill` reads a remote source into."""
        assert self.probe is not None
        if self.probe.is_remote:
            return memoryview(self.scratch)
        return self.mapping().buf[:]  # a view of its own: released by the caller

    def fill(self, view: memoryview, off: int, n: int) -> None:
        """Bring ``[off, off + n)`` of a source reached through its target into ``view``."""
        assert self.probe is not None
        if self.probe.is_remote:
            self.probe.target.read(view[off:off + n], off, 0)  # type: ignore[union-attr]

    def release(self, off: int, n: int) -> None:
        """Let go of the source's pages of a range copied: the run's memory stays bounded."""
        assert self.probe is not None
        if self.probe.is_remote:
            self.scratch.madvise(mmap.MADV_DONTNEED, off, n)
        elif self._map is not None:
            self._map.release(off, n)

    def mapping(self) -> Mapping:
        """The local source, mapped (once per run)."""
        if self._map is None:
            assert self.probe is not None and self.probe.files is not None
            self._map = self.probe.files.open()
        return self._map

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

"""The source's data as a repair reads it: read through the source's target, range by
range, into a scratch buffer the size of the pool, which the targets being repaired copy
from (and those that need no source are bound to as well). Pages of a range are let go
once it is copied, so a run's memory stays bounded whatever the pool's size."""

from __future__ import annotations

import logging
import mmap
from typing import Callable

import pluggy

from ..pmem import MAP_NORESERVE
from ..setfile import PoolSetFile
from ..target import ReplicaTarget
from ..target_host import TargetHost

log = logging.getLogger("pmreplica.sync")


class SourceData:
    """The scratch buffer, and the source's open target once chosen."""

    def __init__(self, set_file: PoolSetFile, pm: pluggy.PluginManager, size: int) -> None:
        self.set_file, self.pm = set_file, pm
        self.scratch = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | MAP_NORESERVE)
        #: the source's open target, when asked (given by the run once the source is chosen)
        self.target: Callable[[], ReplicaTarget] | None = None

    def host(self, buf: memoryview) -> TargetHost:
        """What a plugin's target is handed as its pool: ``buf`` is what it copies from."""
        return TargetHost(self.set_file, buf, self.pm)

    def view(self) -> memoryview:
        """The scratch buffer that :meth:`fill` reads the source into (a view of its own:
        released by the caller)."""
        return memoryview(self.scratch)

    def fill(self, view: memoryview, off: int, n: int) -> None:
        """Bring ``[off, off + n)`` of the source into ``view``."""
        assert self.target is not None
        self.target().read(view[off:off + n], off, 0)

    def release(self, off: int, n: int) -> None:
        """Let go of the source's pages of a range copied: the run's memory stays bounded."""
        self.scratch.madvise(mmap.MADV_DONTNEED, off, n)

    def close(self) -> None:
        try:
            self.scratch.close()
        except BufferError:
            log.debug("scratch buffer still referenced")

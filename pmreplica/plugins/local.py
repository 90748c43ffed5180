"""The built-in ``local`` plugin: replicas made of part files on this machine.

A persist writes the range from the master's mapping into the replica's part files with
``pwrite`` and ``fdatasync``, not through a mapping of the replica: a part that is truncated
or whose file system fails then gives an errno instead of a SIGBUS that would kill the host
process. A part file unlinked under an open pool is noticed (its link count drops to zero)
and reported as a failed replica, since writes to it would reach no file.
"""

from __future__ import annotations

import bisect
import errno
import os

from ..errors import ReplicaError
from ..header import PoolAttr
from ..hookspecs import hookimpl
from ..pmem import Mapping
from ..pool import describe
from ..poolset import LocalReplica
from ..replica import LocalReplicaFiles, raise_if_broken, remove_parts
from ..target import TargetStat

#: local replicas have no per-lane resources; any lane count the pool asks for works
NLANES = 1 << 16


class LocalTarget:
    """A local replica of an open pool set."""

    nlanes = NLANES

    def __init__(self, files: LocalReplicaFiles, master: Mapping, name: str) -> None:
        self.files = files
        self.name = name
        self._src = master.buf
        self._fds: list[int] = []
        self._starts = [s.pool_offset for s in files.segments]

    def create(self, attr: PoolAttr) -> None:
        self.files.create(attr.to_header())
        self._open_fds()

    def open(self) -> PoolAttr:
        headers, problems = self.files.check()
        raise_if_broken(self.name, problems)
        self._open_fds()
        return PoolAttr.from_header(headers[0].header) if headers else PoolAttr()

    def _open_fds(self) -> None:
        try:
            for seg in self.files.segments:
                self._fds.append(os.open(seg.path, os.O_RDWR | os.O_CLOEXEC))
        except OSError as e:
            self.close()
            raise ReplicaError(e.errno or errno.EIO, f"{self.name}: {e}") from e

    def _pieces(self, offset: int, length: int):
        """(fd, file offset, pool offset, length) of each part the range touches."""
        if not self._fds:
            raise ReplicaError(errno.EBADF, f"{self.name} is not open")
        segs = self.files.segments
        i = bisect.bisect_right(self._starts, offset) - 1
        end = offset + length
        while offset < end:
            seg = segs[i]
            n = min(end, seg.pool_offset + seg.length) - offset
            yield self._fds[i], seg.file_offset + offset - seg.pool_offset, offset, n
            offset += n
            i += 1

    def persist(self, offset: int, length: int, lane: int = 0, flags: int = 0) -> None:
        try:
            for fd, foff, poff, n in self._pieces(offset, length):
                if os.pwrite(fd, self._src[poff:poff + n], foff) != n:
                    raise ReplicaError(errno.EIO, f"{self.name}: short write")
                os.fdatasync(fd)
                if os.fstat(fd).st_nlink == 0:
                    raise ReplicaError(errno.ENOENT, f"{self.name}: part file was removed")
        except ReplicaError:
            raise
        except OSError as e:
            raise ReplicaError(e.errno or errno.EIO, f"{self.name}: {e.strerror}") from e

    # pwrite+fdatasync completes at once: flush is persist, drain has nothing left to wait for
    flush = persist
    deep_persist = persist

    def drain(self, lane: int = 0) -> None:
        if not self._fds:
            raise ReplicaError(errno.EBADF, f"{self.name} is not open")

    def read(self, dest: memoryview, offset: int, lane: int = 0) -> None:
        for fd, foff, poff, n in self._pieces(offset, len(dest)):
            at = poff - offset
            if os.preadv(fd, [dest[at:at + n]], foff) != n:
                raise ReplicaError(errno.EIO, f"{self.name}: short read at {poff}")

    def set_attr(self, attr: PoolAttr) -> None:
        """Rewrite the attributes in every part header; the other parts' uuids stay."""
        hdr = attr.to_header()
        uuids = [h.header.uuid for h in self.files.read_headers() if h.header is not None]
        uuids[0] = hdr.uuid  # part 0 takes the attributes' uuid, as PMDK's set_attr does
        self.files.write_headers(hdr, uuids, hdr.prev_repl, hdr.next_repl)

    def stat(self) -> TargetStat:
        _, problems = self.files.check()
        return TargetStat(size=self.files.pool_size, healthy=not problems,
                          detail="; ".join(problems))

    def close(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)


@hookimpl(trylast=True)
def pmreplica_open_replica(spec, index, poolset, create):
    if not isinstance(spec, LocalReplica):
        return None
    files = LocalReplicaFiles(poolset.set_file, spec, poolset.size)
    return LocalTarget(files, poolset.mapping, describe(spec, index))


@hookimpl(trylast=True)
def pmreplica_remove_replica(spec, index, force, remove_pool_set):
    if not isinstance(spec, LocalReplica):
        return None
    remove_parts(spec, force)
    return True

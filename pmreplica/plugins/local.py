"""The built-in ``local`` plugin: replicas made of part files on this machine.

A persist writes the range from the master's mapping into the replica's part files with
``pwrite`` and ``fdatasync``, not through a mapping of the replica: a part that is truncated
or whose file system fails then gives an errno instead of a SIGBUS that would kill the host
process. A part file unlinked under an open pool is noticed (its link count drops to zero)
and reported as a failed replica, since writes to it would reach no file.

On storage where fdatasync has real work to do, a replica's writes run on a thread of its
own (flush queues, drain waits), so that the replicas of a pool are written in parallel,
with each other and with the network waits of remote replicas, not one after another.

On tmpfs and ramfs, where the page cache is the storage and fdatasync has nothing to do,
the replica is mapped and a flush is a copy into the mapping, as libpmemobj writes its
local replicas: no system call on the write path, where pwrite, fdatasync and the link
count check cost more than the whole commit's own work. Such a file system cannot fail a
write (the parts' blocks were allocated when they were made); what is checked is the link
count, once per drain. Truncating a part of such a replica under an open pool would end the
process with SIGBUS, as truncating the master's would.

The target keeps its header pages itself (:class:`~pmreplica.target.HeaderPageKeeper`):
replica-sync, check and verify read a broken replica's record and repair it in place
through it, as they reach every other replica through its target; and it lends its parts
mapped (:class:`~pmreplica.target.MappedTarget`), so that a repair copies from a local
source and verify hashes a local replica in place.
"""

from __future__ import annotations

import bisect
import collections
import errno
import os
import threading
import uuid as _uuid
from collections.abc import Callable

from .. import generation
from ..errors import PmReplicaError, ReplicaError
from ..files import open_regular
from ..header import PoolAttr, PoolHeader
from ..hookspecs import hookimpl
from ..pmem import Mapping, memory_backed
from ..replica import LocalReplicaFiles, raise_if_broken, remove_parts
from ..setfile import LocalReplica, PoolSetFile
from ..state import store_copy
from ..status import describe
from ..target import HeaderPages, TargetStat

#: local replicas have no per-lane resources; any lane count the pool asks for works
NLANES = 1 << 16
#: a flush of a mapped replica this large is written with pwrite rather than copied
BULK = 1 << 20


class LocalTarget:
    """A local replica, written from ``src`` (the bytes a flush copies: the master's mapping
    in an open pool set, replica-sync's source buffer outside one)."""

    nlanes = NLANES

    def __init__(self, set_file: PoolSetFile, spec: LocalReplica, pool_size: int,
                 src: memoryview | None, name: str,
                 progress: Callable[[int, int], None] | None = None,
                 sparse: bool = False) -> None:
        self.name = name
        try:
            self.files = LocalReplicaFiles(set_file, spec, pool_size)
        except PmReplicaError as e:  # a layout that cannot hold the pool: every call says so
            self._unusable: PmReplicaError | None = e
            self.files = None  # type: ignore[assignment]
        else:
            self._unusable = None
        self._progress = progress
        self._sparse = sparse
        self._src = src
        self._fds: list[int] = []
        self._starts = [s.pool_offset for s in self.files.segments] if self.files else []
        self._background: _Background | None = None
        #: the replica mapped, when its parts are memory-backed (else None: pwrite)
        self._map: Mapping | None = None
        self._dst: memoryview | None = None
        # calls using the fds right now: close() leaves the fds to the last of them, so that a
        # closed number cannot be reused under a write still in flight on another lane
        self._use_lock = threading.Lock()
        self._inflight = 0
        #: write_through wrote what no fdatasync has covered yet (the next drain syncs it)
        self._unsynced = False
        self._sync_lock = threading.Lock()
        self._closing = False

    def _usable(self, writing: bool = False) -> LocalReplicaFiles:
        """The replica's files; the error that says why there are none, or (``writing``)
        nothing to copy from."""
        if self._unusable is not None:
            raise self._unusable
        if writing and self._src is None:
            raise ReplicaError(errno.EINVAL, f"{self.name}: no buffer to copy from (the "
                                             "pool gave the target no 'buf')")
        return self.files

    def create(self, attr: PoolAttr) -> None:
        self._usable(writing=True).create(attr.to_header(), sparse=self._sparse,
                                          progress=self._progress)
        self._open_fds()

    def open(self) -> PoolAttr:
        headers, problems = self._usable(writing=True).check()
        raise_if_broken(self.name, problems)
        self._open_fds()
        return PoolAttr.from_header(headers[0].header) if headers else PoolAttr()

    def restore(self) -> None:
        """HeaderPageKeeper: create missing parts, extend short ones, and open the replica
        for writing whatever its headers say (replica-sync then clears its header)."""
        self._usable(writing=True).restore_parts()
        self._open_fds()

    def _open_fds(self) -> None:
        try:
            for seg in self.files.segments:
                self._fds.append(open_regular(seg.path, os.O_RDWR))
        except OSError as e:
            self.close()
            raise ReplicaError(e.errno or errno.EIO, f"{self.name}: {e}") from e
        if not all(memory_backed(fd) for fd in self._fds):
            self._background = _Background(self._write, self.name)
            return
        try:
            self._map = self.files.open()
        except OSError as e:
            self.close()
            raise ReplicaError(e.errno or errno.EIO, f"{self.name}: {e}") from e
        self._dst = self._map.buf
        if self._map.flush_needed:  # only when something observes it (power-loss tests)
            self.flush = self._copy_and_persist  # type: ignore[method-assign]
        else:
            self.flush = self._copy  # type: ignore[method-assign]
        self.drain = self._check_links  # type: ignore[method-assign]

    def _acquire_fds(self) -> list[int]:
        with self._use_lock:
            if not self._fds or self._closing:
                raise ReplicaError(errno.EBADF, f"{self.name} is not open")
            self._inflight += 1
            return self._fds

    def _release_fds(self) -> None:
        with self._use_lock:
            self._inflight -= 1
            if self._closing and not self._inflight:
                self._close_fds()

    def _pieces(self, fds: list[int], offset: int, length: int):
        """(fd, file offset, pool offset, length) of each part the range touches."""
        segs = self.files.segments
        i = bisect.bisect_right(self._starts, offset) - 1
        end = offset + length
        while offset < end:
            seg = segs[i]
            n = min(end, seg.pool_offset + seg.length) - offset
            yield fds[i], seg.file_offset + offset - seg.pool_offset, offset, n
            offset += n
            i += 1

    def _write(self, offset: int, length: int, durable: bool = True) -> None:
        """Copy the master's range into the part files and (``durable``) make it durable
        there."""
        fds = self._acquire_fds()
        try:
            for fd, foff, poff, n in self._pieces(fds, offset, length):
                if os.pwrite(fd, self._src[poff:poff + n], foff) != n:
                    raise ReplicaError(errno.EIO, f"{self.name}: short write")
                if durable:
                    self._make_durable(fd)
        except ReplicaError:
            raise
        except OSError as e:
            raise ReplicaError(e.errno or errno.EIO, f"{self.name}: {e.strerror}") from e
        finally:
            self._release_fds()

    def _make_durable(self, fd: int) -> None:
        """fdatasync one part; ENOENT if it was unlinked meanwhile (writes reach no file)."""
        os.fdatasync(fd)
        if os.fstat(fd).st_nlink == 0:
            raise ReplicaError(errno.ENOENT, f"{self.name}: part file was removed")

    def _copy(self, offset: int, length: int, lane: int = 0, flags: int = 0) -> None:
        """flush of a mapped replica: copy the range from the master's mapping."""
        if length >= BULK:
            # a large range (a repair's chunks) goes in with pwrite: the same page cache the
            # mapping shows, without a page fault, and the zeroing of a new page, for every
            # 4 KiB not yet touched through the mapping (1.8x faster on tmpfs)
            self._write(offset, length, durable=False)
            return
        try:
            self._dst[offset:offset + length] = self._src[offset:offset + length]  # type: ignore[index]
        except (TypeError, ValueError):  # closed meanwhile (its view released)
            raise ReplicaError(errno.EBADF, f"{self.name} is not open") from None

    def _copy_and_persist(self, offset: int, length: int, lane: int = 0,
                          flags: int = 0) -> None:
        self._copy(offset, length)
        self._map.persist(offset, length)  # type: ignore[union-attr]

    def _check_links(self, lane: int = 0) -> None:
        """drain of a mapped replica: the copies are in place; are its parts still files?
        (No fd guard: a target closed meanwhile has failed already, whatever this says.)"""
        try:
            for fd in self._fds:
                if os.fstat(fd).st_nlink == 0:
                    raise ReplicaError(errno.ENOENT, f"{self.name}: part file was removed")
        except ReplicaError:
            raise
        except OSError as e:
            raise ReplicaError(errno.EBADF, f"{self.name} is not open: {e.strerror}") from e

    def flush(self, offset: int, length: int, lane: int = 0, flags: int = 0) -> None:
        if self._background is not None:
            self._background.submit(offset, length)
        else:
            self._write(offset, length)

    def drain(self, lane: int = 0) -> None:
        if not self._fds or self._closing:
            raise ReplicaError(errno.EBADF, f"{self.name} is not open")
        background = self._background
        if background is not None:
            background.wait()
            if self._unsynced:
                self._sync_written()

    def write_through(self, offset: int, length: int) -> None:
        """HeaderPageKeeper: the range written now, durable at the next drain (a repair's
        copy: one fdatasync at its end instead of one per batch)."""
        background = self._background
        if background is None:  # mapped: a flush is a copy (or pwrite), done on return
            self.flush(offset, length)
            return
        background.wait()  # the flushes before it go first: a lane applies in issue order
        self._write(offset, length, durable=False)
        with self._sync_lock:
            self._unsynced = True

    def _sync_written(self) -> None:
        """fdatasync what write_through wrote. The flag is cleared before the sync, under
        the lock the sync holds, so a write flagged meanwhile is synced by its own drain."""
        with self._sync_lock:
            if not self._unsynced:
                return
            self._unsynced = False
            fds = self._acquire_fds()
            try:
                for fd in fds:
                    self._make_durable(fd)
            except OSError as e:
                self._unsynced = True
                if isinstance(e, ReplicaError):
                    raise
                raise ReplicaError(e.errno or errno.EIO, f"{self.name}: {e.strerror}") from e
            finally:
                self._release_fds()

    def persist(self, offset: int, length: int, lane: int = 0, flags: int = 0) -> None:
        self.flush(offset, length, lane, flags)
        self.drain(lane)

    deep_persist = persist  # fdatasync reaches the deepest domain a file system offers

    def read(self, dest: memoryview, offset: int, lane: int = 0) -> None:
        self.drain(lane)  # what was flushed before is what a read must see
        fds = self._acquire_fds()
        try:
            for fd, foff, poff, n in self._pieces(fds, offset, len(dest)):
                at = poff - offset
                if os.preadv(fd, [dest[at:at + n]], foff) != n:
                    raise ReplicaError(errno.EIO, f"{self.name}: short read at {poff}")
        finally:
            self._release_fds()

    def set_attr(self, attr: PoolAttr) -> None:
        """Rewrite the attributes in every part header; the other parts' uuids stay."""
        files = self._usable()
        hdr = attr.to_header()
        uuids = [h.header.uuid for h in files.read_headers() if h.header is not None]
        uuids[0] = hdr.uuid  # part 0 takes the attributes' uuid, as PMDK's set_attr does
        files.write_headers(hdr, uuids, hdr.prev_repl, hdr.next_repl)

    def stat(self) -> TargetStat:
        headers, problems = self._usable().check()
        page = headers[0].raw if headers else None
        return TargetStat(size=self.files.pool_size, healthy=not problems,
                          detail="; ".join(problems),
                          generation=generation.of_page(page) if page else None)

    def store_generation(self, record: generation.Generation) -> None:
        try:
            generation.store(self._usable().paths[0], record)
        except OSError as e:
            raise ReplicaError(e.errno or errno.EIO, f"{self.name}: cannot record the "
                                                     f"generation: {e.strerror or e}") from e

    def map_replica(self) -> Mapping:
        """MappedTarget: the part files mapped, for a repair to copy from and verify to hash
        in place."""
        return self._usable().open()

    def header_pages(self) -> HeaderPages:
        """HeaderPageKeeper: each header part's page and the problems of its part files and
        headers, as :meth:`LocalReplicaFiles.check` finds them."""
        headers, problems = self._usable().check()
        return HeaderPages(tuple(h.raw for h in headers), tuple(problems))

    def clear_header(self, record: bytes) -> None:
        """HeaderPageKeeper: part 0's header zeroed, ``record`` kept in its page."""
        self._usable().clear_header(record)

    def write_headers(self, template: PoolHeader, uuid: _uuid.UUID, prev_repl: _uuid.UUID,
                      next_repl: _uuid.UUID, record: bytes | None = None,
                      gen: bytes | None = None) -> None:
        """HeaderPageKeeper: every part's header; part 0's page with ``record`` and ``gen``
        in the same write."""
        files = self._usable()
        uuids = [uuid] + [_uuid.uuid4() for _ in range(files.nhdrs - 1)]
        files.write_headers(template, uuids, prev_repl, next_repl, state=record, gen=gen)

    def store_record(self, record: bytes) -> None:
        """HeaderPageKeeper: the replica-state record's copy, into part 0's page."""
        store_copy(self._usable().paths[0], record)

    def close(self) -> None:
        background, self._background = self._background, None
        if background is not None:
            background.close()
        mapping, self._map = self._map, None
        if mapping is not None:
            self._dst = None
            self.__dict__.pop("flush", None)
            self.__dict__.pop("drain", None)
            try:
                mapping.close()
            except BufferError:  # a copy in flight on another lane: unmapped when it ends
                pass
        with self._use_lock:
            self._closing = True
            if not self._inflight:
                self._close_fds()

    def _close_fds(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)


class _Background:
    """A replica's writes, applied in order on a thread of their own: ``submit`` queues a
    range, ``wait`` returns when every queued range is durable or raises the first error
    (after which the replica takes no more writes)."""

    def __init__(self, write, name: str) -> None:
        self._write = write
        self._cond = threading.Condition()
        self._queue: collections.deque[tuple[int, int]] = collections.deque()
        self._busy = 0  # ranges queued or being written
        self._error: OSError | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=f"pmreplica writer {name}",
                                        daemon=True)
        self._thread.start()

    def submit(self, offset: int, length: int) -> None:
        with self._cond:
            if self._error is not None:
                raise self._error
            self._queue.append((offset, length))
            self._busy += 1
            self._cond.notify_all()

    def wait(self) -> None:
        with self._cond:
            while self._busy and self._error is None:
                self._cond.wait()
            if self._error is not None:
                raise self._error

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                offset, length = self._queue.popleft()
            try:
                self._write(offset, length)
                error = None
            except OSError as e:
                error = e
            with self._cond:
                self._busy -= 1
                if error is not None and self._error is None:
                    self._error = error
                    self._busy -= len(self._queue)
                    self._queue.clear()  # the replica failed: what is queued need not go
                self._cond.notify_all()

    def close(self) -> None:
        """Finish what is queued and stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()


@hookimpl(trylast=True)
def pmreplica_open_replica(spec, index, poolset, create):
    if not isinstance(spec, LocalReplica):
        return None
    return LocalTarget(poolset.set_file, spec, poolset.size, getattr(poolset, "buf", None),
                       describe(spec, index),
                       lambda done, total: poolset.report_progress(index, "create", done, total),
                       sparse=poolset.sparse)


@hookimpl(trylast=True)
def pmreplica_remove_replica(spec, index, force, remove_pool_set):
    if not isinstance(spec, LocalReplica):
        return None
    remove_parts(spec, force)
    return True

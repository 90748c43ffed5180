"""An example third-party pmreplica plugin: ``REPLICA filestore NAME`` keeps the replica as
one file, ``NAME``, in the directory ``$PMREPLICA_FILESTORE`` (default
``/var/tmp/pmreplica-filestore``): a header page, then the pool's data at its own offsets.

Written against :class:`pmreplica.ReplicaTarget` and nothing else of pmreplica's: pool sets
write it, and ``replica-sync``/``pmreplica check`` probe it (``open``, ``stat``), recreate it
(the remove hook, ``create``), copy into it (``flush``/``drain``), give it its headers
(``set_attr``) and verify it by reading it back (``read``: it computes no digests of its
own); ``pmreplica info`` shows where it is kept (the describe hook). It keeps the pool's
generation too (``store_generation``), so that it is never taken for current when it missed
writes.
"""

from __future__ import annotations

import errno
import os
import struct
import zlib

from pmreplica import (PoolAttr, RemoteReplica, ReplicaError, TargetStat, generation,
                       hookimpl)

NODE = "filestore"
MAGIC = b"PMRFSTOR"
_HEAD = struct.Struct("<8s104sI")  # magic, the pool attributes, crc32 of both
GEN_AT = 512  # where the generation record is kept in the header page
PAGE = 4096


def directory() -> str:
    return os.environ.get("PMREPLICA_FILESTORE", "/var/tmp/pmreplica-filestore")


def _error(e: OSError, name: str) -> ReplicaError:
    return ReplicaError(e.errno or errno.EIO, f"filestore replica {name}: {e.strerror or e}")


class FileTarget:
    """One replica: a file of the pool's size. A flush is a pwrite, a drain an fdatasync."""

    nlanes = 64

    def __init__(self, name: str, pool) -> None:
        self.name = name
        self.path = os.path.join(directory(), name)
        self.pool = pool  # pmreplica's view of the pool: pool.buf holds the bytes to copy
        self.fd = -1

    # -- lifecycle -------------------------------------------------------------------------
    def create(self, attr: PoolAttr) -> None:
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.ftruncate(self.fd, self.pool.size)
        except OSError as e:
            raise _error(e, self.name) from e
        self.set_attr(attr)

    def open(self) -> PoolAttr:
        try:
            self.fd = os.open(self.path, os.O_RDWR)
        except OSError as e:
            raise _error(e, self.name) from e
        attr, problem = self._header()
        if attr is None:
            self.close()
            raise ReplicaError(errno.EINVAL, f"filestore replica {self.name}: {problem}")
        return attr

    def _header(self) -> tuple[PoolAttr | None, str]:
        head = os.pread(self.fd, _HEAD.size, 0)
        if os.fstat(self.fd).st_size < self.pool.size:
            return None, "shorter than the pool"
        magic, attr, crc = _HEAD.unpack(head)
        if magic != MAGIC or zlib.crc32(magic + attr) != crc:
            return None, "its header is damaged"
        return PoolAttr.unpack(attr), ""

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    # -- the write path --------------------------------------------------------------------
    def flush(self, offset: int, length: int, lane: int = 0, flags: int = 0) -> None:
        try:
            if os.pwrite(self.fd, self.pool.buf[offset:offset + length], offset) != length:
                raise OSError(errno.EIO, "short write")
        except OSError as e:
            raise _error(e, self.name) from e

    def drain(self, lane: int = 0) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            raise _error(e, self.name) from e

    def persist(self, offset: int, length: int, lane: int = 0, flags: int = 0) -> None:
        self.flush(offset, length, lane, flags)
        self.drain(lane)

    deep_persist = persist

    # -- what repair and verify use ----------------------------------------------------------
    def read(self, dest: memoryview, offset: int, lane: int = 0) -> None:
        if os.preadv(self.fd, [dest], offset) != len(dest):
            raise ReplicaError(errno.EIO, f"filestore replica {self.name}: short read")

    def set_attr(self, attr: PoolAttr) -> None:
        raw = attr.pack()
        os.pwrite(self.fd, _HEAD.pack(MAGIC, raw, zlib.crc32(MAGIC + raw)), 0)
        os.fdatasync(self.fd)

    def stat(self) -> TargetStat:
        """Health without opening for writing (repair asks it when ``open`` failed)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            return TargetStat(self.pool.size, False, f"{self.path}: {e.strerror}")
        was, self.fd = self.fd, fd
        try:
            attr, problem = self._header()
            record = os.pread(fd, generation.SIZE, GEN_AT)
        finally:
            self.fd = was
            os.close(fd)
        return TargetStat(self.pool.size, attr is not None, problem,
                          generation.Generation.unpack(record))

    def store_generation(self, record: generation.Generation) -> None:
        """The pool's generation, kept in the header page (pmreplica's GenerationKeeper)."""
        os.pwrite(self.fd, record.pack(), GEN_AT)
        os.fdatasync(self.fd)


@hookimpl
def pmreplica_open_replica(spec, index, poolset, create):
    if isinstance(spec, RemoteReplica) and spec.node == NODE:
        return FileTarget(spec.pool_set, poolset)
    return None


@hookimpl
def pmreplica_describe_replica(spec, index):
    if isinstance(spec, RemoteReplica) and spec.node == NODE:
        return [("storage", os.path.join(directory(), spec.pool_set))]
    return None


@hookimpl
def pmreplica_remove_replica(spec, index, force, remove_pool_set):
    if not isinstance(spec, RemoteReplica) or spec.node != NODE:
        return None
    try:
        os.unlink(os.path.join(directory(), spec.pool_set))
    except FileNotFoundError:
        if not force:
            raise
    return True

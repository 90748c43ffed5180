"""Mapped pool files and making ranges of them durable; an ``nvm.pmem``-compatible surface.

On a DAX mapping (MAP_SYNC accepted, or libpmem says pmem) durability is a CPU cache flush
through libpmem (Debian's ``libpmem1``, loaded with ctypes when present); elsewhere it is
``msync(MS_SYNC)`` over the page-aligned range, as librpmem did off pmem.

:class:`Mapping` maps one or more file segments as one contiguous range: a Python anonymous
``mmap`` reserves the range (and guards it: closing refuses while views are exported) and the
segments are mapped over it with ``MAP_FIXED`` through libc, since :mod:`mmap` cannot place a
mapping. libc's ``msync`` is called through ctypes because CPython's ``mmap.flush`` holds the
GIL while it waits.

Power-loss simulation (:mod:`pmreplica.powerloss`) observes mappings through
:func:`set_observer`: each Mapping made while an observer is set is handed to it, which
wraps that mapping's ``persist``/``flush``/``drain`` on the instance. Mappings made without
one keep the plain methods, so the simulation costs the normal path nothing.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections import namedtuple
from collections.abc import Callable, Sequence

from .errors import PmReplicaError
from .files import open_regular

PAGE_SIZE = mmap.PAGESIZE
_PAGE_MASK = ~(PAGE_SIZE - 1)

# nvm.pmem file flags (libpmem's PMEM_FILE_*)
FILE_CREATE = 1
FILE_EXCL = 2
FILE_SPARSE = 4
FILE_TMPFILE = 8

_MAP_SHARED_VALIDATE = 0x03
_MAP_SYNC = 0x80000
_MAP_FIXED = 0x10
MAP_NORESERVE = 0x4000  # Linux; the mmap module does not name it
_MS_SYNC = 4

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.msync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MADV_POPULATE_READ = 22  # Linux 5.14; the mmap module does not name it
_libc.fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
_MAP_FAILED = ctypes.c_void_p(-1).value
# file systems whose msync has nothing to write back (Linux: shmem's fsync is noop_fsync)
_MEMORY_FS = {0x01021994: "tmpfs", 0x858458F6: "ramfs"}


def _load_libpmem() -> ctypes.CDLL | None:
    """libpmem if installed; pmreplica works without it (msync only)."""
    try:  # by soname: ctypes.util.find_library would run ldconfig, slowing every start
        lib = ctypes.CDLL("libpmem.so.1")
    except OSError:
        return None
    for fn in ("pmem_persist", "pmem_flush", "pmem_deep_persist"):
        getattr(lib, fn).argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.pmem_deep_persist.restype = ctypes.c_int
    lib.pmem_is_pmem.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.pmem_is_pmem.restype = ctypes.c_int
    lib.pmem_check_version.argtypes = [ctypes.c_uint, ctypes.c_uint]
    lib.pmem_check_version.restype = ctypes.c_char_p
    lib.pmem_drain.argtypes = []
    return lib


# libpmem is loaded only for mappings that may be pmem: a real DAX mapping (MAP_SYNC held)
# or PMEM_IS_PMEM_FORCE set, the only cases its pmem_is_pmem() says yes for ours
libpmem: ctypes.CDLL | None = None
_libpmem_looked_for = False


def _pmem_lib() -> ctypes.CDLL | None:
    global libpmem, _libpmem_looked_for
    if not _libpmem_looked_for:
        libpmem, _libpmem_looked_for = _load_libpmem(), True
    return libpmem


#: the power-loss simulation new mappings are handed to (None: normal operation); typed
#: ``object``: the remote agent imports this module, and its start stays without typing
_observer: object = None


def set_observer(observer: object) -> object:
    """Hand every Mapping made from now on to ``observer.attach(mapping)`` (None: stop);
    returns the observer that was set before."""
    global _observer
    previous, _observer = _observer, observer
    return previous


def _oserror(what: str, path: str | None = None) -> PmReplicaError:
    err = ctypes.get_errno() or errno.EIO
    where = f" {path}" if path else ""
    return PmReplicaError(err, f"{what}{where}: {os.strerror(err)}")


def memory_backed(fd: int) -> bool:
    """True if the file lives on tmpfs or ramfs, where RAM is its only storage."""
    buf = ctypes.create_string_buffer(128)  # struct statfs; f_type is its first field
    if _libc.fstatfs(fd, buf) != 0:
        return False
    return ctypes.c_long.from_buffer(buf).value in _MEMORY_FS


def buffer_address(buf: object) -> int:
    """The address of a writable buffer's first byte (for libc, libpmem and pyverbs). The
    ctypes object that reads it is dropped at once: a live export would block closing an
    mmap."""
    anchor = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


def msync_range(addr: int, length: int) -> None:
    """``msync(MS_SYNC)`` over the pages covering ``[addr, addr+length)``; GIL released."""
    start = addr & _PAGE_MASK
    if _libc.msync(start, addr + length - start, _MS_SYNC) != 0:
        raise _oserror("msync")


class Segment(namedtuple("Segment", "path file_offset length pool_offset")):
    """``length`` bytes of ``path`` from ``file_offset``, placed at ``pool_offset``."""

    __slots__ = ()


#: bytes allocated per step when a part is created (progress advances this much)
ALLOC_STEP = 256 << 20


def open_part(path: str, size: int, *, create: bool, mode: int = 0o666,
              sparse: bool = False, progress: Callable[[int], None] | None = None) -> int:
    """Open (or exclusively create with ``size`` bytes allocated) a part file; return its fd.

    Creation allocates the blocks up front (``posix_fallocate``) so that a full file system
    is an ENOSPC now, not a SIGBUS on a later store into the mapping; in steps, telling
    ``progress`` the bytes allocated so far after each."""
    if create:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            if sparse:
                os.ftruncate(fd, size)
            else:
                for off in range(0, size, ALLOC_STEP):
                    os.posix_fallocate(fd, off, min(ALLOC_STEP, size - off))
                    if progress is not None:
                        progress(min(off + ALLOC_STEP, size))
        except BaseException as e:
            os.close(fd)
            os.unlink(path)
            if isinstance(e, OSError):
                raise PmReplicaError(e.errno or errno.EIO, f"{path}: cannot allocate {size} "
                                                           f"bytes: {e.strerror}") from None
            raise
        return fd
    fd = open_regular(path, os.O_RDWR)
    have = os.fstat(fd).st_size
    if have < size:
        os.close(fd)
        raise PmReplicaError(errno.EINVAL, f"{path}: file size {have} is smaller than the "
                                           f"{size} bytes the pool set gives it")
    return fd


class Mapping:
    """File segments mapped as one contiguous, writable range.

    ``buf`` is a memoryview of the whole range. ``persist``/``flush``/``drain`` take offsets
    into it. ``close`` unmaps (it raises BufferError while views of ``buf`` are alive)."""

    def __init__(self, segments: Sequence[Segment], fds: dict[str, int]) -> None:
        self.segments = tuple(segments)
        self.size = max(s.pool_offset + s.length for s in segments)
        # MAP_NORESERVE: the reservation is replaced by the file mappings at once, and a
        # pool larger than RAM must not be refused by the kernel's overcommit heuristic
        self._reservation = mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | MAP_NORESERVE)
        self.addr = buffer_address(self._reservation)
        synced = True
        try:
            for seg in segments:
                synced &= self._map_segment(seg, fds[seg.path])
        except BaseException:
            self._reservation.close()
            raise
        self.buf = memoryview(self._reservation)
        lib = _pmem_lib() if synced or os.environ.get("PMEM_IS_PMEM_FORCE") else None
        self.is_pmem = bool(synced or (lib and lib.pmem_is_pmem(self.addr, self.size)))
        self._flush = lib.pmem_flush if self.is_pmem and lib else None
        # on tmpfs msync is a system call that does nothing: the page cache is the storage
        self._msync = not all(memory_backed(fd) for fd in fds.values())
        #: False when stores are durable as they are (RAM-backed files off pmem): callers on
        #: a hot path may skip persist/flush calls then
        self.flush_needed = self._flush is not None or self._msync
        if _observer is not None:
            _observer.attach(self)  # type: ignore[attr-defined]

    def _map_segment(self, seg: Segment, fd: int) -> bool:
        """Map one segment over its place in the reservation; True if MAP_SYNC held."""
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        where = self.addr + seg.pool_offset
        for flags, synced in ((_MAP_SHARED_VALIDATE | _MAP_SYNC, True), (mmap.MAP_SHARED, False)):
            got = _libc.mmap(where, seg.length, prot, flags | _MAP_FIXED, fd, seg.file_offset)
            if got != _MAP_FAILED:
                return synced
            if ctypes.get_errno() not in (errno.EOPNOTSUPP, errno.EINVAL):
                break
        raise _oserror("mmap", seg.path)

    @classmethod
    def open(cls, segments: Sequence[Segment], *, create: bool = False, mode: int = 0o666,
             sparse: bool = False) -> "Mapping":
        """Open or create the segments' files and map them."""
        sizes: dict[str, int] = {}
        for s in segments:
            sizes[s.path] = max(sizes.get(s.path, 0), s.file_offset + s.length)
        fds: dict[str, int] = {}
        try:
            for path, size in sizes.items():
                fds[path] = open_part(path, size, create=create, mode=mode, sparse=sparse)
            return cls(segments, fds)
        except BaseException:
            if create:
                for path in fds:
                    os.unlink(path)
            raise
        finally:
            for fd in fds.values():
                os.close(fd)

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise PmReplicaError(errno.EINVAL, f"range {offset}+{length} is outside the "
                                               f"{self.size}-byte mapping")

    def persist(self, offset: int, length: int) -> None:
        """Make ``[offset, offset+length)`` durable."""
        self._check(offset, length)
        if self._flush is not None:
            libpmem.pmem_persist(self.addr + offset, length)
        elif self._msync:
            msync_range(self.addr + offset, length)

    def flush(self, offset: int, length: int) -> None:
        """First half of persist: CPU cache flush on pmem, msync elsewhere."""
        self._check(offset, length)
        if self._flush is not None:
            self._flush(self.addr + offset, length)
        elif self._msync:
            msync_range(self.addr + offset, length)

    def drain(self) -> None:
        """Second half of persist: wait for flushed stores (a fence on pmem)."""
        if self._flush is not None:
            libpmem.pmem_drain()

    def deep_persist(self, offset: int, length: int) -> None:
        """Persist through the memory controller's buffers too (libpmem's deep flush)."""
        self._check(offset, length)
        if self._flush is not None and libpmem.pmem_deep_persist(self.addr + offset, length) == 0:
            return
        if self._msync:
            msync_range(self.addr + offset, length)

    def prefetch(self, offset: int, length: int) -> None:
        """Map the pages of ``[offset, offset+length)`` ahead of reading them (madvise
        POPULATE_READ through ctypes, which lets other threads run meanwhile: the page
        faults of one replica's range overlap the hashing of another's). A kernel without
        it just leaves the faults to the reads."""
        start = offset & _PAGE_MASK
        end = min(offset + length, self.size)
        if start < end and not self._reservation.closed:
            _libc.madvise(self.addr + start, end - start, _MADV_POPULATE_READ)

    def release(self, offset: int, length: int) -> None:
        """Let go of the pages of ``[offset, offset+length)`` this process has mapped
        (madvise DONTNEED, the pages wholly inside): a repair or a verify that reads a pool
        once keeps its resident memory bounded. The data stays in the files (the mapping
        is shared): a later access maps the pages again."""
        start = -(-offset // PAGE_SIZE) * PAGE_SIZE
        end = min(offset + length, self.size) & _PAGE_MASK
        if start < end and not self._reservation.closed:
            self._reservation.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        """Unmap. Raises BufferError while memoryviews of ``buf`` are still alive, the
        mapping and a new ``buf`` then usable as before."""
        if self._reservation.closed:
            return
        self.buf.release()
        try:
            self._reservation.close()
        except BufferError:
            self.buf = memoryview(self._reservation)
            raise

    @property
    def closed(self) -> bool:
        return self._reservation.closed


# ---------------------------------------------------------------------------------------
# nvm.pmem compatibility: whole-buffer functions over a MemoryBuffer from map_file().

class MemoryBuffer:
    """A mapped file with a file-like cursor, as ``nvm.pmem.MemoryBuffer``."""

    def __init__(self, mapping: Mapping) -> None:
        self._mapping = mapping
        self.buffer = mapping.buf
        self.is_pmem = mapping.is_pmem
        self.mapped_len = self.size = mapping.size
        self.pos = 0

    def __len__(self) -> int:
        return self.size

    def write(self, data: bytes) -> None:
        end = self.pos + len(data)
        if end > self.size:
            raise RuntimeError("Out of range error.")
        self.buffer[self.pos:end] = data
        self.pos = end

    def read(self, size: int = 0) -> bytes:
        if size <= 0:
            if self.pos >= self.size:
                raise EOFError("End of file.")
            size = self.size - self.pos
        elif self.pos + size > self.size:
            raise RuntimeError("Out of range error.")
        data = bytes(self.buffer[self.pos:self.pos + size])
        self.pos += size
        return data

    def seek(self, pos: int) -> None:
        if pos < 0:
            raise RuntimeError("Negative position.")
        if pos > self.size:
            raise RuntimeError("Out of range error.")
        self.pos = pos

    def __enter__(self) -> "MemoryBuffer":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            persist(self)
            unmap(self)
        return False


def map_file(file_name: str | os.PathLike[str], file_size: int, flags: int,
             mode: int) -> MemoryBuffer:
    """Map a whole file (creating it with ``FILE_CREATE``), like ``pmem_map_file``."""
    path = os.fspath(file_name)
    if flags & FILE_TMPFILE:
        raise PmReplicaError(errno.ENOTSUP, "FILE_TMPFILE is not supported")
    exists = os.path.exists(path)
    if flags & FILE_CREATE and flags & FILE_EXCL and exists:
        raise PmReplicaError(errno.EEXIST, f"{path}: file exists")
    create = bool(flags & FILE_CREATE) and not exists
    if not create:
        file_size = os.stat(path).st_size if not file_size else file_size
    if file_size <= 0:
        raise PmReplicaError(errno.EINVAL, f"{path}: invalid size {file_size}")
    if flags & FILE_CREATE and exists:  # as libpmem: extended or truncated to the size asked
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, file_size)
            if not flags & FILE_SPARSE:
                os.posix_fallocate(fd, 0, file_size)
        finally:
            os.close(fd)
    mapping = Mapping.open([Segment(path, 0, file_size, 0)], create=create, mode=mode,
                           sparse=bool(flags & FILE_SPARSE))
    return MemoryBuffer(mapping)


def unmap(memory_buffer: MemoryBuffer) -> None:
    """Unmap; BufferError while a slice of ``buffer`` is alive (a memoryview here, where
    pynvm's cffi buffer gave bytes), the buffer then usable as before."""
    try:
        memory_buffer._mapping.close()
    except BufferError:
        memory_buffer.buffer = memory_buffer._mapping.buf
        raise


def is_pmem(memory_buffer: MemoryBuffer) -> bool:
    return memory_buffer._mapping.is_pmem


def persist(memory_buffer: MemoryBuffer) -> None:
    memory_buffer._mapping.persist(0, memory_buffer.size)


def msync(memory_buffer: MemoryBuffer) -> int:
    m = memory_buffer._mapping
    msync_range(m.addr, m.size)
    return 0


def flush(memory_buffer: MemoryBuffer) -> None:
    memory_buffer._mapping.flush(0, memory_buffer.size)


def drain(memory_buffer: MemoryBuffer | None = None) -> None:
    if libpmem is not None:
        libpmem.pmem_drain()


def has_hw_drain() -> bool:
    """False: no platform this runs on has a separate hardware drain (PCOMMIT is gone)."""
    return False


def check_version(major_required: int, minor_required: int) -> bool:
    """True if libpmem offers the API version; RuntimeError saying why not otherwise."""
    lib = _pmem_lib()
    if lib is None:
        raise RuntimeError("libpmem is not installed (Debian package libpmem1)")
    reason = lib.pmem_check_version(major_required, minor_required)
    if reason is not None:
        raise RuntimeError(reason.decode())
    return True


class FlushContext:
    """Flush (and by default unmap) the buffer when the block ends without error."""

    def __init__(self, memory_buffer: MemoryBuffer, unmap: bool = True) -> None:
        self.memory_buffer, self.unmap = memory_buffer, unmap

    def __enter__(self) -> MemoryBuffer:
        return self.memory_buffer

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            flush(self.memory_buffer)
            if self.unmap:
                unmap(self.memory_buffer)
        return False


class DrainContext(FlushContext):
    """Drain (and by default unmap) the buffer when the block ends without error."""

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            drain(self.memory_buffer)
            if self.unmap:
                unmap(self.memory_buffer)
        return False

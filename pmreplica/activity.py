"""The activity log: the areas of a pool its open session handed to persist, flush or deep
persist, so that a reopen after a crash brings them in line on every replica (DRBD's
activity log, for a mapped pool).

A persist that never returned (the process was killed, the host lost power) may have
reached the master and not a replica, or a replica and not the master. With every replica
still recorded in step, the application would go on from the master's bytes while a
replica kept others, and a later failover would hand it those. So:

* the **marker**, 20 bytes in the master's part-0 header page at :data:`MARKER_OFFSET`
  (after the generation record, before PMDK's shutdown state; outside the header checksum):
  magic, flags, session id, CRC32. It is set durably when a pool set with replicas is
  opened and cleared when it is closed cleanly. Set on open: the last session did not close.
* the **log**, ``<master part 0>.pmractive``: a header page (magic, session, chunk size,
  chunk count, CRC32) and a byte per chunk (:func:`chunk_for`: 1 MiB and up, at most 65,536
  chunks). A chunk's byte is made durable (``pwrite``, ``fdatasync``) before the first range
  of the session that touches it reaches any replica or the master's persist; later ranges
  in it pay nothing.
* **epochs** keep the log to what the session wrote lately, as DRBD bounds its activity
  log: an epoch ends once half of ``PMREPLICA_ACTIVITY_MIB`` (4 GiB by default) worth of
  chunks new to the log were named, and the chunks that no call named during the epoch
  before leave the log, durably (those of flushes not yet drained stay). Every chunk then
  counts as not named again, so the write path comes back to :meth:`ActivityLog.mark`
  for it once per epoch, which writes nothing for a chunk still in the file. A chunk
  leaves only once no call can be writing to it: :mod:`pmreplica.session` lets an epoch
  end only after every call in flight when the last one began has returned.

:func:`recover`, run under the pool's lock before anything reads the replica-state record,
turns an unclean session's chunks (every chunk when its log is missing, damaged, of another
session, or could not be kept) into the record's own terms: each replica not yet stale is
marked stale, and the chunks are marked written (:mod:`pmreplica.state`), durably, before
the marker is replaced by one naming a session of nothing. From there the pool's usual
repair brings them over from the master: ``PoolSet.open`` resyncs every stale replica it
can open before it returns, ``replica-sync`` copies them. The marker stays set until a
session closes cleanly, so a crash at any step of that (the fold, a resync) leaves the
whole of it to the next open.

Stores into the mapping that no persist, flush or deep persist named since their chunk
was last in the log are outside it, as they are outside PMDK's guarantees: their bytes are
undefined after a crash and may differ between replicas (``replica-sync --verify`` finds
such differences).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
import struct
import zlib
from typing import NamedTuple

from . import dirtymap
from .errors import PmReplicaError
from .files import not_regular, open_regular, pwrite_all, sync_dir
from .header import HDR_SIZE
from .replica import MARKER_OFFSET, RECORDS_END
from .setfile import PoolSetFile
from .state import OFFSET as STATE_OFFSET, ReplicaState, store_copy

log = logging.getLogger(__name__)

_MARKER = struct.Struct("<4sIQ")  # magic, flags, session; then the CRC32 of those
MARKER_SIZE = _MARKER.size + 4
assert MARKER_OFFSET + MARKER_SIZE == RECORDS_END
_MARKER_MAGIC = b"PMRA"
_LOGGED = 1  # flag: the log holds every chunk the session touched (else any may be)

SUFFIX = ".pmractive"
MIN_CHUNK = 1 << 20
MAX_CHUNKS = 1 << 16
_FILE_MAGIC = b"PMRACTIV"
_FILE_HEAD = struct.Struct("<8sQQQ")  # magic, session, chunk, chunk count; then its CRC32
MAP_OFFSET = 4096  # the map starts a page after the header: its writes never touch it
ENV = "PMREPLICA_ACTIVITY_MIB"
#: what an unclean reopen copies at most, about (DRBD's default activity log covers 4.8 GB)
DEFAULT_MIB = 4096
_RUNS = re.compile(rb"[^\x00]+")  # logged chunks, found at C speed


def chunk_for(pool_size: int) -> int:
    """The log's chunk for a pool: a power of two >= 1 MiB, at most :data:`MAX_CHUNKS`."""
    return dirtymap.chunk_covering(pool_size, MIN_CHUNK, MAX_CHUNKS)


def path_for(part0: str) -> str:
    """Where the log of the pool whose master's first part is ``part0`` lives."""
    return part0 + SUFFIX


class Marker(NamedTuple):
    """The marker of a session that has not closed: ``session`` names its log (0: a log
    of nothing), ``logged`` is False when no log covers it (any chunk may have been
    written)."""

    session: int
    logged: bool = True

    def pack(self) -> bytes:
        body = _MARKER.pack(_MARKER_MAGIC, _LOGGED if self.logged else 0, self.session)
        return body + zlib.crc32(body).to_bytes(4, "little")


CLEAR = bytes(MARKER_SIZE)


def read_marker(page: bytes | memoryview) -> Marker | None:
    """The marker in a part-0 header page; None when the pool was closed cleanly. A damaged
    marker (a power cut tore it) reads as a session without a log."""
    raw = bytes(page[MARKER_OFFSET:MARKER_OFFSET + MARKER_SIZE])
    if raw == CLEAR:
        return None
    magic, flags, session = _MARKER.unpack_from(raw)
    if magic != _MARKER_MAGIC or zlib.crc32(raw[:_MARKER.size]) != int.from_bytes(
            raw[_MARKER.size:], "little"):
        return Marker(0, logged=False)
    return Marker(session, bool(flags & _LOGGED))


def epoch_chunks(pool_size: int) -> int:
    """Chunks new to the log after which an epoch ends: half of ``PMREPLICA_ACTIVITY_MIB``
    (default :data:`DEFAULT_MIB`) worth of them, at least one."""
    raw = os.environ.get(ENV, "")
    try:
        mib = int(raw) if raw else DEFAULT_MIB
        if mib < 1:
            raise ValueError
    except ValueError:
        raise PmReplicaError(errno.EINVAL, f"{ENV}={raw!r}: a number of MiB (1 or more) "
                                           "is wanted") from None
    return max(1, (mib << 20) // 2 // chunk_for(pool_size))


class ActivityLog:
    """The log of the session that has the pool open: :meth:`mark` before a range goes
    out. ``logged`` has a byte per chunk, set once the chunk is durably in the log and
    named in the current epoch: the write path reads it to skip the log for such chunks.
    :meth:`new_epoch` lets go of the chunks no call named during the epoch that ends."""

    def __init__(self, path: str, pool_size: int, session: int, epoch: int) -> None:
        self.path, self.session = path, session
        self.chunk = chunk_for(pool_size)
        self.shift = self.chunk.bit_length() - 1
        self.logged = bytearray(-(-pool_size // self.chunk))
        #: the chunks durably in the file (``logged`` is those named this epoch as well)
        self._infile = bytearray(len(self.logged))
        #: chunks new to the file after which :attr:`epoch_over` turns true
        self.epoch = epoch
        #: chunks new to the file this epoch
        self.fresh = 0
        self._fd = -1

    @classmethod
    def begin(cls, part0: str, pool_size: int, epoch: int) -> "ActivityLog":
        """A new, empty log for a session, made durable (the marker naming it is set
        after); an epoch ends every ``epoch`` chunks new to it. Raises OSError when the
        file cannot be made."""
        out = cls(path_for(part0), pool_size, int.from_bytes(os.urandom(8), "little") or 1,
                  epoch)
        head = _FILE_HEAD.pack(_FILE_MAGIC, out.session, out.chunk, len(out.logged))
        head += zlib.crc32(head).to_bytes(4, "little")
        # never through a link, nor into what is not a regular file: it is emptied
        fd = os.open(out.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_CLOEXEC, 0o600)
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise not_regular(out.path, mode)
            os.ftruncate(fd, 0)
            # the map padded to whole pages: the file is a whole number of blocks
            pwrite_all(fd, head.ljust(MAP_OFFSET + -(-len(out.logged) // MAP_OFFSET) * MAP_OFFSET,
                                      b"\0"), 0, out.path)
            os.fdatasync(fd)
            sync_dir(os.path.dirname(out.path) or ".")  # the new name, durably
        except BaseException as e:
            os.close(fd)
            if not isinstance(e, PmReplicaError):  # not something else that stood there
                dirtymap.remove(out.path)  # nothing half-made is left (a full disk, say)
            raise
        out._fd = fd
        return out

    def mark(self, offset: int, length: int) -> None:
        """Put the chunks of ``[offset, offset+length)`` in the log, durably (the caller
        holds the pool's state lock). Raises OSError when the log cannot be written."""
        if length <= 0:
            return
        first, last = offset >> self.shift, (offset + length - 1) >> self.shift
        logged, infile = self.logged, self._infile
        if logged.find(0, first, last + 1) < 0:
            return
        ones = b"\1" * (last - first + 1)
        new = last - first + 1 - infile.count(1, first, last + 1)
        if new:
            pwrite_all(self._fd, ones, MAP_OFFSET + first, self.path)
            os.fdatasync(self._fd)
            infile[first:last + 1] = ones
            self.fresh += new
        logged[first:last + 1] = ones  # named this epoch: in the file already, or now

    @property
    def epoch_over(self) -> bool:
        """True once the current epoch has seen :attr:`epoch` chunks new to the log."""
        return self.fresh >= self.epoch

    def new_epoch(self, keep: list[tuple[int, int]]) -> int:
        """End the epoch: the chunks no call named during it leave the log, durably, except
        those ``keep`` touches; then every chunk counts as not named (the write path comes
        back through :meth:`mark` for it, which costs no write for one still in the file).
        The caller makes sure that every call begun before the epoch that ends has
        returned: only such a call can still write to a chunk not named during it
        (see :mod:`pmreplica.session`). Returns the chunks let go of."""
        stay = bytearray(self.logged)
        for off, n in keep:
            if n > 0:
                a, b = off >> self.shift, (off + n - 1) >> self.shift
                stay[a:b + 1] = b"\1" * (b - a + 1)
        infile = self._infile
        n = len(infile)
        # in the file and named (or kept): the bytes are 0 or 1, so an AND of two big ints
        kept = (int.from_bytes(infile, "little") & int.from_bytes(stay, "little")
                ).to_bytes(n, "little")
        gone = infile.count(1) - kept.count(1)
        if gone:
            pwrite_all(self._fd, kept, MAP_OFFSET, self.path)
            os.fdatasync(self._fd)
            infile[:] = kept
        self.logged[:] = bytes(len(self.logged))
        self.fresh = 0
        return gone

    def end(self, delete: bool) -> None:
        """Close the log; ``delete``: and remove it (its marker is cleared, or says "any
        chunk": the log is of no more use)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if delete:
            dirtymap.remove(self.path)


def read_log(path: str, session: int, pool_size: int) -> list[tuple[int, int]] | None:
    """The chunks in the log at ``path`` as ``(offset, length)`` ranges; None when it is
    missing, damaged, or not ``session``'s."""
    chunk = chunk_for(pool_size)
    nchunks = -(-pool_size // chunk)
    try:
        fd = open_regular(path)
    except OSError:
        return None
    try:
        raw = os.pread(fd, MAP_OFFSET + nchunks, 0)
    finally:
        os.close(fd)
    head = raw[:_FILE_HEAD.size]
    crc = raw[_FILE_HEAD.size:_FILE_HEAD.size + 4]
    if (len(raw) < MAP_OFFSET + nchunks or zlib.crc32(head).to_bytes(4, "little") != crc
            or _FILE_HEAD.unpack(head) != (_FILE_MAGIC, session, chunk, nchunks)):
        return None
    out = []
    # a torn or stray byte reads as logged: never fewer chunks than were written
    for run in _RUNS.finditer(raw, MAP_OFFSET, MAP_OFFSET + nchunks):
        off = (run.start() - MAP_OFFSET) * chunk
        out.append((off, min((run.end() - run.start()) * chunk, pool_size - off)))
    return out


def logged_areas(part0: str, marker: Marker, pool_size: int) -> list[tuple[int, int]] | None:
    """What the session ``marker`` names wrote to, as ``(offset, length)`` ranges: its log's
    chunks (none for a session of nothing); None when no usable log covers it (any chunk
    may have been written)."""
    if not marker.logged:
        return None
    return read_log(path_for(part0), marker.session, pool_size) if marker.session else []


def store_marker(set_file: PoolSetFile, raw: bytes) -> None:
    """Write the marker ``raw`` into the master's part-0 page through its file, durably
    (the pool need not be mapped)."""
    store_copy(set_file.master.parts[0].path, raw, MARKER_OFFSET)


class Recovery(NamedTuple):
    """What folding an unclean session in does (:func:`plan`): the replicas to bring in
    line, the replica-state record to store (None: unchanged) and the state it packs, the
    marker to leave and what to tell the user once it is done."""

    replicas: list[int]
    record: bytes | None
    state: ReplicaState | None
    marker: bytes
    notes: tuple[str, ...]


def plan(set_file: PoolSetFile) -> Recovery | None:
    """How to fold an unclean session's log into the replica-state record of the pool set
    (see the module docstring), without writing anything; None after a clean close. Every
    replica is to be brought in line: those it marks stale, and those that were stale
    already (an earlier recovery that died after a replica's record and before its
    generation leaves it in step on the record and behind on the open)."""
    part0 = set_file.master.parts[0].path
    size = set_file.pool_size
    try:
        fd = open_regular(part0)
    except FileNotFoundError:
        return None
    try:
        page = os.pread(fd, HDR_SIZE, 0)
    finally:
        os.close(fd)
    marker = read_marker(page) if len(page) == HDR_SIZE else None
    if marker is None:
        return None
    areas = logged_areas(part0, marker, size)
    notes = []
    if areas is None:
        notes.append(f"{set_file.path} was not closed cleanly and its activity log is missing "
                     "or damaged: every replica is brought in line with the whole pool")
        areas = [(0, size)]
    # the fine map's side file is not rewritten: the record's ``recent`` chunks, united
    # with it on load, carry the areas
    state = ReplicaState.load(page, size, len(set_file.replicas), dirtymap.path_for(part0))
    marked = [i for i in range(1, len(set_file.replicas)) if not state.is_stale(i)]
    record, folded = None, None
    if areas and marked:
        for i in marked:
            state.mark_stale(i)
        for off, n in areas:
            state.mark_dirty(off, n)
        record, folded = state.pack(), state
        notes.append(f"{set_file.path} was not closed cleanly: the "
                     f"{-(-sum(n for _, n in areas) >> 20)} MiB it was writing to are to be "
                     f"brought in line on replica{'s' if len(marked) > 1 else ''} "
                     + ", ".join(map(str, marked)))
    return Recovery(list(range(1, len(set_file.replicas))), record, folded,
                    Marker(0).pack(), tuple(notes))


def recover(set_file: PoolSetFile) -> list[int]:
    """Fold an unclean session in (:func:`plan`), durably; returns the replicas to bring in
    line (none after a clean close). The pool's lock must be held."""
    found = apply(set_file, plan(set_file))
    return found.replicas if found is not None else []


def apply(set_file: PoolSetFile, found: Recovery | None) -> Recovery | None:
    """Store what :func:`plan` found, durably: the fine dirty map's side file when it can
    be saved (so that the replicas copy the log's chunks, not the record's coarse ones,
    which are 256 MiB at 1 TiB), the record, then the marker of a session of nothing (the
    areas are in the record now), then the log goes. Returns what was stored."""
    if found is None:
        return None
    for note in found.notes:
        log.warning("%s", note)
    part0 = set_file.master.parts[0].path
    if found.state is not None:
        # the side file first: a record naming its epoch is stored only once it is durable
        if found.state.save_fine(keep_working_set=False):
            found = found._replace(record=found.state.pack())
        store_copy(part0, found.record, STATE_OFFSET)
    store_marker(set_file, found.marker)
    dirtymap.remove(path_for(part0))
    return found


def settled(set_file: PoolSetFile) -> None:
    """Clear the marker an unclean session left, once every replica is in line (a
    replica-sync that repaired them all). The pool's lock must be held."""
    store_marker(set_file, CLEAR)

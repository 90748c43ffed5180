"""Replica state kept in the master's metadata: which replicas are stale, and which parts of
the pool were written while some replica missed writes (DRBD's bitmap and activity log).

The record lives in the master's part-0 header page at bytes 2048..3636 (PMDK's ``unused2``
area: outside the header checksum when CKSUM_2K is set and ignored by PMDK's tools, so PMDK
pools stay valid for them); pmreplica's generation record follows at 3640
(:mod:`pmreplica.generation`), PMDK's shutdown state at 4024. The record carries its own
CRC32; a record that fails it is treated as "every replica stale", the safe reading.

Copies of the record are kept at the same place in the part-0 header of every local replica
that takes writes, so that replica-sync can still tell stale replicas from fresh ones when
the master itself is lost. Every change of what a copy holds raises ``generation``: the
newest copy wins.
A replica in ``full_mask`` needs a complete resync (the maps do not cover what it lacks:
replica-sync was recreating it, or its header was broken); one in ``compare_mask`` is
brought in line by comparing checksums and copying what differs (it may hold writes the
source lacks: in flight when a master was lost and a replica promoted in its place).

What was written while a replica is stale is kept at two levels (a *period* runs from the
first failure to the repair of the last stale replica; each has a random id):

* the **fine map** (:mod:`pmreplica.dirtymap`): 4 KiB per bit up to 1 TiB pools, 64 KiB at
  16 TiB; in memory while the pool is open, saved to a side file next to the master's
  part 0 (``<part0>.pmrdirty``) in batches and on close. The header page has no room for
  it (1,592 bytes between the header and the generation record), space inside the pool
  belongs to the application, and pools made before (or by PMDK) reserve none: a side
  file serves them all.
* two **coarse maps** in the record, 6,080 bits each (1 MiB per bit at 4 GiB): ``coarse``,
  every chunk written in the period, and ``recent``, the chunks written since the fine map
  was last saved (``fine_epoch`` counts the saves; 0: none yet in this period).

Crash safety: a persist that skips a stale replica returns only after its chunk is set in
both coarse maps durably (a record store; the first write into a chunk pays it, later
ones nothing). A save writes the fine map's changed pages, fdatasyncs them, and only then
stores the record with ``fine_epoch`` raised and ``recent`` emptied (keeping the chunks
written in the batch just saved when they are few, so a hot working set does not pay a
store again at once). After a crash the pool's dirty set is therefore the side file's map,
when it belongs to the record's period and epoch (or a later epoch: a save the record did
not see yet), united with the chunks in ``recent``; and ``coarse`` alone when the side file
is missing or is not the record's (it is deleted, damaged, on another disk that failed).
Either way it covers every write a stale replica missed. After a clean close ``recent`` is
empty and the fine map is exact.

Cost on the write path (degraded only): setting bits in memory, a record store for the
first write into a coarse chunk since the last save, and every :func:`recent_limit` or so
such chunks a save (the changed pages of the fine map and one fdatasync). The fine map is
never written per persist.

A copy in a local replica carries ``recent`` = ``coarse`` and no fine epoch: it stays valid
without the side file, and it is rewritten only when ``coarse`` or the stale marks change
(the master's record, on every change of ``recent``).
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import zlib
from collections.abc import Iterator

from . import dirtymap
from .dirtymap import Bitmap
from .files import open_regular, pwrite_all

log = logging.getLogger(__name__)

OFFSET = 2048
MAGIC = b"PMRSTATE"
VERSION = 3
COARSE_BYTES = 760
# magic, version, compare mask, stale mask, full-resync mask, generation, coarse chunk,
# period, fine epoch
_HEAD = struct.Struct("<8sIIQQQQQQ")
SIZE = _HEAD.size + 2 * COARSE_BYTES + 4
assert OFFSET + SIZE <= 3640  # the generation record follows (generation.OFFSET)
MIN_CHUNK = 64 << 10
#: bytes of ``recent`` chunks that make the fine map be saved: what a crash may copy beyond
#: what was written (within 16 to 256 chunks: a save every so many first writes into a
#: chunk keeps its cost mostly off the p99 persist)
RECENT_BYTES = 1 << 30


def recent_limit(chunk: int) -> int:
    """Chunks in ``recent`` that make the fine map be saved, for coarse chunks of ``chunk``."""
    return max(16, min(256, RECENT_BYTES // chunk))

# version 2 (pools made before the fine map): one 12,288-bit map, no period
_V2_HEAD = struct.Struct("<8sIIQQQQ")
_V2_BITMAP = 1536
_V2_SIZE = _V2_HEAD.size + _V2_BITMAP + 4


def chunk_size_for(pool_size: int) -> int:
    """Smallest power of two >= 64 KiB whose chunks cover the pool with a coarse map."""
    return dirtymap.chunk_covering(pool_size, MIN_CHUNK, COARSE_BYTES * 8)


class ReplicaState:
    """Stale replicas (bit i = replica i) and the parts of the pool written while any was
    stale; see the module docstring."""

    def __init__(self, pool_size: int, stale_mask: int = 0, generation: int = 0,
                 intact: bool = True, full_mask: int = 0, compare_mask: int = 0) -> None:
        self.pool_size = pool_size
        self.chunk = chunk_size_for(pool_size)
        self.stale_mask = stale_mask
        self.full_mask = full_mask
        self.compare_mask = compare_mask
        self.generation = generation
        #: False when the stored record was damaged: callers must resync replicas in full
        self.intact = intact
        self.coarse = Bitmap(self.chunk, COARSE_BYTES * 8, bytearray(COARSE_BYTES))
        self.recent = Bitmap(self.chunk, COARSE_BYTES * 8, bytearray(COARSE_BYTES))
        self.period = 0
        self.fine_epoch = 0
        #: the fine map (None until needed: then built from the side file or ``coarse``)
        self.fine: Bitmap | None = None
        #: the side file, once known (None: the fine map is kept in memory only)
        self.fine_path: str | None = None
        # the side file holds this period's map but for the pages in fine.pages
        self._saved = False
        # chunks written since the last save, whatever ``recent`` holds (in memory only)
        self._batch = Bitmap(self.chunk, COARSE_BYTES * 8, bytearray(COARSE_BYTES))
        self._save_failed = False
        # chunks added to ``recent`` since it was last counted (a lower bound, cheap)
        self._recent_added = 0

    def __repr__(self) -> str:
        return (f"ReplicaState(stale_mask={self.stale_mask:#x}, full_mask={self.full_mask:#x}, "
                f"generation={self.generation}, chunk={self.chunk}, "
                f"coarse={self.coarse.count()}, recent={self.recent.count()}, "
                f"fine_epoch={self.fine_epoch}, intact={self.intact})")

    # -- the stored record ----------------------------------------------------------------
    @classmethod
    def load(cls, header_page: bytes | memoryview, pool_size: int, nreplicas: int,
             fine_path: str | None = None) -> "ReplicaState":
        """The record in a part-0 header page (validated: a damaged one reads as every
        replica stale in full); ``fine_path``: the side file to take the fine map from."""
        raw = bytes(header_page[OFFSET:OFFSET + SIZE])
        if raw == bytes(SIZE):
            out = cls(pool_size)
        else:
            out = cls._v3(raw, pool_size)
            if out is None:
                out = cls._v2(bytes(header_page[OFFSET:OFFSET + _V2_SIZE]), pool_size)
            if out is None:
                all_but_master = ((1 << nreplicas) - 1) & ~1
                return cls(pool_size, stale_mask=all_but_master, intact=False,
                           full_mask=all_but_master)
        if fine_path is not None:
            out.attach(fine_path)
        return out

    @classmethod
    def _v3(cls, raw: bytes, pool_size: int) -> "ReplicaState | None":
        magic, version, compare, mask, full, gen, chunk, period, epoch = _HEAD.unpack_from(raw)
        crc = struct.unpack_from("<I", raw, SIZE - 4)[0]
        if (magic != MAGIC or version != VERSION or crc != zlib.crc32(raw[:SIZE - 4])
                or chunk != chunk_size_for(pool_size)):
            return None
        out = cls(pool_size, stale_mask=mask, generation=gen, full_mask=full,
                  compare_mask=compare)
        out.period, out.fine_epoch = period, epoch
        at = _HEAD.size
        out.coarse.buf[:] = raw[at:at + COARSE_BYTES]
        out.recent.buf[:] = raw[at + COARSE_BYTES:at + 2 * COARSE_BYTES]
        if not epoch:  # no save yet: recent is every chunk written (and a copy's is coarse)
            out.recent.update(out.coarse)
        return out

    @classmethod
    def _v2(cls, raw: bytes, pool_size: int) -> "ReplicaState | None":
        """A record of pmreplica before the fine map, its chunks carried over."""
        magic, version, compare, mask, full, gen, chunk = _V2_HEAD.unpack_from(raw)
        crc = struct.unpack_from("<I", raw, _V2_SIZE - 4)[0]
        if magic != MAGIC or version != 2 or crc != zlib.crc32(raw[:_V2_SIZE - 4]) or not chunk:
            return None
        out = cls(pool_size, stale_mask=mask, generation=gen, full_mask=full,
                  compare_mask=compare)
        old = Bitmap(chunk, _V2_BITMAP * 8,
                     bytearray(raw[_V2_HEAD.size:_V2_HEAD.size + _V2_BITMAP]))
        out.coarse.mark_ranges(old.ranges())
        out.recent.update(out.coarse)
        return out

    def pack(self) -> bytes:
        """The record as the master keeps it."""
        return self._pack(self.recent, self.fine_epoch)

    def pack_copy(self) -> bytes:
        """The record as a local replica's copy keeps it: valid without the side file."""
        return self._pack(self.coarse, 0)

    def _pack(self, recent: Bitmap, epoch: int) -> bytes:
        body = b"".join((_HEAD.pack(MAGIC, VERSION, self.compare_mask & 0xFFFFFFFF,
                                    self.stale_mask, self.full_mask, self.generation,
                                    self.chunk, self.period, epoch),
                         self.coarse.buf, recent.buf))
        return body + zlib.crc32(body).to_bytes(4, "little")

    # -- stale replicas -------------------------------------------------------------------
    def is_stale(self, index: int) -> bool:
        return bool(self.stale_mask >> index & 1)

    def is_full(self, index: int) -> bool:
        """True if replica ``index`` needs a complete resync, not just the dirty chunks."""
        return bool(self.full_mask >> index & 1) or not self.intact

    def needs_compare(self, index: int) -> bool:
        """True if replica ``index`` is to be compared with the source and what differs
        copied (it may hold writes the source does not)."""
        return bool(self.compare_mask >> index & 1)

    def mark_stale(self, index: int, full: bool = False, compare: bool = False) -> bool:
        """Mark replica ``index`` stale (``full``: needing a complete resync; ``compare``: to
        be compared, see :meth:`needs_compare`); True if that changed the record."""
        before = (self.stale_mask, self.full_mask, self.compare_mask)
        self._begin_period()
        self.stale_mask |= 1 << index
        if full:
            self.full_mask |= 1 << index
        if compare:
            self.compare_mask |= 1 << index
        if (self.stale_mask, self.full_mask, self.compare_mask) == before:
            return False
        self.generation += 1
        return True

    def clear_stale(self, index: int) -> bool:
        """Replica ``index`` is consistent again; the maps reset when none is stale."""
        if not self.is_stale(index):
            return False
        self.stale_mask &= ~(1 << index)
        self.full_mask &= ~(1 << index)
        self.compare_mask &= ~(1 << index)
        if not self.stale_mask:
            for bitmap in (self.coarse, self.recent, self._batch):
                bitmap.clear()
            self.period = self.fine_epoch = 0
            self.fine = None
            self._saved = self._save_failed = False
            self.intact = True
        self.generation += 1
        return True

    def _begin_period(self) -> None:
        if not self.period:
            self.period = int.from_bytes(os.urandom(8), "little") or 1
            self._saved = False

    # -- what was written -----------------------------------------------------------------
    def mark_dirty(self, offset: int, length: int) -> bool:
        """Record that ``[offset, offset+length)`` was written; True if the stored record
        changed (it must be stored before the write's persist returns). Only a change of
        what copies hold (``coarse``) raises the generation: the master's record and its
        copies stay of one generation, which a change of ``recent`` alone does not part."""
        if not length:
            return False  # nothing written (and at the pool's end, no chunk to mark)
        if not self.period:
            self._begin_period()
        (self.fine or self._fine_map()).mark(offset, length)
        chunk = self.chunk
        first = offset // chunk
        if first == (offset + (length or 1) - 1) // chunk:
            # one coarse chunk (nearly every persist): its bit in the three maps at once
            byte, bit = first >> 3, 1 << (first & 7)
            coarse, recent = self.coarse.buf, self.recent.buf
            self._batch.buf[byte] |= bit
            changed = not coarse[byte] & bit
            if changed:
                coarse[byte] |= bit
                self.generation += 1
            if recent[byte] & bit:
                return changed
            recent[byte] |= bit
            self._recent_added += 1
            return True
        self._batch.mark(offset, length)
        changed = self.coarse.mark(offset, length)
        if changed:
            self.generation += 1
        if self.recent.mark(offset, length):
            self._recent_added += 1
            return True
        return changed

    def _fine_map(self) -> Bitmap:
        if self.fine is None:
            self.fine = Bitmap.covering(dirtymap.fine_chunk_for(self.pool_size),
                                        self.pool_size, track_pages=True)
            self.fine.mark_ranges(self.coarse.ranges())
            self._saved = False
        return self.fine

    def attach(self, path: str) -> None:
        """Take the fine map from the side file at ``path`` (and save it there from now
        on): its map united with ``recent`` when it is this record's, else ``coarse``."""
        self.fine_path = path
        if not self.intact or not (self.stale_mask or self.coarse.any()):
            return
        chunk = dirtymap.fine_chunk_for(self.pool_size)
        nbits = -(-self.pool_size // chunk)
        fine = (dirtymap.load(path, self.period, self.fine_epoch, chunk, nbits, track_pages=True)
                if self.period and self.fine_epoch else None)
        if fine is None:
            self.fine = None
            self._fine_map()
            return
        fine.mark_ranges(self.recent.ranges())
        self.fine, self._saved = fine, True

    def needs_save(self) -> bool:
        """True when ``recent`` has grown to :func:`recent_limit` chunks: time to save."""
        limit = recent_limit(self.chunk)
        if self._recent_added < limit // 2 or self._save_failed:
            return False  # counted only when it may be near (a persist pays for this)
        self._recent_added = 0
        return (self.fine is not None and self.fine_path is not None
                and self.recent.count() >= limit)

    def save_fine(self, keep_working_set: bool = True) -> bool:
        """Save the fine map to the side file, durably, and empty ``recent`` (the record
        must be stored after: it changed); ``keep_working_set``: but for the chunks written
        since the last save when they are few (not on close: the map is exact then).
        False (and nothing changed) if it cannot be saved, or there is nothing to save."""
        if self.fine is None or self.fine_path is None or not self.period:
            return False
        if self._saved and not self.fine.pages and not self.recent.any():
            return False
        try:
            dirtymap.save(self.fine_path, self.fine, self.period, self.fine_epoch + 1,
                          whole=not self._saved)
        except OSError as e:
            if not self._save_failed:
                log.warning("%s: cannot save the dirty map (chunks written from now on are "
                            "tracked at %d KiB in the record): %s", self.fine_path,
                            self.chunk >> 10, e)
            self._save_failed = True
            return False
        self._saved = True
        self.fine_epoch += 1
        self.recent.clear()
        self._recent_added = 0
        if keep_working_set and self._batch.count() <= recent_limit(self.chunk) // 2:
            self.recent.update(self._batch)
        self._batch.clear()
        return True

    def drop_side_file(self) -> None:
        """Delete the side file when no period runs (nothing stale: it is of no use)."""
        if self.fine_path is not None and not self.period:
            dirtymap.remove(self.fine_path)

    def _effective(self) -> Bitmap:
        return self.fine if self.fine is not None else self.coarse

    def iter_dirty(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        """The written parts of ``[start, end)`` as merged ``(offset, length)`` ranges, as
        fine as what is known (the fine map, else the coarse chunks)."""
        return self._effective().ranges(start, end)

    def dirty_bytes(self, start: int, end: int) -> int:
        return self._effective().dirty_bytes(start, end)

    def dirty_ranges(self, pool_size: int) -> list[tuple[int, int]]:
        """The written chunks as merged (offset, length) ranges clipped to the pool."""
        return list(self.iter_dirty(0, pool_size))

    def fine_snapshot(self) -> Bitmap:
        """A copy of the fine map (built from the coarse one if need be), to read while
        writes go on."""
        return self._fine_map().copy()

    def merge(self, other: "ReplicaState") -> None:
        """Take the union of two records of the same generation (the safe reading of copies
        that disagree): stale and full-resync marks and dirty chunks of both. A copy that
        adds nothing to this record (the master's) leaves its fine map in force."""
        adds = bool(other.stale_mask & ~self.stale_mask or other.full_mask & ~self.full_mask
                    or other.compare_mask & ~self.compare_mask
                    or not other.coarse.issubset(self.coarse))
        self.stale_mask |= other.stale_mask
        self.full_mask |= other.full_mask
        self.compare_mask |= other.compare_mask
        self.coarse.update(other.coarse)
        if adds or (other.fine_epoch and (other.period, other.fine_epoch)
                    != (self.period, self.fine_epoch)):
            self.fine_epoch, self.fine = 0, None
            self.recent.update(self.coarse)

    def copy(self) -> "ReplicaState":
        """An independent copy (its fine map too)."""
        out = ReplicaState(self.pool_size, self.stale_mask, self.generation, self.intact,
                           self.full_mask, self.compare_mask)
        out.coarse.update(self.coarse)
        out.recent.update(self.recent)
        out._batch.update(self._batch)
        out.period, out.fine_epoch, out.fine_path = self.period, self.fine_epoch, self.fine_path
        if self.fine is not None:
            out.fine = self.fine.copy(track_pages=True)
            out.fine.pages = set(self.fine.pages or ())
            out._saved = self._saved
        return out


def store_copy(path: str, record: bytes, offset: int = OFFSET) -> None:
    """Write ``record`` (from :meth:`ReplicaState.pack`, or another record of the header
    page) into the header page of the part file ``path`` at ``offset``, durably. The file
    must already hold a full header page."""
    fd = open_regular(path, os.O_WRONLY)
    try:
        if os.fstat(fd).st_size < offset + len(record):
            raise OSError(errno.EINVAL, f"{path}: too short to hold a pool header")
        pwrite_all(fd, record, offset, path)
        os.fdatasync(fd)
    finally:
        os.close(fd)

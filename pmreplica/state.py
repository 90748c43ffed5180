"""Replica state kept in the master's metadata: which replicas are stale, and which chunks of
the pool were written while some replica missed writes (DRBD's activity bitmap, coarse).

The record lives in the master's part-0 header at bytes 2048..4024, PMDK's ``unused2`` area:
outside the header checksum when CKSUM_2K is set and ignored by PMDK's tools, so PMDK pools
stay valid for them. The record carries its own CRC32; a record that fails it is treated
as "every replica stale", the safe reading.

Copies of the record are kept at the same place in the part-0 header of every local replica
that takes writes, so that replica-sync can still tell stale replicas from fresh ones when
the master itself is lost. Every change raises ``generation``: the newest copy wins.
A replica in ``full_mask`` needs a complete resync (the bitmap does not cover what it
lacks: replica-sync was recreating it, or its header was broken); one in ``compare_mask``
is brought in line by comparing checksums and copying what differs (it may hold writes the
source lacks: in flight when a master was lost and a replica promoted in its place).
"""

from __future__ import annotations

import errno
import os
import struct
import zlib

from .files import open_regular

OFFSET = 2048
MAGIC = b"PMRSTATE"
VERSION = 2
BITMAP_BYTES = 1536
# magic, version, compare mask (formerly reserved: 0), stale mask, full-resync mask,
# generation, chunk size
_HEAD = struct.Struct("<8sIIQQQQ")
SIZE = _HEAD.size + BITMAP_BYTES + 4
MIN_CHUNK = 64 << 10


def chunk_size_for(pool_size: int) -> int:
    """Smallest power of two >= 64 KiB whose chunks cover the pool with the bitmap's bits."""
    chunk = MIN_CHUNK
    while chunk * BITMAP_BYTES * 8 < pool_size:
        chunk *= 2
    return chunk


class ReplicaState:
    """Stale replicas (bit i = replica i) and the chunks written while any was stale."""

    def __init__(self, chunk: int, stale_mask: int = 0, generation: int = 0,
                 bitmap: bytearray | None = None, intact: bool = True,
                 full_mask: int = 0, compare_mask: int = 0) -> None:
        self.chunk = chunk
        self.stale_mask = stale_mask
        self.full_mask = full_mask
        self.compare_mask = compare_mask
        self.generation = generation
        self.bitmap = bitmap if bitmap is not None else bytearray(BITMAP_BYTES)
        #: False when the stored record was damaged: callers must resync replicas in full
        self.intact = intact

    def __repr__(self) -> str:
        return (f"ReplicaState(stale_mask={self.stale_mask:#x}, full_mask={self.full_mask:#x}, "
                f"generation={self.generation}, chunk={self.chunk}, "
                f"dirty={sum(bin(b).count('1') for b in self.bitmap)}, intact={self.intact})")

    @classmethod
    def load(cls, header_page: bytes | memoryview, pool_size: int,
             nreplicas: int) -> "ReplicaState":
        raw = bytes(header_page[OFFSET:OFFSET + SIZE])
        if raw == bytes(SIZE):
            return cls(chunk=chunk_size_for(pool_size))
        magic, version, compare, mask, full, gen, chunk = _HEAD.unpack_from(raw)
        crc = struct.unpack_from("<I", raw, SIZE - 4)[0]
        if magic != MAGIC or version != VERSION or crc != zlib.crc32(raw[:SIZE - 4]) or not chunk:
            all_but_master = ((1 << nreplicas) - 1) & ~1
            return cls(chunk=chunk_size_for(pool_size), stale_mask=all_but_master,
                       intact=False, full_mask=all_but_master)
        bitmap = bytearray(raw[_HEAD.size:_HEAD.size + BITMAP_BYTES])
        return cls(chunk=chunk, stale_mask=mask, generation=gen, bitmap=bitmap, full_mask=full,
                   compare_mask=compare)

    def pack(self) -> bytes:
        body = _HEAD.pack(MAGIC, VERSION, self.compare_mask & 0xFFFFFFFF, self.stale_mask,
                          self.full_mask, self.generation, self.chunk) + bytes(self.bitmap)
        return body + struct.pack("<I", zlib.crc32(body))

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
        """Replica ``index`` is consistent again; the bitmap resets when none is stale."""
        if not self.is_stale(index):
            return False
        self.stale_mask &= ~(1 << index)
        self.full_mask &= ~(1 << index)
        self.compare_mask &= ~(1 << index)
        if not self.stale_mask:
            self.bitmap[:] = bytes(BITMAP_BYTES)
            self.intact = True
        self.generation += 1
        return True

    def mark_dirty(self, offset: int, length: int) -> bool:
        """Record that ``[offset, offset+length)`` was written; True if a new bit was set.
        Whole bytes of the bitmap are set at once: a large range costs no per-chunk loop."""
        first = offset // self.chunk
        last = min((offset + max(length, 1) - 1) // self.chunk, BITMAP_BYTES * 8 - 1)
        if first > last:
            return False
        b0, b1 = first >> 3, last >> 3
        bitmap = self.bitmap
        if b0 == b1:
            masks = [((1 << (last - first + 1)) - 1) << (first & 7)]
        else:
            masks = [(0xFF << (first & 7)) & 0xFF, (1 << ((last & 7) + 1)) - 1]
        changed = False
        for byte, mask in zip((b0, b1), masks):
            if bitmap[byte] & mask != mask:
                bitmap[byte] |= mask
                changed = True
        if b1 - b0 > 1 and bitmap[b0 + 1:b1].count(0xFF) != b1 - b0 - 1:
            bitmap[b0 + 1:b1] = b"\xff" * (b1 - b0 - 1)
            changed = True
        if changed:
            self.generation += 1
        return changed

    def merge(self, other: "ReplicaState") -> None:
        """Take the union of two records of the same generation (the safe reading of copies
        that disagree): stale and full-resync marks and dirty chunks of both."""
        self.stale_mask |= other.stale_mask
        self.full_mask |= other.full_mask
        self.compare_mask |= other.compare_mask
        if other.chunk != self.chunk:
            self.full_mask |= self.stale_mask
        else:
            self.bitmap[:] = bytes(a | b for a, b in zip(self.bitmap, other.bitmap))

    def dirty_ranges(self, pool_size: int) -> list[tuple[int, int]]:
        """The written chunks as merged (offset, length) ranges clipped to the pool."""
        out: list[tuple[int, int]] = []
        for byte_index, byte in enumerate(self.bitmap):
            if not byte:
                continue
            for bit in range(8):
                if byte >> bit & 1:
                    off = (byte_index * 8 + bit) * self.chunk
                    if off >= pool_size:
                        continue
                    end = min(off + self.chunk, pool_size)
                    if out and out[-1][0] + out[-1][1] == off:
                        out[-1] = (out[-1][0], end - out[-1][0])
                    else:
                        out.append((off, end - off))
        return out


def store_copy(path: str, record: bytes, offset: int = OFFSET) -> None:
    """Write ``record`` (from :meth:`ReplicaState.pack`, or another record of the header
    page) into the header page of the part file ``path`` at ``offset``, durably. The file
    must already hold a full header page."""
    fd = open_regular(path, os.O_WRONLY)
    try:
        if os.fstat(fd).st_size < offset + len(record):
            raise OSError(errno.EINVAL, f"{path}: too short to hold a pool header")
        if os.pwrite(fd, record, offset) != len(record):
            raise OSError(errno.EIO, f"{path}: short write")
        os.fdatasync(fd)
    finally:
        os.close(fd)

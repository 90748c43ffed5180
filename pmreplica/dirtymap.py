"""Dirty maps: bitmaps of the chunks of a pool written while a replica missed writes, and
the side file that keeps the fine one (see :mod:`pmreplica.state` for how the two levels,
coarse in the pool header and fine here, stay crash-safe together).

:class:`Bitmap` marks byte ranges at a chunk granularity and lists the marked chunks as
merged ranges, scanning its bytes with a regular expression (C speed over the zero bytes
that make up most of a map) rather than bit by bit in Python.

The fine map's chunk is 4 KiB for pools up to 1 TiB and grows beyond so that the map never
exceeds 2^28 bits (32 MiB): 64 KiB per bit at 16 TiB. In memory it is an anonymous mapping,
so pages of it never written cost nothing.

The side file (``<master part 0>.pmrdirty``) holds a header page (magic, version, the
period and epoch it belongs to, chunk and bit count, CRC), then the map in 4 KiB pages,
then a CRC32 per map page. A save rewrites the pages changed since the last one, their
CRCs, then the header, and ends with one fdatasync. Bits are only ever set within a period,
so whatever subset of a save's writes a power failure keeps holds at least the bits of the
save before; a page whose CRC fails reads as all set (never fewer bits than were written),
a header that fails its CRC, or names another period, makes the file count as absent.
"""

from __future__ import annotations

import array
import logging
import mmap
import os
import re
import struct
import zlib
from collections.abc import Iterator

from .files import open_regular, pwrite_all, sync_dir

log = logging.getLogger(__name__)

PAGE = 4096
MIN_FINE_CHUNK = 4096
MAX_FINE_BITS = 1 << 28
SUFFIX = ".pmrdirty"

_MAGIC = b"PMRDIRTY"
_VERSION = 1
# magic, version, reserved, period, epoch, chunk, bits; then the header's CRC32
_HEAD = struct.Struct("<8sIIQQQQ")

# a run of 0xFF bytes (contiguous set bits) or one byte with some bits set; zero bytes
# are skipped by the scan itself
_TOKENS = re.compile(rb"\xff+|[^\x00\xff]")


def _bit_runs(value: int) -> tuple[tuple[int, int], ...]:
    runs, bit = [], 0
    while bit < 8:
        if value >> bit & 1:
            start = bit
            while bit < 8 and value >> bit & 1:
                bit += 1
            runs.append((start, bit - start))
        else:
            bit += 1
    return tuple(runs)


_RUNS = tuple(_bit_runs(v) for v in range(256))


def chunk_covering(pool_size: int, smallest: int, most: int) -> int:
    """``smallest`` (a power of two), doubled until ``most`` chunks cover the pool: the
    chunk of a map of at most ``most`` bits (or bytes)."""
    chunk = smallest
    while chunk * most < pool_size:
        chunk *= 2
    return chunk


def fine_chunk_for(pool_size: int) -> int:
    """The fine map's chunk: 4 KiB, doubled until 2^28 bits cover the pool."""
    return chunk_covering(pool_size, MIN_FINE_CHUNK, MAX_FINE_BITS)


def path_for(part0: str) -> str:
    """The side file of the pool whose master's first part is ``part0``."""
    return part0 + SUFFIX


def _zeroed(nbytes: int) -> bytearray | mmap.mmap:
    """A zero-filled writable buffer; large ones mapped, so untouched pages cost nothing."""
    if nbytes < 16 * PAGE:
        return bytearray(nbytes)
    return mmap.mmap(-1, -(-nbytes // PAGE) * PAGE)


class Bitmap:
    """Bit i set: chunk i (``[i*chunk, (i+1)*chunk)``) was written. ``pages`` (when
    tracked) holds the 4 KiB pages of the map changed since the last :func:`save`."""

    __slots__ = ("chunk", "nbits", "nbytes", "buf", "pages")

    def __init__(self, chunk: int, nbits: int, buf: bytearray | mmap.mmap | None = None,
                 track_pages: bool = False) -> None:
        self.chunk = chunk
        self.nbits = nbits
        self.nbytes = (nbits + 7) // 8
        self.buf = buf if buf is not None else _zeroed(self.nbytes)
        self.pages: set[int] | None = set() if track_pages else None

    @classmethod
    def covering(cls, chunk: int, size: int, track_pages: bool = False) -> "Bitmap":
        """A map with a bit for every chunk of a ``size``-byte pool."""
        return cls(chunk, -(-size // chunk), track_pages=track_pages)

    def mark(self, offset: int, length: int) -> bool:
        """Set the bits of the chunks ``[offset, offset+length)`` touches (a zero length
        touches one); True if one was not set yet. Whole bytes are set at once: a large
        range costs no loop per chunk."""
        first = offset // self.chunk
        last = min((offset + max(length, 1) - 1) // self.chunk, self.nbits - 1)
        buf = self.buf
        if first == last:  # the common case (a persist within a chunk), on the hot path
            byte, bit = first >> 3, 1 << (first & 7)
            value = buf[byte]
            if value & bit:
                return False
            buf[byte] = value | bit
            if self.pages is not None:
                self.pages.add(byte // PAGE)
            return True
        if first > last:
            return False
        b0, b1 = first >> 3, last >> 3
        if b0 == b1:
            edges = ((b0, ((1 << (last - first + 1)) - 1) << (first & 7)),)
        else:
            edges = ((b0, (0xFF << (first & 7)) & 0xFF), (b1, (1 << ((last & 7) + 1)) - 1))
        changed = False
        for byte, mask in edges:
            if buf[byte] & mask != mask:
                buf[byte] |= mask
                changed = True
        if b1 - b0 > 1 and buf[b0 + 1:b1].count(0xFF) != b1 - b0 - 1:
            buf[b0 + 1:b1] = b"\xff" * (b1 - b0 - 1)
            changed = True
        if changed and self.pages is not None:
            self.pages.update(range(b0 // PAGE, b1 // PAGE + 1))
        return changed

    def mark_ranges(self, ranges: Iterator[tuple[int, int]]) -> bool:
        changed = False
        for off, n in ranges:
            changed |= self.mark(off, n)
        return changed

    def ranges(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
        """The marked chunks as merged ``(offset, length)`` ranges clipped to
        ``[start, end)`` (default: every chunk)."""
        chunk = self.chunk
        end = self.nbits * chunk if end is None else end
        run_start = run_end = -1
        for m in _TOKENS.finditer(self.buf, 0, self.nbytes):
            s = m.start()
            if m.end() - s > 1 or self.buf[s] == 0xFF:
                runs: tuple[tuple[int, int], ...] = ((0, (m.end() - s) * 8),)
            else:
                runs = _RUNS[self.buf[s]]
            for bit, nb in runs:
                lo = (s * 8 + bit) * chunk
                hi = lo + nb * chunk
                if lo == run_end:
                    run_end = hi
                    continue
                if run_end > run_start:
                    yield from _clip(run_start, run_end, start, end)
                run_start, run_end = lo, hi
        if run_end > run_start:
            yield from _clip(run_start, run_end, start, end)

    def count(self) -> int:
        """How many bits are set."""
        return int.from_bytes(self.buf[:self.nbytes], "little").bit_count()

    def dirty_bytes(self, start: int, end: int) -> int:
        """The bytes of ``[start, end)`` in marked chunks."""
        total = 0
        for _, n in self.ranges(start, end):
            total += n
        return total

    def test(self, bit: int) -> bool:
        return bool(self.buf[bit >> 3] >> (bit & 7) & 1)

    def any(self) -> bool:
        return _TOKENS.search(self.buf, 0, self.nbytes) is not None

    def issubset(self, other: "Bitmap") -> bool:
        a = int.from_bytes(self.buf[:self.nbytes], "little")
        return a & ~int.from_bytes(other.buf[:other.nbytes], "little") == 0

    def update(self, other: "Bitmap") -> None:
        """Set every bit ``other`` (of the same chunk) has set."""
        n = min(self.nbytes, other.nbytes)
        merged = (int.from_bytes(self.buf[:n], "little")
                  | int.from_bytes(other.buf[:n], "little"))
        self.buf[:n] = merged.to_bytes(n, "little")
        if self.pages is not None:
            self.pages.update(range(0, -(-n // PAGE)))

    def clear(self) -> None:
        self.buf[:self.nbytes] = bytes(self.nbytes)
        if self.pages is not None:
            self.pages.update(range(0, -(-self.nbytes // PAGE)))

    def copy(self, track_pages: bool = False) -> "Bitmap":
        out = Bitmap(self.chunk, self.nbits, track_pages=track_pages)
        out.buf[:self.nbytes] = self.buf[:self.nbytes]
        return out


def _clip(lo: int, hi: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    lo, hi = max(lo, start), min(hi, end)
    if lo < hi:
        yield lo, hi - lo


# -- the side file ------------------------------------------------------------------------

def _npages(nbytes: int) -> int:
    return -(-nbytes // PAGE)


def _page(bitmap: Bitmap, k: int) -> bytes:
    raw = bytes(bitmap.buf[k * PAGE:min((k + 1) * PAGE, bitmap.nbytes)])
    return raw.ljust(PAGE, b"\0")


def _header(period: int, epoch: int, bitmap: Bitmap) -> bytes:
    body = _HEAD.pack(_MAGIC, _VERSION, 0, period, epoch, bitmap.chunk, bitmap.nbits)
    return body + struct.pack("<I", zlib.crc32(body))


def save(path: str, bitmap: Bitmap, period: int, epoch: int, whole: bool) -> None:
    """Write ``bitmap`` to the side file at ``path`` as the map of ``period`` at ``epoch``,
    durably: every page (``whole``, or the file does not hold this map's layout yet) or
    the pages in ``bitmap.pages``; these are forgotten once durable."""
    npages = _npages(bitmap.nbytes)
    table_at = PAGE + npages * PAGE
    size = table_at + 4 * npages
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        created = os.fstat(fd).st_size == 0
        if created or os.fstat(fd).st_size != size:
            whole = True
            os.ftruncate(fd, size)
        pages = range(npages) if whole or bitmap.pages is None else sorted(bitmap.pages)
        for k in pages:
            raw = _page(bitmap, k)
            pwrite_all(fd, raw, PAGE + k * PAGE, path)
            pwrite_all(fd, struct.pack("<I", zlib.crc32(raw)), table_at + 4 * k, path)
        pwrite_all(fd, _header(period, epoch, bitmap), 0, path)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    if created:  # the new name itself must survive a power failure
        sync_dir(os.path.dirname(path) or ".")
    if bitmap.pages is not None:
        bitmap.pages.clear()


def load(path: str, period: int, min_epoch: int, chunk: int, nbits: int,
         track_pages: bool = False) -> Bitmap | None:
    """The map the side file at ``path`` holds for ``period`` at ``min_epoch`` or later;
    None if it holds none (missing, unreadable, another period or layout, a damaged
    header). Pages whose CRC fails read as all set."""
    try:
        fd = open_regular(path)
    except OSError:
        return None
    try:
        head = os.pread(fd, _HEAD.size + 4, 0)
        if len(head) < _HEAD.size + 4 or struct.unpack_from("<I", head, _HEAD.size)[0] \
                != zlib.crc32(head[:_HEAD.size]):
            return None
        magic, version, _, per, epoch, ch, bits = _HEAD.unpack_from(head)
        if (magic, version, per, ch, bits) != (_MAGIC, _VERSION, period, chunk, nbits) \
                or epoch < min_epoch:
            return None
        bitmap = Bitmap(chunk, nbits, track_pages=track_pages)
        npages = _npages(bitmap.nbytes)
        table = array.array("I")
        table.frombytes(os.pread(fd, 4 * npages, PAGE + npages * PAGE))
        if len(table) != npages:
            return None
        for k in range(npages):
            raw = os.pread(fd, PAGE, PAGE + k * PAGE)
            n = min(PAGE, bitmap.nbytes - k * PAGE)
            if len(raw) == PAGE and zlib.crc32(raw) == table[k]:
                bitmap.buf[k * PAGE:k * PAGE + n] = raw[:n]
            else:
                log.warning("%s: map page %d is damaged: its chunks count as written",
                            path, k)
                bitmap.buf[k * PAGE:k * PAGE + n] = b"\xff" * n
        return bitmap
    except OSError as e:
        log.warning("%s: cannot read the dirty map: %s", path, e)
        return None
    finally:
        os.close(fd)


def remove(path: str) -> None:
    """Delete the side file, if there is one."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.debug("%s: cannot remove: %s", path, e)

"""The replica-state record and the dirty maps: bits set in whole bytes exactly as chunk by
chunk, records of earlier versions read, the side file's damage read as written chunks,
and the two levels crash-safe together under a model of power loss."""

from __future__ import annotations

import os
import random
import struct
import zlib
from pathlib import Path

import pytest

from pmreplica import PoolSet, dirtymap, sync
from pmreplica.dirtymap import Bitmap
from pmreplica.header import HDR_SIZE
from pmreplica.pmem import Mapping
from pmreplica.state import OFFSET, ReplicaState, recent_limit

from .helpers import write_set

M = 1 << 20


def _chunk_by_chunk(bitmap: bytearray, chunk: int, nbits: int, offset: int,
                    length: int) -> bool:
    first = offset // chunk
    last = min((offset + max(length, 1) - 1) // chunk, nbits - 1)
    changed = False
    for c in range(first, last + 1):
        byte, bit = divmod(c, 8)
        if not bitmap[byte] >> bit & 1:
            bitmap[byte] |= 1 << bit
            changed = True
    return changed


@pytest.mark.parametrize("nbits", [12288, 1 << 20])  # a bytearray, a mapped map
def test_mark_sets_the_same_bits_as_chunk_by_chunk_and_ranges_read_them_back(nbits):
    rng = random.Random(20261122 + nbits)
    chunk = 4096
    for _ in range(200 if nbits < 1 << 16 else 8):
        bitmap, expect = Bitmap(chunk, nbits), bytearray(nbits // 8)
        for _ in range(6):
            offset = rng.randrange(0, nbits * chunk)
            length = rng.choice([0, 1, 4096, 64 << 10, 1 << 20, rng.randrange(nbits * chunk)])
            assert bitmap.mark(offset, length) == _chunk_by_chunk(expect, chunk, nbits, offset,
                                                                  length)
        assert bytes(bitmap.buf[:nbits // 8]) == bytes(expect)
        bits = [i for i in range(nbits) if expect[i >> 3] >> (i & 7) & 1]
        want: list[tuple[int, int]] = []
        for i in bits:
            if want and want[-1][0] + want[-1][1] == i * chunk:
                want[-1] = (want[-1][0], want[-1][1] + chunk)
            else:
                want.append((i * chunk, chunk))
        assert list(bitmap.ranges()) == want
        assert bitmap.count() == len(bits) and bitmap.dirty_bytes(0, nbits * chunk) == \
            len(bits) * chunk


def test_ranges_are_clipped_and_merged():
    bitmap = Bitmap(64 << 10, 12288)
    bitmap.mark(100, 1)                  # chunk 0
    bitmap.mark((64 << 10) + 5, 10)      # chunk 1
    bitmap.mark(10 * (64 << 10), 1 << 20)  # chunks 10..25
    assert list(bitmap.ranges(HDR_SIZE, 1 << 30)) == [(HDR_SIZE, (128 << 10) - HDR_SIZE),
                                                      (10 * (64 << 10), 16 * (64 << 10))]
    assert bitmap.dirty_bytes(HDR_SIZE, 20 * (64 << 10)) == (128 << 10) - HDR_SIZE + \
        10 * (64 << 10)


def test_fine_chunk_is_4k_to_1t_and_64k_at_16t():
    assert dirtymap.fine_chunk_for(4 << 30) == 4096
    assert dirtymap.fine_chunk_for(1 << 40) == 4096
    assert dirtymap.fine_chunk_for(16 << 40) == 64 << 10


def test_a_record_made_before_the_fine_map_is_read(tmp_path):
    """Version 2 (one 12,288-bit map at its own chunk): stale marks kept, chunks carried
    over into the coarse map (a coarser chunk, never fewer bytes)."""
    size = 4 << 30
    chunk = 512 << 10
    bitmap = bytearray(1536)
    bitmap[3] = 0b101  # chunks 24 and 26
    body = struct.pack("<8sIIQQQQ", b"PMRSTATE", 2, 0, 0b10, 0, 7, chunk) + bytes(bitmap)
    page = bytearray(HDR_SIZE)
    page[OFFSET:OFFSET + len(body) + 4] = body + struct.pack("<I", zlib.crc32(body))
    st = ReplicaState.load(page, size, 2, str(tmp_path / "none.pmrdirty"))
    assert st.intact and st.is_stale(1) and not st.is_full(1) and st.generation == 7
    got = list(st.iter_dirty(0, size))
    for c in (24, 26):
        assert any(o <= c * chunk and c * chunk + chunk <= o + n for o, n in got)
    assert st.dirty_bytes(0, size) == 2 * st.chunk  # 1 MiB coarse chunks here
    st.mark_dirty(100 * M, 1)  # goes on in the new format
    again = ReplicaState.load(page[:OFFSET] + st.pack() + page[OFFSET + len(st.pack()):],
                              size, 2)
    assert again.is_stale(1) and again.coarse.test(100)


def test_side_file_damage_reads_as_written_and_foreign_files_as_absent(tmp_path):
    path = str(tmp_path / "m.pmrdirty")
    bitmap = Bitmap.covering(4096, 64 * M, track_pages=True)  # 16,384 bits: 2 KiB, 1 page
    big = Bitmap.covering(4096, 1 << 30, track_pages=True)    # 32 pages
    bitmap.mark(5 * M, 10)
    big.mark(700 * M, 3 * 4096)
    dirtymap.save(path, big, period=9, epoch=3, whole=True)
    got = dirtymap.load(path, 9, 3, 4096, big.nbits)
    assert got is not None and list(got.ranges()) == [(700 * M, 3 * 4096)]
    assert dirtymap.load(path, 9, 4, 4096, big.nbits) is None  # older than the record
    assert dirtymap.load(path, 8, 3, 4096, big.nbits) is None  # another period
    big.mark(1, 1)  # only page 0 changes: only it is written
    dirtymap.save(path, big, period=9, epoch=4, whole=False)
    assert list(dirtymap.load(path, 9, 4, 4096, big.nbits).ranges())[0] == (0, 4096)
    with open(path, "r+b") as f:  # a torn page: its chunks count as written
        f.seek(4096 + 5 * 4096 + 17)
        f.write(b"\x01")
    damaged = dirtymap.load(path, 9, 4, 4096, big.nbits)
    assert damaged.dirty_bytes(5 * 4096 * 8 * 4096, 6 * 4096 * 8 * 4096) == 4096 * 8 * 4096
    with open(path, "r+b") as f:  # a torn header: the file is not this record's
        f.seek(20)
        f.write(b"\xff")
    assert dirtymap.load(path, 9, 4, 4096, big.nbits) is None
    dirtymap.save(path, bitmap, period=1, epoch=1, whole=False)  # another layout: rewritten
    assert list(dirtymap.load(path, 1, 1, 4096, bitmap.nbits).ranges()) == [(5 * M, 4096)]


def _page(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(HDR_SIZE)


class PowerLoss:
    """A model of power loss (which cannot be caused for real here): what the master's
    header page and the side file hold durably, apart from what the page cache holds.
    The record becomes durable at the master's persist of it, the side file at its
    fdatasync; every write to the side file since its last fdatasync is pending, and a
    crash image keeps any subset of its 8-byte words."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, part0: Path, side: Path) -> None:
        self.part0, self.side = part0, side
        self.page = _page(part0)
        self.file = b""
        self.points = 0
        self.check = lambda: None
        persist, fdatasync = Mapping.persist, os.fdatasync

        def persisted(mapping: Mapping, offset: int, length: int) -> None:
            persist(mapping, offset, length)
            if offset < HDR_SIZE:  # the master's header page: the record (or generation)
                self.point()
                self.page = _page(part0)

        def synced(fd: int) -> None:
            fdatasync(fd)
            if os.path.exists(side) and os.fstat(fd).st_ino == os.stat(side).st_ino:
                self.point()
                self.file = side.read_bytes()

        monkeypatch.setattr(Mapping, "persist", persisted)
        monkeypatch.setattr(dirtymap.os, "fdatasync", synced)

    def point(self) -> None:
        self.points += 1
        self.check()

    def images(self, rng: random.Random, count: int = 3):
        """Crash images now: (header page, side file bytes or None)."""
        live = self.side.read_bytes() if self.side.exists() else b""
        # a file's creation and size are metadata, durable at once; its bytes are not
        base = self.file[:len(live)].ljust(len(live), b"\0")
        for k in range(count):
            image = bytearray(base)
            for w in range(0, len(live), 8):
                if live[w:w + 8] != image[w:w + 8] and (k == 1 or rng.random() < 0.5):
                    image[w:w + 8] = live[w:w + 8]
            yield self.page, (bytes(image) if self.side.exists() else None)


def test_every_crash_image_covers_what_a_stale_replica_missed(pool_dir, monkeypatch):
    """Degraded writes, enough to save the fine map many times, with power cut at every
    point that makes the record or the side file durable: each image's dirty set (the side
    file when it is the record's, with ``recent``; the coarse map otherwise) covers every
    write whose persist had returned, and after a clean close the map is exact."""
    d = pool_dir
    size = 64 * M
    path = write_set(d / "p.set", f"64M {d}/m", "REPLICA", f"64M {d}/r")
    PoolSet.create(path).close()
    side = Path(dirtymap.path_for(str(d / "m")))
    model = PowerLoss(monkeypatch, d / "m", side)
    rng = random.Random(18)
    returned: list[tuple[int, int]] = []
    work = d / "image"
    work.mkdir()

    def check() -> None:
        for page, image in model.images(rng):
            fine = work / "m.pmrdirty"
            if image is None:
                fine.unlink(missing_ok=True)
            else:
                fine.write_bytes(image)
            st = ReplicaState.load(page, size, 2, str(fine))
            assert st.is_stale(1)
            covered = list(st.iter_dirty(0, size))
            for off, n in returned:
                assert any(o <= off and off + n <= o + k for o, k in covered), \
                    f"write {off}+{n} lost at point {model.points}"

    os.unlink(d / "r")  # replica 1 fails at open: every write from here on is missed
    with PoolSet.open(path) as pool:
        model.check = check
        for _ in range(6 * recent_limit(64 << 10)):
            off = rng.randrange(HDR_SIZE, size - 4096) & ~4095
            pool.buf[off:off + 4096] = os.urandom(4096)
            pool.persist(off, 4096)
            returned.append((off, 4096))
        assert pool.state.fine_epoch >= 4  # saved in batches, not only on close
    model.check = lambda: None
    assert model.points > 4 * recent_limit(64 << 10)
    st = ReplicaState.load(_page(d / "m"), size, 2, str(side))
    assert not st.recent.any() and st.dirty_bytes(HDR_SIZE, size) == \
        len({off for off, _ in returned}) * 4096
    rep = sync.sync(path)  # the replica is rebuilt; nothing stale, the side file goes
    assert rep.status == "repaired" and not side.exists()

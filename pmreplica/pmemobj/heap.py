"""The allocator: chunks holding runs of equal units (small blocks) or huge blocks.

Persistent state is the chunk table (one u64 per chunk) and, per run chunk, a bitmap at
the chunk start (bit set = unit allocated). Both change only through the transaction's
overlay, so an allocation or free is part of its transaction: it commits or vanishes with
it, and a crash leaks nothing that the redo log does not account for. Objects allocated
but not yet referenced when a process dies are what ``gc`` reclaims (refcount 0).

The volatile state (which chunks and units are taken) is rebuilt from the persistent state
on open. Freed memory becomes reusable only at the checkpoint after its transaction
commits, so no transaction writes fresh bytes over a block that an abort would bring back
or that a record still in the log refers to. When an allocation finds no free chunk, runs
left without any unit go back to the free chunks at once (:meth:`Heap.reclaim_now`).
"""

from __future__ import annotations

import errno
import logging
import struct
from typing import Iterator

from ..errors import PmReplicaError
from .layout import (ALLOC_HDR, ALLOC_MAGIC, CH_FREE, CH_HUGE, CH_RUN, CHUNK, CHUNK_SHIFT,
                     POBJECT_TYPE_NUM, RUN_GEOMETRY, SIZE_CLASSES, Geometry, class_of)
from .txn import Engine, PoolFullError

log = logging.getLogger("pmreplica.pmemobj")

_HDR = struct.Struct("<QQ")
MAX_ALLOC = 1 << 40


class _Run:
    __slots__ = ("cls", "unit", "nunits", "first", "mask", "full", "chunk", "base")

    def __init__(self, cls: int, chunk: int, base: int, mask: int = 0) -> None:
        self.cls = cls
        self.unit = SIZE_CLASSES[cls]
        self.nunits, self.first = RUN_GEOMETRY[cls]
        self.full = (1 << self.nunits) - 1
        self.mask = mask
        self.chunk = chunk
        self.base = base            # offset of the chunk


class Heap:
    """Volatile view of the allocator, changing persistent state only through ``eng``."""

    def __init__(self, eng: Engine, geo: Geometry) -> None:
        self.eng = eng
        self.geo = geo
        self.used = bytearray(geo.nchunks)      # 1: chunk taken (run, huge, lent to a log)
        self.runs: dict[int, _Run] = {}
        self.avail: list[set[int]] = [set() for _ in SIZE_CLASSES]
        self.cur: list[_Run | None] = [None] * len(SIZE_CLASSES)
        self._chunk_hint = 0
        eng.spill_reserve = self._spill_reserve
        eng.spill_release = self._spill_release
        self._load()

    def _load(self) -> None:
        geo, eng = self.geo, self.eng
        table = eng.get_words(geo.ctab, geo.nchunks)
        i, n = 0, geo.nchunks
        while i < n:
            e = table[i]
            kind = e & 0xFF
            if kind == CH_FREE:
                i += 1
                continue
            if kind == CH_RUN:
                cls = (e >> 8) & 0xFF
                if cls >= len(SIZE_CLASSES):
                    raise PmReplicaError(errno.EINVAL, f"chunk {i}: bad size class {cls}")
                base = geo.chunk_off(i)
                run = _Run(cls, i, base)
                nw = (run.nunits + 63) // 64
                words = eng.get_words(base, nw)
                run.mask = int.from_bytes(struct.pack(f"<{nw}Q", *words), "little") & run.full
                self.runs[i] = run
                self.used[i] = 1
                if run.mask != run.full:
                    self.avail[cls].add(i)
                i += 1
            elif kind == CH_HUGE:
                cnt = e >> 32
                if cnt == 0 or i + cnt > n:
                    raise PmReplicaError(errno.EINVAL, f"chunk {i}: bad huge block length {cnt}")
                self.used[i:i + cnt] = b"\1" * cnt
                i += cnt
            else:
                raise PmReplicaError(errno.EINVAL, f"chunk {i}: bad chunk table entry {e:#x}")

    # -- allocation ----------------------------------------------------------------------

    def alloc(self, size: int, type_num: int, type_code: int = 0, init: bytes = b"") -> int:
        """Allocate ``size`` payload bytes inside the current transaction; return the oid.

        The allocation header and ``init`` (the payload's first bytes) are written fresh."""
        if size < 0 or size > MAX_ALLOC:
            raise ValueError(f"allocation size {size} out of range")
        total = size + ALLOC_HDR
        cls = class_of(total)
        off = self._alloc_unit(cls) if cls >= 0 else self._alloc_huge(total)
        eng = self.eng
        eng.write_fresh(off, _HDR.pack(size, type_num | ALLOC_MAGIC << 16 | type_code << 32)
                        + init)
        if type_num == POBJECT_TYPE_NUM and len(init) >= 8:
            eng.fresh_objs.add(off + ALLOC_HDR)
        return off + ALLOC_HDR

    def _alloc_unit(self, cls: int) -> int:
        eng = self.eng
        run = self.cur[cls]
        if run is None or run.mask == run.full:
            run = self._pick_run(cls)
        mask = run.mask
        free = ~mask & run.full
        bit = free & -free
        unit = bit.bit_length() - 1
        run.mask = mask | bit

        def undo(run: _Run = run, bit: int = bit) -> None:
            run.mask &= ~bit
            self.avail[run.cls].add(run.chunk)
        eng.on_abort.append(undo)
        woff = run.base + ((unit >> 6) << 3)
        eng.set(woff, eng.get(woff) | (1 << (unit & 63)))
        return run.base + run.first + unit * run.unit

    def _pick_run(self, cls: int) -> _Run:
        avail = self.avail[cls]
        while avail:
            ch = next(iter(avail))
            run = self.runs.get(ch)
            if run is not None and run.mask != run.full:
                self.cur[cls] = run
                return run
            avail.discard(ch)
        # A new run: one free chunk, its bitmap zeroed fresh, its table entry logged.
        ch = self._take_chunks(1)
        base = self.geo.chunk_off(ch)
        run = _Run(cls, ch, base)
        self.eng.write_fresh(base, bytes(run.first))
        self.eng.set(self.geo.ctab + ch * 8, CH_RUN | cls << 8)
        self.runs[ch] = run
        avail.add(ch)
        self.cur[cls] = run

        def undo(ch: int = ch, cls: int = cls) -> None:
            self.runs.pop(ch, None)
            self.avail[cls].discard(ch)
            if self.cur[cls] is run:
                self.cur[cls] = None
            self.used[ch] = 0
        self.eng.on_abort.append(undo)
        return run

    def _find_chunks(self, cnt: int) -> int:
        need = b"\0" * cnt
        pos = self.used.find(need, self._chunk_hint)
        if pos < 0:
            pos = self.used.find(need)
        if pos < 0:
            raise PoolFullError(errno.ENOMEM, f"object pool is full: no {cnt} free "
                                              f"{CHUNK >> 10} KiB chunk(s) left")
        return pos

    def _find_room(self, cnt: int) -> int:
        """``cnt`` free chunks in a row, making them free if need be: committed frees become
        reusable at a checkpoint, emptied runs go back to the free chunks."""
        try:
            return self._find_chunks(cnt)
        except PoolFullError:
            pass
        if self.eng.pending_release:
            self.eng.checkpoint()
            try:
                return self._find_chunks(cnt)
            except PoolFullError:
                pass
        if not self.reclaim_now():
            raise PoolFullError(errno.ENOMEM, f"object pool is full: no {cnt} free "
                                              f"{CHUNK >> 10} KiB chunk(s) left")
        return self._find_chunks(cnt)

    def _take_chunks(self, cnt: int) -> int:
        pos = self._find_room(cnt)
        self.used[pos:pos + cnt] = b"\1" * cnt
        self._chunk_hint = pos + cnt

        def undo(pos: int = pos, cnt: int = cnt) -> None:
            self.used[pos:pos + cnt] = bytes(cnt)
        self.eng.on_abort.append(undo)
        return pos

    def _alloc_huge(self, total: int) -> int:
        cnt = (total + CHUNK - 1) >> CHUNK_SHIFT
        pos = self._take_chunks(cnt)
        self.eng.set(self.geo.ctab + pos * 8, CH_HUGE | cnt << 32)
        return self.geo.chunk_off(pos)

    # -- free ----------------------------------------------------------------------------

    def header(self, oid: int) -> tuple[int, int, int]:
        """(payload size, type_num, type_code) of an allocation; EINVAL if ``oid`` is not one."""
        self._check_oid(oid)
        size, w1 = self.eng.q[(oid - ALLOC_HDR) >> 3:(oid >> 3)].tolist()
        if (w1 >> 16) & 0xFFFF != ALLOC_MAGIC:
            raise PmReplicaError(errno.EINVAL, f"oid {oid:#x} is not an allocated object")
        return size, w1 & 0xFFFF, w1 >> 32

    def _check_oid(self, oid: int) -> None:
        geo = self.geo
        if oid & 15 or oid < geo.heap + ALLOC_HDR or oid >= geo.heap + geo.nchunks * CHUNK:
            raise PmReplicaError(errno.EINVAL, f"oid {oid:#x} is not inside the heap")

    def free(self, oid: int) -> None:
        """Free an allocation inside the current transaction (reusable after commit)."""
        self._check_oid(oid)
        eng, geo = self.eng, self.geo
        unit_off = oid - ALLOC_HDR
        ch = (unit_off - geo.heap) >> CHUNK_SHIFT
        ctab_off = geo.ctab + ch * 8
        e = eng.get(ctab_off)
        kind = e & 0xFF
        if kind == CH_RUN:
            run = self.runs[ch]
            rel = unit_off - run.base - run.first
            unit, rem = divmod(rel, run.unit)
            if rel < 0 or rem or unit >= run.nunits:
                raise PmReplicaError(errno.EINVAL, f"oid {oid:#x} is not a block start")
            woff = run.base + ((unit >> 6) << 3)
            word = eng.get(woff)
            bit = 1 << (unit & 63)
            if not word & bit:
                raise PmReplicaError(errno.EINVAL, f"oid {oid:#x} freed twice")
            eng.set(woff, word & ~bit)
            vbit = 1 << unit

            def done(run: _Run = run, vbit: int = vbit) -> None:
                run.mask &= ~vbit
                self.avail[run.cls].add(run.chunk)
            eng.released.append(done)
            eng.freed.append((unit_off, run.unit))
        elif kind == CH_HUGE and unit_off == geo.chunk_off(ch):
            cnt = e >> 32
            eng.set(ctab_off, CH_FREE)
            eng.freed.append((unit_off, cnt << CHUNK_SHIFT))

            def done_huge(ch: int = ch, cnt: int = cnt) -> None:
                self.used[ch:ch + cnt] = bytes(cnt)
            eng.released.append(done_huge)
        else:
            raise PmReplicaError(errno.EINVAL, f"oid {oid:#x} freed twice or never allocated")

    def reclaim_empty_runs(self) -> int:
        """Return runs without any allocated unit to the free chunks (inside a transaction).

        The run stops serving allocations at once; its chunk is reusable after the next
        checkpoint, like any freed memory."""
        n = 0
        eng = self.eng
        for ch, run in list(self.runs.items()):
            if run.mask:
                continue
            eng.set(self.geo.ctab + ch * 8, CH_FREE)
            del self.runs[ch]
            self.avail[run.cls].discard(ch)
            if self.cur[run.cls] is run:
                self.cur[run.cls] = None

            def undo(ch: int = ch, run: _Run = run) -> None:
                self.runs[ch] = run
                self.avail[run.cls].add(ch)
            eng.on_abort.append(undo)

            def done(ch: int = ch) -> None:
                self.used[ch] = 0
            eng.released.append(done)
            n += 1
        return n

    def reclaim_now(self) -> int:
        """Return the chunks of runs without any allocated or pending unit to the free
        chunks at once, whatever transaction is open, so that it can use them: the chunk
        table entries are committed on their own (Engine.commit_words). No record still in
        the log touches such a chunk (its units were freed before the last checkpoint, and
        none was allocated since), so it is reusable as soon as that record is durable on
        the master, which commit_words makes sure of before returning."""
        empty = [ch for ch, run in self.runs.items() if not run.mask]
        if not empty:
            return 0
        ctab = self.geo.ctab >> 3
        self.eng.commit_words({ctab + ch: CH_FREE for ch in empty})
        for ch in empty:
            run = self.runs.pop(ch)
            self.avail[run.cls].discard(ch)
            if self.cur[run.cls] is run:
                self.cur[run.cls] = None
            self.used[ch] = 0
        log.debug("returned %d emptied run chunk(s) to the free chunks", len(empty))
        return len(empty)

    # -- lending chunks to a spilled log -------------------------------------------------

    def _spill_reserve(self, nbytes: int) -> int:
        cnt = (nbytes + CHUNK - 1) >> CHUNK_SHIFT
        pos = self._find_room(cnt)
        self.used[pos:pos + cnt] = b"\1" * cnt
        return self.geo.chunk_off(pos)

    def _spill_release(self, off: int, nbytes: int) -> None:
        cnt = (nbytes + CHUNK - 1) >> CHUNK_SHIFT
        pos = (off - self.geo.heap) >> CHUNK_SHIFT
        self.used[pos:pos + cnt] = bytes(cnt)

    # -- walking -------------------------------------------------------------------------

    def allocations(self) -> Iterator[tuple[int, int, int, int]]:
        """Every allocation of the committed state: ``(oid, size, type_num, type_code)``."""
        q = self.eng.q
        geo = self.geo
        table = q[geo.ctab >> 3:(geo.ctab >> 3) + geo.nchunks].tolist()
        i, n = 0, geo.nchunks
        while i < n:
            e = table[i]
            kind = e & 0xFF
            if kind == CH_RUN:
                run = self.runs.get(i)
                if run is not None:
                    # the persistent bitmap: the volatile mask also holds units freed but
                    # not yet reusable (they wait for a checkpoint)
                    nw = (run.nunits + 63) // 64
                    mask = int.from_bytes(q[run.base >> 3:(run.base >> 3) + nw], "little")
                    mask &= run.full
                    start = run.base + run.first
                    while mask:
                        low = mask & -mask
                        unit = low.bit_length() - 1
                        mask ^= low
                        off = start + unit * run.unit
                        size, w1 = q[off >> 3:(off >> 3) + 2].tolist()
                        if (w1 >> 16) & 0xFFFF != ALLOC_MAGIC:
                            log.error("allocation at %#x has a damaged header", off)
                            continue
                        yield off + ALLOC_HDR, size, w1 & 0xFFFF, w1 >> 32
                i += 1
            elif kind == CH_HUGE:
                off = geo.chunk_off(i)
                size, w1 = q[off >> 3:(off >> 3) + 2].tolist()
                if (w1 >> 16) & 0xFFFF == ALLOC_MAGIC:
                    yield off + ALLOC_HDR, size, w1 & 0xFFFF, w1 >> 32
                else:
                    log.error("huge allocation at %#x has a damaged header", off)
                i += max(1, e >> 32)
            else:
                i += 1

"""Transactions over the mapped pool: a volatile redo overlay, committed as one log record.

Inside a transaction, writes to existing persistent words go to an overlay
(``{word index: value}``) that reads consult; the mapping itself keeps the committed state.
Memory allocated by the transaction is free space in the committed state, so its contents
are written straight into the mapping ("fresh" bytes).

Commit (outermost level), on lane 0, drained once::

    [large fresh bytes]     flushed first when they exceed FRESH_INLINE, then fenced
    record                  the overlay's words and the small fresh bytes, checksummed,
                            appended to the log area and flushed: one message per replica;
                            then fenced
    apply                   the overlay is stored in place (on the master only)
    drain                   one wait for the master and every replica

A fence orders the master's own writes: what was flushed before it is durable before any
store after it can reach the media (libpmem's drain on pmem; nothing off pmem, where a
flush is a synchronous msync). Without it, a power failure could keep in-place words whose
record it lost. Replicas need none: each applies the ranges of a lane in issue order.

The in-place words reach the replicas at a checkpoint: when the log area is full, when
enough freed memory waits for reuse, on ``close()``, and after recovery. A checkpoint
flushes every range changed since the last one, fences, then writes the new control slot
(which empties the log); it needs no drain of its own. Memory freed by a transaction is
reused only after the next checkpoint, so no record still in the log can touch memory that
a later transaction writes fresh.

A replica (or the master) interrupted at any point therefore holds the last checkpoint's
state plus a prefix of valid records, which open replays; a torn record fails its
checksum and ends the log. Abort drops the overlay and rolls back volatile state.
"""

from __future__ import annotations

import errno
import logging
import threading
from array import array
from typing import Any, Callable

from ..errors import PmReplicaError
from . import redolog
from .layout import Geometry

log = logging.getLogger("pmreplica.pmemobj")

#: Flush ranges closer than this are merged (one msync / one message instead of two).
DATA_GAP = 2048
FRESH_GAP = 2048
#: Fresh bytes up to this many per transaction travel inside its log record.
FRESH_INLINE = 8192
#: Checkpoint early when this many committed frees wait for reuse, or this many blocks
#: wait for their in-place flush.
RELEASE_BATCH = 1024
DIRTY_BATCH = 4096

_NONE, _WORK, _ABORTED = 0, 1, 2
#: kinds of level for Engine.begin: one opened by begin() (ended by commit() or abort())
#: and one opened by a ``with`` block
FREE_LEVEL, CONTEXT_LEVEL = "F", "C"
_get_ident = threading.get_ident


class TransactionAborted(PmReplicaError):
    """The transaction was aborted (``abort()`` or an error); nothing of it was kept."""


class PoolFullError(PmReplicaError, MemoryError):
    """No free space left for an allocation (ENOMEM; also a MemoryError, as in pynvm)."""


class PoolClosedError(PmReplicaError, ValueError):
    """An object of a closed pool was used (EBADF; also a ValueError, like closed files)."""


class _ClosedView:
    """Stands in for the mapping once the pool is closed: every access says so."""

    def __getitem__(self, _key: Any) -> Any:
        raise PoolClosedError(errno.EBADF, "object pool is closed")

    __setitem__ = __getitem__


class Engine:
    """Owns the mapping view, the overlay and the commit protocol of one pool."""

    def __init__(self, ps: Any, geo: Geometry, *, readonly: bool = False) -> None:
        self.ps = ps
        #: orders the master's own writes: what was flushed before it is durable on the
        #: master before any store after it reaches the media (libpmem's drain on pmem; a
        #: no-op where a flush is a synchronous msync). Replicas need none: each applies
        #: the ranges of a lane in issue order.
        self._fence: Callable[[], None] = ps.mapping.drain
        self.geo = geo
        self.buf: memoryview = ps.buf
        self.q: memoryview = self.buf.cast("Q")
        self.nwords = len(self.q)
        self.readonly = readonly
        self.lock = threading.RLock()
        self.ov: dict[int, int] = {}
        self.fresh: list[tuple[int, int]] = []
        #: PObjects allocated by this transaction: their refcount words are fresh memory
        self.fresh_objs: set[int] = set()
        self.on_abort: list[Callable[[], None]] = []
        self.on_commit: list[Callable[[], None]] = []
        self.stack: list[str] = []
        self.stage = _NONE
        self.writer: int | None = None
        self.seq = 1                     # the next record's sequence number
        self._ctl_seq = 1                # the sequence number the control slot holds
        self.broken: BaseException | None = None
        #: hooks the heap installs: lend free chunks to a spilled log, take them back
        self.spill_reserve: Callable[[int], int] | None = None
        self.spill_release: Callable[[int, int], None] | None = None
        #: this transaction's frees, and committed frees waiting for a checkpoint
        self.released: list[Callable[[], None]] = []
        #: blocks this transaction frees, as (offset, length)
        self.freed: list[tuple[int, int]] = []
        self.pending_release: list[Callable[[], None]] = []
        #: 256-byte blocks changed in place since the last checkpoint
        self.dirty: set[int] = set()
        self.ctl_slot = 0
        self.log_pos = geo.log + redolog.CTL_LINE
        self.log_end = geo.log + geo.log_size
        #: runs inside the transaction just before the outermost commit (deferred frees)
        self.pre_commit: Callable[[], None] | None = None
        self.spills = 0
        self.checkpoints = 0

    # -- access -------------------------------------------------------------------------

    def get(self, off: int) -> int:
        """The u64 at ``off`` as this transaction sees it."""
        ov = self.ov
        if ov:
            v = ov.get(off >> 3)
            if v is not None:
                return v
        return self.q[off >> 3]

    def set(self, off: int, value: int) -> None:
        """Write the u64 at ``off`` (logged; only inside this thread's transaction)."""
        if self.writer != _get_ident() or self.stage != _WORK:
            self._refuse_write()
        self.ov[off >> 3] = value

    def get_words(self, off: int, n: int) -> list[int]:
        w = off >> 3
        out = self.q[w:w + n].tolist()
        ov = self.ov
        if ov:
            if len(ov) < n:
                end = w + n
                for k, v in ov.items():
                    if w <= k < end:
                        out[k - w] = v
            else:
                get = ov.get
                for i in range(n):
                    v = get(w + i)
                    if v is not None:
                        out[i] = v
        return out

    def set_words(self, off: int, values: Any) -> None:
        if self.writer != _get_ident() or self.stage != _WORK:
            self._refuse_write()
        w = off >> 3
        ov = self.ov
        for i, v in enumerate(values, w):
            ov[i] = v

    def read(self, off: int, n: int) -> bytes:
        """Bytes as this transaction sees them."""
        data = self.buf[off:off + n].tobytes()
        ov = self.ov
        if ov:
            hits = self._logged_words(off, n)
            if hits:
                b = bytearray(data)
                for k in hits:
                    word = ov[k].to_bytes(8, "little")
                    lo, hi = max(off, k << 3), min(off + n, (k << 3) + 8)
                    b[lo - off:hi - off] = word[lo - (k << 3):hi - (k << 3)]
                data = bytes(b)
        return data

    def write_fresh(self, off: int, data: Any) -> None:
        """Write bytes of memory allocated in this transaction straight into the mapping."""
        if self.writer != _get_ident() or self.stage != _WORK:
            self._refuse_write()
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        self.buf[off:off + n] = data
        self.fresh.append((off, n))
        ov = self.ov
        if ov:
            # A logged word inside the range must carry the new bytes, or applying the
            # overlay at commit would write the old ones back.
            for k in self._logged_words(off, n):
                word = bytearray(ov[k].to_bytes(8, "little"))
                lo, hi = max(off, k << 3), min(off + n, (k << 3) + 8)
                word[lo - (k << 3):hi - (k << 3)] = self.buf[lo:hi]
                ov[k] = int.from_bytes(word, "little")

    def write_fresh_words(self, off: int, values: Any) -> None:
        self.write_fresh(off, memoryview(array("Q", values)).cast("B"))

    def _logged_words(self, off: int, n: int) -> list[int]:
        """Indexes of the overlay's words that overlap [off, off+n) (scanning the smaller
        of the overlay and the range)."""
        ov = self.ov
        w0, w1 = off >> 3, (off + n + 7) >> 3
        if len(ov) < w1 - w0:
            return [k for k in ov if w0 <= k < w1]
        return [k for k in range(w0, w1) if k in ov]

    def _refuse_write(self) -> None:
        if self.broken is not None:
            raise PmReplicaError(errno.EIO, f"object pool is unusable after a failed commit: "
                                            f"{self.broken}")
        if self.readonly:
            raise PmReplicaError(errno.EROFS, "object pool is open read-only")
        if self.stage == _ABORTED and self.writer == _get_ident():
            raise RuntimeError("transaction was aborted; no further changes until it ends")
        raise RuntimeError("persistent memory written outside of a transaction")

    # -- transaction levels --------------------------------------------------------------

    def begin(self, kind: str) -> None:
        """Open a transaction level of ``kind`` (FREE_LEVEL or CONTEXT_LEVEL) in this thread."""
        if self.broken is not None or self.readonly:
            self._refuse_write()
        self.lock.acquire()
        if self.stack:
            if self.stage == _ABORTED:
                self.lock.release()
                raise RuntimeError("cannot begin a transaction inside an aborted one")
        else:
            self.stage = _WORK
            self.writer = _get_ident()
        self.stack.append(kind)

    def _finish(self) -> None:
        """The outermost level ended: reset and let other threads in."""
        self.stage = _NONE
        self.writer = None
        self.ov.clear()
        self.fresh.clear()
        self.fresh_objs.clear()
        self.released.clear()
        self.freed.clear()
        self.on_abort.clear()
        self.on_commit.clear()

    def _pop(self) -> None:
        """Pop one level; after the outermost, reset and let other threads in."""
        self.stack.pop()
        if not self.stack:
            self._finish()
        self.lock.release()

    def rollback(self) -> None:
        """Drop the overlay and undo volatile changes (reverse order).

        Bytes the transaction wrote into free space still go to the replicas, so that
        outside transactions every replica is byte-identical to the master."""
        self.ov.clear()
        if self.fresh and self.broken is None:
            try:
                for off, ln in redolog.coalesce(self.fresh, FRESH_GAP):
                    self.ps.flush(off, ln)
                self.ps.drain()
            except OSError as e:
                log.warning("flushing an aborted transaction's free space failed: %s", e)
        self.fresh.clear()
        self.fresh_objs.clear()
        self.released.clear()
        self.freed.clear()
        undo = self.on_abort
        while undo:
            try:
                undo.pop()()
            except Exception:  # keep undoing: one failed undo must not strand the rest
                log.exception("volatile rollback step failed")
        self.on_commit.clear()
        self.stage = _ABORTED

    def end_context(self, exc_type: Any) -> None:
        """``__exit__`` of a context level; raises when an abort needs reporting."""
        if not self.stack or self.writer != _get_ident():
            raise RuntimeError("transaction context exited outside of its transaction")
        if self.stack[-1] != CONTEXT_LEVEL:
            while self.stack and self.stack[-1] == FREE_LEVEL:
                self.stack.pop()
                self.lock.release()
            if self.stage == _WORK:
                self.rollback()
            self._pop()
            raise RuntimeError("Non-context transaction open at context end.")
        if exc_type is None and self.stage == _WORK:
            self._end_level()
            return
        if self.stage == _WORK:
            self.rollback()
        self._pop()
        if exc_type is None:
            raise TransactionAborted(errno.ECANCELED, "transaction aborted")

    def commit_level(self) -> None:
        """Non-context ``commit()``."""
        if not self.stack or self.writer != _get_ident():
            raise RuntimeError("commit called outside of transaction")
        if self.stack[-1] != FREE_LEVEL:
            raise RuntimeError("Non-context commit inside a context")
        if self.stage == _ABORTED:
            self._pop()
            raise TransactionAborted(errno.ECANCELED, "transaction aborted")
        self._end_level()

    def _end_level(self) -> None:
        """End a level that completed: the outermost commits first, then is popped."""
        if len(self.stack) == 1:
            try:
                self._commit_outer()
            finally:
                self._pop()
        else:
            self._pop()

    def abort_level(self, err: int = errno.ECANCELED) -> None:
        """``abort()``: roll the whole transaction back now."""
        if not self.stack or self.writer != _get_ident():
            raise RuntimeError("abort called outside of transaction")
        if self.stage == _WORK:
            self.rollback()
        if self.stack[-1] == FREE_LEVEL:
            self._pop()
            raise TransactionAborted(err, "transaction aborted")

    def abandon(self) -> bool:
        """Roll back and end this thread's open transaction, all levels (for close())."""
        if not self.stack or self.writer != _get_ident():
            return False
        if self.stage == _WORK:
            self.rollback()
        levels = len(self.stack)
        self.stack.clear()
        self._finish()
        for _ in range(levels):
            self.lock.release()
        return True

    def in_tx(self) -> bool:
        """True inside this thread's transaction, in its working stage (a nested level
        would add nothing: any exception aborts the whole transaction anyway)."""
        return self.writer == _get_ident() and self.stage == _WORK

    @property
    def depth(self) -> int:
        return len(self.stack) if self.writer == _get_ident() else 0

    # -- commit --------------------------------------------------------------------------

    def _commit_outer(self) -> None:
        if self.pre_commit is not None:
            try:
                self.pre_commit()
            except BaseException:
                self.rollback()
                raise
        self.commit_now()

    def commit_now(self) -> None:
        """Make the outermost transaction durable everywhere (one drain)."""
        ov, fresh = self.ov, self.fresh
        if not ov and not fresh:
            self._run_commit_hooks()
            return
        if self.freed:
            self._drop_freed()
        ps, q = self.ps, self.q
        # The record: the fresh bytes when they are few (then they need no flush of their
        # own; ranges are whole words, as allocations are 16-aligned), then the overlay,
        # which replay applies last, so its words win where both cover one.
        fresh_ranges = redolog.coalesce(fresh, 0) if len(fresh) > 1 else fresh
        inline = sum(ln for _, ln in fresh_ranges) <= FRESH_INLINE
        payload = array("Q")
        ranges: list[tuple[int, int]] = []
        if inline:
            for off, ln in fresh_ranges:
                w0, w1 = off >> 3, (off + ln + 7) >> 3
                payload.append(w0)
                payload.append(w1 - w0)
                payload.extend(q[w0:w1])
                ranges.append((w0 << 3, (w1 - w0) << 3))
        nfresh = len(payload)
        redolog.encode(ov, payload, ranges)
        nbytes = redolog.REC_HDR + 8 * len(payload)
        try:
            spill = self._room_for(nbytes)
        except PoolFullError:
            self.rollback()       # nothing was written that the pool depends on
            raise
        except BaseException as e:
            self._break(e)
            raise
        rec = redolog.record(self.seq, payload)
        try:
            if not inline:
                for off, ln in redolog.coalesce(fresh_ranges, FRESH_GAP):
                    ps.flush(off, ln)
                self._fence()                        # new objects before the record
            if spill:
                self._commit_spilled(rec, payload, ranges, spill)
            else:
                self._append(rec, memoryview(payload)[nfresh:], ranges)
                self._committed_frees()
                if len(self.pending_release) > RELEASE_BATCH or len(self.dirty) > DIRTY_BATCH:
                    self.checkpoint()
                ps.drain()
        except BaseException as e:
            self._break(e)
            raise
        self._run_commit_hooks()

    def _break(self, e: BaseException) -> None:
        self.broken = e
        log.error("commit failed; the pool refuses further changes: %s", e)

    def _drop_freed(self) -> None:
        """Forget the logged words inside blocks this transaction frees: that memory is
        free once it commits and gone with the overlay if it aborts, so its words need no
        log (freeing many objects then costs a log entry per bitmap word, not per object)."""
        ov = self.ov
        for off, n in self.freed:
            for k in self._logged_words(off, n):
                del ov[k]

    def _room_for(self, nbytes: int) -> int:
        """Make room for a record of ``nbytes``: in the log (checkpointing it if it is too
        full), else in free chunks (their offset is returned; 0 for the log). PoolFullError
        when neither can hold it; nothing has been written then."""
        if self.log_pos + nbytes <= self.log_end:
            return 0
        self.checkpoint()
        if self.log_pos + nbytes <= self.log_end:
            return 0
        if self.spill_reserve is None:
            raise PoolFullError(errno.ENOMEM, "transaction too large for the log")
        try:
            spill = self.spill_reserve(nbytes)
        except PoolFullError as e:
            raise PoolFullError(errno.ENOMEM, f"transaction refused, nothing was changed: "
                                              f"its commit record ({nbytes} bytes) is larger "
                                              f"than the log ({self.log_end - self.geo.log} "
                                              f"bytes) and the pool has no free space to "
                                              f"hold it ({e.strerror})") from None
        if self.seq != self._ctl_seq:
            # making room committed records of its own: a spilled record is replayed
            # before the log's, so the log must be empty when it is
            self.checkpoint()
        return spill

    def _append(self, rec: array, inplace: memoryview | array,
                ranges: list[tuple[int, int]]) -> None:
        """Append a record to the log, make it durable on the master, then apply its
        in-place words (``inplace``: the payload part that replay must write now)."""
        q = self.q
        nbytes = len(rec) * 8
        w = self.log_pos >> 3
        q[w + 4:w + len(rec)] = rec[4:]      # payload first, header last
        q[w:w + 4] = rec[:4]
        self.ps.flush(self.log_pos, nbytes)
        self._fence()                        # the record before its in-place words
        self.log_pos += nbytes
        self.seq += 1
        redolog.replay(q, inplace, self.nwords)
        self._mark_dirty(ranges)

    def commit_words(self, words: dict[int, int]) -> None:
        """Commit ``words`` (``{word index: value}``) on their own, now, beside whatever
        transaction is open: the allocator's own changes that no abort may undo (chunks of
        emptied runs going back to the free pool). Made durable by the next drain."""
        payload, ranges = redolog.encode(words)
        nbytes = redolog.REC_HDR + 8 * len(payload)
        try:
            if self.log_pos + nbytes > self.log_end:
                self.checkpoint()
            if self.log_pos + nbytes > self.log_end:
                raise PmReplicaError(errno.ENOMEM, "allocator record larger than the log")
            self._append(redolog.record(self.seq, payload), payload, ranges)
        except BaseException as e:
            self._break(e)
            raise

    def _commit_spilled(self, rec: Any, payload: Any, ranges: list[tuple[int, int]],
                        spill: int) -> None:
        """A record larger than the log area, written to free chunks at ``spill`` (kept
        until the checkpoint that follows at once)."""
        ps, q = self.ps, self.q
        nbytes = len(rec) * 8
        self.spills += 1
        try:
            q[spill >> 3:(spill >> 3) + len(rec)] = rec
            ps.flush(spill, nbytes)
            self._fence()                                 # the record before the slot
            self._write_control(self.seq, spill)          # the record counts from here
            self._fence()                                 # and before its in-place words
            redolog.replay(q, memoryview(payload), self.nwords)
            self._mark_dirty(ranges)
            self.seq += 1
            self._committed_frees()
            self.checkpoint()
            ps.drain()
        finally:
            if self.spill_release is not None and self.broken is None:
                self.spill_release(spill, nbytes)

    def _mark_dirty(self, ranges: list[tuple[int, int]]) -> None:
        dirty = self.dirty
        for off, ln in ranges:
            dirty.update(range(off >> 8, ((off + ln - 1) >> 8) + 1))

    def _write_control(self, seq: int, spill: int) -> None:
        slot = 1 - self.ctl_slot
        off = self.geo.log + slot * redolog.CTL_SLOT
        self.q[off >> 3:(off >> 3) + 4] = redolog.control_slot(seq, spill)
        self.ps.flush(off, redolog.CTL_SLOT)
        self.ctl_slot = slot

    def checkpoint(self) -> None:
        """Flush every range changed in place since the last checkpoint, then empty the
        log; committed frees become reusable. Needs no drain (lane order does)."""
        if self.seq != self._ctl_seq or self.dirty:
            self._write_back()
        pending, self.pending_release = self.pending_release, []
        for fn in pending:
            fn()

    def _write_back(self) -> None:
        """The checkpoint's writes: the changed ranges, a fence, the new control slot."""
        ps = self.ps
        blocks = sorted(self.dirty)
        ranges = []
        for b in blocks:
            if ranges and b * 256 <= ranges[-1][0] + ranges[-1][1] + DATA_GAP:
                ranges[-1][1] = b * 256 + 256 - ranges[-1][0]
            else:
                ranges.append([b * 256, 256])
        for off, ln in ranges:
            ps.flush(off, min(ln, self.ps.size - off))
        self._fence()                        # the data before the slot that drops its log
        self.dirty.clear()
        self._write_control(self.seq, 0)
        self._ctl_seq = self.seq
        self.log_pos = self.geo.log + redolog.CTL_LINE
        self.checkpoints += 1

    def _committed_frees(self) -> None:
        """This transaction's record is in the log: its frees wait for the next checkpoint."""
        self.pending_release.extend(self.released)
        self.released.clear()

    def _run_commit_hooks(self) -> None:
        hooks, self.on_commit = self.on_commit, []
        self.pending_release.extend(self.released)
        self.released.clear()
        self.on_abort.clear()
        for hook in hooks:
            hook()

    # -- recovery ------------------------------------------------------------------------

    def recover(self) -> int:
        """Replay the records left in the log (idempotent) and checkpoint; return how many
        were replayed. A read-only pool with records to replay replays them into a private
        copy of itself, its files left as they are (memory for the whole pool, in that case
        only): everything that reads the mapping then sees the committed state."""
        geo, q = self.geo, self.q
        ctl = redolog.read_control(q, geo.log)
        if ctl is None:
            raise PmReplicaError(errno.EINVAL, "object pool log control is damaged")
        self.ctl_slot, seq, spill = ctl
        self._ctl_seq = seq
        payloads = []
        if spill:
            p = redolog.read_record(q, spill, self.ps.size, seq)
            if p is None:
                raise PmReplicaError(errno.EINVAL, "object pool: spilled log record is damaged")
            payloads.append(p)
            seq += 1
        pos = geo.log + redolog.CTL_LINE
        while True:
            p = redolog.read_record(q, pos, self.log_end, seq)
            if p is None:
                break
            payloads.append(p)
            pos += redolog.REC_HDR + 8 * len(p)
            seq += 1
        self.seq = seq
        self.log_pos = pos
        try:
            if self.readonly:
                if payloads:
                    self.buf = memoryview(bytearray(self.buf))
                    self.q = self.buf.cast("Q")
                    for p in payloads:
                        redolog.replay(self.q, p, self.nwords)
                return len(payloads)
            for p in payloads:
                self._mark_dirty(redolog.replay(q, p, self.nwords))
        finally:
            for p in payloads:
                p.release()
            if self.q is not q:
                q.release()  # the shared mapping's view: the pool must be able to close
        if payloads or spill:
            self.checkpoint()
            self.ps.drain()
        return len(payloads)

    def release(self) -> None:
        """Drop the views of the mapping (the pool cannot close while they live)."""
        self.q.release()
        self.q = self.buf = _ClosedView()  # type: ignore[assignment]
        self.ov = {}

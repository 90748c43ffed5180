"""The bookkeeping of an open pool set's replica failures: what the master records of its
replicas (the replica-state record, the generation) and what the host application is told.

A replica that fails is taken off the write path, marked failed and stale with what it may
have missed, a new generation is started among the replicas left, its target is closed and
``pmreplica_replica_failed`` is called; the pool goes on degraded.

:class:`FailureBook` is a mixin of :class:`~pmreplica.poolset.PoolSet`, not a member: the
degraded write path calls :meth:`~FailureBook._note_dirty` on every persist, and a member's
method costs a lookup more there (about 40 ns a persist, measured with a local replica).
It changes the pool's write path (its ``_active`` replicas and ``_degraded`` flag, read by
every persist) under its state lock.
"""

from __future__ import annotations

import errno
import logging
import threading
from typing import Callable

import pluggy

from . import dirtymap
from . import generation as _generation
from .errors import PmReplicaError, as_replica_failure
from .generation import Generation
from .header import PoolHeader
from .plugin_manager import notify
from .pmem import Mapping
from .state import OFFSET as STATE_OFFSET, SIZE as STATE_SIZE, ReplicaState
from .status import FAILED, OK, STALE, ReplicaStatus, close_quietly
from .target import HeaderPageKeeper, ReplicaTarget

log = logging.getLogger(__name__)

#: seconds close() waits for the targets of replicas failing on other threads to be let go of
LET_GO_WAIT = 10.0

Dropped = list[tuple[ReplicaStatus, ReplicaTarget, OSError]]


class FailureBook:
    """The master's record of its replicas while the pool is open, and the state lock that every
    change of it (and every degraded persist) takes."""

    # what the PoolSet provides (see its __init__)
    buf: memoryview
    mapping: Mapping
    header: PoolHeader
    plugin_manager: pluggy.PluginManager
    replicas: list[ReplicaStatus]
    _active: tuple[tuple[ReplicaStatus, ReplicaTarget], ...]
    _degraded: bool
    _pending: list[list[int]]
    _npending: list[int]
    # and what the SessionBook (session.py) provides
    _activity: object | None
    _log_activity: Callable[[int, int, int], None]
    _cut_short_by_close: Callable[[], None]

    def _open_book(self, state: ReplicaState, generation: Generation | None) -> None:
        self._state_lock = threading.Lock()
        #: the replica-state record (state.py): stale replicas, the dirty map
        self.state = state
        #: the generation the master is in (generation.py); None for a pool made before them
        self.generation = generation
        #: the generation of the record the local replicas' copies hold (what a copy holds
        #: changes with the generation, and only then: they are rewritten when it differs)
        self._copies_at: int | None = None
        #: chunks written while an online resync copies (None when none runs)
        self._resync_marks: dirtymap.Bitmap | None = None
        #: targets dropped by _drop() and not yet let go of (closed, failure announced);
        #: close() waits for them, since a failing target may still hold a view of the
        #: mapping
        self._letting_go = 0
        self._let_go = threading.Condition(self._state_lock)
        #: close() began: the write path refuses calls (EBADF) instead of skipping replicas
        self._closing = False

    # -- the write path --------------------------------------------------------------------
    def _undrained(self) -> list[tuple[int, int]]:
        """The ranges flushed and not yet drained, on every lane, as ``(offset, length)``
        (a lane's last slot widened over the rest when it had too many to keep)."""
        out = []
        for pend, n in zip(self._pending, self._npending):  # (offset, end) pairs
            out += [(pend[2 * i], pend[2 * i + 1] - pend[2 * i])
                    for i in range(min(n, len(pend) // 2))]
        return out

    def _note_dirty(self, offset: int, length: int, lane: int
                    ) -> tuple[tuple[ReplicaStatus, ReplicaTarget], ...]:
        """Put a range in the activity log when its chunk is not there yet, record it when
        written while degraded (what the stale replicas lack), and return the replicas to
        write it to, read under the state lock: an online resync that ended
        meanwhile (its last copy runs under the lock) has put its replica back on them, and
        the range is then the replica's to receive, not to be marked."""
        with self._state_lock:
            if self._closing:
                raise PmReplicaError(errno.EBADF, "pool is closed")
            if self._activity is not None:
                self._log_activity(offset, length, lane)
            if self._degraded:
                if self._resync_marks is not None:
                    self._resync_marks.mark(offset, length)
                if self.state.mark_dirty(offset, length):
                    self._store_state()
            return self._active

    def _fail(self, status: ReplicaStatus, target: ReplicaTarget, error: BaseException,
             offset: int | None = None, length: int = 0, call: bool = True) -> None:
        """Take a replica off the write path, record it stale with what it may have missed
        (the failed range and every lane's undrained flushes), start a new generation among
        the replicas left (recorded on each before any persist that skips this replica can
        return: degraded persists wait for the state lock), tell the host application.
        The target is closed at once, so that the failed storage is let go (a disk can be
        unmounted and replaced while the application runs); a target must therefore bear
        being closed while another lane's thread is in one of its calls. ``target`` is the
        one that failed: if the replica no longer uses it (failed already, or resynced with
        a new target meanwhile), only what this call may have missed is recorded. An
        interrupt (``error`` not an Exception: KeyboardInterrupt, say) is raised again once
        the replica is failed, since the call it cut short may have left the range out.
        ``call``: the failure met a call of the write path (not found by a heartbeat)."""
        self._fail_replica(status, target, as_replica_failure(status.name, error), offset,
                           length, call)
        if not isinstance(error, Exception):
            raise error

    def _fail_replica(self, status: ReplicaStatus, target: ReplicaTarget, error: OSError,
                      offset: int | None, length: int, call: bool) -> None:
        """:meth:`_fail`'s work, ``error`` already the replica's OSError."""
        with self._state_lock:
            if self._closing and status.target is not target:
                # close() took the targets off (and may have unmapped the pool): a call it
                # cut short must not return as done, and the session is not clean; a
                # failure found outside a call (a heartbeat) has nothing to add
                if call:
                    self._cut_short_by_close()
                    raise PmReplicaError(errno.EBADF, "pool is closed")
                return
            changed = offset is not None and self.state.mark_dirty(offset, length)
            for off, n in self._undrained():
                changed |= self.state.mark_dirty(off, n)
            if status.target is not target:
                # failed already (by another lane), or replaced by a resync meanwhile: what
                # this call sent may be missing from the replica all the same
                if changed:
                    self._store_state()
                return
            dropped = self._drop([(status, error)])
        self._let_go_of(dropped)

    def _take_off(self, status: ReplicaStatus) -> ReplicaTarget | None:
        """Take a replica off the write path (the state lock is held); returns its target."""
        self._degraded = True  # before _active shrinks: persist reads them in this order
        target, status.target = status.target, None
        self._active = tuple(p for p in self._active if p[0] is not status)
        return target

    def _drop(self, failures: list[tuple[ReplicaStatus, OSError]]) -> Dropped:
        """Take failed replicas off the write path, mark them stale and start a new
        generation without them (the state lock is held); a replica that cannot record the new
        generation fails too. Returns every replica dropped, with its target."""
        dropped = []
        while failures:
            for status, error in failures:
                target = self._take_off(status)
                status.state, status.error = FAILED, error
                self.state.mark_stale(status.index)
                dropped.append((status, target, error))
            self._store_state()
            failures = self._advance_generation()
        self._letting_go += len(dropped)
        return dropped  # type: ignore[return-value]

    def _let_go_of(self, dropped: Dropped) -> None:
        """Close the targets :meth:`_drop` returned and tell the host application (outside
        the state lock: a target's close or a hook may take time)."""
        try:
            for st, tgt, err in dropped:
                close_quietly(tgt)
                self._announce_failed(st, err)
        finally:
            with self._let_go:
                self._letting_go -= len(dropped)
                self._let_go.notify_all()

    # -- generations and the record --------------------------------------------------------
    def _advance_generation(self, only_if_changed: bool = False
                           ) -> list[tuple[ReplicaStatus, OSError]]:
        """Start a new generation among the master and the replicas on the write path and
        record it on each (the state lock is held); ``only_if_changed``: not when those are the
        members of the current one. Returns the replicas that could not record it."""
        members = 1 | sum(1 << s.index for s, _ in self._active if s.state == OK)
        gen = self.generation
        if only_if_changed and gen is not None and gen.members == members:
            return []
        master = self.header.uuid
        gen = Generation.first(master, members) if gen is None else gen.next(members, master)
        at = _generation.OFFSET
        self.buf[at:at + _generation.SIZE] = gen.pack()
        self.mapping.persist(at, _generation.SIZE)
        self.generation = gen
        failed: list[tuple[ReplicaStatus, OSError]] = []
        for status, target in self._active:
            store = getattr(target, "store_generation", None)
            if store is None or status.state != OK:  # a stale one is not in step: behind
                continue
            try:
                store(gen)
            except Exception as e:  # noqa: BLE001 - a plugin's bug fails its replica alone
                failed.append((status, as_replica_failure(status.name, e)))
        return failed

    def _store_state(self, save: bool | None = None) -> None:
        """Write the replica-state record into the master header and make it durable, then
        its copies into the replicas on the write path that keep header pages (their
        HeaderPageKeeper targets: the local ones, and any plugin's; replica-sync reads them
        when the master is lost) when what they hold changed. The fine dirty map is saved first
        when ``recent`` reached its limit (``save``: True, always; False, never)."""
        if save if save is not None else self.state.needs_save():
            self.state.save_fine(keep_working_set=save is None)
        raw = self.state.pack()
        self.buf[STATE_OFFSET:STATE_OFFSET + STATE_SIZE] = raw
        self.mapping.persist(STATE_OFFSET, STATE_SIZE)
        if self._copies_at == self.state.generation:
            return
        copy = self.state.pack_copy()
        stored = True
        for status in self.replicas[1:]:
            target = status.target  # every replica that keeps header pages, whoever serves it
            if target is not None and isinstance(target, HeaderPageKeeper):
                try:
                    target.store_record(copy)
                except Exception as e:  # noqa: BLE001 - its next write fails too, and reports it
                    stored = False
                    log.debug("%s: cannot store the replica-state copy: %s", status.name,
                              as_replica_failure(status.name, e))
        self._copies_at = self.state.generation if stored else None

    def _mark_behind(self, status: ReplicaStatus, theirs: Generation) -> None:
        """A replica whose generation is behind the master's (found on open): stale."""
        if not self.state.is_stale(status.index):
            log.warning("%s is behind the master (%s, the master's %s): stale", status.name,
                        theirs.describe(), self.generation.describe())  # type: ignore[union-attr]
            with self._state_lock:
                self.state.mark_stale(status.index, full=True, compare=True)
                self._store_state()
        status.state = STALE

    def _restored(self, status: ReplicaStatus) -> list[tuple[ReplicaStatus, OSError]]:
        """Record a replica back in step with the master and start a generation with it
        (the state lock is held); returns the replicas that could not record it."""
        status.state, status.error = OK, None
        if self.state.clear_stale(status.index):
            self._store_state()
        self._degraded = any(s.state != OK for s in self.replicas)
        return self._advance_generation()

    # -- telling the host application ------------------------------------------------------
    def _report_failed(self, status: ReplicaStatus, error: BaseException) -> None:
        """A replica that could not be opened: marked failed and stale, announced."""
        with self._state_lock:
            status.state, status.error = FAILED, error
            self._degraded = True
            self.state.mark_stale(status.index)
            self._store_state()
        self._announce_failed(status, error)

    def _announce_failed(self, status: ReplicaStatus, error: BaseException) -> None:
        self._unlock(status.index)  # its storage may be unmounted and replaced meanwhile
        # the traceback's frames may hold views of the pool (a failed target's locals); kept
        # with the error, they would stop the pool from ever being unmapped (close: EBUSY)
        error.__traceback__ = None
        log.warning("%s failed: %s", status.name, error)
        notify(self.plugin_manager, "pmreplica_replica_failed", replica=status, error=error)

    def _notify_restored(self, status: ReplicaStatus) -> None:
        self._lock(status.index)  # as when the pool was opened
        notify(self.plugin_manager, "pmreplica_replica_restored", replica=status)

    # -- close -----------------------------------------------------------------------------
    def _close_book(self) -> None:
        """Wait for the targets of replicas failing on other threads to be let go of and for
        an online resync to stop, then save the fine dirty map (or drop its side file when
        the record needs none)."""
        with self._let_go:
            # an online resync on another thread stops at its next piece (it sees _closing);
            # a replica failing meanwhile is let go of before close() goes on
            if not self._let_go.wait_for(
                    lambda: not self._letting_go and self._resync_marks is None, LET_GO_WAIT):
                log.warning("a failed replica's target is still being closed, or an online "
                            "resync is still running")
            try:
                if self.state.period:
                    if self.state.save_fine(keep_working_set=False):
                        self._store_state(save=False)
                else:
                    self.state.drop_side_file()
            except OSError as e:  # the record keeps what the map lacks
                log.warning("cannot record the replica state on close: %s", e)

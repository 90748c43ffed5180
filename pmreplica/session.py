"""The session of an open pool set: its activity log (:mod:`pmreplica.activity`) begun
when the pool opens, written before a range reaches any replica, its epochs ended when no
call could still be writing to the chunks that leave it, and the log ended by a clean
close; and, on open, the replicas an unclean last session left stale brought in line.

:class:`SessionBook` is a mixin of :class:`~pmreplica.poolset.PoolSet`, as
:class:`~pmreplica.failures.FailureBook` is: the write path reads ``_log_shift`` and
``_logged`` on every call to skip the log for chunks already in it, and attributes of the
pool itself cost the least there.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from . import activity
from .errors import as_replica_failure
from .pmem import Mapping
from .setfile import PoolSetFile
from .status import FAILED, OK, ReplicaStatus

log = logging.getLogger(__name__)


class SessionBook:
    """The open session's activity log and marker."""

    # what the PoolSet provides (see its __init__ and FailureBook's)
    buf: memoryview
    mapping: Mapping
    set_file: PoolSetFile
    size: int
    replicas: list[ReplicaStatus]
    _npending: list[int]
    _busy: list[int]
    _undrained: Callable[[], list[tuple[int, int]]]
    _state_lock: threading.Lock
    resync: Callable[[int], int]
    _report_failed: Callable[[ReplicaStatus, BaseException], None]

    def _open_session(self) -> None:
        #: this session's activity log (None: no replicas, or it was lost) and what the
        #: write path reads of it: a byte per chunk, set once the chunk is logged
        self._activity: activity.ActivityLog | None = None
        self._log_shift = 62
        self._logged = bytearray(b"\1")
        #: replicas an unclean last session left to bring in line (activity.recover)
        self._unclean: list[int] = []
        #: True until _begin_activity, and once the session ended: close() leaves a marker
        #: it did not set (a recovery's, when the open failed) as it is
        self._session_over = True
        #: a call was cut short by close(): the session does not end cleanly
        self._close_refused = False
        #: close() cleared the marker
        self._marker_cleared = False
        #: lanes with calls in flight when the last epoch began that have not been seen
        #: without one since (an epoch may end only once this is empty)
        self._waiting: set[int] = set()

    def _begin_activity(self) -> None:
        """Start this session's activity log and set the marker naming it, durably, before
        the application can write; a pool set without replicas keeps none."""
        if len(self.replicas) < 2:
            return
        epoch = activity.epoch_chunks(self.size)
        self._session_over = False
        try:
            session = activity.ActivityLog.begin(self.set_file.master.parts[0].path, self.size,
                                                 epoch)
        except OSError as e:
            log.warning("%s: cannot keep an activity log (after a crash, reopening will bring "
                        "the whole pool in line on the replicas): %s", self.set_file.path, e)
        else:
            self._activity = session
            self._log_shift, self._logged = session.shift, session.logged
        # without a log, _logged stays "every chunk logged": the write path never asks
        self._store_marker()

    def _store_marker(self) -> None:
        """Store this session's marker durably: its log, or none."""
        session = self._activity
        self._set_marker(activity.Marker(session.session if session is not None else 0,
                                         logged=session is not None).pack())

    def _set_marker(self, raw: bytes) -> None:
        at = activity.MARKER_OFFSET
        self.buf[at:at + len(raw)] = raw
        self.mapping.persist(at, len(raw))

    def _bring_in_line(self) -> None:
        """After an unclean last session, resync every stale replica that opened (recover
        marked them stale, with what it was writing) before the application goes on; one
        that cannot be stays stale, reported failed. A crash meanwhile leaves it all to the
        next open: this session's marker is set already."""
        for index in self._unclean:
            status = self.replicas[index]
            if status.target is None or status.state == OK:
                continue  # in step; or failed to open: reported, replica-sync has the rest
            try:
                self.resync(index)
            except Exception as e:  # noqa: BLE001 - a plugin's bug fails its replica alone
                if status.state != FAILED:  # failed on rejoining: reported already
                    self._report_failed(status, as_replica_failure(status.name, e))
        self._unclean = []

    def _end_activity(self) -> None:
        """Clear the marker and delete the log, when the session ends cleanly: every lane
        drained and no call cut short by close(); else the log stays for the next open."""
        session, self._activity = self._activity, None
        if self._session_over:
            return
        self._session_over = True  # once: a close refused (EBUSY) is called again
        with self._state_lock:  # a call cut short by close() meanwhile waits, or is seen
            clean = not any(self._npending) and not self._close_refused
            if clean:
                try:
                    self._set_marker(activity.CLEAR)
                    self._marker_cleared = True
                except OSError as e:  # the next open takes this session for unclean: safe
                    log.warning("%s: cannot record the clean close: %s", self.set_file.path, e)
                    clean = False
        if session is not None:
            session.end(delete=clean)

    def _log_activity(self, offset: int, length: int, lane: int) -> None:
        """Put a range's chunks in the activity log before it goes out, from a call on
        ``lane`` (the state lock is held); end the epoch first when it is over. A log that
        cannot be written is given up: the marker then says "any chunk"."""
        session = self._activity
        assert session is not None
        busy = self._busy
        waiting = self._waiting
        if waiting:  # this call is in flight on its own lane, and names its range here
            waiting.difference_update([i for i in waiting if busy[i] - (i == lane) <= 0])
        try:
            if session.epoch_over and not waiting:
                self._new_epoch(session, lane)
            session.mark(offset, length)
        except OSError as e:
            log.warning("%s: the activity log cannot be written (after a crash, reopening will "
                        "bring the whole pool in line on the replicas): %s",
                        self.set_file.path, e)
            # the marker says "any chunk" before any write may skip the log
            lost, self._activity = self._activity, None
            self._store_marker()
            self._logged[:] = b"\1" * len(self._logged)
            lost.end(delete=True)

    def _new_epoch(self, session: activity.ActivityLog, lane: int) -> None:
        """End the log's epoch (the state lock is held, by a call on ``lane``): the chunks
        no call named since the last one leave the log, except those of flushes not yet
        drained. Safe because every call that could still be writing to such a chunk began
        in the epoch before (when the chunk was named) and has ended since (``_waiting``
        emptied); a call beginning from here finds no chunk named and comes back to the log
        (this method's caller names its own range after it)."""
        gone = session.new_epoch(self._undrained())
        busy = self._busy
        self._waiting = {i for i in range(len(busy)) if busy[i] - (i == lane) > 0}
        log.debug("%s: activity log epoch ended, %d chunks let go of", self.set_file.path,
                  gone)

    def _cut_short_by_close(self) -> None:
        """A call that close() cut short may have left its range on the master alone: the
        session does not end cleanly (the state lock is held). Once the marker is cleared,
        it is set again, through the file (the pool may be unmapped), for the whole pool."""
        self._close_refused = True
        if self._marker_cleared:
            try:
                activity.store_marker(self.set_file, activity.Marker(0, logged=False).pack())
            except OSError as e:
                log.warning("%s: cannot record that a call was cut short by close: %s",
                            self.set_file.path, e)
            self._marker_cleared = False

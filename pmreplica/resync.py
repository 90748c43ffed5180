"""Online resync: a failed or stale replica of an open pool set brought up to date from the
master while the application goes on writing (``PoolSet.resync``).

The replica is reopened (its storage must be sound: a missing or broken one needs
``replica-sync`` with the pool closed), or used through its open target when it is stale
and was found sound when the pool was opened, and gets from the master what it missed: the chunks
written while it was stale, or everything when the record cannot tell. Writes go on
meanwhile and are tracked; the last pass copies what they touched while holding the lock
that every persist takes in degraded mode, and the replica rejoins the write path under
that lock; a persist that waited for the lock writes to the replicas it finds then
(``FailureBook._note_dirty``), so no write can fall between the copy and its return. The copy is
:mod:`pmreplica.copier`'s, the one every repair uses.
"""

from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING, Callable, Iterable

from . import copier, dirtymap
from .errors import PmReplicaError, ReplicaError, fresh
from .failures import Dropped
from .identity import attr_problem
from .status import OK, STALE, ReplicaStatus, close_quietly
from .target import ReplicaTarget, open_checked

if TYPE_CHECKING:
    from .poolset import PoolSet

log = logging.getLogger(__name__)


def resync(pool: "PoolSet", index: int, chunk: int = copier.CHUNK) -> int:
    """Bring replica ``index`` of ``pool`` up to date and put it back on the write path;
    returns the bytes copied (0 when it is in step already). A replica that rejoins but
    cannot record the generation it rejoins in fails again (its target let go, the failure
    told) and that failure is raised: it is not restored."""
    if not 0 < index < len(pool.replicas):
        raise PmReplicaError(errno.EINVAL, f"no replica {index} to resync (replica 0 is "
                                           "the master)")
    status = pool.replicas[index]
    with pool._state_lock:
        if status.state == OK and status.target is not None:
            return 0
        if pool._resync_marks is not None:
            raise PmReplicaError(errno.EBUSY, "another resync is running on this pool")
        # off the write path while it is copied (a stale replica may be on it: its open
        # target is used as it is, the replica found sound on open)
        reuse = status.state == STALE and status.target is not None
        old = pool._take_off(status)
        full = pool.state.is_full(index) or not pool.state.is_stale(index)
        missed = None if full else pool.state.fine_snapshot()
        pool._resync_marks = dirtymap.Bitmap.covering(
            missed.chunk if missed is not None else dirtymap.fine_chunk_for(pool.size),
            pool.size)
    try:
        if reuse:
            target = old
        else:
            if old is not None:
                close_quietly(old)
            target = _reopen(pool, status)
        try:
            copied, dropped = _copy(pool, status, target, missed, chunk)
        except BaseException:
            close_quietly(target)
            raise
    finally:
        with pool._let_go:
            pool._resync_marks = None
            pool._let_go.notify_all()  # close() waits for a running resync to end
    pool._let_go_of(dropped)  # replicas that could not record the new generation
    failure = next((error for st, _, error in dropped if st is status), None)
    if failure is not None:
        raise fresh(failure)  # the one told to the hooks keeps no traceback of this call
    log.info("%s resynced online (%d bytes copied)", status.name, copied)
    pool._notify_restored(status)
    return copied


def _reopen(pool: "PoolSet", status: ReplicaStatus) -> ReplicaTarget:
    """Open replica ``status``'s target anew and check that it belongs."""
    target = pool._target(status.spec, status.index, create=False)
    try:
        attr = open_checked(target)
        problem = attr_problem(attr, pool.header, status.index, {})
        if problem is None and target.nlanes < pool.nlanes:
            problem = f"{status.name} offers {target.nlanes} lanes, the pool uses {pool.nlanes}"
        if problem:
            raise ReplicaError(errno.EINVAL, problem)
    except BaseException:
        close_quietly(target)
        raise
    return target


def _copy(pool: "PoolSet", status: ReplicaStatus, target: ReplicaTarget,
          missed: dirtymap.Bitmap | None, chunk: int) -> tuple[int, Dropped]:
    """Copy what ``missed`` marks (None: everything) into ``target``, then under the lock
    what was written meanwhile, and put the target on the write path. Returns the bytes
    copied and the replicas dropped for not recording the generation it rejoined in (this
    one among them, maybe: the write path has its target then), to be let go of."""
    start, size = pool.data_offset, pool.size
    if missed is None:
        pieces: Iterable[tuple[int, int]] = [(start, size - start)]
        total = size - start
    else:
        pieces, total = missed.ranges(start, size), missed.dirty_bytes(start, size)
    done = 0

    def count(n: int) -> None:
        nonlocal done
        done += n

    def advance(n: int) -> None:
        count(n)
        pool.report_progress(status.index, "resync", done, total)

    def go_on() -> None:
        if pool._closing:  # close() waits for this resync: it ends at the next piece
            raise PmReplicaError(errno.EBADF, f"{status.name}: resync stopped: the pool "
                                              "is being closed")

    def write(off: int, n: int) -> None:
        go_on()
        target.flush(off, n, 0, 0)

    def settle(off: int, n: int) -> None:
        target.drain(0)
        # the master's pages read for the copy are let go (a shared mapping: the data stays
        # in the files), or bringing a large pool in line holds it all resident
        pool.mapping.release(off, n)

    def copy(ranges: Iterable[tuple[int, int]], step: Callable[[int], None]) -> None:
        copier.copy(ranges, write, settle, step, chunk)

    pool.report_progress(status.index, "resync", 0, total)
    copy(pieces, advance)
    with pool._state_lock:
        marks = pool._resync_marks
        assert marks is not None
        written = list(marks.ranges(start, size))
        go_on()  # once close() began, the replica must not rejoin the write path
        total += sum(n for _, n in written)
        # counted only: the progress hook is told once the lock is let go, since a hook
        # that persists into this pool would wait for the lock this pass holds
        copy(written, count)
        status.target = target
        pool._active = pool._active + ((status, target),)
        try:
            failures = pool._restored(status)
        except BaseException:
            # its rejoin could not be recorded (the master's storage failed): it stays off,
            # stale, and the caller closes its target
            pool._take_off(status)
            status.state = STALE
            pool.state.mark_stale(status.index)
            raise
        dropped = pool._drop(failures)
    if written:
        pool.report_progress(status.index, "resync", done, total)
    return done, dropped

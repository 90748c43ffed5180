"""PoolSet: the master replica mapped for the application, every other replica kept in step.

``persist(offset, length)`` returns once the range is durable on the master and on every
working replica. Remote replicas are started first and waited for last, so their network
round trips overlap the local work instead of following it. A replica that fails is marked
failed and stale (in the master's metadata), reported through ``pmreplica_replica_failed``,
and dropped from the write path; the pool keeps working on the rest (degraded mode).

Here: the lifecycle (create, open, close) and the write path, whose fan-out loops are
inlined on purpose (the hot loop). Elsewhere: the failure bookkeeping (:mod:`.failures`,
the :class:`~pmreplica.failures.FailureBook` mixin), online resync (:mod:`.resync`),
whether a replica belongs (:mod:`.identity`) and the verdict on generations that conflict
(:mod:`.health`, the one judge).
"""

from __future__ import annotations

import errno
import logging
import os
import time
import uuid as _uuid
from typing import Iterable

import pluggy

from . import activity, copier, dirtymap, health, setfile
from . import generation as _generation
from . import resync as _resync
from .errors import HeaderError, PmReplicaError, ReplicaError, as_replica_failure, fresh
from .failures import LET_GO_WAIT, FailureBook
from .generation import AHEAD, BEHIND, DIVERGED, Generation
from .header import FEAT_CKSUM_2K, FEAT_SINGLEHDR, HDR_SIZE, PoolAttr, PoolHeader
from .identity import attr_problem
from .plugin_manager import make_plugin_manager, notify
from .pmem import Mapping
from .replica import (LocalReplicaFiles, lock_pool, lock_pool_set, raise_if_broken,
                      release_locks)
from .session import SessionBook
from .setfile import LocalReplica, PoolSetFile, Replica
from .state import ReplicaState
from .status import OK, STALE, ReplicaStatus, close_quietly, describe
from .target import RELAXED, ReplicaTarget, open_checked, stat_checked
from .target_host import remove_replica, served_target

log = logging.getLogger(__name__)

DEFAULT_SIGNATURE = b"PMREPLIC"
DEFAULT_NLANES = 4
#: flushed ranges remembered per lane until its drain (beyond that, one covering span)
PENDING_RANGES = 16
#: what a target's ``stat`` fails with when it keeps no generation to read
_UNSUPPORTED = (errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS)


def _busy(set_file: PoolSetFile) -> str:
    return f"{set_file.master.parts[0].path}: pool is open in another process"


class PoolSet(FailureBook, SessionBook):
    """An open pool set. Use :meth:`create` or :meth:`open`; close it (or use ``with``). Its
    failure bookkeeping is the :class:`~pmreplica.failures.FailureBook` mixin's."""

    def __init__(self, set_file: PoolSetFile, master: LocalReplicaFiles, mapping: Mapping,
                 locks: dict[int, int], pm: pluggy.PluginManager, nlanes: int) -> None:
        self.set_file = set_file
        self.plugin_manager = pm
        self._master = master
        self.mapping = mapping
        self.buf: memoryview = mapping.buf
        self.size: int = mapping.size
        self.data_offset: int = HDR_SIZE if set_file.has_headers else 0
        self.nlanes = nlanes
        #: by replica index, the plugin whose target serves it
        self._served_by: dict[int, object] = {}
        #: the pool's locks (replica.lock_pool_set) by replica index: the master's and its
        #: working local replicas' (a failed one's is let go: its disk may be replaced)
        self._locks = locks
        self.replicas: list[ReplicaStatus] = [ReplicaStatus(0, set_file.replicas[0])]
        #: the write path: the replicas a persist goes to (FailureBook changes it)
        self._active: tuple[tuple[ReplicaStatus, ReplicaTarget], ...] = ()
        self._degraded = False
        #: set by _activate: the replicas opened are on the write path
        self._activated = False
        #: targets that reported a failure before that (see target_failed)
        self._failed_early: list[tuple[ReplicaTarget, OSError]] = []
        self._reset_pending(nlanes)
        #: local replicas are made sparse (see :meth:`create`)
        self.sparse = False
        self._open_session()
        self._open_book(
            ReplicaState.load(self.buf[:HDR_SIZE], self.size, len(set_file.replicas),
                              dirtymap.path_for(set_file.master.parts[0].path)),
            _generation.of_page(self.buf[:HDR_SIZE]))

    # -- construction --------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike[str], *, size: int | None = None,
               signature: bytes = DEFAULT_SIGNATURE, major: int = 1, compat: int = 0,
               incompat: int = 0, ro_compat: int = 0, mode: int = 0o666,
               plugins: Iterable[object] = (), nlanes: int = DEFAULT_NLANES,
               sparse: bool = False) -> "PoolSet":
        """Create the pool set described by the set file at ``path`` (or a single pool file
        of ``size`` bytes). Fails with EEXIST if a part exists; on any failure, whatever
        was created is removed again. ``sparse`` makes local parts without allocating
        their blocks (for tests and benchmarks of pools larger than the storage at hand:
        a file system that fills up then ends the process with SIGBUS)."""
        path = os.fspath(path)
        if size is not None and os.path.exists(path) and not setfile.is_poolset_file(path):
            raise PmReplicaError(errno.EEXIST, f"file {path} already exists")
        set_file = setfile.load_set(path, size)
        set_file.validate()
        master = LocalReplicaFiles(set_file, set_file.master, set_file.pool_size)
        if setfile.OPT_SINGLEHDR in set_file.options:
            incompat |= FEAT_SINGLEHDR
        template = PoolHeader(signature=signature, major=major, compat=compat,
                              incompat=incompat | FEAT_CKSUM_2K, ro_compat=ro_compat,
                              poolset_uuid=_uuid.uuid4(), crtime=int(time.time()))
        n = len(set_file.replicas)
        first_uuids = [_uuid.uuid4() for _ in range(n)]
        pm = make_plugin_manager(plugins)
        master_status = ReplicaStatus(0, set_file.master)
        master.create(template._replace(uuid=first_uuids[0], prev_repl=first_uuids[-1],
                                        next_repl=first_uuids[1 % n]), mode, sparse=sparse,
                      progress=lambda done, total: notify(
                          pm, "pmreplica_sync_progress", replica=master_status,
                          phase="create", done=done, total=total))
        try:
            self = cls._map(set_file, master, pm, nlanes)
        except BaseException:
            master.remove(force=True)
            raise
        self.sparse = sparse
        try:
            for status in self.replicas[1:]:
                i = status.index
                attr = PoolAttr(signature=template.signature, major=major, compat_features=compat,
                                incompat_features=template.incompat, ro_compat_features=ro_compat,
                                poolset_uuid=template.poolset_uuid.bytes_le,
                                uuid=first_uuids[i].bytes_le,
                                next_uuid=first_uuids[(i + 1) % n].bytes_le,
                                prev_uuid=first_uuids[i - 1].bytes_le,
                                user_flags=template.arch.pack())
                status.target = self._create_replica(status, attr)
            self._locks = lock_pool_set(set_file, _busy(set_file), held=self._locks)
            lost = self._activate()
            if lost:  # a replica's host was lost while the others were made: nothing is kept
                raise fresh(lost[0][2])
            with self._state_lock:
                failed = self._advance_generation()  # the first: every replica in step
            if failed:  # a replica without it is not created as a member
                raise failed[0][1]
            self._begin_activity()
            return self
        except BaseException:
            self._discard_created()
            raise

    def _create_replica(self, status: ReplicaStatus, attr: PoolAttr) -> ReplicaTarget:
        """Create replica ``status``'s storage through its plugin's target; what the plugin
        raises fails the create, a bug as the replica's EIO (as_replica_failure) caused by
        it."""
        i = status.index
        try:
            target = self._target(status.spec, i, create=True)
            try:
                self.report_progress(i, "create", 0, self.size)
                target.create(attr)
                self.report_progress(i, "create", self.size, self.size)
            except BaseException:
                close_quietly(target)
                raise
        except Exception as e:  # noqa: BLE001 - a plugin's bug, raised as its replica's failure
            failure = as_replica_failure(status.name, e, raised=True)
            if failure is e:
                raise
            raise failure from e
        return target

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, signature: bytes | None = None,
             plugins: Iterable[object] = (), nlanes: int = DEFAULT_NLANES) -> "PoolSet":
        """Open an existing pool set. The master must be consistent; a replica that cannot be
        opened or does not belong to the pool is reported failed and the pool opens degraded."""
        set_file = setfile.load_set(path)
        set_file.validate()
        master = LocalReplicaFiles(set_file, set_file.master, set_file.pool_size)
        headers, problems = master.check(signature)
        raise_if_broken(f"master replica of {os.fspath(path)}", problems)
        if headers and ReplicaState.load(headers[0].raw, set_file.pool_size,  # type: ignore[arg-type]
                                         len(set_file.replicas)).is_stale(0):
            raise HeaderError(errno.EINVAL, f"master replica of {os.fspath(path)} is stale: a "
                                            "replica-sync repairing it did not finish (run "
                                            "`replica-sync` again)")
        self = cls._map(set_file, master, make_plugin_manager(plugins), nlanes, recover=True)
        try:
            hdr = headers[0].header if headers else None
            if hdr is not None:
                self._check_master_role(hdr)
            nexts: dict[int, bytes] = {} if hdr is None else {0: hdr.next_repl.bytes_le}
            conflicts = [c for c in (self._open_replica(status, hdr, nexts)
                                     for status in self.replicas[1:]) if c is not None]
            if conflicts:
                self._refuse(conflicts)
            for status, target, error in self._activate():
                self._fail(status, target, error, call=False)
            with self._state_lock:  # a replica that cannot record it fails (and is let go)
                dropped = self._drop(self._advance_generation(only_if_changed=True))
            self._let_go_of(dropped)
            self._begin_activity()
            self._bring_in_line()
            return self
        except BaseException:
            self.close()
            raise

    def _check_master_role(self, hdr: PoolHeader) -> None:
        """Refuse to open a replica of another master as a master (``pmreplica promote``
        makes it one)."""
        gen = self.generation
        if gen is not None and not gen.is_master(hdr.uuid):
            raise HeaderError(errno.EPERM, f"{self.set_file.path}: this is a replica of "
                                           f"another pool set's master (replica uuid "
                                           f"{hdr.uuid}, {gen.describe()} of master "
                                           f"{_uuid.UUID(bytes=gen.master)}): run `pmreplica "
                                           "promote` to make it a master")

    def _open_replica(self, status: ReplicaStatus, hdr: PoolHeader | None,
                      nexts: dict[int, bytes]) -> tuple[str, health.Side] | None:
        """Open replica ``status``'s target and check that it belongs (``nexts``: see
        :func:`~pmreplica.identity.attr_problem`); one that cannot be opened or does not
        belong, or whose plugin raises anything else than an OSError (a bug: EIO), is
        reported failed. Returns its conflict with the master, if any (see
        :meth:`_compare_generation`)."""
        if self.state.is_stale(status.index):
            status.state = STALE
        if status.state == STALE and status.index not in self._unclean:
            log.warning("%s is stale: it missed writes while it was failed (run "
                        "`replica-sync` to bring it up to date)", status.name)
        try:
            target = self._target(status.spec, status.index, create=False)
        except Exception as e:  # noqa: BLE001 - a plugin's bug fails its replica alone
            self._report_failed(status, as_replica_failure(status.name, e))
            return None
        try:
            attr = open_checked(target)
        except Exception as e:  # noqa: BLE001 - as above
            return self._refused(status, target, as_replica_failure(status.name, e))
        status.target = target
        try:
            if hdr is not None:
                problem = attr_problem(attr, hdr, status.index, nexts)
                nexts[status.index] = attr.next_uuid
                if problem:
                    raise ReplicaError(errno.EINVAL, problem)
            theirs = self._their_generation(status, target)
        except Exception as e:  # noqa: BLE001 - as above (attr_problem reads what open gave)
            close_quietly(target)
            status.target = None
            self._report_failed(status, as_replica_failure(status.name, e))
            return None
        return self._compare_generation(status, theirs)

    def _refused(self, status: ReplicaStatus, target: ReplicaTarget, error: OSError
                 ) -> tuple[str, health.Side] | None:
        """Replica ``status``'s target refused to open with ``error``: closed, and the
        replica reported failed, unless it is there but not to be had (EBUSY, EINVAL) because
        it was promoted elsewhere (and is open there): its conflict is returned then."""
        theirs = None
        if error.errno in (errno.EBUSY, errno.EINVAL):
            try:
                theirs = self._their_generation(status, target)
            except Exception as e:  # noqa: BLE001 - a bug: not known, the refusal stands
                as_replica_failure(status.name, e)
        close_quietly(target)
        found = self._compare_generation(status, theirs)
        if found is None:
            self._report_failed(status, error)
        return found

    def _their_generation(self, status: ReplicaStatus, target: ReplicaTarget
                          ) -> Generation | None:
        """The generation replica ``status``'s target records, to compare with the master's;
        None when the master has none, or the target keeps none (no ``stat``, or one it does
        not support). Anything else ``stat`` raises or returns wrong is raised: a replica
        whose generation cannot be read may have been promoted elsewhere, so it is not
        taken for one in step."""
        stat = getattr(target, "stat", None)
        if self.generation is None or stat is None:
            return None
        try:
            theirs = stat_checked(target).generation
        except OSError as e:
            if e.errno not in _UNSUPPORTED:
                raise
            log.debug("%s: keeps no generation: %s", status.name, e)
            return None
        if theirs is not None and not isinstance(theirs, Generation):
            raise TypeError(f"{type(target).__name__}.stat() returned a generation of type "
                            f"{type(theirs).__name__}")
        return theirs

    def _compare_generation(self, status: ReplicaStatus, theirs: Generation | None
                            ) -> tuple[str, health.Side] | None:
        """Compare replica ``status``'s generation (``theirs``: see
        :meth:`_their_generation`) with the master's: a replica behind is stale; a replica
        ahead (this master was superseded: a replica was promoted) or diverged from it
        (both took writes: split brain) is returned, with the relation, to stop the open
        (:meth:`_refuse`): writing here would overwrite or fork acknowledged data."""
        mine = self.generation
        if mine is None or theirs is None:
            return None
        relation = mine.relation(theirs)
        if relation == AHEAD:
            self._mark_behind(status, theirs)
        elif relation in (BEHIND, DIVERGED):
            return relation, health.Side(status.name, theirs, (status.index,))
        return None

    def _refuse(self, conflicts: list[tuple[str, health.Side]]) -> None:
        """Stop the open on the first conflict, in the judge's words (:func:`health.conflict`:
        replica-sync gives the same verdict), naming every replica of the same generation
        line as its side."""
        relation, first = conflicts[0]
        line = tuple(i for r, side in conflicts if r == relation
                     and side.generation.id == first.generation.id  # type: ignore[union-attr]
                     for i in side.indices)
        master = health.Side(describe(self.set_file.master, 0), self.generation, (0,))
        raise PmReplicaError(errno.ESTALE, f"{self.set_file.path}: " + health.conflict(
            relation, master, first._replace(indices=line)))

    @classmethod
    def _map(cls, set_file: PoolSetFile, master: LocalReplicaFiles,
             pm: pluggy.PluginManager, nlanes: int, recover: bool = False) -> "PoolSet":
        """Lock and map the master; the replicas are listed but not yet opened.
        ``recover``: first fold an unclean last session's activity log into the record."""
        locks = lock_pool_set(set_file, _busy(set_file))
        try:
            unclean = activity.recover(set_file) if recover else []
            mapping = master.open()
        except BaseException:
            release_locks(locks)
            raise
        try:
            self = cls(set_file, master, mapping, locks, pm, nlanes)
        except BaseException:
            mapping.close()
            release_locks(locks)
            raise
        self.replicas += [ReplicaStatus(i, spec) for i, spec in
                          enumerate(set_file.replicas[1:], start=1)]
        self._unclean = unclean
        return self

    def _target(self, spec: Replica, index: int, create: bool) -> ReplicaTarget:
        target, plugin = served_target(self.plugin_manager, spec, index, self, create)
        self._served_by[index] = plugin  # its remove hook undoes a failed create
        return target

    def _activate(self) -> list[tuple[ReplicaStatus, ReplicaTarget, OSError]]:
        """Put the opened replicas on the write path and settle the lane count; returns
        those whose targets reported a failure meanwhile (target_failed: a heartbeat found
        a host dead while other replicas were still opening), to be failed now."""
        active = [(s, s.target) for s in self.replicas[1:] if s.target is not None]
        with self._state_lock:
            self._active = tuple(active)  # type: ignore[assignment]
            if active:
                self.nlanes = min([self.nlanes] + [t.nlanes for _, t in active])
                self._reset_pending(self.nlanes)
            self._degraded = any(s.state != OK for s in self.replicas)
            self._activated = True
            early, self._failed_early = self._failed_early, []
        return [(s, t, e) for t, e in early for s, t2 in active if t2 is t]

    def _discard_created(self) -> None:
        """Undo a failed create: remove every replica made so far and the master."""
        for status in self.replicas[1:]:
            if status.target is not None:
                close_quietly(status.target)
                try:
                    remove_replica(self.plugin_manager, status.spec, status.index,
                                   self._served_by.get(status.index))
                except Exception as e:  # noqa: BLE001 - the failure being undone is the one told
                    log.warning("cleanup of %s failed: %s", status.name,
                                as_replica_failure(status.name, e))
        try:
            self._release()
        except PmReplicaError as e:
            # a view of the pool is still alive (e.g. in the traceback of the failed step);
            # the mapping goes when it does, the files that were made go now
            log.debug("unmapping the pool being discarded: %s", e)
        self._master.remove(force=True)

    # -- the write path --------------------------------------------------------------------
    def _check(self, offset: int, length: int, lane: int, flags: int = 0) -> None:
        # a flag no replica knows is the caller's error, refused before any replica sees it
        if flags & ~RELAXED:
            raise PmReplicaError(errno.EINVAL, f"invalid flags {flags:#x} (only RELAXED, "
                                               f"{RELAXED:#x}, is defined)")
        if offset < self.data_offset or length < 0 or offset + length > self.size:
            raise PmReplicaError(errno.EINVAL, f"range {offset}+{length} is outside the pool "
                                               f"data [{self.data_offset}, {self.size})")
        if not 0 <= lane < self.nlanes:
            raise PmReplicaError(errno.EINVAL, f"lane {lane} out of range (nlanes={self.nlanes})")

    def persist(self, offset: int, length: int, lane: int = 0, flags: int = 0) -> None:
        """Make ``[offset, offset+length)`` durable on the master and every working replica."""
        self._check(offset, length, lane, flags)
        busy = self._busy
        busy[lane] += 1  # in flight: the activity log's next epoch waits (session.py)
        # the lane's flushes so far are drained by this persist only if no other call on
        # the lane is under way (one may have recorded a flush it has not sent yet)
        flushed = self._npending[lane]
        alone = flushed and busy[lane] == 1
        try:
            # _active before _degraded, the reverse of the order _take_off changes them in: a
            # replica taken off meanwhile is either still in `active` or found in the dirty map;
            # and while degraded, or when the replicas changed meanwhile (a resync put one back),
            # the replicas to write to are those _note_dirty reads under the state lock
            # and a range in a chunk not yet in the activity log (or over more than two chunks)
            # takes the same slow way
            active = self._active
            first, last = offset >> self._log_shift, (offset + length - 1) >> self._log_shift
            logged = self._logged
            if (self._degraded or active is not self._active
                    or first != last and (last != first + 1 or not logged[last])
                    or not logged[first]):
                active = self._note_dirty(offset, length, lane)
            for status, target in active:
                try:
                    target.flush(offset, length, lane, flags)
                except BaseException as e:  # noqa: BLE001 - a replica's failure, whatever its kind
                    self._fail(status, target, e, offset, length)
            self.mapping.persist(offset, length)
            for status, target in active:
                if status.target is not target:
                    # failed since its flush above, maybe on another thread (a heartbeat): that
                    # failure's record lacks this range (not drained) until _fail marks it
                    self._fail(status, target, ReplicaError(
                        errno.EIO, "failed before the range was drained"), offset, length)
                    continue
                try:
                    target.drain(lane)
                except BaseException as e:  # noqa: BLE001 - a replica's failure, whatever its kind
                    self._fail(status, target, e, offset, length)
            if alone and busy[lane] == 1 and self._npending[lane] == flushed:
                self._npending[lane] = 0  # drained on every replica: its flushes too
        finally:
            busy[lane] -= 1

    def flush(self, offset: int, length: int, lane: int = 0, flags: int = 0) -> None:
        """Start making a range durable everywhere; :meth:`drain` on the lane waits for it.
        Ranges flushed on one lane are applied in issue order on every replica."""
        self._check(offset, length, lane, flags)
        busy = self._busy
        busy[lane] += 1  # in flight: the activity log's next epoch waits (session.py)
        try:
            active = self._active  # before _degraded: see persist
            first, last = offset >> self._log_shift, (offset + length - 1) >> self._log_shift
            logged = self._logged
            if (self._degraded or active is not self._active
                    or first != last and (last != first + 1 or not logged[last])
                    or not logged[first]):
                active = self._note_dirty(offset, length, lane)
            # remembered before it is sent: a replica failing before the drain may lack it
            n = self._npending[lane]
            pend = self._pending[lane]
            if n < PENDING_RANGES:
                pend[2 * n] = offset
                pend[2 * n + 1] = offset + length
            else:  # too many to keep one by one: the last slot widens to cover the rest
                i = 2 * PENDING_RANGES - 2
                if offset < pend[i]:
                    pend[i] = offset
                if offset + length > pend[i + 1]:
                    pend[i + 1] = offset + length
            self._npending[lane] = n + 1
            for status, target in active:
                try:
                    target.flush(offset, length, lane, flags)
                except BaseException as e:  # noqa: BLE001 - a replica's failure, whatever its kind
                    self._fail(status, target, e, offset, length)
            self.mapping.flush(offset, length)
        finally:
            busy[lane] -= 1

    def drain(self, lane: int = 0) -> None:
        """Wait until everything flushed on ``lane`` is durable on every working replica."""
        self._check(self.data_offset, 0, lane)
        if self._closing:
            raise PmReplicaError(errno.EBADF, "pool is closed")
        # as in persist: flushes still under way on the lane stay pending
        alone, flushed = self._busy[lane] == 0, self._npending[lane]
        self.mapping.drain()
        for status, target in self._active:
            try:
                target.drain(lane)
            except BaseException as e:  # noqa: BLE001 - a replica's failure, whatever its kind
                self._fail(status, target, e)
        if alone and self._busy[lane] == 0 and self._npending[lane] == flushed:
            self._npending[lane] = 0

    def _reset_pending(self, nlanes: int) -> None:
        #: per lane, (offset, end) of the ranges flushed since its last drain, preallocated
        self._pending = [[0] * (2 * PENDING_RANGES) for _ in range(nlanes)]
        self._npending = [0] * nlanes
        #: per lane, the calls in flight on it (the activity log's epochs wait for them)
        self._busy = [0] * nlanes

    def deep_persist(self, offset: int, length: int, lane: int = 0) -> None:
        """Persist through every replica's deepest durability domain."""
        self._check(offset, length, lane)
        busy = self._busy
        busy[lane] += 1  # in flight: the activity log's next epoch waits (session.py)
        try:
            active = self._active  # before _degraded: see persist
            first, last = offset >> self._log_shift, (offset + length - 1) >> self._log_shift
            logged = self._logged
            if (self._degraded or active is not self._active
                    or first != last and (last != first + 1 or not logged[last])
                    or not logged[first]):
                active = self._note_dirty(offset, length, lane)
            for status, target in active:
                try:
                    target.deep_persist(offset, length, lane)
                except BaseException as e:  # noqa: BLE001 - a replica's failure, whatever its kind
                    self._fail(status, target, e, offset, length)
            self.mapping.deep_persist(offset, length)
        finally:
            busy[lane] -= 1

    # -- failures, state, resync (failures.py and resync.py do the work) -------------------
    def target_failed(self, target: ReplicaTarget, error: OSError) -> None:
        """A target reports, from any thread, a failure found outside the pool's calls (its
        peer was found dead by a heartbeat, say): its replica is failed as if a persist had
        met the error; one whose replica was opened and is not on it yet (the pool is being
        opened or created) is failed as soon as it is (:meth:`_activate`). Nothing happens if
        the target is not (or no longer) on the write path."""
        with self._state_lock:
            if not self._activated:  # opened, not yet on it: failed once it is (_activate)
                self._failed_early.append((target, error))
                return
        status = next((s for s, t in self._active if t is target), None)
        if status is not None and not self._closing:
            self._fail(status, target, error, call=False)

    @property
    def stale_replicas(self) -> list[ReplicaStatus]:
        """Replicas the master's record marks stale: they missed writes while failed and
        stay so until replica-sync (or :meth:`resync`) brings them up to date."""
        return [s for s in self.replicas if self.state.is_stale(s.index)]

    def report_progress(self, index: int, phase: str, done: int, total: int) -> None:
        """Tell ``pmreplica_sync_progress`` how long work on replica ``index`` goes (for
        plugins: "create" while a replica's storage is allocated)."""
        notify(self.plugin_manager, "pmreplica_sync_progress", replica=self.replicas[index],
               phase=phase, done=done, total=total)

    def resync(self, index: int, *, chunk: int = copier.CHUNK) -> int:
        """Bring failed or stale replica ``index`` of this open pool up to date online and put
        it back on the write path (:mod:`pmreplica.resync`: its storage must be sound, writes
        go on meanwhile); returns the bytes copied. Progress goes to
        ``pmreplica_sync_progress`` (phase "resync")."""
        return _resync.resync(self, index, chunk)

    @property
    def header(self) -> PoolHeader:
        """The master's part-0 header."""
        return PoolHeader.unpack(self.buf[:HDR_SIZE])

    @property
    def attr(self) -> PoolAttr:
        return PoolAttr.from_header(self.header)

    # -- teardown --------------------------------------------------------------------------
    def close(self) -> None:
        """Save the dirty map, close every replica and unmap the master (views of ``buf``
        must be released). Calls on other threads meanwhile fail with EBADF, or complete
        before the replicas are closed: none returns having skipped one. An online resync
        running on another thread stops (EBADF; its replica stays stale) before the pool
        is unmapped."""
        with self._state_lock:
            self._closing = True
            self._degraded = True  # every write path call now takes the lock: refused there
        self._wait_for_calls()
        if not self.mapping.closed:
            self._close_book()
        with self._state_lock:  # off the write path first: a call failing as its target
            # closes finds it taken off (EBADF), not a replica failure
            targets = [status.target for status in self.replicas[1:]]
            for status in self.replicas[1:]:
                status.target = None
            self._active = ()
        interrupt: BaseException | None = None
        for target in targets:
            if target is not None:
                try:
                    close_quietly(target)
                except BaseException as e:  # noqa: BLE001 - a signal handler's (Ctrl-C): the
                    interrupt = interrupt or e  # other replicas and the pool are closed first
        self._end_activity()
        self._release()
        if interrupt is not None:
            raise interrupt

    def _wait_for_calls(self) -> None:
        """Let the calls in flight on other threads end (those beginning now fail with
        EBADF) before the replicas are closed and the pool unmapped: a persist between its
        replicas and the master's own persist would otherwise persist a range of an
        unmapped pool (on pmem, a crash). One still running after LET_GO_WAIT seconds is cut
        short: it fails, and the session does not end cleanly."""
        deadline = time.monotonic() + LET_GO_WAIT
        while any(self._busy) and time.monotonic() < deadline:
            time.sleep(0.001)

    def _lock(self, index: int) -> None:
        """Take local replica ``index``'s lock again (it rejoined; see lock_pool_set)."""
        spec = self.set_file.replicas[index]
        if isinstance(spec, LocalReplica) and index not in self._locks:
            try:
                self._locks[index] = lock_pool(spec.parts[0].path, _busy(self.set_file))
            except OSError as e:
                log.warning("%s: cannot lock it again: %s", self.replicas[index].name, e)

    def _unlock(self, index: int) -> None:
        """Let go of failed local replica ``index``'s lock (see lock_pool_set)."""
        release_locks(self._locks, index)

    def _release(self) -> None:
        if self.mapping.closed:
            return
        self.buf.release()
        try:
            self.mapping.close()
        except BufferError:
            self.buf = self.mapping.buf  # still mapped, and usable
            raise PmReplicaError(errno.EBUSY, "pool is still referenced: release every memoryview "
                                              "taken from PoolSet.buf before close()") from None
        # the pool stays locked while it stays mapped: a close refused (EBUSY) keeps it
        release_locks(self._locks)

    def __enter__(self) -> "PoolSet":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

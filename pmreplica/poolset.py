"""PoolSet: the master replica mapped for the application, every other replica kept in step.

``persist(offset, length)`` returns once the range is durable on the master and on every
working replica. Remote replicas are started first and waited for last, so their network
round trips overlap the local work instead of following it. A replica that fails is marked
failed and stale (in the master's metadata), reported through ``pmreplica_replica_failed``,
and dropped from the write path; the pool keeps working on the rest (degraded mode).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
import uuid as _uuid
from dataclasses import dataclass, field
from typing import Iterable

import pluggy

from . import copier, dirtymap
from . import generation as _generation
from . import setfile
from .errors import HeaderError, PmReplicaError, ReplicaError
from .generation import AHEAD, BEHIND, DIVERGED, Generation  # noqa: F401
from .header import FEAT_CKSUM_2K, FEAT_SINGLEHDR, HDR_SIZE, PoolAttr, PoolHeader
from .identity import Identity, membership_problem
from .pmem import Mapping
from .plugin_manager import make_plugin_manager
from .setfile import LocalReplica, PoolSetFile, Replica
from .replica import LocalReplicaFiles, lock_pool, raise_if_broken
from .state import OFFSET as STATE_OFFSET, SIZE as STATE_SIZE, ReplicaState, store_copy
from .target import RELAXED, ReplicaTarget

log = logging.getLogger(__name__)

DEFAULT_SIGNATURE = b"PMREPLIC"
DEFAULT_NLANES = 4
#: flushed ranges remembered per lane until its drain (beyond that, one covering span)
PENDING_RANGES = 16
#: seconds close() waits for the targets of replicas failing on other threads to be let go of
LET_GO_WAIT = 10.0

OK, FAILED, STALE = "ok", "failed", "stale"


def describe(spec: Replica, index: int) -> str:
    """``replica 1 (/path/part0)`` or ``replica 2 (host:set)``, for messages."""
    if spec.is_remote:
        return f"replica {index} ({spec.node}:{spec.pool_set})"  # type: ignore[union-attr]
    first = spec.parts[0].path if spec.parts else "?"  # type: ignore[union-attr]
    return f"replica {index} ({first})"


class NamedReplica:
    """Mixin of records about one replica (fields ``index`` and ``spec``): its name for
    messages and whether it is remote."""

    index: int
    spec: Replica

    @property
    def name(self) -> str:
        return describe(self.spec, self.index)

    @property
    def is_remote(self) -> bool:
        return self.spec.is_remote


@dataclass(eq=False)
class ReplicaStatus(NamedReplica):
    """One replica of an open pool set, as hooks and ``PoolSet.replicas`` show it."""

    index: int
    spec: Replica
    state: str = OK
    error: BaseException | None = None
    target: ReplicaTarget | None = field(default=None, repr=False)


class PoolSet:
    """An open pool set. Use :meth:`create` or :meth:`open`; close it (or use ``with``)."""

    def __init__(self, set_file: PoolSetFile, master: LocalReplicaFiles, mapping: Mapping,
                 lock_fd: int, pm: pluggy.PluginManager, nlanes: int) -> None:
        self.set_file = set_file
        self.plugin_manager = pm
        self._master = master
        self.mapping = mapping
        self.buf: memoryview = mapping.buf
        self.size: int = mapping.size
        self.data_offset: int = HDR_SIZE if set_file.has_headers else 0
        self.nlanes = nlanes
        self._lock_fd = lock_fd
        self._state_lock = threading.Lock()
        #: targets dropped by _drop and not yet let go of (closed, failure announced); close()
        #: waits for them, since a failing target may still hold a view of the mapping
        self._letting_go = 0
        self._let_go = threading.Condition(self._state_lock)
        self.replicas: list[ReplicaStatus] = [ReplicaStatus(0, set_file.replicas[0])]
        self._active: tuple[tuple[ReplicaStatus, ReplicaTarget], ...] = ()
        self.state = ReplicaState.load(self.buf[:HDR_SIZE], self.size, len(set_file.replicas),
                                       dirtymap.path_for(set_file.master.parts[0].path))
        #: the generation of the record the local replicas' copies hold (what a copy holds
        #: changes with the generation, and only then: they are rewritten when it differs)
        self._copies_at: int | None = None
        #: the generation the master is in (generation.py); None for a pool made before them
        self.generation: Generation | None = _generation.of_page(self.buf[:HDR_SIZE])
        self._degraded = False
        self._reset_pending(nlanes)
        #: local replicas are made sparse (see :meth:`create`)
        self.sparse = False
        #: chunks written while :meth:`resync` copies (None when no resync runs)
        self._resync_marks: dirtymap.Bitmap | None = None

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
                      progress=lambda done, total: pm.hook.pmreplica_sync_progress(
                          replica=master_status, phase="create", done=done, total=total))
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
                target = self._target(status.spec, i, create=True)
                try:
                    self.report_progress(i, "create", 0, self.size)
                    target.create(attr)
                    self.report_progress(i, "create", self.size, self.size)
                except BaseException:
                    close_quietly(target)
                    raise
                status.target = target
            self._activate()
            with self._state_lock:
                self._advance_generation()  # the first: every replica in step
            return self
        except BaseException:
            self._discard_created()
            raise

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
        self = cls._map(set_file, master, make_plugin_manager(plugins), nlanes)
        try:
            hdr = headers[0].header if headers else None
            if hdr is not None:
                self._check_master_role(hdr)
            nexts: dict[int, bytes] = {} if hdr is None else {0: hdr.next_repl.bytes_le}
            for status in self.replicas[1:]:
                if self.state.is_stale(status.index):
                    status.state = STALE
                    log.warning("%s is stale: it missed writes while it was failed (run "
                                "`replica-sync` to bring it up to date)", status.name)
                try:
                    target = self._target(status.spec, status.index, create=False)
                except OSError as e:
                    self._report_failed(status, e)
                    continue
                try:
                    attr = target.open()
                except OSError as e:
                    if e.errno in (errno.EBUSY, errno.EINVAL):  # there, but not to be had:
                        self._compare_generation(status, target)  # promoted elsewhere?
                    close_quietly(target)
                    self._report_failed(status, e)
                    continue
                status.target = target
                if hdr is not None:
                    problem = _attr_problem(attr, hdr, status.index, nexts)
                    nexts[status.index] = attr.next_uuid
                    if problem:
                        close_quietly(target)
                        status.target = None
                        self._report_failed(status, ReplicaError(errno.EINVAL, problem))
                        continue
                self._compare_generation(status, target)
            self._activate()
            with self._state_lock:
                self._advance_generation(only_if_changed=True)
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

    def _compare_generation(self, status: "ReplicaStatus", target: ReplicaTarget) -> None:
        """Compare replica ``status``'s generation with the master's: a replica behind is
        stale; a replica ahead (this master was superseded: a replica was promoted) or
        diverged from it (both took writes: split brain) stops the open, since writing here
        would overwrite or fork acknowledged data."""
        mine = self.generation
        stat = getattr(target, "stat", None)
        if mine is None or stat is None:
            return
        try:
            theirs = getattr(stat(), "generation", None)
        except OSError as e:
            log.debug("%s: its generation cannot be read: %s", status.name, e)
            return
        if theirs is None:
            return
        relation = mine.relation(theirs)
        if relation == AHEAD:
            if not self.state.is_stale(status.index):
                log.warning("%s is behind the master (%s, the master's %s): stale",
                            status.name, theirs.describe(), mine.describe())
                self.state.mark_stale(status.index, full=True, compare=True)
                self._store_state()
            status.state = STALE
        elif relation in (BEHIND, DIVERGED):
            raise PmReplicaError(errno.ESTALE, split_message(
                self.set_file.path, mine, status.index, status.name, theirs, relation))

    @classmethod
    def _map(cls, set_file: PoolSetFile, master: LocalReplicaFiles,
             pm: pluggy.PluginManager, nlanes: int) -> "PoolSet":
        """Lock and map the master; the replicas are listed but not yet opened."""
        first = set_file.master.parts[0].path
        lock_fd = lock_pool(first, f"{first}: pool is open in another process")
        try:
            mapping = master.open()
        except BaseException:
            os.close(lock_fd)
            raise
        try:
            self = cls(set_file, master, mapping, lock_fd, pm, nlanes)
        except BaseException:
            mapping.close()
            os.close(lock_fd)
            raise
        self.replicas += [ReplicaStatus(i, spec) for i, spec in
                          enumerate(set_file.replicas[1:], start=1)]
        return self

    def _target(self, spec: Replica, index: int, create: bool) -> ReplicaTarget:
        target = self.plugin_manager.hook.pmreplica_open_replica(
            spec=spec, index=index, poolset=self, create=create)
        if target is None:
            raise ReplicaError(errno.ENOTSUP, f"{describe(spec, index)}: no plugin serves "
                                              "this kind of replica")
        return target

    def _activate(self) -> None:
        """Put the opened replicas on the write path and settle the lane count."""
        active = [(s, s.target) for s in self.replicas[1:] if s.target is not None]
        self._active = tuple(active)  # type: ignore[assignment]
        if active:
            self.nlanes = min([self.nlanes] + [t.nlanes for _, t in active])
            self._reset_pending(self.nlanes)
        self._degraded = any(s.state != OK for s in self.replicas)

    def _discard_created(self) -> None:
        """Undo a failed create: remove every replica made so far and the master."""
        for status in self.replicas[1:]:
            if status.target is not None:
                close_quietly(status.target)
                try:
                    self.plugin_manager.hook.pmreplica_remove_replica(
                        spec=status.spec, index=status.index, force=True,
                        remove_pool_set=False)
                except OSError as e:
                    log.warning("cleanup of %s failed: %s", status.name, e)
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
        if self._degraded:
            self._note_dirty(offset, length)
        active = self._active
        for status, target in active:
            try:
                target.flush(offset, length, lane, flags)
            except Exception as e:  # noqa: BLE001 - a replica's failure, whatever its kind
                self._fail(status, target, e, offset, length)
        self.mapping.persist(offset, length)
        for status, target in active:
            if status.target is not target:  # failed during the flush above (or replaced)
                continue
            try:
                target.drain(lane)
            except Exception as e:  # noqa: BLE001 - a replica's failure, whatever its kind
                self._fail(status, target, e, offset, length)

    def flush(self, offset: int, length: int, lane: int = 0, flags: int = 0) -> None:
        """Start making a range durable everywhere; :meth:`drain` on the lane waits for it.
        Ranges flushed on one lane are applied in issue order on every replica."""
        self._check(offset, length, lane, flags)
        if self._degraded:
            self._note_dirty(offset, length)
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
        for status, target in self._active:
            try:
                target.flush(offset, length, lane, flags)
            except Exception as e:  # noqa: BLE001 - a replica's failure, whatever its kind
                self._fail(status, target, e, offset, length)
        self.mapping.flush(offset, length)

    def drain(self, lane: int = 0) -> None:
        """Wait until everything flushed on ``lane`` is durable on every working replica."""
        self._check(self.data_offset, 0, lane)
        self.mapping.drain()
        for status, target in self._active:
            try:
                target.drain(lane)
            except Exception as e:  # noqa: BLE001 - a replica's failure, whatever its kind
                self._fail(status, target, e)
        self._npending[lane] = 0

    def _reset_pending(self, nlanes: int) -> None:
        #: per lane, (offset, end) of the ranges flushed since its last drain, preallocated
        self._pending = [[0] * (2 * PENDING_RANGES) for _ in range(nlanes)]
        self._npending = [0] * nlanes

    def deep_persist(self, offset: int, length: int, lane: int = 0) -> None:
        """Persist through every replica's deepest durability domain."""
        self._check(offset, length, lane)
        if self._degraded:
            self._note_dirty(offset, length)
        for status, target in self._active:
            try:
                target.deep_persist(offset, length, lane)
            except Exception as e:  # noqa: BLE001 - a replica's failure, whatever its kind
                self._fail(status, target, e, offset, length)
        self.mapping.deep_persist(offset, length)

    # -- failures and state ----------------------------------------------------------------
    def target_failed(self, target: ReplicaTarget, error: OSError) -> None:
        """A target reports, from any thread, a failure found outside the pool's calls (its
        peer was found dead by a heartbeat, say): its replica is failed as if a persist had
        met the error. Nothing happens if the target is not (or no longer) on the write
        path."""
        status = next((s for s, t in self._active if t is target), None)
        if status is not None:
            self._fail(status, target, error)

    def _fail(self, status: ReplicaStatus, target: ReplicaTarget, error: Exception,
              offset: int | None = None, length: int = 0) -> None:
        """Take a replica off the write path, record it stale with what it may have missed
        (the failed range and every lane's undrained flushes), start a new generation among
        the replicas left (recorded on each before any persist that skips this replica can
        return: degraded persists wait for the state lock), tell the host application.
        The target is closed at once, so that the failed storage is let go (a disk can be
        unmounted and replaced while the application runs); a target must therefore bear
        being closed while another lane's thread is in one of its calls. ``target`` is the
        one that failed: if the replica no longer uses it (failed already, or resynced with
        a new target meanwhile), only what this call may have missed is recorded."""
        if not isinstance(error, OSError):  # a plugin's bug: still the replica's failure
            log.error("%s raised %r", status.name, error, exc_info=error)
            error = ReplicaError(errno.EIO, f"{status.name}: {type(error).__name__}: {error}")
        with self._state_lock:
            changed = offset is not None and self.state.mark_dirty(offset, length)
            for lane, n in enumerate(self._npending):
                pend = self._pending[lane]
                for i in range(min(n, PENDING_RANGES)):
                    changed |= self.state.mark_dirty(pend[2 * i], pend[2 * i + 1] - pend[2 * i])
            if status.target is not target:
                # failed already (by another lane) or replaced by a resync meanwhile: what
                # this call sent may be missing from the replica all the same
                if changed:
                    self._store_state()
                return
            dropped = self._drop([(status, error)])
        self._let_go_of(dropped)

    def _drop(self, failures: list[tuple[ReplicaStatus, OSError]]
              ) -> list[tuple[ReplicaStatus, ReplicaTarget, OSError]]:
        """Take failed replicas off the write path, mark them stale and start a new
        generation without them (the state lock is held); a replica that cannot record the
        new generation fails too. Returns every replica dropped, with its target."""
        dropped = []
        while failures:
            self._degraded = True  # before _active shrinks: persist reads them in this order
            for status, error in failures:
                target = status.target
                status.target = None
                self._active = tuple(p for p in self._active if p[0] is not status)
                status.state, status.error = FAILED, error
                self.state.mark_stale(status.index)
                dropped.append((status, target, error))
            self._store_state()
            failures = self._advance_generation()
        self._letting_go += len(dropped)
        return dropped  # type: ignore[return-value]

    def _let_go_of(self, dropped: list[tuple[ReplicaStatus, ReplicaTarget, OSError]]) -> None:
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

    def _advance_generation(self, only_if_changed: bool = False
                            ) -> list[tuple[ReplicaStatus, OSError]]:
        """Start a new generation among the master and the replicas on the write path and
        record it on each (the state lock is held); ``only_if_changed``: not when those are
        the members of the current one. Returns the replicas that could not record it."""
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
            except OSError as e:
                failed.append((status, e))
        return failed

    def _report_failed(self, status: ReplicaStatus, error: BaseException) -> None:
        """A replica that could not be opened: marked failed and stale, announced."""
        with self._state_lock:
            status.state, status.error = FAILED, error
            self._degraded = True
            self.state.mark_stale(status.index)
            self._store_state()
        self._announce_failed(status, error)

    def _announce_failed(self, status: ReplicaStatus, error: BaseException) -> None:
        # the traceback's frames may hold views of the pool (a failed target's locals); kept
        # with the error, they would stop the pool from ever being unmapped (close: EBUSY)
        error.__traceback__ = None
        log.warning("%s failed: %s", status.name, error)
        try:
            self.plugin_manager.hook.pmreplica_replica_failed(replica=status, error=error)
        except Exception:  # a host application's hook must not break the write path
            log.exception("pmreplica_replica_failed hook raised")

    def _note_dirty(self, offset: int, length: int) -> None:
        with self._state_lock:
            if self._resync_marks is not None:
                self._resync_marks.mark(offset, length)
            if self.state.mark_dirty(offset, length):
                self._store_state()

    def _store_state(self, save: bool | None = None) -> None:
        """Write the replica-state record into the master header and make it durable, then
        its copies into the local replicas that take writes (replica-sync reads them when
        the master is lost) when what they hold changed. The fine dirty map is saved first
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
            if status.target is not None and isinstance(status.spec, LocalReplica):
                try:
                    store_copy(status.spec.parts[0].path, copy)
                except OSError as e:  # its next write fails too, and reports it
                    stored = False
                    log.debug("%s: cannot store the replica-state copy: %s", status.name, e)
        self._copies_at = self.state.generation if stored else None

    @property
    def stale_replicas(self) -> list[ReplicaStatus]:
        """Replicas the master's record marks stale: they missed writes while failed and
        stay so until replica-sync (or :meth:`resync`) brings them up to date."""
        return [s for s in self.replicas if self.state.is_stale(s.index)]

    def _restored(self, status: ReplicaStatus) -> list[tuple[ReplicaStatus, OSError]]:
        """Record a replica back in step with the master and start a generation with it
        (the state lock is held); returns the replicas that could not record it."""
        status.state, status.error = OK, None
        if self.state.clear_stale(status.index):
            self._store_state()
        self._degraded = any(s.state != OK for s in self.replicas)
        return self._advance_generation()

    def report_progress(self, index: int, phase: str, done: int, total: int) -> None:
        """Tell ``pmreplica_sync_progress`` how long work on replica ``index`` goes (for
        plugins: "create" while a replica's storage is allocated)."""
        try:
            self.plugin_manager.hook.pmreplica_sync_progress(
                replica=self.replicas[index], phase=phase, done=done, total=total)
        except Exception:  # a host application's hook must not break the pool
            log.exception("pmreplica_sync_progress hook raised")

    def _notify_restored(self, status: ReplicaStatus) -> None:
        try:
            self.plugin_manager.hook.pmreplica_replica_restored(replica=status)
        except Exception:  # a host application's hook must not break the pool
            log.exception("pmreplica_replica_restored hook raised")

    def resync(self, index: int, *, chunk: int = copier.CHUNK) -> int:
        """Bring failed or stale replica ``index`` of this open pool up to date online and put
        it back on the write path; returns the bytes copied.

        The replica is reopened (its storage must be sound: a missing or broken one needs
        ``replica-sync`` with the pool closed) and gets from the master what it missed: the
        chunks written while it was stale, or everything when the record cannot tell.
        Writes go on meanwhile and are tracked; the last pass copies what they touched
        while holding the state lock that every persist takes in degraded mode, and the
        replica rejoins the write path under that lock, so no write can fall between the
        copy and its return. Progress goes to ``pmreplica_sync_progress`` (phase "resync").
        """
        if not 0 < index < len(self.replicas):
            raise PmReplicaError(errno.EINVAL, f"no replica {index} to resync (replica 0 is "
                                               "the master)")
        status = self.replicas[index]
        with self._state_lock:
            if status.state == OK and status.target is not None:
                return 0
            if self._resync_marks is not None:
                raise PmReplicaError(errno.EBUSY, "another resync is running on this pool")
            # off the write path while it is copied (a stale replica may be on it)
            old, status.target = status.target, None
            self._active = tuple(p for p in self._active if p[0] is not status)
            self._degraded = True
            full = self.state.is_full(index) or not self.state.is_stale(index)
            missed = None if full else self.state.fine_snapshot()
            self._resync_marks = dirtymap.Bitmap.covering(
                missed.chunk if missed is not None else dirtymap.fine_chunk_for(self.size),
                self.size)
        try:
            if old is not None:
                close_quietly(old)
            target = self._target(status.spec, index, create=False)
            try:
                attr = target.open()
                problem = _attr_problem(attr, self.header, index, {})
                if problem is None and target.nlanes < self.nlanes:
                    problem = (f"{status.name} offers {target.nlanes} lanes, the pool uses "
                               f"{self.nlanes}")
                if problem:
                    raise ReplicaError(errno.EINVAL, problem)
                copied = self._resync_copy(status, target, missed, chunk)
            except BaseException:
                close_quietly(target)
                raise
        finally:
            with self._state_lock:
                self._resync_marks = None
        self._notify_restored(status)
        return copied

    def _resync_copy(self, status: ReplicaStatus, target: ReplicaTarget,
                     missed: dirtymap.Bitmap | None, chunk: int) -> int:
        """Copy what ``missed`` marks (None: everything) into ``target``, then under the
        state lock what was written meanwhile, and put the target on the write path."""
        start = self.data_offset
        if missed is None:
            pieces: Iterable[tuple[int, int]] = [(start, self.size - start)]
            total = self.size - start
        else:
            pieces, total = missed.ranges(start, self.size), missed.dirty_bytes(start, self.size)
        done = 0
        hook = self.plugin_manager.hook

        def advance(n: int) -> None:
            nonlocal done
            done += n
            hook.pmreplica_sync_progress(replica=status, phase="resync", done=done,
                                         total=total)

        def copy(ranges: Iterable[tuple[int, int]]) -> None:
            copier.copy(ranges, lambda off, n: target.flush(off, n, 0, 0),
                        lambda off, n: target.drain(0), advance, chunk)

        hook.pmreplica_sync_progress(replica=status, phase="resync", done=0, total=total)
        copy(pieces)
        with self._state_lock:
            marks = self._resync_marks
            assert marks is not None
            written = list(marks.ranges(start, self.size))
            total += sum(n for _, n in written)
            copy(written)
            status.target = target
            self._active = self._active + ((status, target),)
            dropped = self._drop(self._restored(status))
        self._let_go_of(dropped)  # a replica that could not record the new generation
        log.info("%s resynced online (%d bytes copied)", status.name, done)
        return done

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
        must be released)."""
        if not self.mapping.closed:
            with self._let_go:  # a replica failing on another thread: its target let go of
                if not self._let_go.wait_for(lambda: not self._letting_go, LET_GO_WAIT):
                    log.warning("a failed replica's target is still being closed")
            with self._state_lock:
                try:
                    if self.state.period:
                        if self.state.save_fine(keep_working_set=False):
                            self._store_state(save=False)
                    else:
                        self.state.drop_side_file()
                except OSError as e:  # the record keeps what the map lacks
                    log.warning("cannot record the replica state on close: %s", e)
        for status in self.replicas[1:]:
            if status.target is not None:
                close_quietly(status.target)
                status.target = None
        self._active = ()
        self._release()

    def _release(self) -> None:
        if self.mapping.closed:
            return
        self.buf.release()
        try:
            self.mapping.close()
        except BufferError:
            raise PmReplicaError(errno.EBUSY, "pool is still referenced: release every memoryview "
                                              "taken from PoolSet.buf before close()") from None
        finally:
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1

    def __enter__(self) -> "PoolSet":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def close_quietly(target: ReplicaTarget) -> None:
    try:
        target.close()
    except OSError as e:
        log.debug("closing replica target: %s", e)


def split_message(path: str, master: Generation, index: int, name: str, replica: Generation,
                  relation: str) -> str:
    """Why a master cannot be used beside replica ``index``: it was superseded by it
    (``relation`` BEHIND) or both took writes after they parted (DIVERGED)."""
    if relation == BEHIND:
        return (f"{path}: this master was superseded: {name} holds newer data ({replica.describe()}"
                f", this master's is {master.describe()}), a replica promoted since; rejoin "
                f"this copy as a replica of the promoted pool (replica-sync there), or keep "
                f"this copy's data instead with `replica-sync --discard {index}`")
    parted = master.parted(replica)
    since = f"generation {parted}" if parted is not None else "a generation no longer recorded"
    return (f"{path}: split brain: this master and {name} both took writes after they parted "
            f"at {since} (this master: {master.describe()}, {name}: {replica.describe()}); "
            f"nothing is overwritten until you choose: `replica-sync --discard {index}` keeps "
            f"this master's data, `replica-sync --discard 0` keeps {name}'s")


def _attr_problem(attr: PoolAttr, master: PoolHeader, index: int,
                  nexts: dict[int, bytes]) -> str | None:
    """Why replica ``index`` (attributes ``attr``) does not belong with this master (by the
    rule replica-sync judges by, :mod:`pmreplica.identity`); ``nexts`` holds the
    next-replica uuid of the replicas opened before it."""
    if attr.is_zeroed:
        return None  # raw replica without headers (NOHDRS remote set)
    problem = membership_problem(Identity.of_attr(attr), Identity.of_header(master), "the master")
    if problem:
        return f"replica {index} {problem}"
    if index - 1 in nexts and nexts[index - 1] != attr.uuid:
        return f"replica {index} is not the replica its predecessor links to (replica uuid differs)"
    return None

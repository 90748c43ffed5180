"""replica-sync: check a pool set's replicas, repair the broken and stale ones from a healthy
source, and (``verify``) compare the healthy ones by checksums computed where the data lives.

:func:`check` reports; :func:`sync` repairs (``dry_run``: reports what it would do). Both
return a :class:`Report`; its ``exit_code`` is the CLI's (0 healthy, 1 repaired, 4 problems
left). How replicas are judged and the source chosen: :mod:`pmreplica.health`.

A repair copies the pool's data range ``[4096, size)`` (each replica has its own header
page) into every replica that is broken, unknown or stale: all of it, or for a stale
replica whose record is intact only the chunks written while it was failed (the record's
bitmap), then rewrites its headers with the links the pool set needs. Broken local parts are
recreated (missing) or extended (short); any other replica is reached through its plugin's
target (:mod:`pmreplica.target_host`): when broken, removed (the remove hook) and created
again with the attributes the source's identity and the replica circle give it, then
copied into with flush/drain (:mod:`pmreplica.copier`, as every repair copies).

Crash safety (SIGKILL or power loss at any point; the next run must finish the job and no
replica that holds the newest data may ever be overwritten with older data):

1. The source is only ever a replica that is sound and *known* up to date (health.py), so
   older data can only flow from a replica a later run would also trust.
2. Before any replica is touched, every replica about to be repaired is marked stale in the
   record (``full`` when it gets a complete copy), written durably to the master and to the
   copies in sound local replicas. A replica is therefore stale in the newest record while
   its data is being rewritten, and a later run never takes it for a source.
3. A local replica additionally loses its header before its data is touched (part 0's
   header is zeroed, the record in the same page kept): until its headers are written again
   it is not a pool at all, whatever becomes of the record. This is what keeps a master that
   is being repaired (its record is the one that would have to say it is stale) from ever
   looking sound: its new header is written only after all its data is durable, in one page
   write together with the record.
4. A replica reached through its target (a remote one) cannot lose its header that way, so
   it is repaired only while its stale mark is recorded where a record counts (the
   master's part 0, or a sound local replica); with no such place (the master lost and not
   yet recreated, no sound local replica) it is left alone. Replicas are repaired in index
   order, so a lost master is recreated, and holds the record, before any remote replica
   is touched.
5. The stale mark of a replica is cleared only after its data and its headers are durable
   (the record is written master first, then the copies; a crash in between leaves some
   copies older, and the newest generation wins).
6. ``verify`` with ``repair`` marks a differing replica stale and its differing chunks dirty
   before copying them, so an interrupted run resumes with those chunks.

A crash therefore leaves every replica either untouched, or stale/broken and repaired again
by the next run, from a source that held the newest data before the crash. Rewriting only
the links of a replica whose data is fine is not atomic across its parts: a crash there
leaves it broken, and it is repaired from another replica. The remaining gap is a double
fault: the master's record lost *and* a replica failure that only the master had recorded
(no other local replica took the copy), so that the surviving copies predate it.
health.py narrows it (a copy never vouches for its own holder; with no record at all only
the master counts as up to date, and a run without a known-good source refuses) but cannot
close it.
"""

from __future__ import annotations

import errno
import functools
import logging
import mmap
import os
import sys
import uuid as _uuid
from typing import Any, Callable, Iterable

from rpmem_common import checksum as _checksum

from . import compare as _compare
from . import copier, generation, health
from . import progress as _progress_mod
from . import sync_report
from .errors import PmReplicaError
from .generation import Generation
from .header import HDR_SIZE, PoolAttr, PoolHeader
from .health import BROKEN, HEALTHY, STALE, Probe
from .plugin_manager import make_plugin_manager
from .pmem import MAP_NORESERVE, Mapping
from .pool import ReplicaStatus, close_quietly, load_set
from .poolset import LocalReplica
from .replica import ReplicaWriter, lock_pool
from .sync_record import RunRecord
# the report and its statuses are part of this module's API (sync.OK_HEALTHY, ...)
from .sync_report import (EXIT_ERROR, EXIT_HEALTHY, EXIT_PROBLEMS, EXIT_REPAIRED,  # noqa: F401
                          FAILED, NEEDS_REPAIR, OK_HEALTHY, OK_REPAIRED, Report,
                          ReplicaReport, note_differing)
from .target import GenerationKeeper
from .target_host import TargetHost, open_target

log = logging.getLogger(__name__)

_NO_RECORD_PLACE = ("no local replica can record that it is being repaired; repair the "
                    "master first")


def check(path: str | os.PathLike[str], *, verify: bool = False,
          plugins: Iterable[object] = (), progress: bool | str = False) -> Report:
    """Check every replica of the pool set at ``path`` (and with ``verify`` compare the
    healthy ones); change nothing. EBUSY if the pool set is open."""
    return sync(path, dry_run=True, verify=verify, plugins=plugins, progress=progress)


def sync(path: str | os.PathLike[str], *, dry_run: bool = False, verify: bool = False,
         repair: bool = False, source: int | None = None, plugins: Iterable[object] = (),
         progress: bool | str = False, block: int = _checksum.DEFAULT_BLOCK,
         discard: Iterable[int] = (), algorithm: int | None = None) -> Report:
    """Repair the pool set at ``path`` from its healthy source and report.

    ``dry_run`` only reports. ``verify`` compares the healthy replicas with the source by
    ``block``-byte checksums; ``repair`` then copies the differing ranges from the source.
    ``source`` names the replica to repair from when none is known to be up to date;
    ``algorithm`` the digest (:mod:`rpmem_common.checksum`; default: the fastest both
    sides compute); ``discard`` the replicas whose data to give up when their generations
    conflict with the others' (split brain, or a set superseded by a promoted replica): they
    are repaired by comparison, never a source.
    ``progress`` shows progress on stderr (True: a bar on a terminal, a line every few
    seconds elsewhere; or a mode of :mod:`pmreplica.progress`); hosts can follow
    ``pmreplica_sync_progress`` through ``plugins``. Errors that stop the run before it
    starts (the pool set file is invalid, the pool set is open: EBUSY) are raised; a
    replica that cannot be repaired is reported."""
    if repair and not verify:
        raise PmReplicaError(errno.EINVAL, "repair is for the ranges verify finds: give verify")
    if block % _checksum.MIN_BLOCK or not _checksum.MIN_BLOCK <= block <= _checksum.MAX_BLOCK:
        raise PmReplicaError(errno.EINVAL, f"verify block size {block} is not a multiple of "
                                           f"{_checksum.MIN_BLOCK} up to {_checksum.MAX_BLOCK}")
    return _Run(path, dry_run=dry_run, verify=verify, repair=repair, forced=source,
                plugins=plugins, progress=progress, block=block,
                discard=frozenset(discard), algorithm=algorithm).run()


class _Progress:
    """Progress through the pmreplica_sync_progress hook (which a
    :class:`~pmreplica.progress.HookRenderer` among the plugins may draw)."""

    def __init__(self, hook: Any) -> None:
        self._hook = hook
        self._status: ReplicaStatus | None = None
        self._phase = ""
        self._done = self._total = 0

    def start(self, probe: Probe, phase: str, total: int) -> None:
        self._status = ReplicaStatus(probe.index, probe.spec, state=probe.health)
        self._phase, self._done, self._total = phase, 0, total
        self._notify()

    def advance(self, n: int) -> None:
        self._done += n
        self._notify()

    def finish(self) -> None:
        if self._status is not None and self._done < self._total:
            self._done = self._total  # what was planned and turned out not to be needed
            self._notify()
        self._status = None

    def _notify(self) -> None:
        self._hook.pmreplica_sync_progress(replica=self._status, phase=self._phase,
                                           done=self._done, total=self._total)


class _Run:
    """One replica-sync run over one pool set."""

    def __init__(self, path: str | os.PathLike[str], *, dry_run: bool, verify: bool,
                 repair: bool, forced: int | None, plugins: Iterable[object],
                 progress: bool | str,
                 block: int, discard: frozenset[int] = frozenset(),
                 algorithm: int | None = None) -> None:
        self.path = os.fspath(path)
        self.discard = discard
        self.set_file = load_set(self.path)
        self.set_file.validate()
        self.size = self.set_file.pool_size
        self.dry_run, self.verify, self.repair, self.forced = dry_run, verify, repair, forced
        self.block = block
        self.algorithm = algorithm
        self.renderer = _progress_mod.HookRenderer(
            progress if isinstance(progress, str) else
            _progress_mod.mode_for(sys.stderr, True) if progress else _progress_mod.OFF)
        self.pm = make_plugin_manager([*plugins, self.renderer])
        self.progress = _Progress(self.pm.hook)
        self.probes: list[Probe] = []
        self.reports: list[ReplicaReport] = []
        self.lock_fd = -1
        # targets that need no local source are bound to this buffer, and data read from
        # a source reached through its target lands in it on its way to a replica (pages
        # freed after use)
        self.scratch = mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | MAP_NORESERVE)
        self.src_map: Mapping | None = None
        #: the record this run writes (made once the replicas are judged)
        self.record: RunRecord
        self.judgement: health.Judgement | None = None
        self.source: int | None = None
        self._missed_map: Any = None
        self._run_gen: Generation | None = None

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> Report:
        try:
            self._lock()
            self._probe()
            if any(not 0 <= i < len(self.probes) for i in self.discard):
                raise PmReplicaError(errno.EINVAL, f"--discard: the pool set has replicas 0 to "
                                                   f"{len(self.probes) - 1}")
            self.judgement = health.judge(self.probes, self.size, self.discard)
            self.record = RunRecord(self.probes, self.judgement, self.size,
                                    self.set_file.master.parts[0].path)
            report = sync_report.found(self.path, self.size, self.dry_run, self.probes,
                                       self.judgement)
            self.reports = report.replicas
            self.source, why = health.choose_source(self.probes, self.forced)
            if self.judgement.conflict is not None:
                self.source, why = None, self.judgement.conflict
            report.source = self.source
            if self.source is None:
                report.reason, report.status = why, FAILED
                log.info("%s: %s", self.path, why)
                return report
            self.reports[self.source].source = True
            self._plan()
            if not self.dry_run:
                self._repair()
            if self.verify:
                self._verify()
                report.verified = True
            if self.record.state is not None:
                self.record.state.drop_side_file()  # nothing stale any more: the fine map is moot
            report.copied = sum(r.copy_bytes for r in self.reports
                                if r.result == "repaired" or self.dry_run)
            report.status = sync_report.status(self.reports)
            return report
        finally:
            self.renderer.close()
            self._close()

    # -- locking and probing ---------------------------------------------------------------
    def _lock(self) -> None:
        """Hold the master's lock (the one an open PoolSet holds) for the whole run."""
        path = self.set_file.master.parts[0].path
        try:
            fd = lock_pool(path, f"{self.path}: the pool set is open in another process; "
                                 "close it before replica-sync")
        except FileNotFoundError:
            return  # nothing can have it open; taken once the repair recreates it
        self.lock_fd = fd

    def _probe(self) -> None:
        view = memoryview(self.scratch)
        for i, spec in enumerate(self.set_file.replicas):
            if isinstance(spec, LocalReplica):
                probe = health.probe_local(self.set_file, i, spec, self.size)
            else:
                probe = health.probe_target(i, spec, self.size, functools.partial(
                    open_target, self.pm, spec, i, self._host(view)))
            self.probes.append(probe)
        view.release()

    # -- planning --------------------------------------------------------------------------
    def _full(self, p: Probe) -> bool:
        state = self.judgement.state  # type: ignore[union-attr]
        return p.health != STALE or state is None or state.is_full(p.index)

    def _ranges(self, p: Probe) -> Iterable[tuple[int, int]]:
        """What replica ``p`` needs copied: everything, or the chunks written while stale."""
        if self._full(p):
            return [(HDR_SIZE, self.size - HDR_SIZE)]
        return self._missed.ranges(HDR_SIZE, self.size)

    @property
    def _missed(self):
        """The fine map of what stale replicas missed, as the authoritative record has it
        (a copy taken once: the run's own record changes as it goes)."""
        if self._missed_map is None:
            self._missed_map = self.judgement.state.fine_snapshot()  # type: ignore[union-attr]
        return self._missed_map

    def _plan(self) -> None:
        for p, r in zip(self.probes, self.reports):
            if p.index == self.source or p.health == HEALTHY:
                r.action = "rewrite headers" if p.link_problems else None
            elif not p.reachable or not p.repairable:
                r.action = "cannot repair"
            elif p.compare and p.sound:
                r.action = "copy differing ranges"  # how much: known once compared
            else:
                r.action = ("recreate and copy" if p.health == BROKEN else
                            "full copy" if self._full(p) else "resync dirty chunks")
                r.copy_bytes = (self.size - HDR_SIZE if self._full(p)
                                else self._missed.dirty_bytes(HDR_SIZE, self.size))

    # -- repair ----------------------------------------------------------------------------
    def _repair(self) -> None:
        j = self.judgement
        assert j is not None and self.source is not None
        dests = [p for p, r in zip(self.probes, self.reports)
                 if r.action not in (None, "cannot repair", "rewrite headers")]
        relink = [p for p, r in zip(self.probes, self.reports) if r.action == "rewrite headers"]
        if not dests and not relink:
            return
        plans = [(p, self._ranges(p), self._full(p)) for p in dests]
        self.record.begin()
        for p, _, full in plans:
            self.record.mark_stale(p.index, full=full, compare=p.compare and p.sound)
        self.record.store()
        for p, ranges, _ in plans:
            r = self.reports[p.index]
            if r.action == "copy differing ranges":
                self._repair_by_comparison(p, r)
                continue
            try:
                self._repair_one(p, ranges)
            except OSError as e:
                r.result, r.error = "failed", _text(e)
                log.info("%s: repair failed: %s", p.name, r.error)
                continue
            self.record.repaired(p)
            r.result = "repaired"
            log.info("%s repaired (%d bytes copied)", p.name, r.copy_bytes)
        for p in relink:
            r = self.reports[p.index]
            try:
                self._write_headers(p)
                r.result = "repaired"
            except OSError as e:
                r.result, r.error = "failed", _text(e)

    def _template(self) -> PoolHeader:
        src = self.probes[self.source]  # type: ignore[index]
        if src.header is not None:
            return src.header._replace(sds=bytes(len(src.header.sds)))
        assert src.attr is not None
        return src.attr.to_header()

    def _attr(self, p: Probe) -> PoolAttr:
        j, n = self.judgement, len(self.probes)
        t = self._template()
        canon = j.canonical  # type: ignore[union-attr]
        return PoolAttr(signature=t.signature, major=t.major, compat_features=t.compat,
                        incompat_features=t.incompat, ro_compat_features=t.ro_compat,
                        poolset_uuid=t.poolset_uuid.bytes_le, uuid=canon[p.index].bytes_le,
                        next_uuid=canon[(p.index + 1) % n].bytes_le,
                        prev_uuid=canon[(p.index - 1) % n].bytes_le, user_flags=t.arch.pack())

    def _write_headers(self, p: Probe, target: Any = None) -> None:
        """Give replica ``p`` headers of the source's identity with the right links (a local
        replica's part 0 page gets the current record with them); ``target`` is an open
        target of ``p``, else the probe's is used."""
        if p.files is not None:
            canon, n = self.judgement.canonical, len(self.probes)  # type: ignore[union-attr]
            uuids = [canon[p.index]] + [_uuid.uuid4() for _ in range(p.files.nhdrs - 1)]
            state = self.record.state.pack() if self.record.state is not None else None
            p.files.write_headers(self._template(), uuids, canon[(p.index - 1) % n],
                                  canon[(p.index + 1) % n], state=state,
                                  gen=self._generation().pack())
            return
        if target is None:
            if p.target is None:
                p.target = self._open_target(p, memoryview(self.scratch))
            target = p.target
        target.set_attr(self._attr(p))
        if isinstance(target, GenerationKeeper):
            target.store_generation(self._generation())

    def _host(self, buf: memoryview) -> TargetHost:
        """What a plugin's target is handed as its pool: ``buf`` is what it copies from."""
        src = self.src_map if buf.obj is not self.scratch else None
        return TargetHost(self.set_file, buf, self.pm, src)

    def _open_target(self, p: Probe, buffer: memoryview, create: bool = False) -> Any:
        """Replica ``p``'s target, copying from ``buffer``, opened (``create``: its storage
        removed and created again, with the headers it is to have)."""
        target = open_target(self.pm, p.spec, p.index, self._host(buffer), create)
        try:
            if create:
                self.pm.hook.pmreplica_remove_replica(spec=p.spec, index=p.index, force=True,
                                                      remove_pool_set=False)
                target.create(self._attr(p))
            else:
                p.attr = target.open()
        except BaseException:
            close_quietly(target)
            raise
        return target

    def _source_view(self) -> memoryview:
        """The pool as the source holds it: the mapped local source, or the scratch buffer
        that :meth:`_fill` reads a remote source into."""
        if self.probes[self.source].is_remote:  # type: ignore[index]
            return memoryview(self.scratch)
        return self._source_mapping().buf[:]  # a view of its own: released by the caller

    def _fill(self, view: memoryview, off: int, n: int) -> None:
        src = self.probes[self.source]  # type: ignore[index]
        if src.is_remote:
            src.target.read(view[off:off + n], off, 0)  # type: ignore[union-attr]

    def _release(self, off: int, n: int) -> None:
        """Let go of the source's pages of a range copied: the run's memory stays bounded."""
        if self.probes[self.source].is_remote:  # type: ignore[index]
            self.scratch.madvise(mmap.MADV_DONTNEED, off, n)
        elif self.src_map is not None:
            self.src_map.release(off, n)

    def _repair_one(self, p: Probe, ranges: Iterable[tuple[int, int]]) -> None:
        """Copy ``ranges`` from the source into ``p`` and give it its headers."""
        if p.is_remote and not self.record.places:
            raise PmReplicaError(errno.EAGAIN, _NO_RECORD_PLACE)
        writer = _Writer(self, p, create=p.health == BROKEN)
        try:
            self.progress.start(p, "copy", self.reports[p.index].copy_bytes)
            writer.copy(ranges, self.progress.advance)
            writer.finish()
        finally:
            self.progress.finish()
            writer.close()

    # -- verify ----------------------------------------------------------------------------
    def _verify(self) -> None:
        """Compare every healthy replica with the source, all at once."""
        compare = [p for p, r in zip(self.probes, self.reports) if p.index != self.source
                   and r.result != "failed" and (p.health == HEALTHY or r.result == "repaired")]
        if compare:
            self._stream(compare, repair=self.repair and not self.dry_run)

    def _repair_by_comparison(self, p: Probe, r: ReplicaReport) -> None:
        """Compare ``p`` with the source by checksums and copy what differs as it is found
        (a replica that may hold writes the source lacks: behind by generation, or
        discarded); its stale mark is recorded already."""
        if p.is_remote and not self.record.places:
            r.result, r.error = "failed", _NO_RECORD_PLACE
            return
        self._stream([p], repair=True, begun=True)

    def _stream(self, targets: list[Probe], repair: bool, begun: bool = False) -> None:
        """Compare ``targets`` with the source as the data streams, the source and every
        target hashed at once where each lives, recording the ranges that differ; with
        ``repair``, copy those from the source as they are found: a target is marked stale
        (to be compared again) before its first byte is rewritten, and cleared once its
        copy and headers are durable (``begun``: it is marked already)."""
        src = self.probes[self.source]  # type: ignore[index]
        block = self.block
        writers: dict[int, _Writer] = {}
        mappings: list[Mapping] = []
        digesters: dict[int, _compare.Digester] = {}

        def begin(p: Probe) -> _Writer:
            if not begun:
                self.record.begin()
                if p.is_remote and not self.record.places:
                    raise PmReplicaError(errno.EAGAIN, _NO_RECORD_PLACE)
                self.record.mark_stale(p.index, full=True, compare=True)
                self.record.store()
                self.reports[p.index].action = "copy differing ranges"
            writers[p.index] = _Writer(self, p, session=bound.pop(p.index, None))
            return writers[p.index]

        def fail(p: Probe, e: OSError) -> None:
            r = self.reports[p.index]
            r.result, r.error = "failed", f"{'compare' if begun else 'verify'}: {_text(e)}"
            log.info("%s: %s", p.name, r.error)

        # targets to be repaired: one bound to the source's buffer, which computes their
        # digests and, once one differs, takes the copy (its writer's)
        bound: dict[int, Any] = {}
        src_view = self._source_view()
        try:
            sessions = []
            for p in targets:
                self.reports[p.index].differing = []
                if p.is_remote and repair and not begun:
                    if p.target is not None:
                        close_quietly(p.target)
                    p.target = None
                    bound[p.index] = self._open_target(p, src_view)
                if repair and begun:
                    begin(p)
                if p.is_remote:
                    session = (writers[p.index].target if p.index in writers
                               else bound.get(p.index) or p.target)
                    if session is None:
                        session = p.target = self._open_target(p, memoryview(self.scratch))
                    sessions.append((p, session))
            if src.is_remote:
                sessions.insert(0, (src, src.target))
            algorithm = self.algorithm or _compare.choose_algorithm(
                [s for _, s in sessions], HDR_SIZE, block)
            by_index = dict(sessions)
            for p in [src, *targets]:
                if p.is_remote:
                    digester = _compare.target_digester(by_index[p], block, algorithm)
                else:
                    mapping = self._source_mapping() if p is src else p.files.open()  # type: ignore[union-attr]
                    if p is not src:
                        mappings.append(mapping)
                    digester = _compare.local_digester(mapping, block, algorithm)
                digesters[p.index] = digester
            stream = _compare.Stream(digesters.pop(src.index), digesters, block, algorithm)
            probes = {p.index: p for p in targets}

            def on_window(off: int, n: int, diffs: dict[int, list[tuple[int, int]]]) -> None:
                self.progress.advance(n)
                for index, ranges in diffs.items():
                    if not ranges:
                        continue
                    p, r = probes[index], self.reports[index]
                    note_differing(r, ranges)
                    if not repair:
                        continue
                    try:
                        writer = writers.get(index) or begin(p)
                        writer.copy(ranges)
                        r.copy_bytes += sum(k for _, k in ranges)
                    except OSError as e:
                        stream.others.pop(index, None)
                        fail(p, e)

            self.progress.start(targets[0] if len(targets) == 1 else src,
                                "compare" if begun else "verify", self.size - HDR_SIZE)
            try:
                stream.run(HDR_SIZE, self.size, on_window,
                           lambda index, e: fail(probes[index], e))
            finally:
                self.progress.finish()
            for index, writer in writers.items():
                p, r = probes[index], self.reports[index]
                if r.result == "failed":
                    continue
                try:
                    writer.finish()
                except OSError as e:
                    fail(p, e)
                    continue
                self.record.repaired(p)
                r.result = "repaired"
        except OSError as e:
            for p in targets:
                if self.reports[p.index].result != "repaired":
                    fail(p, e)
        finally:
            for writer in writers.values():
                writer.close()
            for session in bound.values():
                close_quietly(session)
            src_view.release()
            for mapping in mappings:
                _close_mapping(mapping)

    def _source_mapping(self) -> Mapping:
        """The local source, mapped (once per run)."""
        if self.src_map is None:
            src = self.probes[self.source]  # type: ignore[index]
            assert src.files is not None
            self.src_map = src.files.open()
        return self.src_map

    def _generation(self) -> Generation:
        """The generation this run leaves the pool in, after the newest one found: recorded
        first on the source and the replicas in step with it, then on each replica as it is
        repaired, with its headers. A run cut short leaves the replicas it did not finish
        behind (or without headers), never ahead of the source; and a discarded side can
        never win again."""
        if self._run_gen is not None:
            return self._run_gen
        j = self.judgement
        assert j is not None and self.source is not None
        members = [p for p, r in zip(self.probes, self.reports) if p.index == self.source or (
            p.health == HEALTHY and r.action in (None, "rewrite headers"))]
        mask = sum(1 << p.index for p in self.probes if p.sound or p.index in members)
        master = j.canonical[0]
        gen = Generation.first(master, mask) if j.newest is None else j.newest.next(mask, master)
        for p in members:
            if p.index != self.source and self.reports[p.index].action == "rewrite headers":
                continue  # gets it with its headers
            try:
                self._store_generation(p, gen)
            except OSError as e:
                if p.index == self.source:
                    raise PmReplicaError(e.errno or errno.EIO, f"{p.name}: cannot record the "
                                                               f"new generation: {_text(e)}")
                log.warning("%s: cannot record the new generation (it stays behind): %s",
                            p.name, _text(e))
        self._run_gen = gen
        return gen

    def _store_generation(self, p: Probe, gen: Generation) -> None:
        if not p.is_remote:
            generation.store(p.spec.parts[0].path, gen)  # type: ignore[union-attr]
            return
        target = p.target
        if target is None:
            target = self._open_target(p, memoryview(self.scratch))
        try:
            if isinstance(target, GenerationKeeper):
                target.store_generation(gen)
        finally:
            if target is not p.target:
                close_quietly(target)

    # -- cleanup ---------------------------------------------------------------------------
    def _close(self) -> None:
        for p in self.probes:
            if p.target is not None:
                close_quietly(p.target)
                p.target = None
        if self.src_map is not None:
            _close_mapping(self.src_map)
        try:
            self.scratch.close()
        except BufferError:
            log.debug("scratch buffer still referenced")
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1


class _Writer:
    """Copies from the source into one replica under repair. A local replica loses its
    header first (it is no pool until :meth:`finish`) and its parts are written with
    pwrite; any other gets the ranges through its target, bound to the source's buffer.
    Source pages are let go as each batch is durable or sent."""

    def __init__(self, run: "_Run", p: Probe, create: bool = False,
                 session: Any = None) -> None:
        self.run, self.p = run, p
        self.view = run._source_view()
        self.io: ReplicaWriter | None = None
        self.target: Any = session  # one bound to the source's buffer already: its own
        try:
            if p.is_remote:
                if session is None:
                    if p.target is not None:  # the probe's is bound to the scratch buffer
                        close_quietly(p.target)
                        p.target = None
                    self.target = run._open_target(p, self.view, create=create)
            else:
                self._clear_local()
                self.io = ReplicaWriter(p.files)  # type: ignore[arg-type]
        except BaseException:
            self.close()
            raise

    def _clear_local(self) -> None:
        run, p = self.run, self.p
        files, state = p.files, run.record.state
        assert files is not None and state is not None
        files.restore_parts()
        files.clear_header(state.pack() if p.index == 0 else state.pack_copy())
        if p.index == 0:
            run.record.places.add(0)  # the master's record counts even while it is broken
            if run.lock_fd < 0:
                run._lock()
        else:
            run.record.places.discard(p.index)  # a broken replica's copy does not count

    def copy(self, ranges: Iterable[tuple[int, int]],
             advance: Callable[[int], None] | None = None) -> None:
        run, view = self.run, self.view

        def write(off: int, n: int) -> None:
            run._fill(view, off, n)
            if self.io is not None:
                self.io.write(off, view[off:off + n])
            else:
                self.target.flush(off, n, 0, 0)

        def settle(off: int, n: int) -> None:
            if self.target is not None:
                self.target.drain(0)  # sent and durable: the source's pages may go
            run._release(off, n)

        copier.copy(ranges, write, settle, advance)

    def finish(self) -> None:
        """Make what was copied durable and write the replica's headers."""
        if self.io is not None:
            self.io.sync()
            self.run._write_headers(self.p)
        else:
            self.run._write_headers(self.p, self.target)

    def close(self) -> None:
        if self.io is not None:
            self.io.close()
            self.io = None
        if self.target is not None:
            close_quietly(self.target)
            self.target = None
        self.view.release()


def _close_mapping(mapping: Mapping) -> None:
    try:
        mapping.close()
    except BufferError:
        log.debug("mapping still referenced; unmapped when released")


def _text(e: OSError) -> str:
    return str(e) if isinstance(e, PmReplicaError) else (e.strerror or str(e))


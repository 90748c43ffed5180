"""replica-sync: check a pool set's replicas, repair the broken and stale ones from a healthy
source, and (``verify``) compare the healthy ones by checksums computed where the data lives.

:func:`check` reports; :func:`sync` repairs (``dry_run``: reports what it would do). Both
return a :class:`Report`; its ``exit_code`` is the CLI's (0 healthy, 1 repaired, 4 problems
left). How replicas are judged and the source chosen: :mod:`pmreplica.health`.

A repair copies the pool's data range ``[4096, size)`` (each replica has its own header
page) into every replica that is broken, unknown or stale: all of it, or for a stale
replica whose record is intact only the chunks written while it was failed (the record's
bitmap), then rewrites its headers with the links the pool set needs. Broken local parts are
recreated (missing) or extended (short); a broken remote pool is removed and created again
through its agent, with the attributes the source's identity and the replica circle give it.

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
4. A remote replica cannot lose its header that way, so it is repaired only while its stale
   mark is recorded where a record counts (the master's part 0, or a sound local replica);
   with no such place (the master lost and not yet recreated, no sound local replica) it
   is left alone. Replicas are repaired in index order, so a lost master is recreated, and
   holds the record, before any remote replica is touched.
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

import copy
import errno
import logging
import mmap
import os
import sys
import uuid as _uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator

from . import generation, health
from .errors import PmReplicaError
from .generation import Generation
from .header import HDR_SIZE, PoolAttr, PoolHeader
from .health import BROKEN, HEALTHY, STALE, UNKNOWN, Probe
from .plugin_manager import make_plugin_manager
from .pmem import Mapping
from .pool import ReplicaStatus, load_set
from .poolset import LocalReplica, RemoteReplica
from .replica import ReplicaWriter, lock_pool
from .rpmem import checksum as _checksum
from .state import ReplicaState, chunk_size_for, store_copy

log = logging.getLogger(__name__)

# report statuses and the exit codes the CLI gives them (fsck's numbers)
OK_HEALTHY = "healthy"
OK_REPAIRED = "repaired"
NEEDS_REPAIR = "needs repair"
FAILED = "failed"
EXIT_HEALTHY, EXIT_REPAIRED, EXIT_PROBLEMS, EXIT_ERROR = 0, 1, 4, 8
_EXIT = {OK_HEALTHY: EXIT_HEALTHY, OK_REPAIRED: EXIT_REPAIRED, NEEDS_REPAIR: EXIT_PROBLEMS,
         FAILED: EXIT_PROBLEMS}

#: bytes copied per step: progress and the hook advance this much at a time
COPY_CHUNK = 8 << 20
_MAP_NORESERVE = 0x4000  # Linux; the mmap module does not name it


@dataclass
class ReplicaReport:
    """One replica: what was found, what was (or would be) done, and how it went."""

    index: int
    name: str
    kind: str
    health: str
    problems: list[str] = field(default_factory=list)
    source: bool = False
    #: what the repair does to it: None (nothing), "rewrite headers", "resync dirty
    #: chunks", "full copy", "recreate and copy", "copy differing ranges", "cannot repair"
    action: str | None = None
    #: bytes the repair copies (planned) or copied
    copy_bytes: int = 0
    #: None (not attempted), "repaired" or "failed"
    result: str | None = None
    error: str | None = None
    #: ranges (offset, length) where --verify found it differs from the source; None when
    #: it was not compared
    differing: list[tuple[int, int]] | None = None


@dataclass
class Report:
    """What replica-sync found and did; ``status`` sums it up, ``exit_code`` for the CLI."""

    path: str
    pool_size: int
    dry_run: bool
    replicas: list[ReplicaReport]
    source: int | None = None
    status: str = OK_HEALTHY
    #: why nothing could be repaired, when so
    reason: str | None = None
    verified: bool = False
    #: the authoritative replica-state record, summarized (None: no record found)
    record: dict[str, Any] | None = None
    #: bytes copied in all (or, in a dry run, that would be)
    copied: int = 0

    @property
    def exit_code(self) -> int:
        return _EXIT[self.status]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["exit_code"] = self.exit_code
        return out


def check(path: str | os.PathLike[str], *, verify: bool = False,
          plugins: Iterable[object] = (), progress: bool = False) -> Report:
    """Check every replica of the pool set at ``path`` (and with ``verify`` compare the
    healthy ones); change nothing. EBUSY if the pool set is open."""
    return sync(path, dry_run=True, verify=verify, plugins=plugins, progress=progress)


def sync(path: str | os.PathLike[str], *, dry_run: bool = False, verify: bool = False,
         repair: bool = False, source: int | None = None, plugins: Iterable[object] = (),
         progress: bool = False, block: int = _checksum.DEFAULT_BLOCK,
         discard: Iterable[int] = ()) -> Report:
    """Repair the pool set at ``path`` from its healthy source and report.

    ``dry_run`` only reports. ``verify`` compares the healthy replicas with the source by
    ``block``-byte checksums; ``repair`` then copies the differing ranges from the source.
    ``source`` names the replica to repair from when none is known to be up to date;
    ``discard`` the replicas whose data to give up when their generations conflict with the
    others' (split brain, or a set superseded by a promoted replica): they are repaired by
    comparison, never a source.
    ``progress`` draws a bar on stderr; hosts can follow ``pmreplica_sync_progress`` through
    ``plugins``. Errors that stop the run before it starts (the pool set file is invalid,
    the pool set is open: EBUSY) are raised; a replica that cannot be repaired is reported."""
    if repair and not verify:
        raise PmReplicaError(errno.EINVAL, "repair is for the ranges verify finds: give verify")
    if block % _checksum.MIN_BLOCK or not _checksum.MIN_BLOCK <= block <= _checksum.MAX_BLOCK:
        raise PmReplicaError(errno.EINVAL, f"verify block size {block} is not a multiple of "
                                           f"{_checksum.MIN_BLOCK} up to {_checksum.MAX_BLOCK}")
    return _Run(path, dry_run=dry_run, verify=verify, repair=repair, forced=source,
                plugins=plugins, progress=progress, block=block,
                discard=frozenset(discard)).run()


class _Progress:
    """A tqdm bar on stderr (when asked for) and the pmreplica_sync_progress hook."""

    def __init__(self, hook: Any, enabled: bool) -> None:
        self._hook = hook
        self._enabled = enabled
        self._bar: Any = None
        self._status: ReplicaStatus | None = None
        self._phase = ""
        self._done = self._total = 0

    def start(self, probe: Probe, phase: str, total: int) -> None:
        self._status = ReplicaStatus(probe.index, probe.spec, state=probe.health)
        self._phase, self._done, self._total = phase, 0, total
        if self._enabled:
            from tqdm import tqdm
            self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                             desc=f"{phase} {probe.name}", file=sys.stderr, leave=False,
                             dynamic_ncols=True)
        self._notify()

    def advance(self, n: int) -> None:
        self._done += n
        if self._bar is not None:
            self._bar.update(n)
        self._notify()

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _notify(self) -> None:
        self._hook.pmreplica_sync_progress(replica=self._status, phase=self._phase,
                                           done=self._done, total=self._total)


def _chunks(ranges: Iterable[tuple[int, int]], size: int = COPY_CHUNK
            ) -> Iterator[tuple[int, int]]:
    for off, n in ranges:
        end = off + n
        while off < end:
            step = min(size, end - off)
            yield off, step
            off += step


def _clip(ranges: Iterable[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    out = []
    for off, n in ranges:
        lo, hi = max(off, start), min(off + n, end)
        if lo < hi:
            out.append((lo, hi - lo))
    return out


class _Run:
    """One replica-sync run over one pool set."""

    def __init__(self, path: str | os.PathLike[str], *, dry_run: bool, verify: bool,
                 repair: bool, forced: int | None, plugins: Iterable[object], progress: bool,
                 block: int, discard: frozenset[int] = frozenset()) -> None:
        self.path = os.fspath(path)
        self.discard = discard
        self.set_file = load_set(self.path)
        self.set_file.validate()
        self.size = self.set_file.pool_size
        self.dry_run, self.verify, self.repair, self.forced = dry_run, verify, repair, forced
        self.block = block
        self.progress = _Progress(make_plugin_manager(plugins).hook, progress)
        self.probes: list[Probe] = []
        self.reports: list[ReplicaReport] = []
        self.lock_fd = -1
        # remote sessions that need no local source are bound to this buffer, and data read
        # from a remote source lands in it on its way to a replica (pages freed after use)
        self.scratch = mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | _MAP_NORESERVE)
        self.src_map: Mapping | None = None
        #: replicas whose part-0 page may hold the record (index 0: the master)
        self.record_places: set[int] = set()
        self.state: ReplicaState | None = None
        self.judgement: health.Judgement | None = None
        self.source: int | None = None
        self._source_digests: list[tuple[int, int, bytes]] | None = None
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
            report = self._report_found()
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
            report.copied = sum(r.copy_bytes for r in self.reports
                                if r.result == "repaired" or self.dry_run)
            report.status = self._status()
            return report
        finally:
            self._close()

    def _status(self) -> str:
        reps = self.reports
        if any(r.result == "failed" or r.action == "cannot repair" for r in reps):
            return FAILED
        pending = [r for r in reps if r.action is not None and r.result is None]
        differing = [r for r in reps if r.differing and not (
            r.action == "copy differing ranges" and r.result == "repaired")]
        if pending or differing:
            return NEEDS_REPAIR
        return OK_REPAIRED if any(r.result == "repaired" for r in reps) else OK_HEALTHY

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
            if isinstance(spec, RemoteReplica):
                probe = health.probe_remote(i, spec, self.size, view)
            else:
                assert isinstance(spec, LocalReplica)
                probe = health.probe_local(self.set_file, i, spec, self.size)
            self.probes.append(probe)
        view.release()

    def _report_found(self) -> Report:
        j = self.judgement
        assert j is not None
        for p in self.probes:
            why = {STALE: ["marked stale: it missed writes while it was failed"],
                   UNKNOWN: ["not known to be up to date: no replica-state record vouches "
                             "for it (the master's was lost)"]}.get(p.health, [])
            self.reports.append(ReplicaReport(
                index=p.index, name=p.name, kind="remote" if p.is_remote else "local",
                health=p.health, problems=p.problems + p.link_problems + p.remarks + why))
            if p.health != HEALTHY:
                log.info("%s is %s%s", p.name, p.health,
                         ": " + "; ".join(p.problems) if p.problems else "")
        record = None
        if j.state is not None:
            st = j.state
            dirty = _clip(st.dirty_ranges(self.size), HDR_SIZE, self.size)
            record = {"generation": st.generation, "holders": j.holders,
                      "stale": [i for i in range(len(self.probes)) if st.is_stale(i)],
                      "full_resync": [i for i in range(len(self.probes)) if st.is_full(i)],
                      "chunk_size": st.chunk, "dirty_bytes": sum(n for _, n in dirty)}
        return Report(path=os.path.abspath(self.path), pool_size=self.size,
                      dry_run=self.dry_run, replicas=self.reports, record=record)

    # -- planning --------------------------------------------------------------------------
    def _full(self, p: Probe) -> bool:
        state = self.judgement.state  # type: ignore[union-attr]
        return p.health != STALE or state is None or state.is_full(p.index)

    def _ranges(self, p: Probe) -> list[tuple[int, int]]:
        """What replica ``p`` needs copied: everything, or the chunks written while stale."""
        if self._full(p):
            return [(HDR_SIZE, self.size - HDR_SIZE)]
        state = self.judgement.state  # type: ignore[union-attr]
        return _clip(state.dirty_ranges(self.size), HDR_SIZE, self.size)  # type: ignore[union-attr]

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
                r.copy_bytes = sum(n for _, n in self._ranges(p))

    # -- the record ------------------------------------------------------------------------
    def _record_places(self) -> None:
        """Where a record counts (health.py): the master's part 0 (unless it is another
        pool's), and the part 0 of every sound local replica."""
        for p in self.probes:
            if p.is_remote or p.page is None:
                continue
            if p.index == 0:
                hdr = PoolHeader.unpack(p.page)
                ref = self.judgement.reference  # type: ignore[union-attr]
                foreign = (PoolHeader.checksum_ok(p.page) and not hdr.is_zeroed and ref is not None
                           and hdr.poolset_uuid != ref.identity.poolset_uuid)  # type: ignore[union-attr]
                if not foreign:
                    self.record_places.add(0)
            elif p.sound:
                self.record_places.add(p.index)

    def _start_record(self) -> None:
        """The record this run writes: the authority's, one generation above every record
        found, so that it is the newest wherever it lands."""
        if self.state is not None:
            return
        self._record_places()
        found = self.judgement.state  # type: ignore[union-attr]
        self.state = (ReplicaState(chunk_size_for(self.size)) if found is None
                      else copy.deepcopy(found))
        self.state.generation += 1

    def _store_record(self) -> None:
        """Write the record durably where it counts, the master first."""
        assert self.state is not None
        raw = self.state.pack()
        for i in sorted(self.record_places):
            path = self.probes[i].spec.parts[0].path  # type: ignore[union-attr]
            try:
                store_copy(path, raw)
            except OSError as e:
                if i == 0:
                    raise PmReplicaError(e.errno or errno.EIO, f"cannot record the replica "
                                                               f"state in {path}: {e}") from e
                log.warning("cannot store the replica-state copy in %s: %s", path, e)
                self.record_places.discard(i)

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
        self._start_record()
        assert self.state is not None
        for p, _, full in plans:
            self.state.mark_stale(p.index, full=full, compare=p.compare and p.sound)
        self._store_record()
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
            if not p.is_remote:
                self.record_places.add(p.index)  # a sound replica again: it keeps a copy
            self.state.clear_stale(p.index)
            self._store_record()
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
        assert src.remote is not None
        return src.remote.attr.to_header()

    def _attr(self, p: Probe) -> PoolAttr:
        j, n = self.judgement, len(self.probes)
        t = self._template()
        canon = j.canonical  # type: ignore[union-attr]
        return PoolAttr(signature=t.signature, major=t.major, compat_features=t.compat,
                        incompat_features=t.incompat, ro_compat_features=t.ro_compat,
                        poolset_uuid=t.poolset_uuid.bytes_le, uuid=canon[p.index].bytes_le,
                        next_uuid=canon[(p.index + 1) % n].bytes_le,
                        prev_uuid=canon[(p.index - 1) % n].bytes_le, user_flags=t.arch.pack())

    def _write_headers(self, p: Probe, remote: Any = None) -> None:
        """Give replica ``p`` headers of the source's identity with the right links (a local
        replica's part 0 page gets the current record with them); ``remote`` is an open
        session on a remote ``p``, else the probe's is used."""
        if p.files is not None:
            canon, n = self.judgement.canonical, len(self.probes)  # type: ignore[union-attr]
            uuids = [canon[p.index]] + [_uuid.uuid4() for _ in range(p.files.nhdrs - 1)]
            state = self.state.pack() if self.state is not None else None
            p.files.write_headers(self._template(), uuids, canon[(p.index - 1) % n],
                                  canon[(p.index + 1) % n], state=state,
                                  gen=self._generation().pack())
            return
        if remote is None:
            if p.remote is None:
                p.remote = self._open_remote(p, memoryview(self.scratch))
            remote = p.remote
        remote.set_attr(self._attr(p))
        remote.store_generation(self._generation().pack())

    def _open_remote(self, p: Probe, buffer: memoryview, create: bool = False) -> Any:
        from .rpmem import client

        spec = p.spec
        assert isinstance(spec, RemoteReplica)
        if create:
            client.remove(spec.node, spec.pool_set, client.REMOVE_FORCE)
            return client.RemotePool.create(spec.node, spec.pool_set, buffer, nlanes=1,
                                            attr=self._attr(p))
        return client.RemotePool.open(spec.node, spec.pool_set, buffer, nlanes=1)

    def _source_view(self) -> memoryview:
        """The pool as the source holds it: the mapped local source, or the scratch buffer
        that :meth:`_fill` reads a remote source into."""
        src = self.probes[self.source]  # type: ignore[index]
        if src.is_remote:
            return memoryview(self.scratch)
        if self.src_map is None:
            assert src.files is not None
            self.src_map = src.files.open()
        return self.src_map.buf[:]  # a view of its own: released by the caller

    def _fill(self, view: memoryview, off: int, n: int) -> None:
        src = self.probes[self.source]  # type: ignore[index]
        if src.is_remote:
            src.remote.read(view[off:off + n], off, n)  # type: ignore[union-attr]

    def _release(self, off: int, n: int) -> None:
        if self.probes[self.source].is_remote:  # type: ignore[index]
            self.scratch.madvise(mmap.MADV_DONTNEED, off, n)

    def _repair_one(self, p: Probe, ranges: list[tuple[int, int]]) -> None:
        if p.is_remote and not self.record_places:
            raise PmReplicaError(errno.EAGAIN, "no local replica can record that it is being "
                                               "repaired; repair the master first")
        view = self._source_view()
        try:
            if p.is_remote:
                self._copy_remote(p, view, ranges)
            else:
                self._copy_local(p, view, ranges)
        finally:
            view.release()

    def _copy_local(self, p: Probe, view: memoryview, ranges: list[tuple[int, int]]) -> None:
        files = p.files
        assert files is not None and self.state is not None
        r = self.reports[p.index]
        files.restore_parts()
        files.clear_header(self.state.pack())  # not a pool until its data is complete
        if p.index == 0:
            self.record_places.add(0)  # the master's record counts even while it is broken
            if self.lock_fd < 0:
                self._lock()
        else:
            self.record_places.discard(p.index)  # a broken replica's copy does not count
        io = ReplicaWriter(files)
        try:
            self.progress.start(p, "copy", r.copy_bytes)
            for off, n in _chunks(ranges):
                self._fill(view, off, n)
                io.write(off, view[off:off + n])
                self._release(off, n)
                self.progress.advance(n)
            io.sync()
        finally:
            self.progress.finish()
            io.close()
        self._write_headers(p)

    def _copy_remote(self, p: Probe, view: memoryview, ranges: list[tuple[int, int]]) -> None:
        r = self.reports[p.index]
        if p.remote is not None:  # the probe's session is bound to the scratch buffer
            p.remote.close()
            p.remote = None
        remote = self._open_remote(p, view, create=p.health == BROKEN)
        try:
            self.progress.start(p, "copy", r.copy_bytes)
            for off, n in _chunks(ranges):
                self._fill(view, off, n)
                remote.persist(off, n)
                self._release(off, n)
                self.progress.advance(n)
            self._write_headers(p, remote)
        finally:
            self.progress.finish()
            remote.close()

    # -- verify ----------------------------------------------------------------------------
    def _verify(self) -> None:
        """Compare every healthy replica with the source, block by block."""
        compare = [p for p, r in zip(self.probes, self.reports) if p.index != self.source
                   and r.result != "failed" and (p.health == HEALTHY or r.result == "repaired")]
        if not compare:
            return
        src = self.probes[self.source]  # type: ignore[index]
        reference = self._digests(src, "checksum")
        for p in compare:
            r = self.reports[p.index]
            try:
                digests = self._digests(p, "verify")
            except OSError as e:
                r.differing = None
                r.result, r.error = "failed", f"verify: {_text(e)}"
                continue
            r.differing = self._differences(reference, digests)
            if r.differing:
                log.info("%s differs from the source in %d range(s)", p.name,
                         len(r.differing))
        if self.repair and not self.dry_run:
            for p in compare:
                r = self.reports[p.index]
                if r.differing:
                    self._repair_differing(p, r)

    def _requests(self, p: Probe) -> list[tuple[int, int]]:
        """The data range cut into checksum requests whose blocks are aligned to the block
        size (the first, after the header, may be short), so that differing ranges line up
        with the record's chunks."""
        block, size = self.block, self.size
        first = min(-(-HDR_SIZE // block) * block, size)
        out = [(HDR_SIZE, first - HDR_SIZE)] if first > HDR_SIZE else []
        step = (_checksum.MAX_BLOCKS if p.is_remote else COPY_CHUNK * 4 // block) * block
        out += [(off, min(step, size - off)) for off in range(first, size, step)]
        return out

    def _digests(self, p: Probe, phase: str) -> list[tuple[int, int, bytes]]:
        """``(offset, length, digest)`` of each block of ``p``'s data range, computed where
        ``p`` lives."""
        block = self.block
        out: list[tuple[int, int, bytes]] = []
        mapping: Mapping | None = None
        view: memoryview | None = None
        self.progress.start(p, phase, self.size - HDR_SIZE)
        try:
            if p.is_remote:
                if p.remote is None:
                    p.remote = self._open_remote(p, memoryview(self.scratch))
            elif p.index == self.source:
                view = self._source_view()
            else:
                assert p.files is not None
                mapping = p.files.open()
                view = mapping.buf[:]
            for off, n in self._requests(p):
                if view is None:
                    got = p.remote.checksum(off, n, block)  # type: ignore[union-attr]
                else:
                    raw = _checksum.digests(view, off, n, block)
                    got = [raw[i:i + _checksum.DIGEST_SIZE]
                           for i in range(0, len(raw), _checksum.DIGEST_SIZE)]
                out += [(at, min(block, off + n - at), d)
                        for at, d in zip(range(off, off + n, block), got)]
                self.progress.advance(n)
        finally:
            self.progress.finish()
            if view is not None:
                view.release()
            if mapping is not None:
                mapping.close()
        return out

    @staticmethod
    def _differences(a: list[tuple[int, int, bytes]],
                     b: list[tuple[int, int, bytes]]) -> list[tuple[int, int]]:
        """The blocks whose digests differ, adjacent ones merged."""
        out: list[tuple[int, int]] = []
        for (off, n, x), (_, _, y) in zip(a, b):
            if x == y:
                continue
            if out and out[-1][0] + out[-1][1] == off:
                out[-1] = (out[-1][0], out[-1][1] + n)
            else:
                out.append((off, n))
        return out

    def _repair_by_comparison(self, p: Probe, r: ReplicaReport) -> None:
        """Compare ``p`` with the source by checksums and copy what differs (a replica that
        may hold writes the source lacks: behind by generation, or discarded)."""
        try:
            if self._source_digests is None:
                assert self.source is not None
                self._source_digests = self._digests(self.probes[self.source], "checksum")
            r.differing = self._differences(self._source_digests, self._digests(p, "verify"))
        except OSError as e:
            r.result, r.error = "failed", f"compare: {_text(e)}"
            return
        self._repair_differing(p, r)

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
        remote = p.remote
        if remote is None:
            remote = self._open_remote(p, memoryview(self.scratch))
        try:
            remote.store_generation(gen.pack())
        finally:
            if remote is not p.remote:
                remote.close()

    def _repair_differing(self, p: Probe, r: ReplicaReport) -> None:
        """Mark ``p`` stale with its differing chunks dirty, copy them, clear the mark."""
        self._start_record()
        assert r.differing is not None and self.state is not None
        self.state.mark_stale(p.index)
        for off, n in r.differing:
            self.state.mark_dirty(off, n)
        self._store_record()
        r.action = "copy differing ranges"
        r.copy_bytes = sum(n for _, n in r.differing)
        try:
            self._repair_one(p, r.differing)
        except OSError as e:
            r.result, r.error = "failed", _text(e)
            return
        self.state.clear_stale(p.index)
        self._store_record()
        r.result = "repaired"

    # -- cleanup ---------------------------------------------------------------------------
    def _close(self) -> None:
        for p in self.probes:
            if p.remote is not None:
                try:
                    p.remote.close()
                except OSError as e:
                    log.debug("closing %s: %s", p.name, e)
                p.remote = None
        if self.src_map is not None:
            try:
                self.src_map.close()
            except BufferError:
                log.debug("source mapping still referenced; unmapped when released")
        try:
            self.scratch.close()
        except BufferError:
            log.debug("scratch buffer still referenced")
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1


def _text(e: OSError) -> str:
    return str(e) if isinstance(e, PmReplicaError) else (e.strerror or str(e))


"""Comparing replicas with the source by checksums computed where each lives, as the data
streams (:mod:`.compare`): ``verify`` compares every healthy replica and, with ``repair``,
copies the ranges that differ; a replica that may hold writes the source lacks (behind by
generation, or discarded) is repaired this way too. A replica is marked stale with its
differing chunks dirty before its first byte is rewritten, so an interrupted run resumes."""

from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING, Any

from ..errors import PmReplicaError, as_replica_failure
from ..header import HDR_SIZE
from ..health import HEALTHY, Probe
from ..pmem import Mapping
from ..status import close_quietly
from ..target import DigestTarget, MappedTarget
from . import compare as _compare
from .record import NO_RECORD_PLACE
from .report import ReplicaReport, error_text, note_differing
from .source import close_mapping
from .writer import Writer

if TYPE_CHECKING:
    from .run import Run

log = logging.getLogger("pmreplica.sync")


def verify(run: Run) -> None:
    """Compare every healthy replica with the source, all at once."""
    compare = [p for p, r in zip(run.probes, run.reports) if p.index != run.source
               and r.result != "failed" and (p.health == HEALTHY or r.result == "repaired")]
    if compare:
        _stream(run, compare, repair=run.repair and not run.dry_run)


def repair_by_comparison(run: Run, p: Probe, r: ReplicaReport) -> None:
    """Compare ``p`` with the source by checksums and copy what differs as it is found
    (a replica that may hold writes the source lacks: behind by generation, or
    discarded); its stale mark is recorded already."""
    if not run.record.can_mark(p):
        r.result, r.error = "failed", NO_RECORD_PLACE
        return
    _stream(run, [p], repair=True, begun=True)


def _stream(run: Run, targets: list[Probe], repair: bool, begun: bool = False) -> None:
    """Compare ``targets`` with the source as the data streams, the source and every
    target hashed at once where each lives, recording the ranges that differ; with
    ``repair``, copy those from the source as they are found: a target is marked stale
    (to be compared again) before its first byte is rewritten, and cleared once its
    copy and headers are durable (``begun``: it is marked already)."""
    src = run.probes[run.source]  # type: ignore[index]
    block = run.block
    writers: dict[int, Writer] = {}
    digesters: dict[int, _compare.Digester] = {}
    mappings: list[Mapping] = []  # replicas mapped here to be hashed in place

    def begin(p: Probe) -> Writer:
        if not begun:
            run.record.begin()
            if not run.record.can_mark(p):
                raise PmReplicaError(errno.EAGAIN, NO_RECORD_PLACE)
            run.record.mark_stale(p.index, full=True, compare=True)
            run.record.store()
            run.reports[p.index].action = "copy differing ranges"
        writers[p.index] = Writer(run, p, session=bound.pop(p.index, None))
        return writers[p.index]

    def fail(p: Probe, e: Exception) -> None:
        r = run.reports[p.index]
        r.result = "failed"
        r.error = (f"{'compare' if begun else 'verify'}: "
                   f"{error_text(as_replica_failure(p.name, e))}")
        if not r.differing:  # not compared to the end: nothing says it is the same
            r.differing = None
        log.info("%s: %s", p.name, r.error)

    # targets to be repaired: one bound to the source's buffer, which computes their
    # digests and, once one differs, takes the copy (its writer's)
    bound: dict[int, Any] = {}
    src_view = run.data.view()
    try:
        sessions = [(src, run.probe_target(src))]
        for p in targets:
            run.reports[p.index].differing = []
            if repair and not begun:
                if p.target is not None:
                    close_quietly(p.target)
                p.target = None
                bound[p.index] = run.open_target(p, src_view)
            if repair and begun:
                begin(p)
            session = (writers[p.index].target if p.index in writers
                       else bound.get(p.index) or run.probe_target(p))
            sessions.append((p, session))
        algorithm = run.algorithm or _compare.choose_algorithm(
            [s for _, s in sessions], HDR_SIZE, block)
        for p, session in sessions:
            mapping = run.data.mapping() if p is src else None
            if mapping is None and isinstance(session, MappedTarget) \
                    and not isinstance(session, DigestTarget):
                mapping = session.map_replica()
                mappings.append(mapping)
            digesters[p.index] = (_compare.local_digester(mapping, block, algorithm)
                                  if mapping is not None else
                                  _compare.target_digester(session, block, algorithm))
        stream = _compare.Stream(digesters.pop(src.index), digesters, block, algorithm)
        probes = {p.index: p for p in targets}

        def on_window(off: int, n: int, diffs: dict[int, list[tuple[int, int]]]) -> None:
            run.progress.advance(n)
            for index, ranges in diffs.items():
                if not ranges:
                    continue
                p, r = probes[index], run.reports[index]
                note_differing(r, ranges)
                if not repair:
                    continue
                try:
                    writer = writers.get(index) or begin(p)
                    writer.copy(ranges)
                    r.copy_bytes += sum(k for _, k in ranges)
                except Exception as e:  # noqa: BLE001 - a plugin's bug fails its replica alone
                    stream.others.pop(index, None)
                    fail(p, e)

        run.progress.start(targets[0] if len(targets) == 1 else src,
                            "compare" if begun else "verify", run.size - HDR_SIZE)
        try:
            stream.run(HDR_SIZE, run.size, on_window,
                       lambda index, e: fail(probes[index], e))
            run.progress.finish()
        finally:
            run.progress.stop()
        for index, writer in writers.items():
            p, r = probes[index], run.reports[index]
            if r.result == "failed":
                continue
            try:
                writer.finish()
            except Exception as e:  # noqa: BLE001 - as above
                fail(p, e)
                continue
            run.record.repaired(p)
            r.result = "repaired"
    except Exception as e:  # noqa: BLE001 - as above: the replicas compared fail, not the run
        for p in targets:
            if run.reports[p.index].result != "repaired":
                fail(p, e)
    finally:
        for writer in writers.values():
            writer.close()
        for session in bound.values():
            close_quietly(session)
        src_view.release()
        for mapping in mappings:
            close_mapping(mapping)

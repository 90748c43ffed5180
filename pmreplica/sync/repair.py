"""The repair of the replicas a run's plan names, in index order: every one marked stale in
the record first, then each copied from the source and given its headers (or, when it may
hold writes the source lacks, repaired by comparison), then cleared; replicas whose data is
fine but whose links are wrong get new headers only."""

from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING, Iterable

from ..errors import PmReplicaError, as_replica_failure
from ..health import BROKEN, Probe
from .record import NO_RECORD_PLACE
from .report import error_text
from .verify import repair_by_comparison
from .writer import Writer

if TYPE_CHECKING:
    from .run import Run

log = logging.getLogger("pmreplica.sync")


def repair(run: Run) -> None:
    """Carry out the plan: repair every replica it names, in index order."""
    assert run.judgement is not None and run.source is not None
    dests = [p for p, r in zip(run.probes, run.reports)
             if r.action not in (None, "cannot repair", "rewrite headers")]
    relink = [p for p, r in zip(run.probes, run.reports) if r.action == "rewrite headers"]
    if not dests and not relink:
        return
    plans = [(p, run.plan.ranges(p), run.plan.full(p)) for p in dests]
    run.record.begin()
    for p, _, full in plans:
        run.record.mark_stale(p.index, full=full, compare=p.compare and p.sound)
    run.record.store()
    for p, ranges, _ in plans:
        r = run.reports[p.index]
        if r.action == "copy differing ranges":
            repair_by_comparison(run, p, r)
            continue
        try:
            _repair_one(run, p, ranges)
        except Exception as e:  # noqa: BLE001 - a plugin's bug fails this replica alone
            r.result, r.error = "failed", error_text(as_replica_failure(p.name, e))
            log.info("%s: repair failed: %s", p.name, r.error)
            continue
        run.record.repaired(p)
        r.result = "repaired"
        log.info("%s repaired (%d bytes copied)", p.name, r.copy_bytes)
    for p in relink:
        r = run.reports[p.index]
        try:
            run.headers.write(p)
            r.result = "repaired"
        except Exception as e:  # noqa: BLE001 - as above
            r.result, r.error = "failed", error_text(as_replica_failure(p.name, e))


def _repair_one(run: Run, p: Probe, ranges: Iterable[tuple[int, int]]) -> None:
    """Copy ``ranges`` from the source into ``p`` and give it its headers."""
    if not run.record.can_mark(p):
        raise PmReplicaError(errno.EAGAIN, NO_RECORD_PLACE)
    writer = Writer(run, p, create=p.health == BROKEN)
    try:
        run.progress.start(p, "copy", run.reports[p.index].copy_bytes)
        writer.copy(ranges, run.progress.advance)
        writer.finish()
        run.progress.finish()
    finally:
        run.progress.stop()
        writer.close()

"""What replica-sync found and did: the report of a run (:class:`Report`, one
:class:`ReplicaReport` per replica), its status and the exit code the command gives it."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import PmReplicaError
from ..header import HDR_SIZE
from ..health import HEALTHY, STALE, UNKNOWN, Judgement, Probe

log = logging.getLogger("pmreplica.sync")

# report statuses and the exit codes the CLI gives them (fsck's numbers)
OK_HEALTHY = "healthy"
OK_REPAIRED = "repaired"
NEEDS_REPAIR = "needs repair"
FAILED = "failed"
EXIT_HEALTHY, EXIT_REPAIRED, EXIT_PROBLEMS, EXIT_ERROR = 0, 1, 4, 8
_EXIT = {OK_HEALTHY: EXIT_HEALTHY, OK_REPAIRED: EXIT_REPAIRED, NEEDS_REPAIR: EXIT_PROBLEMS,
         FAILED: EXIT_PROBLEMS}


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
    #: ranges (offset, length) where --verify found it differs from the source (the first
    #: MAX_REPORTED_RANGES); None when it was not compared
    differing: list[tuple[int, int]] | None = None
    #: bytes in differing ranges (all of them)
    differing_bytes: int = 0


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
    #: the pool's last session did not close: the replicas it may have left behind are
    #: stale with what it was writing (pmreplica.activity)
    unclean: bool = False

    @property
    def exit_code(self) -> int:
        return _EXIT[self.status]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["exit_code"] = self.exit_code
        return out


def found(path: str, pool_size: int, dry_run: bool, probes: list[Probe],
          judgement: Judgement, unclean: bool = False) -> Report:
    """The report of what the probes and their judgement found, before anything is done
    (``unclean``: the pool's last session did not close, see :attr:`Report.unclean`)."""
    reports = []
    stale = ("marked stale: it may lack what the last session was writing, or missed "
             "writes while it was failed" if unclean else
             "marked stale: it missed writes while it was failed")
    for p in probes:
        why = {STALE: [stale],
               UNKNOWN: ["not known to be up to date: no replica-state record vouches "
                         "for it (the master's was lost)"]}.get(p.health, [])
        reports.append(ReplicaReport(
            index=p.index, name=p.name, kind="remote" if p.is_remote else "local",
            health=p.health, problems=p.problems + p.link_problems + p.remarks + why))
        if p.health != HEALTHY:
            log.info("%s is %s%s", p.name, p.health,
                     ": " + "; ".join(p.problems) if p.problems else "")
    record = None
    if judgement.state is not None:
        st, n = judgement.state, len(probes)
        record = {"generation": st.generation, "holders": judgement.holders,
                  "stale": [i for i in range(n) if st.is_stale(i)],
                  "full_resync": [i for i in range(n) if st.is_full(i)],
                  "chunk_size": st.chunk,
                  "fine_chunk_size": st.fine.chunk if st.fine is not None else None,
                  "dirty_bytes": st.dirty_bytes(HDR_SIZE, pool_size)}
    return Report(path=os.path.abspath(path), pool_size=pool_size, dry_run=dry_run,
                  replicas=reports, record=record, unclean=unclean)


def status(reports: list[ReplicaReport]) -> str:
    """The run's outcome from its replicas' reports."""
    if any(r.result == "failed" or r.action == "cannot repair" for r in reports):
        return FAILED
    pending = [r for r in reports if r.action is not None and r.result is None]
    differing = [r for r in reports if r.differing and not (
        r.action == "copy differing ranges" and r.result == "repaired")]
    if pending or differing:
        return NEEDS_REPAIR
    return OK_REPAIRED if any(r.result == "repaired" for r in reports) else OK_HEALTHY


#: differing ranges kept per replica in a report (the bytes are counted past it)
MAX_REPORTED_RANGES = 10_000


def note_differing(r: ReplicaReport, ranges: list[tuple[int, int]]) -> None:
    """Add ``ranges`` to the report's differing ranges (merged with the last one)."""
    assert r.differing is not None
    r.differing_bytes += sum(n for _, n in ranges)
    for off, n in ranges:
        last = r.differing[-1] if r.differing else None
        if last is not None and last[0] + last[1] == off:
            r.differing[-1] = (last[0], last[1] + n)
        elif len(r.differing) < MAX_REPORTED_RANGES:
            r.differing.append((off, n))


def error_text(e: OSError) -> str:
    """How an error reads in a report: pmreplica's own message, else the OS's."""
    return str(e) if isinstance(e, PmReplicaError) else (e.strerror or str(e))

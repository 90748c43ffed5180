"""replica-sync: check a pool set's replicas, repair the broken and stale ones from a healthy
source, and (``verify``) compare the healthy ones by checksums computed where the data lives.

:func:`check` reports; :func:`sync` repairs (``dry_run``: reports what it would do). Both
return a :class:`Report`; its ``exit_code`` is the CLI's (0 healthy, 1 repaired, 4 problems
left). How replicas are judged and the source chosen: :mod:`pmreplica.health`. The steps of a run
are :mod:`.run`'s, each in its own module: :mod:`.plan`, :mod:`.repair` (with :mod:`.writer`,
:mod:`.headers` and :mod:`.source`), :mod:`.verify` (with :mod:`.compare`); what it records
and reports: :mod:`.record`, :mod:`.report`; the command: :mod:`.command`.

A repair copies the pool's data range ``[4096, size)`` (each replica has its own header
page) into every replica that is broken, unknown or stale: all of it, or for a stale
replica whose record is intact only the chunks written while it was failed (the record's
bitmap), then rewrites its headers with the links the pool set needs. Every replica, the
master and the local ones included, is reached through its plugin's target
(:mod:`pmreplica.target_host`) and copied into with flush/drain (:mod:`pmreplica.copier`,
as every repair copies). A target that keeps its header pages
(:class:`~pmreplica.target.HeaderPageKeeper`: the local plugin's, whose part 0 page also
holds the record's copy and the generation) is repaired in place: its storage restored
(missing parts recreated, short ones extended), its copy written with ``write_through``
and made durable by one drain at the end; any other, when broken, is removed (the
remove hook) and created again with the attributes the source's identity and the replica
circle give it.

A pool set whose last session did not close (its activity log's marker is set) is first
folded in under the run's lock (:func:`pmreplica.activity.recover`; a dry run and
:func:`check` only reckon it): the replicas it may have left behind are then stale with
the chunks it was writing, and repaired as such.

Crash safety (SIGKILL or power loss at any point; the next run must finish the job and no
replica that holds the newest data may ever be overwritten with older data):

1. The source is only ever a replica that is sound and *known* up to date (health.py), so
   older data can only flow from a replica a later run would also trust.
2. Before any replica is touched, every replica about to be repaired is marked stale in the
   record (``full`` when it gets a complete copy), written durably to the master and to the
   copies in sound local replicas. A replica is therefore stale in the newest record while
   its data is being rewritten, and a later run never takes it for a source.
3. A replica that keeps its header pages (a local one) additionally loses its header
   before its data is touched (``clear_header``: part 0's header zeroed, the record in the
   same page kept): until its headers are written again it is not a pool at all, whatever
   becomes of the record. This is what keeps a master that is being repaired (its record
   is the one that would have to say it is stale) from ever looking sound: its new header
   is written only after all its data is durable, in one page write together with the
   record (``write_headers``).
4. A replica whose target keeps no header pages (a remote one) cannot lose its header that
   way, so it is repaired only while its stale mark is recorded where a record counts (the
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
import os
from typing import Iterable

from rpmem_common import checksum as _checksum

from ..errors import PmReplicaError
# the report and its statuses are part of this package's API (sync.OK_HEALTHY, ...)
from .report import (EXIT_ERROR, EXIT_HEALTHY, EXIT_PROBLEMS, EXIT_REPAIRED,  # noqa: F401
                     FAILED, NEEDS_REPAIR, OK_HEALTHY, OK_REPAIRED, Report, ReplicaReport)
from .run import Run


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
    return Run(path, dry_run=dry_run, verify=verify, repair=repair, forced=source,
               plugins=plugins, progress=progress, block=block,
               discard=frozenset(discard), algorithm=algorithm).run()

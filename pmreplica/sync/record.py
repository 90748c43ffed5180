"""The replica-state record a replica-sync run writes, and where it writes it.

A record counts where :mod:`pmreplica.health` looks for one: the master's first page (unless
it is another pool's) and the first page of every sound replica that keeps its header pages
(:class:`~pmreplica.target.HeaderPageKeeper`: the local ones), written through its target.
The run's record is the authority's, one generation above every record found, so that it is
the newest wherever it lands; it is written durably, the master first (its fine dirty map
saved before it). See :mod:`pmreplica.sync` for the order of marks and clears that keeps a
crash safe.
"""

from __future__ import annotations

import errno
import logging

from .. import dirtymap
from ..errors import PmReplicaError
from ..header import PoolHeader
from ..health import Judgement, Probe
from ..state import ReplicaState

log = logging.getLogger("pmreplica.sync")

#: why a replica reached through its target is left alone (rule 4 of :mod:`pmreplica.sync`)
NO_RECORD_PLACE = ("no local replica can record that it is being repaired; repair the "
                   "master first")


class RunRecord:
    """The record of one run (``state``, None until :meth:`begin`) and the replicas whose
    first page holds it (``places``; index 0: the master)."""

    def __init__(self, probes: list[Probe], judgement: Judgement, size: int,
                 master_path: str) -> None:
        self.probes, self.judgement = probes, judgement
        self.size, self.master_path = size, master_path
        self.places: set[int] = set()
        self.state: ReplicaState | None = None

    def _find_places(self) -> None:
        """Where a record counts (health.py): the master's first page (unless it is another
        pool's), and that of every sound replica that keeps its header pages."""
        for p in self.probes:
            if not p.keeps_pages or p.page is None:
                continue
            if p.index == 0:
                hdr = PoolHeader.unpack(p.page)
                ref = self.judgement.reference
                foreign = (PoolHeader.checksum_ok(p.page) and not hdr.is_zeroed and ref is not None
                           and hdr.poolset_uuid != ref.identity.poolset_uuid)  # type: ignore[union-attr]
                if not foreign:
                    self.places.add(0)
            elif p.sound:
                self.places.add(p.index)

    def begin(self) -> None:
        """The record this run writes: the authority's, one generation above every record
        found, so that it is the newest wherever it lands."""
        if self.state is not None:
            return
        self._find_places()
        found = self.judgement.state
        if found is None:
            self.state = ReplicaState(self.size)
            self.state.fine_path = dirtymap.path_for(self.master_path)
        else:
            self.state = found.copy()
        self.state.generation += 1

    def store(self) -> None:
        """Write the record durably where it counts, the master first (its fine dirty map
        saved before it)."""
        assert self.state is not None
        self.state.save_fine(keep_working_set=False)
        for i in sorted(self.places):
            p = self.probes[i]
            raw = self.state.pack() if i == 0 else self.state.pack_copy()
            try:
                p.keeper.store_record(raw)  # type: ignore[union-attr]
            except OSError as e:
                if i == 0:
                    raise PmReplicaError(e.errno or errno.EIO, f"cannot record the replica "
                                                               f"state in {p.name}: {e}") from e
                log.warning("cannot store the replica-state copy in %s: %s", p.name, e)
                self.places.discard(i)

    def can_mark(self, p: Probe) -> bool:
        """Whether ``p`` may be touched: one that does not keep its header pages only while
        its stale mark is recorded where a record counts."""
        return p.keeps_pages or bool(self.places)

    def mark_stale(self, index: int, full: bool = True, compare: bool = False) -> None:
        """Record replica ``index`` stale, durably, before it is touched."""
        self.begin()
        assert self.state is not None
        self.state.mark_stale(index, full=full, compare=compare)

    def repaired(self, p: Probe) -> None:
        """Replica ``p``'s data and headers are durable: clear its stale mark, durably (one
        that keeps its header pages holds a copy of the record again)."""
        if p.keeps_pages:
            self.places.add(p.index)
        self.state.clear_stale(p.index)  # type: ignore[union-attr]
        self.store()

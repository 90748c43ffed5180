"""What a run does to each replica (the action its report shows) and which ranges a repair
copies into it: everything, or for a stale replica whose record is intact only the chunks
written while it was failed (the record's fine map)."""

from __future__ import annotations

from typing import Any, Iterable

from ..header import HDR_SIZE
from ..health import BROKEN, HEALTHY, STALE, Judgement, Probe
from .report import ReplicaReport


class Plan:
    """The plan of one run, from the judged probes and the chosen ``source``."""

    def __init__(self, probes: list[Probe], reports: list[ReplicaReport], judgement: Judgement,
                 source: int, size: int) -> None:
        self.probes, self.reports, self.judgement = probes, reports, judgement
        self.source, self.size = source, size
        self._missed_map: Any = None

    def full(self, p: Probe) -> bool:
        """Whether ``p`` gets a complete copy."""
        state = self.judgement.state
        return p.health != STALE or state is None or state.is_full(p.index)

    def ranges(self, p: Probe) -> Iterable[tuple[int, int]]:
        """What replica ``p`` needs copied: everything, or the chunks written while stale."""
        if self.full(p):
            return [(HDR_SIZE, self.size - HDR_SIZE)]
        return self._missed.ranges(HDR_SIZE, self.size)

    @property
    def _missed(self) -> Any:
        """The fine map of what stale replicas missed, as the authoritative record has it
        (a copy taken once: the run's own record changes as it goes)."""
        if self._missed_map is None:
            self._missed_map = self.judgement.state.fine_snapshot()  # type: ignore[union-attr]
        return self._missed_map

    def decide(self) -> None:
        """Set every replica's planned action and the bytes it is to get."""
        for p, r in zip(self.probes, self.reports):
            if p.index == self.source or p.health == HEALTHY:
                r.action = "rewrite headers" if p.link_problems else None
            elif not p.reachable or not p.repairable:
                r.action = "cannot repair"
            elif p.compare and p.sound:
                r.action = "copy differing ranges"  # how much: known once compared
            else:
                r.action = ("recreate and copy" if p.health == BROKEN else
                            "full copy" if self.full(p) else "resync dirty chunks")
                r.copy_bytes = (self.size - HDR_SIZE if self.full(p)
                                else self._missed.dirty_bytes(HDR_SIZE, self.size))

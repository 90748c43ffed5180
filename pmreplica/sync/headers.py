"""What a repaired replica is given besides its data: headers of the source's identity with
the links the pool set needs (the first page of one that keeps its header pages with the
current record), and the generation this run leaves the pool in."""

from __future__ import annotations

import errno
import logging
import uuid as _uuid
from typing import TYPE_CHECKING, Any

from ..errors import PmReplicaError
from ..generation import Generation
from ..header import PoolAttr, PoolHeader
from ..health import HEALTHY, Probe
from ..status import close_quietly
from ..target import GenerationKeeper
from .report import error_text

if TYPE_CHECKING:
    from .run import Run

log = logging.getLogger("pmreplica.sync")


class Headers:
    """The headers and the generation a run writes into the replicas it repairs."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self._gen: Generation | None = None

    def template(self) -> PoolHeader:
        """The source's header, the model of every header written."""
        src = self.run.probes[self.run.source]  # type: ignore[index]
        if src.header is not None:
            return src.header._replace(sds=bytes(len(src.header.sds)))
        assert src.attr is not None
        return src.attr.to_header()

    def attr(self, p: Probe) -> PoolAttr:
        """The attributes replica ``p`` is created or relinked with through its target."""
        t = self.template()
        uuid, prev, next_ = self._links(p)
        return PoolAttr(signature=t.signature, major=t.major, compat_features=t.compat,
                        incompat_features=t.incompat, ro_compat_features=t.ro_compat,
                        poolset_uuid=t.poolset_uuid.bytes_le, uuid=uuid.bytes_le,
                        next_uuid=next_.bytes_le, prev_uuid=prev.bytes_le,
                        user_flags=t.arch.pack())

    def _links(self, p: Probe) -> tuple[_uuid.UUID, _uuid.UUID, _uuid.UUID]:
        """Replica ``p``'s uuid and its neighbours' (previous, next) in the pool set's
        circle of replicas."""
        canon, n = self.run.judgement.canonical, len(self.run.probes)  # type: ignore[union-attr]
        return canon[p.index], canon[(p.index - 1) % n], canon[(p.index + 1) % n]

    def write(self, p: Probe, target: Any = None) -> None:
        """Give replica ``p`` headers of the source's identity with the right links (one
        that keeps its header pages gets the current record in the same page write);
        ``target`` is a target of ``p`` (open, or keeping its pages), else the probe's."""
        run = self.run
        if p.keeps_pages:
            state = run.record.state.pack() if run.record.state is not None else None
            (target or p.keeper).write_headers(self.template(), *self._links(p), record=state,
                                               gen=self.generation().pack())
            return
        if target is None:
            target = run.probe_target(p)
        target.set_attr(self.attr(p))
        if isinstance(target, GenerationKeeper):
            target.store_generation(self.generation())

    def generation(self) -> Generation:
        """The generation this run leaves the pool in, after the newest one found: recorded
        first on the source and the replicas in step with it, then on each replica as it is
        repaired, with its headers. A run cut short leaves the replicas it did not finish
        behind (or without headers), never ahead of the source; and a discarded side can
        never win again."""
        if self._gen is not None:
            return self._gen
        run, j = self.run, self.run.judgement
        assert j is not None and run.source is not None
        members = [p for p, r in zip(run.probes, run.reports) if p.index == run.source or (
            p.health == HEALTHY and r.action in (None, "rewrite headers"))]
        mask = sum(1 << p.index for p in run.probes if p.sound or p.index in members)
        master = j.canonical[0]
        gen = Generation.first(master, mask) if j.newest is None else j.newest.next(mask, master)
        for p in members:
            if p.index != run.source and run.reports[p.index].action == "rewrite headers":
                continue  # gets it with its headers
            try:
                self._store_generation(p, gen)
            except OSError as e:
                if p.index == run.source:
                    raise PmReplicaError(e.errno or errno.EIO, f"{p.name}: cannot record the "
                                                               f"new generation: {error_text(e)}")
                log.warning("%s: cannot record the new generation (it stays behind): %s",
                            p.name, error_text(e))
        self._gen = gen
        return gen

    def _store_generation(self, p: Probe, gen: Generation) -> None:
        target = p.keeper or p.target
        if target is None:
            target = self.run.open_target(p)
        try:
            if isinstance(target, GenerationKeeper):
                target.store_generation(gen)
        finally:
            if target is not p.target and target is not p.keeper:
                close_quietly(target)

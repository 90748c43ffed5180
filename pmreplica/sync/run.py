"""One replica-sync run over one pool set, in order: lock the set, probe and judge every
replica (after folding in what an unclean last session was writing: :mod:`pmreplica.activity`),
choose the source, plan, repair, verify; and the targets the run opens on its
replicas. What each step does lives beside it (:mod:`.plan`, :mod:`.repair`,
:mod:`.verify`); the crash-safety rules they follow are :mod:`pmreplica.sync`'s."""

from __future__ import annotations

import errno
import functools
import logging
import os
import sys
from typing import Any, Iterable

from .. import activity, health
from .. import progress as _progress_mod
from ..errors import PmReplicaError
from ..health import Probe
from ..plugin_manager import make_plugin_manager
from ..replica import lock_pool_set, release_locks
from ..setfile import load_set
from ..state import OFFSET as STATE_OFFSET
from ..status import close_quietly
from ..target import open_checked
from ..target_host import open_target, remove_replica, served_target
from . import report as _report
from .headers import Headers
from .plan import Plan
from .replica_progress import ReplicaProgress
from .record import RunRecord
from .repair import repair
from .report import FAILED, Report, ReplicaReport
from .source import SourceData
from .verify import verify

log = logging.getLogger("pmreplica.sync")


class Run:
    """One replica-sync run over one pool set: what it found (``probes``, ``judgement``),
    what it reports, and what its steps share (the record, the source's data, the lock)."""

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
        self.progress = ReplicaProgress(self.pm)
        self.probes: list[Probe] = []
        self.reports: list[ReplicaReport] = []
        #: the locks an open PoolSet holds (replica.lock_pool_set), the master's first
        self.locks: dict[int, int] = {}
        self.data = SourceData(self.set_file, self.pm, self.size)
        #: the record this run writes (made once the replicas are judged)
        self.record: RunRecord
        self.judgement: health.Judgement | None = None
        self.source: int | None = None
        self.plan: Plan
        self.headers = Headers(self)
        #: an unclean last session was folded into the record (activity.py)
        self._folded = False

    def run(self) -> Report:
        try:
            self.lock()
            self._probe()
            unclean = self._recover()
            if any(not 0 <= i < len(self.probes) for i in self.discard):
                raise PmReplicaError(errno.EINVAL, f"--discard: the pool set has replicas 0 to "
                                                   f"{len(self.probes) - 1}")
            self.judgement = health.judge(self.probes, self.size, self.discard)
            self.record = RunRecord(self.probes, self.judgement, self.size,
                                    self.set_file.master.parts[0].path)
            report = _report.found(self.path, self.size, self.dry_run, self.probes,
                                   self.judgement, unclean=unclean is not None)
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
            self.data.target = functools.partial(self.probe_target, self.probes[self.source])
            self.plan = Plan(self.probes, self.reports, self.judgement, self.source, self.size)
            self.plan.decide()
            if not self.dry_run:
                repair(self)
            if self.verify:
                verify(self)
                report.verified = True
            if self.record.state is not None:
                self.record.state.drop_side_file()  # nothing stale any more: the fine map is moot
            report.copied = sum(r.copy_bytes for r in self.reports
                                if r.result == "repaired" or self.dry_run)
            report.status = _report.status(self.reports)
            if self._folded and report.status in (_report.OK_HEALTHY, _report.OK_REPAIRED):
                activity.settled(self.set_file)  # every replica in line: the session is over
            return report
        finally:
            self.renderer.close()
            self._close()

    def lock(self) -> None:
        """Hold the locks an open PoolSet holds for the whole run: on its master and local
        replicas, those whose files exist (taken again for those a repair made since)."""
        self.locks = lock_pool_set(
            self.set_file, f"{self.path}: the pool set is open in another process; close it "
                           "before replica-sync", master=False, held=self.locks)

    @property
    def master_locked(self) -> bool:
        return 0 in self.locks

    def _recover(self) -> activity.Recovery | None:
        """What an unclean last session was writing, folded into the master's record (a dry
        run only reckons it), which the master's probe then holds: its replicas are stale,
        and repaired as such. A master that is not sound is repaired from a replica as it
        is: the marker stays, and the repaired pool's next open folds the session in."""
        master = self.probes[0]
        found = activity.plan(self.set_file) if self.master_locked else None
        if found is None or not master.sound or not master.page:
            if found is not None:
                log.warning("%s was not closed cleanly, and its master is not sound: what "
                            "its last session was writing is brought in line when the "
                            "repaired pool is next opened", self.path)
            return found
        if not self.dry_run:
            found = activity.apply(self.set_file, found)
            assert found is not None
            self._folded = True
        if found.record is not None:
            at = STATE_OFFSET
            master.page = master.page[:at] + found.record + master.page[at + len(found.record):]
        return found

    def _probe(self) -> None:
        view = memoryview(self.data.scratch)
        for i, spec in enumerate(self.set_file.replicas):
            self.probes.append(health.probe_target(i, spec, self.size, functools.partial(
                open_target, self.pm, spec, i, self.data.host(view))))
        view.release()

    def new_target(self, p: Probe, buffer: memoryview | None = None,
                   create: bool = False) -> Any:
        """Replica ``p``'s target, copying from ``buffer`` (default: the scratch buffer),
        not opened (``create``: to be created, as the open_replica hook is told)."""
        return self._served(p, buffer, create)[0]

    def _served(self, p: Probe, buffer: memoryview | None, create: bool) -> tuple[Any, object]:
        """:meth:`new_target`, and the plugin that serves the replica."""
        if buffer is None:
            buffer = memoryview(self.data.scratch)
        return served_target(self.pm, p.spec, p.index, self.data.host(buffer), create)

    def open_target(self, p: Probe, buffer: memoryview | None = None,
                    create: bool = False) -> Any:
        """Replica ``p``'s target, copying from ``buffer`` (default: the scratch buffer),
        opened (``create``: its storage removed and created again, with the headers it is
        to have)."""
        target, plugin = self._served(p, buffer, create)
        try:
            if create:
                remove_replica(self.pm, p.spec, p.index, plugin)
                target.create(self.headers.attr(p))
            else:
                p.attr = open_checked(target)
        except BaseException:
            close_quietly(target)
            raise
        return target

    def probe_target(self, p: Probe) -> Any:
        """The target replica ``p`` was probed through (bound to the scratch buffer), opened
        again when it was let go."""
        if p.target is None:
            p.target = self.open_target(p)
        return p.target

    def _close(self) -> None:
        for p in self.probes:
            p.close()
        self.data.close()
        release_locks(self.locks)

"""A run's progress, told through the ``pmreplica_sync_progress`` hook (which a
:class:`~pmreplica.progress.HookRenderer` among the plugins may draw): one replica and one
phase (copy, verify, compare) at a time."""

from __future__ import annotations

from typing import Any

from ..health import Probe
from ..status import ReplicaStatus


class ReplicaProgress:
    """Where the work on the current replica stands, told to the hook at each step."""

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

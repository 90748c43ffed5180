"""A run's progress, told through the ``pmreplica_sync_progress`` hook (which a
:class:`~pmreplica.progress.HookRenderer` among the plugins may draw): one replica and one
phase (copy, verify, compare) at a time. A hook that raises is logged and the run goes on,
as in an open pool: an application's progress bar must not stop a repair."""

from __future__ import annotations

import pluggy

from ..health import Probe
from ..plugin_manager import notify
from ..status import ReplicaStatus


class ReplicaProgress:
    """Where the work on the current replica stands, told to the hook at each step."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self._pm = pm
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
        """The current replica's work is complete: told at its total (what was planned and
        turned out not to be needed is done too)."""
        if self._status is not None and self._done < self._total:
            self._done = self._total
            self._notify()
        self._status = None

    def stop(self) -> None:
        """The current replica's work ends where it stands (after :meth:`finish`, nothing
        to do): one that failed or was interrupted is not told as done."""
        self._status = None

    def _notify(self) -> None:
        notify(self._pm, "pmreplica_sync_progress", replica=self._status, phase=self._phase,
               done=self._done, total=self._total)

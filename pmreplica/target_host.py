"""Replica targets opened without an open pool: replica-sync, check, info and promote reach
every replica through its plugin's target (the local ones through the local plugin's), as
:class:`PoolSet` reaches the replicas beside its master.

A plugin is handed a :class:`TargetHost` where an open pool would hand it the
:class:`~pmreplica.poolset.PoolSet`: the same attributes (hookspecs lists them), with ``buf``
the bytes a flush copies from (the source of a repair, or a scratch buffer when nothing is
to be written), one lane, and no ``mapping`` (None: no replica is mapped here).
"""

from __future__ import annotations

import errno
import logging
from typing import Any

import pluggy

from .errors import ReplicaError
from .setfile import PoolSetFile, Replica
from .status import describe
from .target import ReplicaTarget

log = logging.getLogger(__name__)


class TargetHost:
    """The pool as a target sees it outside an open pool set (see the module docstring)."""

    nlanes = 1
    sparse = False
    #: what an open pool's master mapping is: none outside one (the source is read into buf)
    mapping = None

    def __init__(self, set_file: PoolSetFile, buf: memoryview, pm: pluggy.PluginManager) -> None:
        self.set_file = set_file
        self.buf = buf
        self.size = set_file.pool_size
        self._pm = pm

    def target_failed(self, target: Any, error: OSError) -> None:
        # its next call fails too, and the run reports that one
        log.info("a replica failed: %s", error)

    def report_progress(self, index: int, phase: str, done: int, total: int) -> None:
        """Progress of a target's own long work (its "create"): not shown outside a pool."""


def open_target(pm: pluggy.PluginManager, spec: Replica, index: int, host: TargetHost,
                create: bool = False) -> ReplicaTarget:
    """The target of the plugin that serves replica ``index``, unopened; ENOTSUP when no
    plugin does."""
    target = pm.hook.pmreplica_open_replica(spec=spec, index=index, poolset=host,
                                            create=create)
    if target is None:
        raise ReplicaError(errno.ENOTSUP, f"{describe(spec, index)}: no plugin serves this "
                                          "kind of replica")
    return target

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
from .plugin_manager import each_implementation
from .setfile import LocalReplica, PoolSetFile, Replica
from .status import close_quietly, describe
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


def serve(pm: pluggy.PluginManager, spec: Replica, index: int, host: Any,
          create: bool = False) -> tuple[ReplicaTarget | None, object | None]:
    """The unopened target of the plugin that serves replica ``index``, and that plugin: the
    first whose open hook returns one, in pluggy's order (the implementations are called one
    at a time, as pluggy would, to know whose answer it is); (None, None) when none does."""
    for plugin, call in each_implementation(pm, "pmreplica_open_replica", spec=spec,
                                            index=index, poolset=host, create=create):
        target = call()
        if target is not None:
            return target, plugin
    return None, None


def served_target(pm: pluggy.PluginManager, spec: Replica, index: int, host: Any,
                  create: bool = False) -> tuple[ReplicaTarget, object]:
    """:func:`serve`, ENOTSUP when no plugin serves replica ``index``."""
    target, plugin = serve(pm, spec, index, host, create)
    if target is None:
        raise ReplicaError(errno.ENOTSUP, f"{describe(spec, index)}: no plugin serves this "
                           "kind of replica")
    return target, plugin


def open_target(pm: pluggy.PluginManager, spec: Replica, index: int, host: Any,
                create: bool = False) -> ReplicaTarget:
    """The target of the plugin that serves replica ``index``, unopened; ENOTSUP when no
    plugin does."""
    return served_target(pm, spec, index, host, create)[0]


def serving_plugin(pm: pluggy.PluginManager, spec: Replica, index: int,
                   host: Any) -> object | None:
    """The plugin that serves replica ``index`` (:func:`serve`; its target is closed
    unopened), for the hooks asked of it alone; None when none does."""
    target, plugin = serve(pm, spec, index, host)
    if target is not None:
        close_quietly(target)
    return plugin


def ask_plugin(pm: pluggy.PluginManager, plugin: object, hook: str, **kwargs: object) -> Any:
    """Call ``hook`` (a remove or describe hook) of ``plugin`` alone: a plugin that answers
    for every line of a kind (the rpmem plugin, for every remote line) must not act on a
    replica another plugin serves. None when ``plugin`` does not implement it."""
    others = [p for p in pm.get_plugins() if p is not plugin]
    return pm.subset_hook_caller(hook, others)(**kwargs)


def remove_replica(pm: pluggy.PluginManager, spec: Replica, index: int, plugin: object | None,
                   force: bool = True, remove_pool_set: bool = False) -> bool:
    """Remove replica ``index``'s storage through the remove hook of ``plugin``, the one
    that serves it (None: unknown, every plugin's is asked); a local replica line's part
    files, when that plugin leaves them (it has no remove hook), through the local plugin's
    (they are the files the set names). True if done."""
    args = {"spec": spec, "index": index, "force": force, "remove_pool_set": remove_pool_set}
    handled = (pm.hook.pmreplica_remove_replica(**args) if plugin is None
               else ask_plugin(pm, plugin, "pmreplica_remove_replica", **args))
    if not handled and isinstance(spec, LocalReplica):
        from .plugins import local
        handled = local.pmreplica_remove_replica(**args)
    return bool(handled)

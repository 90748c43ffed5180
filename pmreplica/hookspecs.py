"""Hook specifications: the contract between pmreplica and its plugins.

A *replica plugin* recognises a replica of a pool set and returns a target object that
implements :class:`pmreplica.target.ReplicaTarget`; the built-in ``local`` and ``rpmem``
plugins serve local ``REPLICA`` sections and ``REPLICA host set`` lines. *Host applications*
implement the notification hooks to learn about replica failures and repairs.

Plugins are registered through the entry-point group ``pmreplica`` or passed to
``PoolSet.open(path, plugins=[...])``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import pluggy

if TYPE_CHECKING:
    from .poolset import PoolSet
    from .setfile import Replica
    from .status import ReplicaStatus
    from .target import ReplicaTarget

PROJECT = "pmreplica"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec(firstresult=True)
def pmreplica_open_replica(spec: "Replica", index: int, poolset: "PoolSet",
                           create: bool) -> Optional["ReplicaTarget"]:
    """Return a target for replica ``index`` of ``poolset`` if this plugin serves ``spec``.

    ``spec`` is the parsed replica (:class:`~pmreplica.setfile.LocalReplica` with its parts,
    or :class:`~pmreplica.setfile.RemoteReplica` with node and pool set name). The target is
    returned unopened: pmreplica then calls ``create(attr)`` or ``open()`` on it. Return
    ``None`` to let the next plugin try; the first non-None result wins. ``create`` tells
    whether the pool set is being created (plugins that cannot create may decline). The
    plugin that answers first serves the replica, and only its remove and describe hooks
    are called for it (``pmreplica rm`` and ``pmreplica info``, which open nothing, ask this
    hook to learn which plugin it is, and close that target unopened).

    What a plugin may use of ``poolset`` (the rest is pmreplica's own): ``buf`` (the
    master, mapped: the bytes a persist copies), ``size``, ``nlanes``, ``set_file`` (the
    parsed pool set), ``mapping`` (the master's :class:`~pmreplica.pmem.Mapping`),
    ``sparse`` (whether a replica being created is to be made sparse),
    ``target_failed(target, error)``, to report a failure the target finds on its own (a
    monitor thread, say), and ``report_progress(index, phase, done, total)`` for long work
    (its "create"). A target that can keep the pool's generation also implements
    :class:`~pmreplica.target.GenerationKeeper`; one that cannot is never judged ahead of,
    behind or diverged from the others. One that can compute checksums where its replica
    lives implements :class:`~pmreplica.target.DigestTarget`; one that cannot is verified
    by reading it. One that keeps its header pages as local part files do (the replica-state
    record's copy beside the header) implements
    :class:`~pmreplica.target.HeaderPageKeeper` (the local plugin's target does); one that
    cannot is recreated when broken and relinked with ``set_attr``. One that can map its
    replica here implements :class:`~pmreplica.target.MappedTarget`: a repair copies from
    it and verify hashes it in place; one that cannot is read.

    replica-sync, check, info and promote ask for targets too, for every replica (the
    master and the local ones included), with ``poolset`` a
    :class:`~pmreplica.target_host.TargetHost` offering the same attributes: ``buf`` then
    holds the bytes to copy into the replica (the source of the repair, or a scratch
    buffer), ``nlanes`` is 1, ``mapping`` is None, and the target is used for the whole
    lifecycle: ``open`` (``stat`` when that fails; ``header_pages`` instead for a
    HeaderPageKeeper), ``create`` after the remove hook (``restore`` for a
    HeaderPageKeeper), ``flush``/``drain`` (``write_through`` and one ``drain`` for a
    HeaderPageKeeper), ``read``, ``set_attr``, ``close``. A target
    must therefore not rely on more of ``poolset`` than the attributes above, and should
    fail with an ``OSError`` when one it needs is missing.
    """


@hookspec(firstresult=True)
def pmreplica_remove_replica(spec: "Replica", index: int, force: bool,
                             remove_pool_set: bool) -> Optional[bool]:
    """Delete the storage of replica ``index`` (``pmreplica rm``, a failed create, a repair
    that recreates it); return True if handled. Asked of the plugin that serves the replica
    alone; a local replica line's part files, when that plugin has no remove hook, are
    deleted by the local plugin's.

    ``force`` removes what can be found even if the replica is inconsistent;
    ``remove_pool_set`` also removes a remote pool set file (librpmem's
    ``RPMEM_REMOVE_POOL_SET``)."""


@hookspec(firstresult=True)
def pmreplica_describe_replica(spec: "Replica", index: int) -> Optional[list[tuple[str, str]]]:
    """What ``pmreplica info`` shows of replica ``index``, which it does not contact:
    ``(key, value)`` lines, e.g. how it would be reached (the rpmem plugin: the launcher
    and the transport); None to let the next plugin answer."""


@hookspec
def pmreplica_replica_failed(replica: "ReplicaStatus", error: BaseException) -> None:
    """Called once when a replica stops taking writes (I/O error, lost connection, ...).

    The pool keeps working on its other replicas (degraded mode) and the replica is marked
    stale in the master's metadata, so that replica-sync repairs it. Called from the thread
    whose persist found the failure, or from the thread of a target that found it on its
    own (the rpmem plugin's heartbeat, when a host stops answering an idle pool; a plugin
    reports such failures with ``poolset.target_failed(target, error)``): keep
    implementations short and do not call back into the pool from here."""


@hookspec
def pmreplica_replica_restored(replica: "ReplicaStatus") -> None:
    """Called when a failed or stale replica is consistent with the master again."""


@hookspec
def pmreplica_sync_progress(replica: "ReplicaStatus", phase: str, done: int,
                            total: int) -> None:
    """Progress of long work on ``replica``: ``done`` of ``total`` bytes in ``phase``:
    "create" (its parts allocated when a pool set is created), "copy" (replica-sync copying
    into it), "compare" (replica-sync comparing it with the source by digests and copying
    what differs), "verify" (--verify comparing replicas with the source: ``replica`` is the
    one compared, or the source when several are compared at once) or "resync"
    (``PoolSet.resync`` online, and ``PoolSet.open`` bringing in line what a last session
    that did not close was writing)."""

"""One replica of a pool set as pmreplica reports it: its name in messages, its state on the
write path (``ReplicaStatus``, what hooks receive), and closing its target quietly.

Shared by the open pool (:mod:`pmreplica.poolset`) and the tools that work on a closed one
(health, replica-sync, promote, the plugins), none of which needs the write path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from .errors import as_replica_failure
from .setfile import Replica
from .target import ReplicaTarget

log = logging.getLogger(__name__)

#: a replica's state on the write path: taking writes, failed, or behind the master
OK, FAILED, STALE = "ok", "failed", "stale"


def describe(spec: Replica, index: int) -> str:
    """``replica 1 (/path/part0)`` or ``replica 2 (host:set)``, for messages."""
    if spec.is_remote:
        return f"replica {index} ({spec.node}:{spec.pool_set})"  # type: ignore[union-attr]
    first = spec.parts[0].path if spec.parts else "?"  # type: ignore[union-attr]
    return f"replica {index} ({first})"


class NamedReplica:
    """Mixin of records about one replica (fields ``index`` and ``spec``): its name for
    messages and whether it is remote."""

    index: int
    spec: Replica

    @property
    def name(self) -> str:
        return describe(self.spec, self.index)

    @property
    def is_remote(self) -> bool:
        return self.spec.is_remote


@dataclass(eq=False)
class ReplicaStatus(NamedReplica):
    """One replica of an open pool set, as hooks and ``PoolSet.replicas`` show it."""

    index: int
    spec: Replica
    state: str = OK
    error: BaseException | None = None
    target: ReplicaTarget | None = field(default=None, repr=False)


def close_quietly(target: ReplicaTarget) -> None:
    """Close a replica's target, logging (not raising) what closing it fails with: an
    OSError, or anything else a plugin's bug raises (logged as such by as_replica_failure),
    so that the targets and the pool closed after it are closed all the same."""
    try:
        target.close()
    except OSError as e:
        log.debug("closing replica target: %s", e)
    except Exception as e:  # noqa: BLE001 - a plugin's bug in close fails nothing else
        as_replica_failure(f"{type(target).__name__}.close()", e)

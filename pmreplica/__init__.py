"""pmreplica: replicated persistent-memory pools, the successor of PMDK's librpmem.

``PoolSet`` maps a pool (a file or a poolset(5) set) and keeps its replicas, local and
remote, in step with every ``persist``. Replica kinds are pluggy plugins (``hookspecs``).
"""

from __future__ import annotations

import logging

from .errors import HeaderError, PmReplicaError, PoolSetError, RemoteError, ReplicaError

__version__ = "0.2.0"

# typing.TYPE_CHECKING without importing typing (the agent imports this package on start)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from .generation import Generation
    from .header import PoolAttr
    from .hookspecs import hookimpl, hookspec
    from .poolset import PoolSet
    from .setfile import LocalReplica, RemoteReplica, Replica
    from .status import ReplicaStatus
    from .target import (RELAXED, DigestTarget, GenerationKeeper, HeaderPageKeeper,
                         HeaderPages, MappedTarget, ReplicaTarget, TargetStat)

#: the application's API, then what a replica plugin is written against (hookspecs.py)
__all__ = ["PoolSet", "ReplicaStatus", "hookimpl", "PmReplicaError", "PoolSetError",
           "HeaderError", "ReplicaError", "RemoteError",
           "hookspec", "ReplicaTarget", "TargetStat", "GenerationKeeper", "DigestTarget",
           "HeaderPageKeeper", "HeaderPages", "MappedTarget", "Generation",
           "RELAXED", "PoolAttr", "Replica", "LocalReplica", "RemoteReplica", "__version__"]

# a library logs; the application decides where to (nothing shows unless it configures it)
logging.getLogger(__name__).addHandler(logging.NullHandler())

_LAZY = {"PoolSet": "poolset", "ReplicaStatus": "status", "hookimpl": "hookspecs",
         "hookspec": "hookspecs", "ReplicaTarget": "target", "TargetStat": "target",
         "GenerationKeeper": "target", "DigestTarget": "target", "RELAXED": "target",
         "HeaderPageKeeper": "target", "HeaderPages": "target", "MappedTarget": "target",
         "Generation": "generation",
         "PoolAttr": "header", "Replica": "setfile", "LocalReplica": "setfile",
         "RemoteReplica": "setfile"}


def __getattr__(name: str) -> object:
    # imported on first use so that the agent, which needs only the formats, starts fast
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""pmreplica's librpmem: remote pools replicated over TCP or RDMA, agent started over SSH.

``RemotePool.create/open``, ``persist``, ``flush``/``drain``, ``read``, ``set_attr``, ``close``,
``remove`` and ``check_version``, with librpmem's flags, environment variables and errno
values (see ``client``).
"""

from __future__ import annotations

# typing.TYPE_CHECKING without importing typing (the agent imports this package on start)
TYPE_CHECKING = False

if TYPE_CHECKING:
    from .client import (FLUSH_RELAXED, PERSIST_RELAXED, REMOVE_FORCE, REMOVE_POOL_SET,
                         RemotePool, check_version, remove, stat)

__all__ = ["RemotePool", "check_version", "remove", "stat", "PERSIST_RELAXED",
           "FLUSH_RELAXED", "REMOVE_FORCE", "REMOVE_POOL_SET"]


def __getattr__(name: str) -> object:
    # the agent imports the protocol modules of this package; loading the client (and the
    # SSH launchers behind it) only when asked for keeps the agent's start fast
    if name in __all__:
        from . import client
        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""pmreplica's librpmem: remote pools replicated over TCP or RDMA, agent started over SSH.

``RemotePool.create/open``, ``persist``, ``flush``/``drain``, ``read``, ``set_attr``, ``close``,
``remove`` and ``check_version``, with librpmem's flags, environment variables and errno
values (see ``client``). What the agent shares with this side (the control protocol, the
lanes' wire format, checksums, TLS, the RDMA connection data) is in :mod:`rpmem_common`.
"""

from __future__ import annotations

from .client import (FLUSH_RELAXED, PERSIST_RELAXED, REMOVE_FORCE, REMOVE_POOL_SET, RemotePool,
                     check_version, remove, stat)

__all__ = ["RemotePool", "check_version", "remove", "stat", "PERSIST_RELAXED",
           "FLUSH_RELAXED", "REMOVE_FORCE", "REMOVE_POOL_SET"]

"""Which data path a remote pool uses, in librpmem's provider order (verbs before sockets).

1. Verbs, when ``RPMEM_ENABLE_VERBS`` is not 0, an RDMA (RoCE v2) device carries the route
   to the target and pyverbs imports. ``RPMEM_ENABLE_SOCKETS=1`` does not override this, as
   in librpmem; ``RPMEM_ENABLE_VERBS=0`` is how TCP is forced with a device present.
2. Otherwise TCP, unless ``RPMEM_ENABLE_SOCKETS=0`` was set explicitly: then neither data
   path is allowed and the open fails with ENOMEDIUM, saying why verbs could not be used.
   Unset counts as allowed because pmreplica's TCP path, unlike libfabric's sockets
   provider, is always there.

An agent that cannot serve verbs (no pyverbs or no device on its node) refuses it with
EMEDIUMTYPE; the client then falls back to TCP under rule 2, on the same session.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass

from rpmem_common.proto import PROV_TCP, PROV_VERBS, PROVIDER_NAMES
from rpmem_common.verbs_common import (RoceGid, check_memlock, gid_toward, is_loopback,
                                       load_pyverbs, resolve, roce_gids)

from ...errors import PmReplicaError
from ..environ import RpmemConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Choice:
    """The data path for one pool: ``provider`` (proto.PROV_*), the local GID for verbs,
    and why, for logs and ``pmreplica info``."""

    provider: int
    gid: RoceGid | None
    reason: str

    @property
    def name(self) -> str:
        return PROVIDER_NAMES[self.provider]

    def __str__(self) -> str:
        return f"{self.name} ({self.reason})"


def data_address(host: str, peer_address: str | None) -> str | None:
    """The address the data path goes to: where the SSH connection went (``peer_address``),
    or, when that is loopback (the local launcher), the target host's own address."""
    if peer_address and not is_loopback(peer_address):
        return peer_address
    return resolve(host) or peer_address


def _verbs_obstacle(address: str | None, config: RpmemConfig) -> tuple[RoceGid | None, str]:
    """(the GID to use, "") if verbs can carry the data; (None, why not) otherwise."""
    if not config.enable_verbs:
        return None, "RPMEM_ENABLE_VERBS=0"
    if address is None:
        return None, "the target's address is unknown"
    gid = gid_toward(address)
    if gid is None:
        if not roce_gids():
            return None, "this node has no RDMA device (RoCE v2)"
        return None, f"no RDMA device carries the route to {address}"
    try:
        load_pyverbs()
    except ImportError as e:
        return None, str(e)
    return gid, ""


def choose(address: str | None, config: RpmemConfig, pool_size: int = 0) -> Choice:
    """The data path for a pool of ``pool_size`` bytes on the node at ``address``; ENOMEDIUM
    if none is allowed. Verbs with a memlock limit too small for the pool is ENOMEM saying
    so, before the remote pool is made (not a silent fall back to TCP)."""
    gid, why = _verbs_obstacle(address, config)
    if gid is not None:
        if pool_size:
            try:
                check_memlock(pool_size, "the local pool")
            except PmReplicaError as e:
                raise PmReplicaError(e.errno, f"{e.strerror}; or set RPMEM_ENABLE_VERBS=0 to "
                                              "use TCP") from None
        return Choice(PROV_VERBS, gid, f"{gid} reaches {address}")
    if config.sockets_allowed:
        return Choice(PROV_TCP, None, why)
    raise PmReplicaError(errno.ENOMEDIUM, f"no data path to {address} is allowed: verbs cannot "
                                          f"be used ({why}) and RPMEM_ENABLE_SOCKETS=0 "
                                          "disables TCP")


def after_refusal(choice: Choice, error: OSError, config: RpmemConfig) -> Choice:
    """The choice once the agent refused verbs with ``error``: TCP if allowed, else raise."""
    if choice.provider != PROV_VERBS or error.errno != errno.EMEDIUMTYPE:
        raise error
    if config.sockets_allowed:
        log.warning("%s; using TCP", error.strerror)
        return Choice(PROV_TCP, None, f"the agent cannot serve verbs: {error.strerror}")
    raise PmReplicaError(errno.ENOMEDIUM, f"{error.strerror}; RPMEM_ENABLE_SOCKETS=0 disables "
                                          "the TCP fallback")


def describe(node: str, config: RpmemConfig | None = None) -> str:
    """The data path a pool on ``node`` ([user@]host[:port]) would use from here, with the
    reason and, for TCP, TLS or clear text, as ``pmreplica info`` shows it (the agent's side
    is not asked)."""
    from ..address import parse_target

    try:
        config = config or RpmemConfig.from_env()
        host = parse_target(node).host
        choice = choose(resolve(host), config)
        return f"{choice}, {config.tcp_security}" if choice.provider == PROV_TCP else str(choice)
    except OSError as e:
        return f"none ({e.strerror})"

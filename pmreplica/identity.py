"""What a replica's header says about the pool it belongs to, and the rule by which it
belongs: the one rule that ``PoolSet.open``, ``pmreplica info``, ``check`` and replica-sync
apply (through :func:`pmreplica.health.judge` or directly)."""

from __future__ import annotations

import uuid as _uuid
from dataclasses import dataclass

from .header import PoolAttr, PoolHeader


@dataclass(frozen=True)
class Identity:
    """What a replica's (first part's) header says about the pool it belongs to."""

    poolset_uuid: _uuid.UUID
    signature: bytes
    major: int
    compat: int
    incompat: int
    ro_compat: int
    uuid: _uuid.UUID
    prev_repl: _uuid.UUID
    next_repl: _uuid.UUID

    @property
    def format(self) -> tuple:
        return (self.signature.rstrip(b"\0"), self.major, self.compat, self.incompat,
                self.ro_compat)

    @classmethod
    def of_header(cls, h: PoolHeader) -> "Identity":
        return cls(h.poolset_uuid, h.signature, h.major, h.compat, h.incompat, h.ro_compat,
                   h.uuid, h.prev_repl, h.next_repl)

    @classmethod
    def of_attr(cls, a: PoolAttr) -> "Identity":
        uu = _uuid.UUID
        return cls(uu(bytes_le=a.poolset_uuid), a.signature, a.major, a.compat_features,
                   a.incompat_features, a.ro_compat_features, uu(bytes_le=a.uuid),
                   uu(bytes_le=a.prev_uuid), uu(bytes_le=a.next_uuid))


def membership_problem(identity: Identity, reference: Identity, name: str) -> str | None:
    """Why a replica of ``identity`` does not belong to the pool set of ``reference`` (the
    identity of ``name``, e.g. "replica 0"): another pool set's uuid, or another format."""
    if identity.poolset_uuid != reference.poolset_uuid:
        return f"belongs to another pool set (pool set uuid differs from {name})"
    if identity.format != reference.format:
        return f"pool format (signature, version or features) differs from {name}"
    return None


def attr_problem(attr: PoolAttr, master: PoolHeader, index: int,
                 nexts: dict[int, bytes]) -> str | None:
    """Why replica ``index`` (attributes ``attr``, as its target's ``open`` gave them) does not
    belong with the master of header ``master``, by :func:`membership_problem`; ``nexts``
    holds the next-replica uuid of the replicas opened before it (``PoolSet.open``, resync)."""
    if attr.is_zeroed:
        return None  # raw replica without headers (NOHDRS remote set)
    problem = membership_problem(Identity.of_attr(attr), Identity.of_header(master), "the master")
    if problem:
        return f"replica {index} {problem}"
    if index - 1 in nexts and nexts[index - 1] != attr.uuid:
        return f"replica {index} is not the replica its predecessor links to (replica uuid differs)"
    return None

"""A third-party pmreplica plugin, for the tests: ``REPLICA toy.invalid NAME`` replicas are
kept in a dict (offset -> bytes) in this process. Every hook call is appended as a JSON line
to the file named by $PMREPLICA_TOY_LOG, so a test can see calls made in another process.

A persist of a range whose master bytes start with ``FAIL`` fails with EIO, so that tests
can make this replica fail on demand."""

from __future__ import annotations

import errno
import json
import os
import uuid

from pmreplica import hookimpl
from pmreplica.errors import ReplicaError
from pmreplica.header import PoolAttr
from pmreplica.setfile import RemoteReplica
from pmreplica.target import TargetStat

NODE = "toy.invalid"
#: pool set name -> (attributes, {offset: bytes}); lives as long as the process
STORES: dict[str, tuple[PoolAttr, dict[int, bytes]]] = {}


def log(event: str, **fields: object) -> None:
    path = os.environ.get("PMREPLICA_TOY_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"event": event, **fields}) + "\n")


class DictTarget:
    """A replica whose storage is a dict."""

    nlanes = 8

    def __init__(self, name: str, poolset: object) -> None:
        self.name = name
        self.poolset = poolset
        self.writes: dict[int, bytes] | None = None

    def create(self, attr: PoolAttr) -> None:
        STORES[self.name] = (attr, {})
        self.writes = STORES[self.name][1]
        log("create", name=self.name, poolset_uuid=str(uuid.UUID(bytes_le=attr.poolset_uuid)),
            uuid=str(uuid.UUID(bytes_le=attr.uuid)), prev=str(uuid.UUID(bytes_le=attr.prev_uuid)))

    def open(self) -> PoolAttr:
        if self.name not in STORES:
            raise ReplicaError(errno.ENOENT, f"toy replica {self.name} does not exist")
        attr, self.writes = STORES[self.name]
        log("open", name=self.name)
        return attr

    def persist(self, offset: int, length: int, lane: int = 0, flags: int = 0) -> None:
        data = bytes(self.poolset.buf[offset:offset + length])
        if data.startswith(b"FAIL"):
            raise ReplicaError(errno.EIO, f"toy replica {self.name}: asked to fail")
        self.writes.pop(offset, None)  # keep the dict in write order
        self.writes[offset] = data
        log("persist", name=self.name, offset=offset, length=length, lane=lane)

    flush = deep_persist = persist

    def drain(self, lane: int = 0) -> None:
        pass

    def read(self, dest: memoryview, offset: int, lane: int = 0) -> None:
        image = bytearray(len(dest))
        for off, data in self.writes.items():
            lo, hi = max(off, offset), min(off + len(data), offset + len(dest))
            if lo < hi:
                image[lo - offset:hi - offset] = data[lo - off:hi - off]
        dest[:] = image

    def set_attr(self, attr: PoolAttr) -> None:
        STORES[self.name] = (attr, self.writes)

    def stat(self) -> TargetStat:
        return TargetStat(size=self.poolset.size, healthy=self.name in STORES)

    def close(self) -> None:
        log("close", name=self.name)


@hookimpl(tryfirst=True)
def pmreplica_open_replica(spec, index, poolset, create):
    if not isinstance(spec, RemoteReplica) or spec.node != NODE:
        return None
    log("open_replica", node=spec.node, pool_set=spec.pool_set, index=index, create=create)
    return DictTarget(spec.pool_set, poolset)


@hookimpl(tryfirst=True)
def pmreplica_remove_replica(spec, index, force, remove_pool_set):
    if not isinstance(spec, RemoteReplica) or spec.node != NODE:
        return None
    log("remove_replica", pool_set=spec.pool_set, index=index, force=force,
        remove_pool_set=remove_pool_set)
    STORES.pop(spec.pool_set, None)
    return True


@hookimpl
def pmreplica_replica_failed(replica, error):
    log("replica_failed", index=replica.index, name=replica.name, state=replica.state,
        errno=error.errno, message=str(error))


@hookimpl
def pmreplica_replica_restored(replica):
    log("replica_restored", index=replica.index)

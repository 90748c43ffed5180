"""The built-in ``rpmem`` plugin: ``REPLICA [user@]host[:port] set`` lines, served by a
remote agent through :class:`pmreplica.rpmem.RemotePool`.

The pool set has already checked each range, so once the remote pool is open the target's
persist, flush, drain and read are the data path's own methods: no second check and no
extra call on the hot path. Outside an open pool (replica-sync, check, promote) the same
target serves repairs and verifies: its :meth:`RpmemTarget.digests` are the agent's.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

from rpmem_common import checksum as _checksum

from ..errors import ReplicaError
from ..generation import Generation
from ..header import PoolAttr
from ..hookspecs import hookimpl
from ..rpmem import client, launch
from ..rpmem.transport import provider
from ..setfile import RemoteReplica
from ..status import describe
from ..target import TargetStat


class RpmemTarget:
    """A remote replica of an open pool set."""

    def __init__(self, spec: RemoteReplica, name: str, pool: memoryview, nlanes: int,
                 on_failure: Callable[["RpmemTarget", OSError], None]) -> None:
        self.spec = spec
        self.name = name
        self._pool = pool
        self.nlanes = nlanes
        self._on_failure = on_failure
        self.remote: client.RemotePool | None = None

    def _attach(self, remote: client.RemotePool) -> None:
        self.remote = remote
        self.nlanes = remote.nlanes
        # the heartbeat finds a dead host while the pool is idle too: report it at once
        remote.on_lost(lambda error: self._on_failure(self, error))
        data = remote.data_path
        self.persist, self.flush, self.drain = data.persist, data.flush, data.drain
        self.deep_persist, self.read = data.deep_persist, data.read

    def create(self, attr: PoolAttr) -> None:
        self._attach(client.RemotePool.create(self.spec.node, self.spec.pool_set, self._pool,
                                              nlanes=self.nlanes, attr=attr))

    def open(self) -> PoolAttr:
        self._attach(client.RemotePool.open(self.spec.node, self.spec.pool_set, self._pool,
                                            nlanes=self.nlanes))
        assert self.remote is not None
        return self.remote.attr

    def _not_open(self, *args: object, **kw: object) -> None:
        raise ReplicaError(errno.EBADF, f"{self.name} is not open")

    persist = flush = drain = deep_persist = read = _not_open

    def set_attr(self, attr: PoolAttr) -> None:
        if self.remote is None:
            self._not_open()
        self.remote.set_attr(attr)  # type: ignore[union-attr]

    def stat(self) -> TargetStat:
        resp = (self.remote.stat() if self.remote is not None
                else client.stat(self.spec.node, self.spec.pool_set))
        return TargetStat(size=resp.size, healthy=resp.healthy, detail=resp.message,
                          generation=Generation.unpack(resp.blob) if resp.blob else None)

    def digests(self, offset: int, length: int, block: int, algorithm: int) -> list[bytes]:
        """Checksums computed by the agent over its own copy (:class:`DigestTarget`)."""
        remote = self.remote
        if remote is None:
            raise ReplicaError(errno.EBADF, f"{self.name} is not open")
        step = _checksum.MAX_BLOCKS * block  # the most one request may cover
        out: list[bytes] = []
        for at in range(offset, offset + length, step):
            out += remote.checksum(at, min(step, offset + length - at), block, algorithm)
        return out

    def store_generation(self, record: Generation) -> None:
        if self.remote is None:
            self._not_open()
        if self.remote.attr.is_zeroed:  # type: ignore[union-attr]
            return  # a remote pool without headers (NOHDRS) has no page to keep it in
        self.remote.store_generation(record.pack())  # type: ignore[union-attr]

    def close(self) -> None:
        remote, self.remote = self.remote, None
        for name in ("persist", "flush", "drain", "deep_persist", "read"):
            self.__dict__.pop(name, None)
        if remote is None:
            return
        if remote.failure is not None:
            remote.abort()  # a failed replica is let go without waiting on its host
        else:
            remote.close()


@hookimpl(trylast=True)
def pmreplica_open_replica(spec, index, poolset, create):
    if not isinstance(spec, RemoteReplica):
        return None
    return RpmemTarget(spec, describe(spec, index), poolset.buf, poolset.nlanes,
                       poolset.target_failed)


@hookimpl(trylast=True)
def pmreplica_describe_replica(spec, index):
    if not isinstance(spec, RemoteReplica):
        return None
    return [("launcher", launch.describe(spec.node)),
            ("transport", provider.describe(spec.node))]


@hookimpl(trylast=True)
def pmreplica_remove_replica(spec, index, force, remove_pool_set):
    if not isinstance(spec, RemoteReplica):
        return None
    flags = (client.REMOVE_FORCE if force else 0) | (
        client.REMOVE_POOL_SET if remove_pool_set else 0)
    client.remove(spec.node, spec.pool_set, flags)
    return True

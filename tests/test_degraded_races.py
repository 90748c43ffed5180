"""A replica failing on another thread while a persist is under way: the persist's range must
end up on the replica or in the master's dirty map, so that replica-sync repairs it.

A thread switch at one exact point cannot be caused for real on demand, so these tests force
the interleaving: a target (or the pool) calls ``target_failed`` from another thread at that
point, as a heartbeat thread would. Everything else is real: pool files, replica-sync, the
byte comparison."""

from __future__ import annotations

import errno
import random
import threading

from pmreplica import PoolSet, hookimpl, sync
from pmreplica.header import HDR_SIZE
from pmreplica.plugins.local import LocalTarget
from pmreplica.setfile import LocalReplica
from pmreplica.status import describe

from .helpers import write_set

M = 1 << 20


def _fail_from_another_thread(pool: PoolSet, target) -> None:
    """What a heartbeat thread does when it finds a replica's host dead."""
    t = threading.Thread(target=pool.target_failed,
                         args=(target, OSError(errno.EHOSTDOWN, "peer lost (forced)")))
    t.start()
    t.join()


class RemoteLike(LocalTarget):
    """Replica 1 behaving as a remote one does: a flush is on its way and durable only once
    drained, and a target closed (its host lost) loses what was not drained. ``fail_next``:
    the next flush is followed by the replica's failure on another thread (forced)."""

    fail_next = False

    def __init__(self, *args, pool: PoolSet) -> None:
        super().__init__(*args)
        self.pool = pool
        self.sent: list[tuple[int, int]] = []

    def flush(self, offset, length, lane=0, flags=0):
        self.sent.append((offset, length))
        if RemoteLike.fail_next:
            RemoteLike.fail_next = False
            _fail_from_another_thread(self.pool, self)

    def drain(self, lane=0):
        for offset, length in self.sent:
            super().flush(offset, length)
        self.sent.clear()
        super().drain(lane)

    def close(self):
        self.sent.clear()
        super().close()


class RemoteLikeReplica1:
    @hookimpl(tryfirst=True)
    def pmreplica_open_replica(self, spec, index, poolset, create):
        if index != 1 or not isinstance(spec, LocalReplica):
            return None
        return RemoteLike(poolset.set_file, spec, poolset.size, getattr(poolset, "buf", None),
                          describe(spec, index), pool=poolset)


def _fill(pool: PoolSet, seed: int) -> None:
    pool.buf[HDR_SIZE:] = random.Random(seed).randbytes(pool.size - HDR_SIZE)
    pool.persist(HDR_SIZE, pool.size - HDR_SIZE)


def _repaired_whole(path, d, size: int, names: list[str]) -> None:
    """replica-sync repairs the failed replica, and then every replica holds the master's
    bytes (compared here, and by replica-sync's own verify)."""
    report = sync.sync(path)
    assert report.status == "repaired", report
    master = (d / "m").read_bytes()[HDR_SIZE:size]
    for name in names:
        assert (d / name).read_bytes()[HDR_SIZE:size] == master, name
    assert sync.check(path, verify=True).status == "healthy"


def test_replica_failed_between_a_persists_flush_and_drain_gets_that_range(tmp_path):
    path = write_set(tmp_path / "p.set", f"4M {tmp_path}/m", "REPLICA", f"4M {tmp_path}/r1",
                     "REPLICA", f"4M {tmp_path}/r2")
    off, n = M + 123, 3000
    with PoolSet.create(path, plugins=[RemoteLikeReplica1()]) as pool:
        size = pool.size
        _fill(pool, 2)
        pool.buf[off:off + n] = b"A" * n
        RemoteLike.fail_next = True
        pool.persist(off, n)  # returns: durable on the master and on replica 2
        assert [s.state for s in pool.replicas] == ["ok", "failed", "ok"]
        # the acknowledged range is what replica 1 lacks: the record says so
        assert any(a <= off and off + n <= a + k for a, k in pool.state.dirty_ranges(size))
    assert (tmp_path / "r1").read_bytes()[off:off + n] != b"A" * n
    _repaired_whole(path, tmp_path, size, ["r1", "r2"])


class SwitchingPool(PoolSet):
    """Fails replica 1 from another thread when a persist reads ``_degraded`` (forced: where
    a thread switch between the write path's reads of its replica list and of its degraded
    flag would put that failure)."""

    fail_next = False

    @property
    def _degraded(self) -> bool:
        value = self.__dict__["_degraded_flag"]
        if SwitchingPool.fail_next:
            SwitchingPool.fail_next = False
            _fail_from_another_thread(self, next(t for s, t in self._active if s.index == 1))
        return value

    @_degraded.setter
    def _degraded(self, value: bool) -> None:
        self.__dict__["_degraded_flag"] = value


def test_replica_failed_while_a_persist_reads_the_write_path_gets_that_range(tmp_path):
    path = write_set(tmp_path / "p.set", f"4M {tmp_path}/m", "REPLICA", f"4M {tmp_path}/r1")
    off, n = 2 * M + 5, 100
    with SwitchingPool.create(path) as pool:
        size = pool.size
        _fill(pool, 3)
        pool.buf[off:off + n] = b"Z" * n
        SwitchingPool.fail_next = True
        pool.persist(off, n)
        assert [s.state for s in pool.replicas] == ["ok", "failed"]
        on_replica = (tmp_path / "r1").read_bytes()[off:off + n] == b"Z" * n
        recorded = any(a <= off and off + n <= a + k for a, k in pool.state.dirty_ranges(size))
        assert on_replica or recorded
    _repaired_whole(path, tmp_path, size, ["r1"])

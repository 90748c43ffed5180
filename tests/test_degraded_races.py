"""The write path while the set of replicas changes under it: a replica failing on another
thread, or an online resync putting one back, while a persist is under way. The persist's
range must end up on the replica or in the master's dirty map, so that replica-sync repairs
it. Also the pool's edges in degraded mode: a close refused, an empty range at the end.

A thread switch at one exact point cannot be caused for real on demand, so the race tests
force the interleaving: a target, the pool or a progress hook acts from another thread at
that point, as a heartbeat thread or the application would. Everything else is real: pool
files, replica-sync, the byte comparison."""

from __future__ import annotations

import errno
import random
import threading
import time

import pytest

from pmreplica import PoolSet, activity, hookimpl, poolset, sync
from pmreplica.errors import ReplicaError
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


class WriteDuringFinalCopy(PoolSet):
    """A pool whose online resync, once its last copy runs (it holds the state lock then),
    starts a thread that persists a range, and gives that thread time to read the write
    path (forced, by a wrapper of the resync target's flush: where a scheduler could put
    it). A progress hook writes during the first pass, so that the last copy has work."""

    offset = 5 * M
    thread: threading.Thread | None = None

    def _target(self, spec, index, create):
        target = super()._target(spec, index, create)
        flush = target.flush

        def flush_then_write(off, n, lane=0, flags=0):
            if self._state_lock.locked() and WriteDuringFinalCopy.thread is None:
                WriteDuringFinalCopy.thread = threading.Thread(target=self._write_at_offset)
                WriteDuringFinalCopy.thread.start()
                WriteDuringFinalCopy.thread.join(0.3)
            return flush(off, n, lane, flags)

        target.flush = flush_then_write
        return target

    def _write_at_offset(self) -> None:
        off = self.offset
        self.buf[off:off + 4096] = b"W" * 4096
        self.persist(off, 4096)


class WriteInFirstPass:
    """A progress hook that persists a range during an online resync's first pass."""

    def __init__(self) -> None:
        self.pool: PoolSet | None = None

    @hookimpl
    def pmreplica_sync_progress(self, replica, phase, done, total):
        pool, self.pool = self.pool, None
        if phase == "resync" and pool is not None:
            pool.buf[HDR_SIZE:HDR_SIZE + 4096] = b"A" * 4096
            pool.persist(HDR_SIZE, 4096)


def test_a_write_during_an_online_resyncs_last_copy_reaches_the_replica(tmp_path):
    path = write_set(tmp_path / "p.set", f"8M {tmp_path}/m", "REPLICA", f"8M {tmp_path}/r1")
    PoolSet.create(path).close()
    (tmp_path / "r1").rename(tmp_path / "r1.away")
    off = WriteDuringFinalCopy.offset
    hook = WriteInFirstPass()
    with WriteDuringFinalCopy.open(path, plugins=[hook]) as pool:
        hook.pool = pool
        size = pool.size
        assert [s.state for s in pool.replicas] == ["ok", "failed"]
        pool.buf[2 * M:2 * M + 4096] = b"S" * 4096
        pool.persist(2 * M, 4096)  # missed by the replica: the resync copies it
        (tmp_path / "r1.away").rename(tmp_path / "r1")
        pool.resync(1)
        thread = WriteDuringFinalCopy.thread
        assert thread is not None
        thread.join()
        assert [s.state for s in pool.replicas] == ["ok", "ok"]
        assert not pool.stale_replicas
    master, replica = (tmp_path / "m").read_bytes(), (tmp_path / "r1").read_bytes()
    assert replica[off:off + 4096] == b"W" * 4096  # the persist returned: on every replica
    assert replica[HDR_SIZE:size] == master[HDR_SIZE:size]


def test_a_close_refused_while_the_pool_is_referenced_keeps_it_locked(tmp_path):
    """close() refused (EBUSY: a view of the pool still held) leaves the pool mapped, so it
    stays locked: another process cannot open it and write beside this one."""
    path = write_set(tmp_path / "p.set", f"8M {tmp_path}/m", "REPLICA", f"8M {tmp_path}/r1")
    pool = PoolSet.create(path)
    view = pool.buf[8192:8200]
    try:
        try:
            pool.close()
        except OSError as e:
            assert e.errno == errno.EBUSY
        else:
            raise AssertionError("close() with a view held did not refuse")
        with pytest.raises(OSError) as other:  # as another process would be refused
            PoolSet.open(path)
        assert other.value.errno == errno.EBUSY
    finally:
        view.release()
    pool.close()
    PoolSet.open(path).close()  # free once closed


def test_an_empty_range_at_the_pools_end_while_degraded(tmp_path):
    """persist and flush of no bytes at the pool's very end, degraded, where the end is a
    whole number of dirty-map chunks (380 MiB: 6,080 chunks of 64 KiB)."""
    path = write_set(tmp_path / "p.set", f"380M {tmp_path}/m", "REPLICA", f"380M {tmp_path}/r1")
    PoolSet.create(path, sparse=True).close()
    (tmp_path / "r1").unlink()
    with PoolSet.open(path) as pool:
        assert [s.state for s in pool.replicas] == ["ok", "failed"]
        pool.persist(pool.size, 0)
        pool.flush(pool.size, 0)
        pool.drain()
        assert pool.state.dirty_ranges(pool.size) == []


class PersistDuringClose(PoolSet):
    """Persists a range from inside close(), once its replicas are let go and before the
    unmap (forced: where another thread's persist could run)."""

    caught: list[BaseException] = []

    def _release(self) -> None:
        if not self.mapping.closed and not PersistDuringClose.caught:
            self.buf[3 * M:3 * M + 4096] = b"C" * 4096
            try:
                self.persist(3 * M, 4096)
            except OSError as e:
                PersistDuringClose.caught.append(e)
            else:
                PersistDuringClose.caught.append(AssertionError("the persist returned"))
        super()._release()


def test_a_persist_racing_close_fails_instead_of_skipping_the_replicas(tmp_path):
    path = write_set(tmp_path / "p.set", f"8M {tmp_path}/m", "REPLICA", f"8M {tmp_path}/r1")
    PoolSet.create(path).close()
    PersistDuringClose.open(path).close()
    [error] = PersistDuringClose.caught
    assert isinstance(error, OSError) and error.errno == errno.EBADF, error


def _persist_while_closing(pool: PoolSet, off: int) -> str:
    """HELLO persisted at ``off`` on a thread of its own while this one closes the pool;
    how that persist ended."""
    out: dict[str, str] = {}

    def writer() -> None:
        try:
            pool.persist(off, 5)
            out["persist"] = "returned"
        except OSError as e:
            out["persist"] = f"{errno.errorcode.get(e.errno or 0)}: {e}"

    pool.buf[off:off + 5] = b"HELLO"
    thread = threading.Thread(target=writer)
    thread.start()
    time.sleep(0.1)
    pool.close()
    thread.join(10)
    return out["persist"]


def test_a_persist_cut_short_by_close_leaves_the_session_unclean(tmp_path, monkeypatch):
    """Forced interleaving (a wrapper): replica 1's flush waits until close() has unmapped
    the pool (close() waits for calls in flight, LET_GO_WAIT, made short here, and gives
    up on this one), then calls its target, which close() closed. The persist fails with
    EBADF (it used to raise a ValueError from storing the record into the unmapped pool,
    and leave the session marked clean), and the next open brings its range to the
    replica."""
    monkeypatch.setattr(poolset, "LET_GO_WAIT", 0.2)
    path = write_set(tmp_path / "p.set", f"8M {tmp_path}/m", "REPLICA", f"8M {tmp_path}/r")
    PoolSet.create(path).close()
    pool = PoolSet.open(path)
    _, target = pool._active[0]
    flush = target.flush

    def late_flush(off, n, lane=0, flags=0):
        while not pool.mapping.closed:
            time.sleep(0.001)
        return flush(off, n, lane, flags)

    target.flush = late_flush
    off = 4 * M
    ended = _persist_while_closing(pool, off)
    assert ended.startswith("EBADF: pool is closed"), ended
    with open(tmp_path / "m", "rb") as f:
        assert activity.read_marker(f.read(HDR_SIZE)) is not None
    with PoolSet.open(path) as pool:
        assert [s.state for s in pool.replicas] == ["ok", "ok"]
    assert (tmp_path / "r").read_bytes()[off:off + 5] == b"HELLO"


class SlowFailureHook:
    @hookimpl
    def pmreplica_replica_failed(self, replica, error):
        self.failed = replica.index
        time.sleep(0.3)


def test_closes_own_closing_of_a_target_is_not_a_replica_failure(tmp_path, monkeypatch):
    """Forced interleaving (wrappers): close() closes replica 1's target (slowly, as a
    remote close's round trip) while a persist on another thread is in a call on it, which
    fails because of that close (close() waits for calls in flight, LET_GO_WAIT, made short
    here, and gives up on this one). It used to count as the replica's failure: failed,
    stale, announced, and the persist returned having skipped it. It is a call cut short
    by close(): EBADF, no failure announced, the replica not stale."""
    monkeypatch.setattr(poolset, "LET_GO_WAIT", 0.2)
    path = write_set(tmp_path / "p.set", f"8M {tmp_path}/m", "REPLICA", f"8M {tmp_path}/r")
    PoolSet.create(path).close()
    hook = SlowFailureHook()
    pool = PoolSet.open(path, plugins=[hook])
    _, target = pool._active[0]
    closing = threading.Event()
    close = target.close

    def slow_close():
        if not closing.is_set():
            closing.set()
            time.sleep(0.3)
        close()

    def failing_flush(off, n, lane=0, flags=0):
        closing.wait()
        raise ReplicaError(errno.EBADF, "replica 1 is not open")  # as a closed target says

    target.close, target.flush = slow_close, failing_flush
    off = 4 * M
    ended = _persist_while_closing(pool, off)
    assert ended.startswith("EBADF: pool is closed"), ended
    assert not hasattr(hook, "failed")
    with PoolSet.open(path) as pool:
        assert [s.state for s in pool.replicas] == ["ok", "ok"]
        assert pool.stale_replicas == []
    assert (tmp_path / "r").read_bytes()[off:off + 5] == b"HELLO"


def test_close_waits_for_a_replica_failing_while_a_resync_stops(tmp_path):
    """Forced interleaving (wrappers): close() begins while replica 1 resyncs on one thread
    (its progress hook slow) and a persist on another meets replica 2 failing (its drain
    raises EIO once close began, its target's close takes 0.3 s). close() used to wait for
    failing replicas first and the resync second, and returned before replica 2's target
    was closed and its failure told. Both are done before close() returns now."""
    path = write_set(tmp_path / "p.set", f"32M {tmp_path}/m", "REPLICA", f"32M {tmp_path}/r1",
                     "REPLICA", f"32M {tmp_path}/r2")
    PoolSet.create(path).close()
    events: list[str] = []

    class Hooks:
        @hookimpl
        def pmreplica_sync_progress(self, replica, phase, done, total):
            if phase == "resync":
                time.sleep(0.3)

        @hookimpl
        def pmreplica_replica_failed(self, replica, error):
            events.append(f"replica {replica.index} failed")

    (tmp_path / "r1").rename(tmp_path / "r1.away")
    pool = PoolSet.open(path, plugins=[Hooks()])
    assert events == ["replica 1 failed"]  # away: it opens degraded
    events.clear()
    (tmp_path / "r1.away").rename(tmp_path / "r1")
    pool.buf[HDR_SIZE:] = random.Random(5).randbytes(pool.size - HDR_SIZE)
    pool.persist(HDR_SIZE, pool.size - HDR_SIZE)  # what replica 1 lacks: the resync copies it
    _, target = next(p for p in pool._active if p[0].index == 2)
    close = target.close

    def failing_drain(lane=0):
        while not pool._closing:
            time.sleep(0.001)
        raise ReplicaError(errno.EIO, "replica 2: storage failed")

    def slow_close():
        time.sleep(0.3)
        close()
        events.append("replica 2 closed")

    target.drain, target.close = failing_drain, slow_close
    out: dict[str, str] = {}

    def resync() -> None:
        try:
            pool.resync(1, chunk=M)
        except OSError as e:
            out["resync"] = str(e)

    def persist() -> None:
        pool.persist(8192, 10)
        out["persist"] = "returned"

    threads = [threading.Thread(target=resync), threading.Thread(target=persist)]
    threads[0].start()
    time.sleep(0.4)
    threads[1].start()
    time.sleep(0.05)
    pool.close()
    events.append("close returned")
    for thread in threads:
        thread.join(10)
    assert events == ["replica 2 closed", "replica 2 failed", "close returned"], events
    assert "resync stopped: the pool is being closed" in out["resync"]
    assert out["persist"] == "returned"  # replica 2 failed as a replica does, recorded
    with PoolSet.open(path) as pool:
        assert sorted(s.index for s in pool.stale_replicas) == [1, 2]


def test_close_waits_for_a_persist_between_its_replicas_and_the_master(tmp_path):
    """Forced interleaving (a wrapper): replica 1's flush returns only once close() has
    begun on another thread. close() waits for that persist, which persists the master
    while the pool is still mapped (it used to persist an unmapped range: ENOMEM, and on
    pmem a crash) and returns; the session ends cleanly, and the bytes are on the
    replica."""
    path = write_set(tmp_path / "p.set", f"8M {tmp_path}/m", "REPLICA", f"8M {tmp_path}/r1")
    PoolSet.create(path).close()
    pool = PoolSet.open(path)
    _, target = pool._active[0]
    flush = target.flush
    sent = threading.Event()

    def flush_until_close(off, n, lane=0, flags=0):
        flush(off, n, lane, flags)
        sent.set()
        while not pool._closing:
            time.sleep(0.001)
        time.sleep(0.05)  # close() is under way meanwhile

    target.flush = flush_until_close
    out: dict[str, BaseException | None] = {}

    def writer() -> None:
        pool.buf[M:M + 5] = b"HELLO"
        try:
            pool.persist(M, 5)
            out["persist"] = None
        except BaseException as e:  # noqa: BLE001 - what the writer's thread ends with
            out["persist"] = e

    thread = threading.Thread(target=writer)
    thread.start()
    assert sent.wait(10)
    pool.close()
    thread.join(10)
    assert out == {"persist": None}
    assert pool.mapping.closed and pool._busy == [0] * pool.nlanes
    assert (tmp_path / "r1").read_bytes()[M:M + 5] == b"HELLO"
    with open(tmp_path / "m", "rb") as f:
        assert activity.read_marker(f.read(HDR_SIZE)) is None  # closed cleanly


def test_drain_on_a_closed_pool_is_refused(tmp_path):
    path = write_set(tmp_path / "p.set", f"8M {tmp_path}/m", "REPLICA", f"8M {tmp_path}/r1")
    pool = PoolSet.create(path)
    pool.close()
    with pytest.raises(OSError) as e:
        pool.drain()
    assert e.value.errno == errno.EBADF


class PostedFlushes:
    """Replica 1's target made one whose flush only posts the write, applied at its lane's
    drain (as librpmem's over RDMA), by wrappers of its flush and drain; a flush from the
    thread named X waits, after the pool recorded it as pending, until ``gate`` is set
    (forced: where a thread switch could come)."""

    def __init__(self, target) -> None:
        self.posted: list[tuple[int, int, int]] = []
        self.entered, self.gate = threading.Event(), threading.Event()
        flush, drain = target.flush, target.drain

        def post(offset, length, lane=0, flags=0):
            if threading.current_thread().name == "X":
                self.entered.set()
                assert self.gate.wait(10)
            self.posted.append((offset, length, lane))

        def apply(lane=0):
            todo = [p for p in self.posted if p[2] == lane]
            self.posted = [p for p in self.posted if p[2] != lane]
            for offset, length, _ in todo:
                flush(offset, length, lane)
            drain(lane)

        target.flush, target.drain = post, apply


def test_a_persist_on_the_lane_of_a_flush_under_way_leaves_it_pending(tmp_path, monkeypatch):
    """Thread X's flush on lane 0 is recorded and not yet handed to replica 1 when the main
    thread's persist on lane 0 drains the lane: X's flush stays pending (it was not
    drained), so epochs keep its chunk in the activity log, and a close without a drain is
    not clean; the next open brings the flushed bytes to the replica."""
    monkeypatch.setenv("PMREPLICA_ACTIVITY_MIB", "2")  # an epoch: one chunk new to the log
    path = write_set(tmp_path / "p.set", f"64M {tmp_path}/m", "REPLICA", f"64M {tmp_path}/r1")
    PoolSet.create(path).close()
    pool = PoolSet.open(path)
    posted = PostedFlushes(pool._active[0][1])
    x_off = 30 * M + 64

    def x() -> None:
        pool.buf[x_off:x_off + 8] = b"XFLUSHED"
        pool.flush(x_off, 8, lane=0)

    thread = threading.Thread(target=x, name="X")
    thread.start()
    assert posted.entered.wait(10)
    pool.buf[10 * M:10 * M + 4] = b"YYYY"
    pool.persist(10 * M, 4, lane=0)
    posted.gate.set()
    thread.join(10)
    assert pool._npending[0] == 1  # X's flush: sent after the persist's drain
    for k in range(40, 50):  # epochs end meanwhile
        pool.persist(k * M, 4, lane=1)
    mark = activity.read_marker(bytes(pool.buf[:HDR_SIZE]))
    logged = activity.read_log(str(tmp_path / "m.pmractive"), mark.session, pool.size)
    assert any(off <= x_off < off + n for off, n in logged), logged
    pool.close()  # X's flush never drained: not a clean close
    with PoolSet.open(path) as again:
        assert [s.state for s in again.replicas] == ["ok", "ok"]
    assert (tmp_path / "r1").read_bytes()[x_off:x_off + 8] == b"XFLUSHED"

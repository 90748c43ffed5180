"""PoolSet over local replicas: what persist promises (the replicas hold the master's bytes
once it returns, seen from another process after the writer was SIGKILLed), what a failing
replica does (reported through the hook with its ReplicaStatus, recorded stale, the master
keeps working), PMDK-made pool sets, and the errors of create/open/persist."""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from pmreplica import HeaderError, PoolSet, PoolSetError, ReplicaError, generation, hookimpl
from pmreplica.errors import PmReplicaError
from pmreplica.header import HDR_SIZE, PoolHeader
from pmreplica.replica import RECORDS_END, LocalReplicaFiles
from pmreplica.setfile import parse
from pmreplica.state import OFFSET as STATE_OFFSET, ReplicaState
from pmreplica.sync import check

from .helpers import (RaisingProgress, read_json_line, replica_bytes, run_threads,
                      start_python, write_set)

M = 1 << 20


class Recorder:
    """A host application's plugin: remembers the notifications it gets."""

    def __init__(self) -> None:
        self.failed: list[tuple[object, BaseException, str]] = []
        self.restored: list[object] = []

    @hookimpl
    def pmreplica_replica_failed(self, replica, error):
        self.failed.append((replica, error, replica.state))

    @hookimpl
    def pmreplica_replica_restored(self, replica):
        self.restored.append(replica)


def _stale_mask(master_part0: Path, pool_size: int, nreplicas: int) -> ReplicaState:
    """The replica-state record as it is on disk (not as the open pool holds it)."""
    return ReplicaState.load(master_part0.read_bytes()[:HDR_SIZE], pool_size, nreplicas)


# -- persist reaches every replica ------------------------------------------------------

GEOMETRY = {  # replica -> parts; boundaries differ between replicas on purpose
    "master": [(4 * M, "a0"), (3 * M, "a1")],
    "r1": [(8 * M, "b0")],
    "r2": [(3 * M, "c0"), (5 * M, "c1")],
}
POOL = 7 * M - HDR_SIZE

CHILD_WRITER = r"""
import json, random, sys
from pmreplica import PoolSet
path, seed, ranges = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
rng = random.Random(seed)
pool = PoolSet.open(path)
for i, (off, n) in enumerate(ranges):
    pool.buf[off:off + n] = rng.randbytes(n)
    lane = i % pool.nlanes
    if i % 3 == 0:
        pool.flush(off, n, lane)
        pool.drain(lane)
    else:
        pool.persist(off, n, lane)
print(json.dumps({"persisted": len(ranges), "states": [r.state for r in pool.replicas]}),
      flush=True)
sys.stdin.read()
"""


def _geometry_set(d: Path) -> Path:
    lines = []
    for name, parts in GEOMETRY.items():
        if name != "master":
            lines.append("REPLICA")
        lines += [f"{size} {d / f}" for size, f in parts]
    return write_set(d / "pool.set", *lines)


def _ranges(seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    fixed = [(HDR_SIZE, 1), (4 * M - 100, 200), (3 * M - 50, 100), (POOL - 1000, 1000),
             (1 * M, 1 * M), (2 * M + 5, 3 * M), (POOL - 1, 1)]
    small = []
    for _ in range(60):
        n = rng.choice([1, 7, 64, 4096, 10000, 65536])
        small.append((rng.randrange(HDR_SIZE, POOL - n), n))
    return fixed + small


def test_replicas_equal_master_after_persist_even_when_writer_is_killed(pool_dir):
    path = _geometry_set(pool_dir)
    PoolSet.create(path).close()
    seed = 20240611
    ranges = _ranges(seed)
    child = start_python(CHILD_WRITER, str(path), str(seed), json.dumps(ranges))
    try:
        report = read_json_line(child)
        child.send_signal(signal.SIGKILL)  # right after the last persist returned
        assert child.wait(10) == -signal.SIGKILL
    finally:
        child.kill()
        child.wait()
    assert report == {"persisted": len(ranges), "states": ["ok", "ok", "ok"]}

    expected = bytearray(POOL)
    rng = random.Random(seed)
    for off, n in ranges:
        expected[off:off + n] = rng.randbytes(n)
    images = {name: replica_bytes([(s, pool_dir / f) for s, f in parts])
              for name, parts in GEOMETRY.items()}
    assert len(images["master"]) == POOL
    for name, image in images.items():
        assert image[HDR_SIZE:POOL] == expected[HDR_SIZE:], f"{name} differs"
    # the killed writer's lock went with it; nothing was marked stale
    with PoolSet.open(path) as pool:
        assert [r.state for r in pool.replicas] == ["ok", "ok", "ok"]
        assert bytes(pool.buf[HDR_SIZE:HDR_SIZE + 4096]) == expected[HDR_SIZE:HDR_SIZE + 4096]


def test_lanes_persist_from_threads_at_once(pool_dir):
    path = _geometry_set(pool_dir)
    expected = bytearray(POOL)
    with PoolSet.create(path, nlanes=4) as pool:
        assert pool.nlanes == 4

        def writer(lane: int) -> None:
            rng = random.Random(lane)
            for i in range(50):
                off = HDR_SIZE + (lane * 50 + i) * 8192 + rng.randrange(100)
                data = rng.randbytes(rng.randrange(1, 8192 - 100))
                pool.buf[off:off + len(data)] = data
                expected[off:off + len(data)] = data
                pool.persist(off, len(data), lane)

        assert run_threads(writer, 4) == []
        assert [r.state for r in pool.replicas] == ["ok", "ok", "ok"]
    for name, parts in GEOMETRY.items():
        image = replica_bytes([(s, pool_dir / f) for s, f in parts])
        assert image[HDR_SIZE:POOL] == expected[HDR_SIZE:], name


def test_persist_refuses_header_and_out_of_pool_ranges(pool_dir):
    path = write_set(pool_dir / "p.set", f"4M {pool_dir}/a", "REPLICA", f"4M {pool_dir}/b")
    with PoolSet.create(path, nlanes=2) as pool:
        header = bytes(pool.buf[:HDR_SIZE])
        for off, n, lane in ((0, 10, 0), (HDR_SIZE - 1, 2, 0), (pool.size - 10, 11, 0),
                             (HDR_SIZE, -1, 0), (HDR_SIZE, 10, 2), (HDR_SIZE, 10, -1)):
            for fn in (pool.persist, pool.flush, pool.deep_persist):
                with pytest.raises(PmReplicaError) as e:
                    fn(off, n, lane)
                assert e.value.errno == errno.EINVAL
        with pytest.raises(PmReplicaError) as e:
            pool.persist(0, 10)
        assert str(e.value) == (f"range 0+10 is outside the pool data [4096, {4 * M}) (EINVAL)")
        assert bytes(pool.buf[:HDR_SIZE]) == header
        assert [r.state for r in pool.replicas] == ["ok", "ok"]
        pool.persist(pool.size - 10, 10)
        pool.deep_persist(HDR_SIZE, 1)


# -- failing replicas -------------------------------------------------------------------

def test_removed_replica_part_is_reported_and_master_keeps_working(pool_dir):
    d = pool_dir
    path = write_set(d / "p.set", f"4M {d}/m", "REPLICA", f"2M {d}/r1a", f"3M {d}/r1b",
                     "REPLICA", f"4M {d}/r2")
    PoolSet.create(path).close()
    rec = Recorder()
    with PoolSet.open(path, plugins=[rec]) as pool:
        pool.buf[HDR_SIZE:HDR_SIZE + 5] = b"first"
        pool.persist(HDR_SIZE, 5)
        assert rec.failed == []
        os.unlink(d / "r1b")  # the part holding pool offsets [2M, ...) of replica 1
        off = 3 * M
        pool.buf[off:off + 6] = b"second"
        pool.persist(off, 6)  # returns: the master and replica 2 have it
        assert len(rec.failed) == 1
        replica, error, state_then = rec.failed[0]
        assert replica is pool.replicas[1] and replica.index == 1 and state_then == "failed"
        assert isinstance(error, ReplicaError) and error.errno == errno.ENOENT
        assert str(error) == f"replica 1 ({d}/r1a): part file was removed (ENOENT)"
        assert pool.replicas[1].error is error
        assert [r.state for r in pool.replicas] == ["ok", "failed", "ok"]
        # degraded mode: more writes reach master and replica 2, no second report
        pool.buf[off + 100:off + 105] = b"third"
        pool.persist(off + 100, 5)
        assert len(rec.failed) == 1
        assert pool.state.is_stale(1) and not pool.state.is_stale(2)
    master = replica_bytes([(4 * M, d / "m")])
    r2 = replica_bytes([(4 * M, d / "r2")])
    for image in (master, r2):
        assert image[off:off + 6] == b"second" and image[off + 100:off + 105] == b"third"
    assert master[HDR_SIZE:] == r2[HDR_SIZE:]
    # the record in the master's header survives the pool: replica 1 is stale, and the
    # chunks written since it failed are known
    state = _stale_mask(d / "m", 4 * M, 3)
    assert state.intact and state.is_stale(1) and not state.is_stale(2)
    dirty = state.dirty_ranges(4 * M)
    assert any(o <= off < o + n for o, n in dirty)
    assert not any(o <= HDR_SIZE < o + n for o, n in dirty)  # written before the failure
    assert PoolHeader.checksum_ok((d / "m").read_bytes()[:HDR_SIZE])
    # reopened, replica 1 is reported again (its part is missing) and the pool opens degraded
    rec2 = Recorder()
    with PoolSet.open(path, plugins=[rec2]) as pool:
        assert [r.state for r in pool.replicas] == ["ok", "failed", "ok"]
        (replica, error, _), = rec2.failed
        assert replica is pool.replicas[1] and error.errno == errno.EINVAL
        assert f"{d}/r1b" in str(error) and "No such file or directory" in str(error)
        pool.persist(HDR_SIZE, 5)


def test_replica_on_failed_storage_is_reported_with_eio(pool_dir, failing_fs):
    d, fs = pool_dir, failing_fs.mountpoint
    path = write_set(d / "p.set", f"4M {d}/m", "REPLICA", f"4M {fs}/r1", "REPLICA", f"4M {d}/r2")
    rec = Recorder()
    with PoolSet.create(path, plugins=[rec]) as pool:
        pool.buf[HDR_SIZE:HDR_SIZE + 6] = b"before"
        pool.persist(HDR_SIZE, 6)
        with open(fs / "r1", "rb") as f:
            assert os.pread(f.fileno(), 6, HDR_SIZE) == b"before"
        failing_fs.shut_down()  # the replica's disk is gone, its file still open
        pool.buf[HDR_SIZE:HDR_SIZE + 5] = b"after"
        pool.persist(HDR_SIZE, 5)
        (replica, error, _), = rec.failed
        assert replica is pool.replicas[1]
        assert isinstance(error, ReplicaError) and error.errno == errno.EIO
        assert str(error) == f"replica 1 ({fs}/r1): Input/output error (EIO)"
        assert [r.state for r in pool.replicas] == ["ok", "failed", "ok"]
        for i in range(10):
            pool.persist(HDR_SIZE + i, 1)
        assert len(rec.failed) == 1
    for part in (d / "m", d / "r2"):
        with open(part, "rb") as f:
            assert os.pread(f.fileno(), 6, HDR_SIZE) == b"aftere"
    assert _stale_mask(d / "m", 4 * M, 3).stale_mask == 0b010


def test_a_raising_hook_does_not_break_persist(pool_dir, caplog):
    class Broken:
        @hookimpl
        def pmreplica_replica_failed(self, replica, error):
            raise RuntimeError("host application bug")

    d = pool_dir
    path = write_set(d / "p.set", f"4M {d}/m", "REPLICA", f"4M {d}/r")
    with PoolSet.create(path, plugins=[Broken()]) as pool:
        os.unlink(d / "r")
        pool.persist(HDR_SIZE, 100)
        assert pool.replicas[1].state == "failed"
        pool.persist(HDR_SIZE, 100)
    assert "pmreplica_replica_failed hook raised" in caplog.text


def test_pool_closes_after_a_replica_failed_while_holding_a_view(pool_dir):
    """A target that fails with a view of the pool in its frame (as a transport may hold one)
    must not keep the pool mapped through the error the application keeps."""
    class FailingOpen:
        nlanes = 1

        def __init__(self, poolset):
            self.poolset = poolset

        def open(self):
            view = self.poolset.buf[HDR_SIZE:]  # noqa: F841 - alive in this frame
            raise ReplicaError(errno.ECONNREFUSED, "views.invalid: cannot connect")

        def close(self):
            pass

    class Plugin:
        @hookimpl(tryfirst=True)
        def pmreplica_open_replica(self, spec, index, poolset, create):
            return FailingOpen(poolset) if getattr(spec, "node", "") == "views.invalid" else None

    d = pool_dir
    path = write_set(d / "p.set", f"4M {d}/m", "REPLICA", f"4M {d}/r")
    PoolSet.create(path).close()
    write_set(d / "p.set", f"4M {d}/m", "REPLICA", f"4M {d}/r", "REPLICA views.invalid x.set")
    rec = Recorder()
    pool = PoolSet.open(path, plugins=[Plugin(), rec])
    (replica, error, _), = rec.failed
    assert replica is pool.replicas[2] and error.errno == errno.ECONNREFUSED
    pool.close()  # while rec and pool.replicas still hold the error
    assert pool.mapping.closed and pool.replicas[2].error is error


def test_replica_of_another_pool_is_not_written(pool_dir):
    d = pool_dir
    path = write_set(d / "p.set", f"4M {d}/m", "REPLICA", f"4M {d}/r")
    other = write_set(d / "o.set", f"4M {d}/om", "REPLICA", f"4M {d}/or")
    PoolSet.create(path).close()
    PoolSet.create(other).close()
    os.replace(d / "or", d / "r")
    before = (d / "r").read_bytes()
    rec = Recorder()
    with PoolSet.open(path, plugins=[rec]) as pool:
        (replica, error, _), = rec.failed
        assert replica is pool.replicas[1] and error.errno == errno.EINVAL
        assert "belongs to another pool set" in str(error)
        pool.buf[HDR_SIZE:HDR_SIZE + 4] = b"mine"
        pool.persist(HDR_SIZE, 4)
    assert (d / "r").read_bytes() == before


def test_open_and_replica_sync_judge_a_replica_of_another_format_alike(pool_dir):
    """A replica whose header gives another format version is failed by PoolSet.open, not
    written, and called broken by replica-sync's check, by the same rule and words."""
    d = pool_dir
    path = write_set(d / "p.set", f"4M {d}/m", "REPLICA", f"4M {d}/r")
    PoolSet.create(path).close()
    set_file = parse(str(path))
    files = LocalReplicaFiles(set_file, set_file.replicas[1], set_file.pool_size)
    (part,) = files.read_headers()
    hdr = part.header
    files.write_headers(hdr._replace(major=hdr.major + 1), [hdr.uuid], hdr.prev_repl,
                        hdr.next_repl)
    before = (d / "r").read_bytes()
    why = "pool format (signature, version or features) differs from"
    rec = Recorder()
    with PoolSet.open(path, plugins=[rec]) as pool:
        (replica, error, _), = rec.failed
        assert replica is pool.replicas[1] and error.errno == errno.EINVAL
        assert str(error).startswith(f"replica 1 {why} the master")
        pool.persist(HDR_SIZE, 4)
    assert (d / "r").read_bytes() == before
    report = check(path)
    assert report.replicas[1].health == "broken"
    assert f"{why} replica 0" in report.replicas[1].problems


def test_stale_replica_stays_stale_until_resynced(pool_dir):
    d = pool_dir
    path = write_set(d / "p.set", f"4M {d}/m", "REPLICA", f"4M {d}/r")
    with PoolSet.create(path) as pool:
        pool.state.mark_stale(1)
        pool._store_state()  # what a failure records; the replica's files stay intact
    rec = Recorder()
    with PoolSet.open(path, plugins=[rec]) as pool:
        assert [r.state for r in pool.replicas] == ["ok", "stale"] and rec.failed == []
        pool.buf[HDR_SIZE:HDR_SIZE + 3] = b"abc"
        pool.persist(HDR_SIZE, 3)  # a stale replica still takes writes
        assert replica_bytes([(4 * M, d / "r")])[HDR_SIZE:HDR_SIZE + 3] == b"abc"
        pool.resync(1)
        assert rec.restored == [pool.replicas[1]] and pool.replicas[1].state == "ok"
    assert _stale_mask(d / "m", 4 * M, 2).stale_mask == 0


# -- PMDK-made pool sets ----------------------------------------------------------------

@pytest.mark.parametrize("singlehdr", [False, True], ids=["headers", "singlehdr"])
def test_pmempool_made_set_is_opened_and_replicated(pool_dir, pmempool, singlehdr):
    d = pool_dir
    opt = ["OPTION SINGLEHDR"] if singlehdr else []
    master = [(8 * M, d / "a"), (4 * M, d / "b")]
    rep = [(5 * M, d / "c"), (5 * M, d / "e"), (4 * M, d / "f")]
    path = write_set(d / "pmdk.set", *opt, *(f"{s} {p}" for s, p in master), "REPLICA",
                     *(f"{s} {p}" for s, p in rep))
    run = subprocess.run([pmempool, "create", "obj", str(path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    pool_size = 12 * M if singlehdr else 12 * M - HDR_SIZE
    before = replica_bytes(rep, singlehdr)[:pool_size]
    data = os.urandom(3 * M)
    with PoolSet.open(path, signature=b"PMEMOBJ") as pool:
        assert pool.size == pool_size and [r.state for r in pool.replicas] == ["ok", "ok"]
        off = pool.size - len(data)  # the tail of the heap, across part boundaries
        pool.buf[off:] = data
        pool.persist(off, len(data))
    images = [replica_bytes(r, singlehdr)[:pool_size] for r in (master, rep)]
    # the bytes landed where PMDK's layout puts them in the replica, and nowhere else but
    # pmreplica's records in part 0's header page (PMDK's unused2 area: its generation)
    assert images[0][-len(data):] == images[1][-len(data):] == data
    records = slice(STATE_OFFSET, RECORDS_END)
    assert generation.of_page(images[1][:HDR_SIZE]) == generation.of_page(images[0][:HDR_SIZE])
    unchanged = bytearray(images[1][:-len(data)])
    unchanged[records] = before[records]
    assert unchanged == before[:-len(data)]
    check = subprocess.run([pmempool, "check", "-v", str(path)], capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.strip().endswith("consistent"), check.stdout


def test_pmempool_made_set_with_a_smaller_replica_and_an_unaligned_part(pool_dir, pmempool):
    """PMDK makes the pool as large as its smallest replica and keeps a part's odd size."""
    d = pool_dir
    master = [(8 * M, d / "a"), (2 * M + 1, d / "b")]
    rep = [(8 * M, d / "c")]
    path = write_set(d / "pmdk.set", *(f"{s} {p}" for s, p in master), "REPLICA",
                     *(f"{s} {p}" for s, p in rep))
    run = subprocess.run([pmempool, "create", "obj", str(path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert (d / "b").stat().st_size == 2 * M + 1
    data = os.urandom(M)
    with PoolSet.open(path, signature=b"PMEMOBJ") as pool:
        assert pool.size == 8 * M and [r.state for r in pool.replicas] == ["ok", "ok"]
        pool.buf[pool.size - len(data):] = data
        pool.persist(pool.size - len(data), len(data))
    assert replica_bytes(master)[8 * M - len(data):8 * M] == data
    assert replica_bytes(rep)[-len(data):] == data
    check = subprocess.run([pmempool, "check", "-v", str(path)], capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.strip().endswith("consistent"), check.stdout


def test_pmempool_made_pool_keeps_a_valid_header_after_a_replica_failed(pool_dir, pmempool):
    d = pool_dir
    path = write_set(d / "pmdk.set", f"8M {d}/a", "REPLICA", f"8M {d}/b")
    run = subprocess.run([pmempool, "create", "obj", str(path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    with PoolSet.open(path, signature=b"PMEMOBJ") as pool:
        os.unlink(d / "b")
        pool.persist(pool.size - 100, 100)
        assert pool.replicas[1].state == "failed"
    info = subprocess.run([pmempool, "info", str(d / "a")], capture_output=True, text=True)
    assert info.returncode == 0, info.stderr
    assert "Checksum" in info.stdout and "[OK]" in info.stdout.split("Checksum")[1].split("\n")[0]
    assert _stale_mask(d / "a", 8 * M, 2).stale_mask == 0b10


# -- create and open ---------------------------------------------------------------------

def test_second_open_from_another_process_is_ebusy(pool_dir):
    path = write_set(pool_dir / "p.set", f"4M {pool_dir}/m")
    PoolSet.create(path).close()
    holder = start_python("import json, sys\nfrom pmreplica import PoolSet\n"
                          "p = PoolSet.open(sys.argv[1])\nprint(json.dumps('open'), flush=True)\n"
                          "sys.stdin.read()\n", str(path))
    try:
        assert read_json_line(holder) == "open"
        with pytest.raises(PmReplicaError) as e:
            PoolSet.open(path)
        assert e.value.errno == errno.EBUSY
        assert str(e.value) == f"{pool_dir}/m: pool is open in another process (EBUSY)"
    finally:
        holder.kill()
        holder.wait()
    PoolSet.open(path).close()


def test_second_open_in_the_same_process_says_so(pool_dir):
    path = write_set(pool_dir / "p.set", f"4M {pool_dir}/m")
    with PoolSet.create(path):
        with pytest.raises(PmReplicaError) as e:
            PoolSet.open(path)
        assert e.value.errno == errno.EBUSY
        assert str(e.value) == (f"{pool_dir}/m: pool is already open in this process (use that "
                                "open pool, or close it first) (EBUSY)")
    PoolSet.open(path).close()


def test_a_directory_is_not_a_pool(pool_dir):
    with pytest.raises(PmReplicaError) as e:
        PoolSet.open(pool_dir)
    assert e.value.errno == errno.EISDIR
    assert str(e.value) == f"{pool_dir} is a directory, not a pool file or a pool set file (EISDIR)"


def test_create_never_overwrites_and_leaves_nothing_behind(pool_dir):
    d = pool_dir
    precious = d / "r"
    precious.write_bytes(b"user data" * 1000)
    path = write_set(d / "p.set", f"4M {d}/m", "REPLICA", f"4M {d}/r")
    with pytest.raises(PmReplicaError) as e:
        PoolSet.create(path)
    assert e.value.errno == errno.EEXIST and f"file {d}/r already exists" in str(e.value)
    assert precious.read_bytes() == b"user data" * 1000
    assert sorted(p.name for p in d.iterdir()) == ["p.set", "r"]
    # a replica in a directory that does not exist: the master made first is removed again
    path = write_set(d / "q.set", f"4M {d}/m", "REPLICA", f"4M {d}/nodir/r")
    with pytest.raises(OSError) as e:
        PoolSet.create(path)
    assert e.value.errno == errno.ENOENT
    assert sorted(p.name for p in d.iterdir()) == ["p.set", "q.set", "r"]
    # a single pool file that exists
    with pytest.raises(PmReplicaError) as e:
        PoolSet.create(precious, size=4 * M)
    assert e.value.errno == errno.EEXIST


def test_create_with_an_unreachable_remote_replica_cleans_up(pool_dir):
    d = pool_dir
    path = write_set(d / "p.set", f"4M {d}/m", "REPLICA", f"4M {d}/r", "REPLICA 127.0.0.1:1 x.set")
    with pytest.raises(OSError):
        PoolSet.create(path)
    assert sorted(p.name for p in d.iterdir()) == ["p.set"]


def test_invalid_set_is_refused_before_any_file_is_made(pool_dir):
    path = write_set(pool_dir / "p.set", f"4M {pool_dir}/m", "REPLICA", f"2M {pool_dir}/r",
                     f"4M {pool_dir}/m")
    with pytest.raises(PoolSetError) as e:
        PoolSet.create(path)
    assert e.value.errno == errno.EINVAL and (
        f"{path}:5: cannot use the same part file twice (line 2)" in str(e.value))
    assert sorted(p.name for p in pool_dir.iterdir()) == ["p.set"]
    with pytest.raises(PmReplicaError) as e:
        PoolSet.open(pool_dir / "nothing")
    assert e.value.errno == errno.ENOENT


def test_single_file_pool(pool_dir):
    path = pool_dir / "pool"
    with PoolSet.create(path, size=4 * M) as pool:
        assert pool.size == 4 * M and len(pool.replicas) == 1
        pool.buf[pool.size - 3:] = b"end"
        pool.persist(pool.size - 3, 3)
        hdr = pool.header
        assert pool.attr.uuid == hdr.uuid.bytes_le
    with PoolSet.open(path, signature=b"PMREPLIC") as pool:
        assert bytes(pool.buf[-3:]) == b"end" and pool.header == hdr
    with pytest.raises(HeaderError) as e:
        PoolSet.open(path, signature=b"PMEMOBJ")
    assert e.value.errno == errno.EINVAL and "wrong pool type" in str(e.value)


def test_close_refuses_while_the_application_holds_views(pool_dir):
    path = write_set(pool_dir / "p.set", f"4M {pool_dir}/m")
    pool = PoolSet.create(path)
    view = pool.mapping.buf[HDR_SIZE:HDR_SIZE + 10]
    with pytest.raises(PmReplicaError) as e:
        pool.close()
    assert e.value.errno == errno.EBUSY and "release every memoryview" in str(e.value)
    pool.buf[HDR_SIZE:HDR_SIZE + 2] = b"ok"  # still mapped, and usable
    view.release()
    pool.close()  # once the views are gone, a close again ends it
    assert pool.mapping.closed
    PoolSet.open(path).close()  # its lock went with it


def test_disk_backed_replicas_are_written_in_parallel_on_their_own_threads(pool_dir,
                                                                            failing_fs):
    """Replicas whose fdatasync has work to do (ext4 here) are each written by a thread of
    their own, so a persist waits for the slowest replica, not for the sum of them; the
    bytes must still land in every replica, in order per lane."""
    import threading

    d, mnt = pool_dir, failing_fs.mountpoint
    path = write_set(d / "p.set", f"8M {d}/m0", "REPLICA", f"8M {mnt}/r1", "REPLICA",
                     f"8M {mnt}/r2", "REPLICA", f"8M {d}/r3")
    rng = random.Random(7)
    with PoolSet.create(path, nlanes=4) as ps:
        writers = [t.name for t in threading.enumerate() if t.name.startswith("pmreplica writer")]
        assert sorted(writers) == [f"pmreplica writer replica 1 ({mnt}/r1)",
                                   f"pmreplica writer replica 2 ({mnt}/r2)"]  # r3: tmpfs

        def work(lane: int) -> None:
            for _ in range(20):
                off = HDR_SIZE + lane * (1 << 20) + rng.randrange(0, (1 << 20) - 8192)
                ps.buf[off:off + 8192] = rng.randbytes(8192)
                ps.flush(off, 8192, lane)
                ps.flush(off, 4096, lane)  # the same range again, later: order matters
                ps.drain(lane)

        assert run_threads(work, 4) == []
        assert [r.state for r in ps.replicas] == ["ok"] * 4
        master = bytes(ps.buf[HDR_SIZE:])
    assert not [t for t in threading.enumerate() if t.name.startswith("pmreplica writer")]
    for part in (mnt / "r1", mnt / "r2", d / "r3"):
        assert replica_bytes([(8 << 20, part)])[HDR_SIZE:] == master, part


def test_online_resync_copies_the_4k_chunks_written_while_stale(pool_dir):
    """Scattered 4 KiB writes while a replica is away: the online resync copies those
    chunks and nothing else (the fine map), and the replica is byte-identical after."""
    d = pool_dir
    size = 64 * M
    path = write_set(d / "p.set", f"64M {d}/m", "REPLICA", f"64M {d}/r")
    PoolSet.create(path).close()
    os.rename(d / "r", d / "r.away")
    rng = random.Random(4)
    offsets = {rng.randrange(1, size // 4096) * 4096 for _ in range(300)}
    with PoolSet.open(path) as pool:
        assert [r.state for r in pool.replicas] == ["ok", "failed"]
        for off in offsets:
            pool.buf[off:off + 4096] = os.urandom(4096)
            pool.persist(off, 4096)
        os.rename(d / "r.away", d / "r")
        assert pool.resync(1) == len(offsets) * 4096
        assert [r.state for r in pool.replicas] == ["ok", "ok"]
    assert replica_bytes([(size, d / "m")])[HDR_SIZE:] == \
        replica_bytes([(size, d / "r")])[HDR_SIZE:]
    assert not (d / "m.pmrdirty").exists()  # nothing stale: the side file is gone


def test_a_raising_progress_hook_does_not_break_create(pool_dir, caplog):
    d = pool_dir
    path = write_set(d / "p.set", f"8M {d}/m", "REPLICA", f"8M {d}/r")
    hook = RaisingProgress()
    with caplog.at_level(logging.ERROR, "pmreplica"):
        with PoolSet.create(path, plugins=[hook]) as pool:
            assert [r.state for r in pool.replicas] == ["ok", "ok"]
    assert {phase for phase, _, _ in hook.calls} == {"create"}
    assert caplog.text.count("pmreplica_sync_progress hook raised") == len(hook.calls)
    PoolSet.open(path).close()


def test_a_raising_progress_hook_does_not_break_an_online_resync(pool_dir, caplog):
    d = pool_dir
    path = write_set(d / "p.set", f"8M {d}/m", "REPLICA", f"8M {d}/r")
    PoolSet.create(path).close()
    os.rename(d / "r", d / "r.away")
    hook = RaisingProgress()
    with PoolSet.open(path, plugins=[hook]) as pool:
        assert [r.state for r in pool.replicas] == ["ok", "failed"]
        pool.buf[HDR_SIZE:HDR_SIZE + 4096] = os.urandom(4096)
        pool.persist(HDR_SIZE, 4096)
        os.rename(d / "r.away", d / "r")
        with caplog.at_level(logging.ERROR, "pmreplica"):
            assert pool.resync(1) == 4096
        assert [r.state for r in pool.replicas] == ["ok", "ok"]
        assert hook.calls == [("resync", 0, 4096), ("resync", 4096, 4096)]
        assert caplog.text.count("pmreplica_sync_progress hook raised") == 2
        pool.buf[HDR_SIZE:HDR_SIZE + 5] = b"after"  # back on the write path
        pool.persist(HDR_SIZE, 5)
    assert replica_bytes([(8 * M, d / "m")])[HDR_SIZE:] == \
        replica_bytes([(8 * M, d / "r")])[HDR_SIZE:]


def test_a_part_file_named_alone_is_refused_with_the_reason(pool_dir):
    """Part 0 of a two-part master named instead of its pool set: not "broken links" (a
    pool to repair) but a part of a bigger pool, whose set file is to be named."""
    d = pool_dir
    path = write_set(d / "p.set", f"8M {d}/m0", f"8M {d}/m1", "REPLICA", f"16M {d}/r")
    PoolSet.create(path).close()
    with pytest.raises(OSError) as e:
        PoolSet.open(d / "m0")
    assert e.value.errno == errno.EINVAL
    assert "one part of a pool of several parts (its header links to another part): " \
           "this part was named instead of its pool set file" in str(e.value)
    rep = check(d / "m0")
    assert "named instead of its pool set file" in " ".join(rep.replicas[0].problems)
    PoolSet.open(path).close()  # untouched


class SlowProgress:
    """A host application whose progress hook takes its time (a slow terminal, say)."""

    def __init__(self) -> None:
        self.calls = 0

    @hookimpl
    def pmreplica_sync_progress(self, replica, phase, done, total):
        if phase == "resync":
            self.calls += 1
            time.sleep(0.02)


def _written_while_the_replica_was_away(d: Path, size: str, hook: object
                                        ) -> tuple[Path, PoolSet]:
    """A pool set of master ``m`` and replica ``r`` (``size`` each), open with ``hook``,
    every byte of it written (random) while ``r`` was away, and ``r`` back: a resync of
    replica 1 has the whole pool to copy."""
    path = write_set(d / "p.set", f"{size} {d}/m", "REPLICA", f"{size} {d}/r")
    PoolSet.create(path).close()
    os.rename(d / "r", d / "r.away")
    pool = PoolSet.open(path, plugins=[hook])
    pool.buf[HDR_SIZE:] = os.urandom(pool.size - HDR_SIZE)
    pool.persist(HDR_SIZE, pool.size - HDR_SIZE)
    os.rename(d / "r.away", d / "r")
    return path, pool


def test_close_during_an_online_resync_stops_it_and_returns(pool_dir):
    """close() on one thread while another resyncs: the resync stops at its next piece
    (EBADF), close waits for it and unmaps the pool; no thread is left behind, the replica
    stays stale with what it lacks, and the next resync brings it."""
    d = pool_dir
    hook = SlowProgress()
    path, pool = _written_while_the_replica_was_away(d, "64M", hook)
    out: dict[str, BaseException] = {}

    def resync() -> None:
        try:
            pool.resync(1, chunk=1 << 20)
        except BaseException as e:  # noqa: BLE001 - what the resync's thread ends with
            out["error"] = e

    before = set(threading.enumerate())
    thread = threading.Thread(target=resync)
    thread.start()
    while hook.calls < 3:
        time.sleep(0.01)
    pool.close()  # returns: the resync stopped
    thread.join(10)
    assert not thread.is_alive()
    assert isinstance(out["error"], OSError) and out["error"].errno == errno.EBADF
    assert "resync stopped: the pool is being closed" in str(out["error"])
    assert pool.mapping.closed
    assert set(threading.enumerate()) <= before
    with PoolSet.open(path) as pool:
        assert [s.index for s in pool.stale_replicas] == [1]
        pool.resync(1)
        master = bytes(pool.buf[HDR_SIZE:])
    assert replica_bytes([(64 * M, d / "r")])[HDR_SIZE:] == master


class PersistingProgress:
    """A host application whose progress hook writes to the pool being resynced (a progress
    record kept in the pool itself, say)."""

    def __init__(self) -> None:
        self.pool: PoolSet | None = None
        self.calls: list[tuple[int, int]] = []

    @hookimpl
    def pmreplica_sync_progress(self, replica, phase, done, total):
        if phase == "resync" and self.pool is not None:
            self.calls.append((done, total))
            at = HDR_SIZE + 8 * (len(self.calls) % 512)
            self.pool.buf[at:at + 8] = done.to_bytes(8, "little")
            self.pool.persist(at, 8)


def test_a_progress_hook_that_persists_during_an_online_resync(pool_dir):
    """The hook's persists land in the resync's last pass (a degraded persist marks what
    the resync copies last, under the state lock): the resync ends, its progress reaches
    its total, and the replica holds every byte the hook wrote."""
    d = pool_dir
    hook = PersistingProgress()
    path, pool = _written_while_the_replica_was_away(d, "16M", hook)
    hook.pool = pool
    out: list[object] = []
    # a daemon thread: a resync hung in its hook must fail this test, not hang the run (the
    # pool is not closed then: close() would wait for that resync)
    thread = threading.Thread(target=lambda: out.append(pool.resync(1, chunk=1 << 20)),
                              daemon=True)
    thread.start()
    thread.join(20)
    assert not thread.is_alive(), "the resync hung in its progress hook's persist"
    with pool:
        assert out and isinstance(out[0], int) and out[0] >= pool.size - HDR_SIZE
        assert [r.state for r in pool.replicas] == ["ok", "ok"]
        done, total = hook.calls[-1]
        assert done == total == out[0]
        hook.pool = None
        master = bytes(pool.buf[HDR_SIZE:])
    assert replica_bytes([(16 * M, d / "r")])[HDR_SIZE:] == master


def _resident_mib() -> int:
    """This process's resident pages of files and shared memory (the pools), in MiB."""
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return sum(int(fields[k].split()[0]) for k in ("RssFile", "RssShmem")) >> 10


def test_an_online_resync_of_a_large_range_does_not_keep_the_master_resident(pool_dir):
    """Bringing 512 MiB over lets go of the master's pages as it goes (a large pool would
    otherwise end up resident as a whole), and the replica still gets every byte."""
    d = pool_dir
    path = write_set(d / "p.set", f"512M {d}/m", "REPLICA", f"512M {d}/r")
    PoolSet.create(path).close()
    os.rename(d / "r", d / "r.away")
    with PoolSet.open(path) as pool:
        pool.buf[HDR_SIZE:HDR_SIZE + 4096] = b"R" * 4096
        pool.persist(HDR_SIZE, pool.size - HDR_SIZE)
        pool.mapping.release(0, pool.size)
        os.rename(d / "r.away", d / "r")
        before = _resident_mib()
        assert pool.resync(1) == pool.size - HDR_SIZE
        assert _resident_mib() - before < 64
    with open(d / "r", "rb") as f:
        f.seek(HDR_SIZE)
        assert f.read(4096) == b"R" * 4096


def test_a_replica_that_is_the_master_again_fails_alone(pool_dir):
    """A replica line naming the master's file (a link: an operator's slip) fails that
    replica; the pool's locks, one per local file, do not make the whole open EBUSY."""
    d = pool_dir
    path = write_set(d / "p.set", f"8M {d}/m", "REPLICA", f"8M {d}/r")
    PoolSet.create(path).close()
    (d / "r").unlink()
    (d / "r").symlink_to(d / "m")
    with PoolSet.open(path) as pool:
        assert [s.state for s in pool.replicas] == ["ok", "failed"]
        assert pool.replicas[1].error.errno == errno.EINVAL

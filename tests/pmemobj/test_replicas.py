"""Object pools on pool sets: every commit reaches every replica; a replica that fails is
an event and the store keeps working; a replica promoted to master holds the same objects."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from pmreplica import hookimpl, pmemobj, sync
from pmreplica.promote import promote
from tests.helpers import promoted, write_set

SIZE = 16 << 20
HDR = 4096


def two_replica_set(pool_dir: Path, rdir: Path | None = None) -> tuple[Path, Path, Path]:
    master, replica = pool_dir / "master.part", (rdir or pool_dir) / "replica.part"
    set_file = write_set(pool_dir / "objs.set", f"{SIZE} {master}", "REPLICA",
                         f"{SIZE} {replica}")
    return set_file, master, replica


def data(path: Path) -> bytes:
    return path.read_bytes()[HDR:]


def snapshot_of(path: Path, pool_dir: Path) -> dict:
    """The objects a copy of this replica holds when opened on its own."""
    copy = pool_dir / "copy.pool"
    shutil.copyfile(path, copy)
    try:
        with pmemobj.open(str(promoted(copy))) as pool:
            return {k: list(v) for k, v in pool.root.items()}
    finally:
        copy.unlink()


def test_every_commit_reaches_the_replica(pool_dir: Path) -> None:
    """After each commit the replica holds it (as a log record, replayed when the replica
    is opened); after a checkpoint and after close its bytes equal the master's."""
    set_file, master, replica = two_replica_set(pool_dir)
    pool = pmemobj.create(str(set_file))
    try:
        assert [r.state for r in pool.replicas] == ["ok", "ok"]
        pool.root = pool.new(pmemobj.PersistentDict)
        expected: dict = {}
        for i in range(30):
            key = f"k{i % 7}"
            pool.root[key] = pool.new(pmemobj.PersistentList, [i, str(i), b"x" * i])
            expected[key] = [i, str(i), b"x" * i]
            if i % 6 == 0:
                assert snapshot_of(replica, pool_dir) == expected
        with pytest.raises(RuntimeError):
            with pool.transaction():
                pool.root["gone"] = pool.new(pmemobj.PersistentSet, "abcdef")
                raise RuntimeError
        assert snapshot_of(replica, pool_dir) == expected
        pool.checkpoint()
        assert data(master) == data(replica)           # the abort's free space too
        pool.root["after"] = pool.new(pmemobj.PersistentList, ["checkpoint"])
        expected["after"] = ["checkpoint"]
        pool.gc()
        assert snapshot_of(replica, pool_dir) == expected
    finally:
        pool.close()
    assert data(master) == data(replica)


def test_checkpoint_when_the_log_fills(pool_dir: Path) -> None:
    set_file, master, replica = two_replica_set(pool_dir)
    with pmemobj.create(str(set_file)) as pool:
        pool.root = pool.new(pmemobj.PersistentList, list(range(100)))
        before = pool._eng.checkpoints
        for i in range(3000):
            pool.root[i % 100] = f"v{i}"
        assert pool._eng.checkpoints > before
        expected = list(pool.root)
    assert data(master) == data(replica)
    with pmemobj.open(str(promoted(replica))) as pool:  # the replica on its own
        assert list(pool.root) == expected


def test_multi_part_replicas(pool_dir: Path) -> None:
    parts = [pool_dir / f"m{i}" for i in range(3)]
    rparts = [pool_dir / f"r{i}" for i in range(2)]
    set_file = write_set(pool_dir / "multi.set", *(f"4M {p}" for p in parts), "REPLICA",
                         f"6M {rparts[0]}", f"6M {rparts[1]}")
    with pmemobj.create(str(set_file)) as pool:
        pool.root = pool.new(pmemobj.PersistentList, [str(i) * 100 for i in range(2000)])
    with pmemobj.open(str(set_file)) as pool:
        assert pool.root[1999] == "1999" * 100


def test_replica_promoted_to_master_has_the_same_objects(pool_dir: Path) -> None:
    set_file, master, replica = two_replica_set(pool_dir)
    with pmemobj.create(str(set_file)) as pool:
        pool.root = pool.new(pmemobj.PersistentDict, a=pool.new(pmemobj.PersistentList, [1]))
        pool.root["b"] = "two"
        expected = {"a": [1], "b": "two"}
    # a set that lists the old replica as the master (and the old master as its replica)
    swapped = write_set(pool_dir / "swapped.set", f"{SIZE} {replica}", "REPLICA",
                        f"{SIZE} {master}")
    promote(swapped)  # the old master is listed, and in step: no --force needed
    with pmemobj.open(str(swapped)) as pool:
        assert pool.root == expected
        pool.root["c"] = "written through the promoted replica"
    with pytest.raises(OSError):  # the old master is a replica of the promoted one now
        pmemobj.open(str(set_file))
    assert sync.sync(swapped).exit_code == 1  # brought in line...
    promote(set_file)  # ...and promoted back
    with pmemobj.open(str(set_file)) as pool:
        assert pool.root["c"] == "written through the promoted replica"


class FailureRecorder:
    def __init__(self) -> None:
        self.failed: list[tuple[int, BaseException]] = []

    @hookimpl
    def pmreplica_replica_failed(self, replica, error) -> None:
        self.failed.append((replica.index, error))


def test_replica_failure_is_an_event_and_the_store_keeps_working(pool_dir: Path,
                                                                 failing_fs) -> None:
    set_file, master, replica = two_replica_set(pool_dir, rdir=failing_fs.mountpoint)
    recorder = FailureRecorder()
    pool = pmemobj.PersistentObjectPool(str(set_file), flag="x", plugins=[recorder])
    try:
        pool.root = pool.new(pmemobj.PersistentDict, before="failure")
        assert recorder.failed == []
        failing_fs.shut_down()                        # the replica's disk dies
        pool.root["during"] = pool.new(pmemobj.PersistentList, ["still", "committing"])
        assert [i for i, _ in recorder.failed] == [1]
        assert recorder.failed[0][1].errno == errno.EIO
        assert [r.state for r in pool.replicas] == ["ok", "failed"]
        for i in range(20):
            pool.root[f"k{i}"] = i
    finally:
        pool.close()
    with pmemobj.open(str(set_file)) as pool:       # the replica stays failed; master fine
        assert pool.root["during"] == ["still", "committing"] and pool.root["k19"] == 19
        assert pool.replicas[1].state == "failed"


def test_unlinked_replica_part_fails_the_replica(pool_dir: Path) -> None:
    set_file, master, replica = two_replica_set(pool_dir)
    recorder = FailureRecorder()
    with pmemobj.PersistentObjectPool(str(set_file), flag="x", plugins=[recorder]) as pool:
        pool.root = pool.new(pmemobj.PersistentList)
        replica.unlink()
        pool.root.append("after")
        pool.root.append("more")
        assert [i for i, _ in recorder.failed] == [1]
        assert list(pool.root) == ["after", "more"]
    shutil.copyfile(master, pool_dir / "alone.pool")
    with pmemobj.open(str(pool_dir / "alone.pool")) as pool:
        assert list(pool.root) == ["after", "more"]


def test_pool_set_too_small(pool_dir: Path) -> None:
    set_file = write_set(pool_dir / "small.set", f"4M {pool_dir / 'p0'}")
    with pytest.raises(ValueError, match="smaller than"):
        pmemobj.create(str(set_file))
    assert not (pool_dir / "p0").exists()


def test_flag_c_with_a_pool_set(pool_dir: Path) -> None:
    set_file, master, replica = two_replica_set(pool_dir)
    with pmemobj.PersistentObjectPool(str(set_file), flag="c") as pool:
        pool.root = 1
    with pmemobj.PersistentObjectPool(str(set_file), flag="c") as pool:
        assert pool.root == 1
    with pytest.raises(OSError) as ei:
        pmemobj.create(str(set_file))
    assert ei.value.errno == errno.EEXIST


# -- a remote replica: a real agent over TCP (started without SSH by the local launcher) ---

def _agent_env(monkeypatch, pool_dir: Path) -> Path:
    agent_dir = pool_dir / "agent"
    agent_dir.mkdir()
    agent = Path(sys.executable).parent / "pmreplica-agent"
    monkeypatch.setenv("PMREPLICA_LAUNCHER", "local")
    # exec: the agent replaces the shell, so it is this process's child
    monkeypatch.setenv("RPMEM_CMD", f"exec {agent} --poolset-dir {agent_dir}")
    return agent_dir


def _remote_set(pool_dir: Path, agent_dir: Path) -> tuple[Path, Path]:
    write_set(agent_dir / "r.set", f"{SIZE} {agent_dir / 'r.part'}")
    return write_set(pool_dir / "remote.set", f"{SIZE} {pool_dir / 'm.part'}",
                     "REPLICA 127.0.0.1 r.set"), agent_dir / "r.part"


def _my_agents(agent_dir: Path) -> list[int]:
    """Pids of this process's children that serve ``agent_dir``."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and str(agent_dir).encode() in cmdline:
            pids.append(int(stat.parent.name))
    return pids


def test_remote_replica_gets_every_commit(pool_dir: Path, monkeypatch) -> None:
    agent_dir = _agent_env(monkeypatch, pool_dir)
    set_file, rpart = _remote_set(pool_dir, agent_dir)
    with pmemobj.create(str(set_file)) as pool:
        assert [r.state for r in pool.replicas] == ["ok", "ok"]
        pool.root = pool.new(pmemobj.PersistentDict)
        for i in range(50):
            pool.root[f"k{i % 9}"] = pool.new(pmemobj.PersistentList, [i, str(i)])
        expected = {k: list(v) for k, v in pool.root.items()}
        # the replica's copy, before any checkpoint: the commits are there as records
        shutil.copyfile(rpart, pool_dir / "early.pool")
    with pmemobj.open(str(promoted(pool_dir / "early.pool"))) as pool:
        assert {k: list(v) for k, v in pool.root.items()} == expected
    assert data(pool_dir / "m.part") == data(rpart)    # after close: byte-identical
    with pmemobj.open(str(promoted(rpart))) as pool:   # the remote copy as a master
        assert {k: list(v) for k, v in pool.root.items()} == expected


def test_remote_replica_failure_is_an_event(pool_dir: Path, monkeypatch) -> None:
    agent_dir = _agent_env(monkeypatch, pool_dir)
    set_file, _rpart = _remote_set(pool_dir, agent_dir)
    recorder = FailureRecorder()
    pool = pmemobj.PersistentObjectPool(str(set_file), flag="x", plugins=[recorder])
    try:
        pool.root = pool.new(pmemobj.PersistentList, ["before"])
        agents = _my_agents(agent_dir)
        assert len(agents) == 1
        os.kill(agents[0], signal.SIGKILL)             # the remote node goes away
        for i in range(5):
            pool.root.append(i)                        # commits keep working
        # a commit meets the dead lane, or the heartbeat finds the agent gone first and
        # tells the application from its own thread: either way, once
        deadline = time.monotonic() + 10
        while not recorder.failed and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [i for i, _ in recorder.failed] == [1]
        assert [r.state for r in pool.replicas] == ["ok", "failed"]
    finally:
        pool.close()
    with pmemobj.open(str(pool_dir / "m.part")) as pool:
        assert list(pool.root) == ["before", 0, 1, 2, 3, 4]

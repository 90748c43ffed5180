"""PoolSet with remote replicas (``REPLICA host set`` lines) served by real agents: bytes reach
the master, a local replica and the remote pool; a remote agent that dies becomes a
``pmreplica_replica_failed`` call while the pool goes on degraded, and the master's state
record marks the replica stale so that a reopen reports it."""

from __future__ import annotations

import errno
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from pmreplica.errors import PmReplicaError
from pmreplica.header import HDR_SIZE, PoolHeader
from pmreplica.hookspecs import hookimpl
from pmreplica.poolset import PoolSet
from pmreplica.rpmem.client import RemotePool
from pmreplica.rpmem.launch import close_connections
from pmreplica import sync
from pmreplica.status import FAILED, OK, STALE

from .helpers import interrupted, run_python, run_threads, write_set
from .rpmem_helpers import (M, Node, check_no_agents_left, local_node,  # noqa: F401
                            local_pool, pattern, remote_bytes, ssh_node, transport)

pytestmark = pytest.mark.timeout(90)

LOST = (errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED)
SIZE = 8 * M


class Recorder:
    """A host application's hooks: what pmreplica told it."""

    def __init__(self) -> None:
        self.failed: list[tuple[int, str, BaseException]] = []
        self.lock = threading.Lock()
        self.told = threading.Event()

    @hookimpl
    def pmreplica_replica_failed(self, replica, error):
        with self.lock:
            self.failed.append((replica.index, replica.name, error))
        self.told.set()


@pytest.fixture(params=["local", "paramiko", "openssh"])
def node(request, transport, pool_dir):
    if request.param == "local":
        sets = pool_dir / "sets"
        sets.mkdir()
        node = Node(transport, "local", "localhost", sets)
    else:
        node = ssh_node(transport, request.param, request.getfixturevalue("sshd"), pool_dir)
    yield node
    check_no_agents_left(node)


def pool_set(node: Node, d: Path, remote_sets: tuple[str, ...] = ("r.set",)) -> Path:
    """master + a local replica + one remote replica per name (8 MiB each)."""
    lines = [f"8M {d}/m", "REPLICA", f"8M {d}/l"]
    for name in remote_sets:
        lines.append(f"REPLICA {node.target} {name}")
    return write_set(d / "p.set", *lines)


def created_pool_set(node: Node, d: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """:func:`pool_set` with its remote pool ``r.set``, created and closed, the node's
    settings in the environment."""
    node.use_env(monkeypatch)
    node.make_set("r.set")
    path = pool_set(node, d)
    PoolSet.create(path).close()
    return path


def replica_files(d: Path) -> dict[str, bytes]:
    """Master and local replica as another process reads them."""
    return {"master": remote_bytes([(SIZE, d / "m")]), "local": remote_bytes([(SIZE, d / "l")])}


def state_elsewhere(master: Path) -> dict:
    """The replica-state record of the master, decoded by another process."""
    code = """
import json, sys
from pmreplica.state import ReplicaState
with open(sys.argv[1], "rb") as f:
    st = ReplicaState.load(f.read(4096), int(sys.argv[2]), 3)
print(json.dumps({"stale": [i for i in range(3) if st.is_stale(i)],
                  "dirty": st.dirty_ranges(int(sys.argv[2])), "intact": st.intact}))
"""
    done = run_python(code, str(master), str(SIZE))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_create_persist_reopen_with_local_and_remote_replicas(node, pool_dir, monkeypatch):
    d = pool_dir
    node.use_env(monkeypatch)
    rparts = node.make_set("r.set")
    path = pool_set(node, d)
    rec = Recorder()
    ps = PoolSet.create(path, plugins=[rec])
    try:
        assert [s.state for s in ps.replicas] == [OK, OK, OK]
        assert ps.replicas[2].is_remote and node.target in ps.replicas[2].name
        data = pattern(SIZE - HDR_SIZE, 1)
        ps.buf[HDR_SIZE:] = data
        ps.persist(HDR_SIZE, SIZE - HDR_SIZE)
        # ranges on several lanes at once
        def writer(lane: int) -> None:
            for i in range(20):
                off = M + lane * (M // 2) + i * 4096
                ps.buf[off:off + 100] = bytes([lane + i]) * 100
                ps.persist(off, 100, lane)

        errors = run_threads(writer, ps.nlanes)
        assert not errors and ps.nlanes >= 2
        expected = bytes(ps.buf[HDR_SIZE:])
        master_hdr = ps.header
    finally:
        ps.close()
    assert rec.failed == []
    files = replica_files(d)
    remote = remote_bytes(rparts)
    for name, raw in (*files.items(), ("remote", remote)):
        assert raw[HDR_SIZE:] == expected, name
    # the remote pool's header is a member of the pool set: same pool set uuid, linked in
    rhdr = PoolHeader.unpack(remote[:HDR_SIZE])
    lhdr = PoolHeader.unpack(files["local"][:HDR_SIZE])
    assert rhdr.poolset_uuid == master_hdr.poolset_uuid
    assert rhdr.uuid == lhdr.next_repl and rhdr.next_repl == master_hdr.uuid
    assert rhdr.signature == master_hdr.signature

    ps = PoolSet.open(path, plugins=[rec])
    try:
        assert [s.state for s in ps.replicas] == [OK, OK, OK]
        assert bytes(ps.buf[HDR_SIZE:]) == expected
        ps.buf[2 * M:2 * M + 5] = b"again"
        ps.flush(2 * M, 5)
        ps.drain()
    finally:
        ps.close()
    assert remote_bytes(rparts)[2 * M:2 * M + 5] == b"again"
    assert rec.failed == []


def test_remote_agent_killed_mid_session_degrades_and_marks_stale(node, pool_dir, monkeypatch):
    d = pool_dir
    node.use_env(monkeypatch)
    rparts = node.make_set("r.set")
    path = pool_set(node, d)
    rec = Recorder()
    ps = PoolSet.create(path, plugins=[rec])
    try:
        ps.buf[HDR_SIZE:HDR_SIZE + 6] = b"before"
        ps.persist(HDR_SIZE, 6)
        node.kill_agents()
        node.wait_agents_gone()
        for i in range(5):  # the first persist finds the failure; none of them raises
            off = 3 * M + i * 100_000
            ps.buf[off:off + 5] = b"after"
            ps.persist(off, 5)
        # the heartbeat may find the dead agent first: it tells the application from its own
        # thread, maybe after these persists returned
        assert rec.told.wait(5)
        assert len(rec.failed) == 1
        index, name, error = rec.failed[0]
        assert index == 2 and node.target in name
        assert isinstance(error, OSError) and error.errno in LOST, error
        assert [s.state for s in ps.replicas] == [OK, OK, FAILED]
        assert ps.replicas[2].error is error
        ps.flush(4 * M, 1)  # flush/drain keep working on what is left
        ps.drain()
        st = state_elsewhere(d / "m")
        assert st["stale"] == [2] and st["intact"]
        assert any(lo <= 3 * M < lo + n for lo, n in st["dirty"]), st
    finally:
        ps.close()
    files = replica_files(d)
    remote = remote_bytes(rparts)
    for raw in files.values():
        assert raw[3 * M:3 * M + 5] == b"after" and raw[HDR_SIZE:HDR_SIZE + 6] == b"before"
    assert remote[HDR_SIZE:HDR_SIZE + 6] == b"before"
    assert remote[3 * M:3 * M + 5] == bytes(5)  # missed while it was down: hence stale

    rec2 = Recorder()
    ps = PoolSet.open(path, plugins=[rec2])
    try:
        assert [s.state for s in ps.replicas] == [OK, OK, STALE]
        ps.persist(HDR_SIZE, 6)  # a stale replica still opens and takes writes
    finally:
        ps.close()
    assert rec2.failed == []
    assert state_elsewhere(d / "m")["stale"] == [2]


def test_unreachable_remote_replica_opens_degraded(local_node, pool_dir, monkeypatch):
    node, d = local_node, pool_dir
    path = created_pool_set(node, d, monkeypatch)
    # the agent cannot start: its pool-set directory is gone
    node.use_env(monkeypatch, RPMEM_CMD=node.command().replace(str(node.dir), str(d / "gone")))
    rec = Recorder()
    ps = PoolSet.open(path, plugins=[rec])
    try:
        assert [s.state for s in ps.replicas] == [OK, OK, FAILED]
        assert [(i, e.errno) for i, _, e in rec.failed] == [(2, errno.ENOENT)]
        ps.buf[HDR_SIZE:HDR_SIZE + 2] = b"ok"
        ps.persist(HDR_SIZE, 2)
    finally:
        ps.close()
    assert replica_files(d)["local"][HDR_SIZE:HDR_SIZE + 2] == b"ok"
    assert state_elsewhere(d / "m")["stale"] == [2]


class KillsTheFirstHost:
    """Forced interleaving (a hook wrapper): as replica 3 is about to open, replica 2's
    agent is killed (its host lost while the pool is still opening) and the hook waits
    until replica 2's heartbeat has reported it."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.pool: PoolSet | None = None

    @hookimpl(tryfirst=True)
    def pmreplica_open_replica(self, spec, index, poolset, create):
        if index == 3:
            target = poolset.replicas[2].target
            self.node.kill_agents()  # only replica 2's runs yet
            deadline = time.monotonic() + 10
            while target.remote.failure is None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert target.remote.failure is not None
        return None  # the rpmem plugin opens it


def test_a_replica_lost_while_the_pool_is_created_fails_the_create(local_node, pool_dir,
                                                                  monkeypatch):
    """The same while the pool set is created: the create fails with the heartbeat's
    error and removes what it made. (Storing the first generation on replica 2 fails too,
    which failed the create before; a target that keeps no generation is caught only by
    the verdict.)"""
    node, d = local_node, pool_dir
    node.use_env(monkeypatch)
    node.make_set("r.set")
    node.make_set("s.set")
    path = pool_set(node, d, ("r.set", "s.set"))
    with pytest.raises(OSError) as e:
        PoolSet.create(path, plugins=[KillsTheFirstHost(node)])
    assert e.value.errno == errno.ECONNRESET, e.value
    assert not (d / "m").exists() and not (d / "l").exists()
    assert not (node.dir / "s.part0").exists()


def test_a_replica_lost_while_the_pool_opens_is_failed_by_the_open(local_node, pool_dir,
                                                                   monkeypatch):
    """Replica 2's host is lost after its open and before the pool's: the heartbeat's
    verdict came while the pool was not yet writing to it, and used to be dropped (the
    replica opened "ok", its failure told at the first write, never if the pool stayed
    idle). The open fails it and tells the application."""
    node, d = local_node, pool_dir
    node.use_env(monkeypatch)
    node.make_set("r.set")
    node.make_set("s.set")
    path = pool_set(node, d, ("r.set", "s.set"))
    PoolSet.create(path).close()
    rec = Recorder()
    ps = PoolSet.open(path, plugins=[rec, KillsTheFirstHost(node)])
    try:
        assert [s.state for s in ps.replicas] == [OK, OK, FAILED, OK]
        assert [i for i, _, _ in rec.failed] == [2]
        ps.buf[HDR_SIZE:HDR_SIZE + 2] = b"ok"
        ps.persist(HDR_SIZE, 2)
    finally:
        ps.close()
    assert state_elsewhere(d / "m")["stale"] == [2]


def test_remote_pool_in_use_elsewhere_is_reported_not_fatal(local_node, pool_dir, monkeypatch):
    node, d = local_node, pool_dir
    path = created_pool_set(node, d, monkeypatch)
    holder = RemotePool.open(node.target, "r.set", local_pool(SIZE, None), config=node.config())
    try:
        rec = Recorder()
        with PoolSet.open(path, plugins=[rec]) as ps:
            assert ps.replicas[2].state == FAILED
            assert [(i, e.errno) for i, _, e in rec.failed] == [(2, errno.EBUSY)]
    finally:
        holder.close()


def test_failed_create_removes_every_replica_made(local_node, pool_dir, monkeypatch):
    node, d = local_node, pool_dir
    node.use_env(monkeypatch)
    good = node.make_set("ok.set")
    path = pool_set(node, d, ("ok.set", "missing.set"))
    with pytest.raises(PmReplicaError) as e:
        PoolSet.create(path)
    assert e.value.errno == errno.ENOENT and "missing.set" in str(e.value)
    assert not good[0][1].exists()  # the first remote pool was created, then removed
    assert sorted(p.name for p in d.iterdir()) == ["p.set", "sets"]
    assert sorted(p.name for p in node.dir.iterdir()) == ["ok.set"]


def test_remote_replica_too_small_for_the_master(local_node, pool_dir, monkeypatch):
    node, d = local_node, pool_dir
    node.use_env(monkeypatch)
    small = node.make_set("r.set", (4 * M,))
    path = pool_set(node, d)
    with pytest.raises(PmReplicaError) as e:
        PoolSet.create(path)
    assert e.value.errno == errno.EFBIG
    assert not small[0][1].exists()
    assert sorted(p.name for p in d.iterdir()) == ["p.set", "sets"]


def test_remote_pool_of_another_pool_set_is_not_written(local_node, pool_dir, monkeypatch):
    node, d = local_node, pool_dir
    node.use_env(monkeypatch)
    rparts = node.make_set("r.set")
    PoolSet.create(pool_set(node, d)).close()  # r.set now belongs to p.set
    before = remote_bytes(rparts)
    other = write_set(d / "q.set", f"8M {d}/qm")
    PoolSet.create(other).close()
    write_set(other, f"8M {d}/qm", f"REPLICA {node.target} r.set")
    rec = Recorder()
    with PoolSet.open(other, plugins=[rec]) as ps:
        assert [s.state for s in ps.replicas] == [OK, FAILED]
        [(index, _, error)] = rec.failed
        assert index == 1 and error.errno == errno.EINVAL and "another pool set" in str(error)
        ps.buf[HDR_SIZE:] = pattern(SIZE - HDR_SIZE, 9)
        ps.persist(HDR_SIZE, SIZE - HDR_SIZE)
    assert remote_bytes(rparts) == before


def test_unreachable_or_unknown_ssh_host(sshd, transport, pool_dir, monkeypatch, tmp_path):
    node, d = ssh_node(transport, "paramiko", sshd, pool_dir), pool_dir
    node.use_env(monkeypatch)
    rparts = node.make_set("r.set")
    path = pool_set(node, d)
    PoolSet.create(path).close()
    close_connections()  # a cached SSH connection would outlive the listener
    rec = Recorder()
    with sshd.stopped():
        with PoolSet.open(path, plugins=[rec]) as ps:
            assert [s.state for s in ps.replicas] == [OK, OK, FAILED]
            ps.persist(HDR_SIZE, 10)
    assert [(i, e.errno) for i, _, e in rec.failed] == [(2, errno.ECONNREFUSED)]
    # a host whose key is not on record: refused, and a create made nothing anywhere
    known = tmp_path / "known_hosts"
    known.write_text("")
    conf = sshd.write_ssh_config(tmp_path / "ssh_config", known_hosts=known)
    node.use_env(monkeypatch, PMREPLICA_SSH_CONFIG=str(conf))
    other = write_set(d / "q.set", f"8M {d}/qm", f"REPLICA {node.target} s.set")
    node.make_set("s.set")
    with pytest.raises(PmReplicaError) as e:
        PoolSet.create(other)
    assert e.value.errno == errno.EACCES and "host key" in str(e.value)
    assert not (d / "qm").exists() and not (node.dir / "s.part0").exists()
    assert known.read_text() == ""
    check_no_agents_left(node)
    assert rparts[0][1].exists()


def test_unknown_flags_are_einval_before_any_replica_sees_them(node, pool_dir, monkeypatch):
    path = created_pool_set(node, pool_dir, monkeypatch)
    with PoolSet.open(path) as pool:
        for call in (pool.persist, pool.flush):
            with pytest.raises(PmReplicaError) as e:
                call(HDR_SIZE, 8, 0, 1 << 40)
            assert e.value.errno == errno.EINVAL and "invalid flags" in str(e.value)
        pool.persist(HDR_SIZE, 8, 0, 1)  # RELAXED is known
        assert [r.state for r in pool.replicas] == [OK, OK, OK]  # nothing was charged to them


def test_a_persist_interrupted_on_a_remote_replica_fails_it_with_its_range(local_node,
                                                                          pool_dir,
                                                                          monkeypatch):
    """A signal handler raises while a persist waits for a stopped agent. The interrupt
    reaches the application; the remote replica, whose lane is out of step and which may lack
    the range, is failed (ECANCELED) with the range recorded as missed, and replica-sync
    brings it there."""
    node, d = local_node, pool_dir
    node.use_env(monkeypatch, PMREPLICA_PEER_TIMEOUT="2")
    rparts = node.make_set("r.set")
    path = pool_set(node, d)
    off = 2 * M + 4096
    ps = PoolSet.create(path)
    pids: list[int] = []
    try:
        ps.buf[off:off + 4096] = b"I" * 4096
        pids = node.kill_agents(signal.SIGSTOP)
        with interrupted():
            ps.persist(off, 4096)
        assert [s.state for s in ps.replicas] == [OK, OK, FAILED]
        assert ps.replicas[2].error.errno == errno.ECANCELED
        st = state_elsewhere(d / "m")
        assert st["stale"] == [2]
        assert any(lo <= off and off + 4096 <= lo + n for lo, n in st["dirty"]), st
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        node.wait_agents_gone()
        ps.close()
    assert remote_bytes(rparts)[off:off + 4096] != b"I" * 4096
    assert sync.sync(path).status == "repaired"
    assert remote_bytes(rparts)[off:off + 4096] == b"I" * 4096


def test_a_close_interrupted_on_one_replica_closes_the_others(local_node, pool_dir,
                                                              monkeypatch):
    """A signal handler raises while close() waits for a stopped agent: the interrupt reaches
    the application, and the close still ends the other replica's session and unmaps and
    unlocks the pool (another open succeeds)."""
    node, d = local_node, pool_dir
    node.use_env(monkeypatch, PMREPLICA_PEER_TIMEOUT="30")
    node.make_set("r1.set")
    node.make_set("r2.set")
    path = pool_set(node, d, ("r1.set", "r2.set"))
    ps = PoolSet.create(path)
    [first] = [pid for pid in node.agent_pids()
               if "r1.part0" in Path(f"/proc/{pid}/maps").read_text()]
    try:
        os.kill(first, signal.SIGSTOP)
        with interrupted(0.5):
            ps.close()
        assert ps.mapping.closed
        assert node.agent_pids() == [first]  # the other replica's agent ended with its session
    finally:
        os.kill(first, signal.SIGKILL)
        node.wait_agents_gone()
    with PoolSet.open(path) as again:
        assert [s.state for s in again.replicas] == [OK, OK, OK, OK]


def test_a_resync_whose_rejoin_cannot_be_recorded_leaves_the_replica_off(local_node,
                                                                          pool_dir, failing_fs,
                                                                          monkeypatch):
    """The master's disk fails as an online resync of a remote replica ends: the replica's
    rejoin cannot be recorded in the master's header. The resync raises (EIO), and the
    replica stays stale and off the write path; its target is not left on it closed."""
    node = local_node
    node.use_env(monkeypatch)
    node.make_set("r.set")
    path = write_set(pool_dir / "p.set", f"8M {failing_fs.mountpoint}/m",
                     f"REPLICA {node.target} r.set")

    class ShutDownAtTheEnd:
        @hookimpl
        def pmreplica_sync_progress(self, replica, phase, done, total):
            if phase == "resync" and total and done == total:
                failing_fs.shut_down()

    ps = PoolSet.create(path)
    try:
        ps.buf[2 * M:2 * M + 6] = b"before"
        ps.persist(2 * M, 6)
        node.kill_agents()
        ps.buf[3 * M:3 * M + 6] = b"missed"
        ps.persist(3 * M, 6)
        assert ps.replicas[1].state == FAILED
        ps.plugin_manager.register(ShutDownAtTheEnd())
        with pytest.raises(OSError) as e:
            ps.resync(1)
        assert e.value.errno == errno.EIO, e.value
        status = ps.replicas[1]
        assert status.state != OK and status.target is None
        assert all(s is not status for s, _ in ps._active) and ps.stale_replicas == [status]
    finally:
        try:
            ps.close()
        except OSError:
            pass  # the master's disk is gone

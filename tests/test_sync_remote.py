"""replica-sync with remote replicas served by real agents, over the test sshd (paramiko) or
the local launcher: a remote pool removed or corrupted on the agent side, an agent host that
is unreachable (sshd stopped), a full remote file system (a small tmpfs), a remote replica
whose agent died during persists and came back (only the chunks it missed are sent), verify
by checksums the agent computes (the data does not cross), a remote source for local
replicas, and online resync. Every replica's bytes are read back from its files here, after
`replica-sync` ran in another process."""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import threading

import pytest

from pmreplica import PoolSet, sync
from pmreplica.header import HDR_SIZE
from pmreplica.rpmem import client
from rpmem_common import proto
from pmreplica.rpmem.client import start_session
from pmreplica.rpmem.environ import RpmemConfig
from pmreplica.rpmem.launch import close_connections

from .helpers import small_tmpfs
from .sync_harness import M, PoolLayout, check, environ, fill, report, write_random


def _identical(layout: PoolLayout, expected: bytes, env: dict[str, str]) -> None:
    for i in range(len(layout.parts)):
        assert layout.data(i) == expected, f"replica {i} differs"
    status, rep = check(layout.path, env)
    assert status == 0 and rep["status"] == "healthy", rep


def _by_index(rep: dict) -> dict[int, dict]:
    return {r["index"]: r for r in rep["replicas"]}


@pytest.fixture
def ssh_layout(pool_dir, sshd):
    """Master, a local replica and a replica on the sshd "host", reached over paramiko."""
    layout = PoolLayout(pool_dir, node=sshd.alias)
    env = sshd.env(RPMEM_CMD=layout.agent_command)
    fill(layout.path, env, seed=3)
    yield layout, env
    close_connections()


@pytest.fixture
def local_layout(pool_dir):
    """Master, a local replica and a remote replica through the local launcher."""
    layout = PoolLayout(pool_dir)
    fill(layout.path, layout.env(), seed=4)
    return layout


@pytest.mark.parametrize("fault", ["pool removed", "header corrupted"])
def test_remote_pool_broken_on_the_agent_side_is_recreated(ssh_layout, fault):
    layout, env = ssh_layout
    expected = layout.data(0)
    part = layout.parts[2][0][1]
    if fault == "pool removed":
        part.unlink()
    else:
        with open(part, "r+b") as f:
            f.seek(60)
            f.write(b"\xaa")
    status, rep = report(layout.path, env=env)
    assert status == 1, rep
    r2 = _by_index(rep)[2]
    assert r2["kind"] == "remote" and r2["health"] == "broken"
    assert r2["action"] == "recreate and copy" and r2["result"] == "repaired"
    problem = "is missing" if fault == "pool removed" else "invalid header checksum"
    assert any(problem in p for p in r2["problems"]), r2
    _identical(layout, expected, env)


def test_unreachable_agent_host_then_back(ssh_layout, sshd):
    layout, env = ssh_layout
    with sshd.stopped():
        close_connections()  # no cached SSH connection may reach the stopped host
        states = write_random(layout.path, env, seed=11)  # the remote replica misses these
        assert states == ["ok", "ok", "failed"]
        expected = layout.data(0)
        layout.parts[1][0][1].unlink()  # and a local replica breaks meanwhile
        status, rep = report(layout.path, env=env)
        assert status == 4 and rep["status"] == "failed", rep
        r1, r2 = _by_index(rep)[1], _by_index(rep)[2]
        assert r1["result"] == "repaired"  # what can be repaired is
        assert r2["health"] == "unreachable" and r2["action"] == "cannot repair"
        assert any("Connection refused" in p or "ECONNREFUSED" in p for p in r2["problems"])
        assert layout.data(1) == expected
    status, rep = report(layout.path, env=env)
    assert status == 1, rep
    r2 = _by_index(rep)[2]
    assert r2["health"] == "stale" and r2["action"] == "resync dirty chunks"
    assert 0 < r2["copy_bytes"] == rep["record"]["dirty_bytes"] < layout.size // 2
    _identical(layout, expected, env)


@pytest.fixture
def small_fs(pool_dir):
    """A 5 MiB tmpfs for the remote pool's part."""
    with small_tmpfs(pool_dir / "small", "5m") as mnt:
        yield mnt


def test_full_remote_file_system(pool_dir, small_fs):
    layout = PoolLayout(pool_dir, remote_dir=small_fs)
    env = layout.env()
    fill(layout.path, env, seed=5)
    expected = layout.data(0)
    layout.parts[2][0][1].unlink()
    filler = small_fs / "filler"
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, 2 * M)  # 3 MiB left: no room for the 4 MiB part
    layout.parts[1][0][1].unlink()
    status, rep = report(layout.path, env=env)
    assert status == 4 and rep["status"] == "failed", rep
    r1, r2 = _by_index(rep)[1], _by_index(rep)[2]
    assert r1["result"] == "repaired" and layout.data(1) == expected
    assert r2["action"] == "recreate and copy" and r2["result"] == "failed"
    assert "No space left on device" in r2["error"], r2
    assert not layout.parts[2][0][1].exists()  # nothing half-made is left behind
    filler.unlink()
    status, rep = report(layout.path, env=env)
    assert status == 1 and _by_index(rep)[2]["result"] == "repaired", rep
    _identical(layout, expected, env)


def test_remote_replica_that_failed_during_persists_gets_what_it_missed(local_layout):
    layout = local_layout
    env = layout.env()
    with environ(env), PoolSet.open(layout.path) as pool:
        pool.buf[HDR_SIZE:HDR_SIZE + 5] = b"first"
        pool.persist(HDR_SIZE, 5)
        assert layout.kill_agents() >= 1  # the agent dies under the open pool
        for off in (M + 3, 3 * M - 100):
            pool.buf[off:off + 200] = os.urandom(200)
            pool.persist(off, 200)  # returns: master and replica 1 have it
        assert [r.state for r in pool.replicas] == ["ok", "ok", "failed"]
    expected = layout.data(0)
    assert layout.data(2) != expected
    status, rep = check(layout.path, env)  # the agent is back (started per session)
    assert status == 4 and _by_index(rep)[2]["health"] == "stale"
    fine = 4096  # the fine map's chunk (the coarse maps': 64 KiB at this size)
    assert rep["record"] == {"generation": rep["record"]["generation"], "holders": [0, 1],
                             "stale": [2], "full_resync": [], "chunk_size": 64 << 10,
                             "fine_chunk_size": fine,
                             "dirty_bytes": 3 * fine}  # 3*M-100+200 spans two chunks
    status, rep = report(layout.path, env=env)
    assert status == 1 and rep["copied"] == 3 * fine, rep
    _identical(layout, expected, env)


def test_verify_compares_remote_data_where_it_lives(local_layout, monkeypatch):
    layout = local_layout
    env = layout.env()
    expected = layout.data(0)
    off = 3 * M + 777
    with open(layout.parts[2][0][1], "r+b") as f:
        f.seek(off)
        f.write(bytes([expected[off - HDR_SIZE] ^ 0x80]))

    def no_reads(*args, **kw):
        raise AssertionError("verify read remote data over the network")

    monkeypatch.setattr(client.RemotePool, "read", no_reads)
    with environ(env):
        result = sync.sync(layout.path, verify=True)
    assert result.status == "needs repair" and result.exit_code == 4
    block = 64 << 10
    assert result.replicas[2].differing == [(off // block * block, block)]
    assert result.replicas[1].differing == []
    with environ(env):
        result = sync.sync(layout.path, verify=True, repair=True)
    assert result.status == "repaired" and result.copied == block
    _identical(layout, expected, env)


def test_checksums_from_the_agent_match_the_data(local_layout):
    layout = local_layout
    buf = mmap.mmap(-1, layout.size)
    with environ(layout.env()):
        remote = client.RemotePool.open(layout.node, "r2.set", buf, nlanes=1)
        try:
            got = remote.checksum(HDR_SIZE, 5 * (64 << 10) + 100)
            with pytest.raises(OSError) as e:
                remote.checksum(layout.size - 10, 20)
            assert e.value.errno == errno.EINVAL
        finally:
            remote.close()
        data = layout.image(2)
        want = [hashlib.sha256(data[o:min(o + (64 << 10), HDR_SIZE + 5 * (64 << 10) + 100)])
                .digest() for o in range(HDR_SIZE, HDR_SIZE + 5 * (64 << 10) + 100, 64 << 10)]
        assert got == want and len(got) == 6
        # without an open pool, and with a malformed request, the agent says EINVAL
        ctl = start_session(layout.node, "test", RpmemConfig.from_env())
        try:
            for blob in (b"", b"\0" * 24):
                with pytest.raises(OSError) as e:
                    ctl.call(proto.Request(proto.CHECKSUM, blob=blob))
                assert e.value.errno == errno.EINVAL
            with pytest.raises(OSError) as e:
                ctl.call(proto.Request(proto.CHECKSUM, blob=bytes(20) + b"\0\0\x10\0"))
            assert e.value.errno == errno.EINVAL and "no pool is open" in str(e.value)
        finally:
            ctl.close()
    buf.close()


def test_lost_master_is_repaired_from_a_remote_source(local_layout):
    layout = local_layout
    env = layout.env()
    write_random(layout.path, env, seed=21)
    expected = layout.data(0)
    layout.parts[0][0][1].unlink()  # master part 0 and its record: replica 1 holds a copy
    status, rep = report(layout.path, env=env)
    assert status == 1, rep
    assert rep["source"] == 2 and rep["record"]["holders"] == [1]
    assert [r["health"] for r in rep["replicas"]] == ["broken", "unknown", "healthy"]
    assert [r["action"] for r in rep["replicas"]] == ["recreate and copy", "full copy", None]
    _identical(layout, expected, env)


def test_online_resync_after_the_agent_came_back(local_layout):
    layout = local_layout
    env = layout.env()
    with environ(env), PoolSet.open(layout.path) as pool:
        layout.kill_agents()
        pool.buf[2 * M:2 * M + 6] = b"missed"
        pool.persist(2 * M, 6)
        assert pool.replicas[2].state == "failed"
        stop = threading.Event()

        def writer() -> None:
            n = 0
            while not stop.is_set():
                off = HDR_SIZE + (n * 4099) % (M - 600)
                pool.buf[off:off + 512] = os.urandom(512)
                pool.persist(off, 512)
                n += 1

        t = threading.Thread(target=writer)
        t.start()
        try:
            copied = pool.resync(2)
        finally:
            stop.set()
            t.join()
        assert copied > 0 and pool.replicas[2].state == "ok" and pool.stale_replicas == []
        pool.buf[3 * M:3 * M + 5] = b"after"
        pool.persist(3 * M, 5)
    expected = layout.data(0)
    assert expected[2 * M - HDR_SIZE:2 * M - HDR_SIZE + 6] == b"missed"
    _identical(layout, expected, env)

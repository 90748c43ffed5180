"""Remote pools through a real sshd: paramiko (the default launcher) and the OpenSSH client
(RPMEM_SSH) both start a real agent, whose data lanes listen on the address the SSH login
came in on. Unknown host keys are refused before any agent runs."""

from __future__ import annotations

import errno
import time

import pytest

from pmreplica.header import HDR_SIZE, PoolHeader
from pmreplica.rpmem import client
from pmreplica.rpmem.client import REMOVE_POOL_SET, RemotePool
from pmreplica.rpmem.launch import close_connections

from .helpers import run_threads
from .rpmem_helpers import (M, attr, check_no_agents_left, local_pool, pattern, remote_bytes,
                            ssh_node, transport)  # noqa: F401 (fixture)

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(params=["paramiko", "openssh"])
def node(request, transport, sshd, pool_dir):
    node = ssh_node(transport, request.param, sshd, pool_dir)
    yield node
    check_no_agents_left(node)


@pytest.fixture(scope="module", autouse=True)
def _no_cached_connections():
    yield
    close_connections()


def test_lifecycle_through_sshd(node, transport):
    parts = node.make_set("r.set", (4 * M, 4 * M))
    size = 8 * M - HDR_SIZE
    pool = local_pool(size, seed=None)
    a, b = attr(seed=1), attr(signature=b"SECOND\0\0", seed=2)
    cfg = node.config()
    rp = RemotePool.create(node.target, "r.set", pool, nlanes=4, attr=a, config=cfg)
    assert (rp.nlanes, rp.provider) == (4, transport)
    def lane_writer(lane: int) -> None:
        base = HDR_SIZE + lane * M
        pool[base:base + M] = pattern(M, lane)
        for off in range(0, M, 64 << 10):
            rp.persist(base + off, 64 << 10, lane)

    errors = run_threads(lane_writer, 4)
    assert not errors
    back = bytearray(4 * M)
    rp.read(back, HDR_SIZE, 4 * M, 3)
    assert back == pool[HDR_SIZE:HDR_SIZE + 4 * M]
    rp.set_attr(b)
    rp.close()
    on_disk = remote_bytes(parts)
    assert on_disk[HDR_SIZE:] == pool[HDR_SIZE:]
    assert PoolHeader.unpack(on_disk[:HDR_SIZE]).signature == b.signature

    with RemotePool.open(node.target, "r.set", local_pool(size, None), config=cfg) as rp:
        assert rp.attr == b
        with pytest.raises(OSError) as e:  # the pool is locked by this session
            RemotePool.open(node.target, "r.set", local_pool(size, None), config=cfg)
        assert e.value.errno == errno.EBUSY
    st = client.stat(node.target, "r.set", config=cfg)
    assert (st.size, st.healthy) == (size, True)
    client.remove(node.target, "r.set", REMOVE_POOL_SET, config=cfg)
    assert not any(p.exists() for _, p in parts) and not (node.dir / "r.set").exists()


def test_errors_travel_back_through_ssh(node):
    cfg = node.config()
    with pytest.raises(OSError) as e:
        RemotePool.open(node.target, "missing.set", local_pool(8 * M, None), config=cfg)
    assert e.value.errno == errno.ENOENT and "missing.set" in str(e.value)
    with pytest.raises(OSError) as e:
        client.remove(node.target, "missing.set", config=cfg)
    assert e.value.errno == errno.ENOENT


def test_agent_killed_mid_session_through_sshd(node):
    node.make_set("r.set")
    rp = RemotePool.create(node.target, "r.set", local_pool(8 * M, seed=3), nlanes=2,
                           attr=attr(), config=node.config())
    rp.persist(HDR_SIZE, M)
    node.kill_agents()
    t0 = time.monotonic()
    with pytest.raises(OSError) as e:
        rp.persist(HDR_SIZE, 100, 1)
    assert e.value.errno in (errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED), e.value
    assert time.monotonic() - t0 < 3
    t0 = time.monotonic()
    with pytest.raises(OSError):
        rp.close()
    assert time.monotonic() - t0 < 10, "close hangs on a dead agent"


@pytest.mark.parametrize("launcher", ["paramiko", "openssh"])
def test_unknown_host_key_is_refused_and_no_agent_runs(launcher, transport, sshd, pool_dir,
                                                       tmp_path):
    node = ssh_node(transport, launcher, sshd, pool_dir)
    parts = node.make_set("r.set")
    known = tmp_path / "known_hosts"
    known.write_text("")
    conf = sshd.write_ssh_config(tmp_path / "ssh_config", known_hosts=known)
    with pytest.raises(OSError) as e:
        RemotePool.create(node.target, "r.set", local_pool(8 * M, None), attr=attr(),
                          config=node.config(PMREPLICA_SSH_CONFIG=str(conf)))
    assert e.value.errno == errno.EACCES
    assert "host key" in str(e.value).lower()
    assert not parts[0][1].exists()
    assert known.read_text() == ""
    check_no_agents_left(node)


def test_agent_is_found_on_the_remote_path(sshd, transport, pool_dir):
    # RPMEM_CMD names the agent without a path: the login's PATH (sshd's SetEnv) finds it
    node = ssh_node(transport, "paramiko", sshd, pool_dir)
    node.make_set("r.set")
    cfg = node.config(RPMEM_CMD=f"pmreplica-agent --poolset-dir {node.dir}")
    with RemotePool.create(node.target, "r.set", local_pool(8 * M, seed=4), attr=attr(),
                           config=cfg) as rp:
        rp.persist(HDR_SIZE, M)
    check_no_agents_left(node)

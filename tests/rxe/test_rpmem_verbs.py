"""A remote pool served over RDMA (pyverbs on a real rxe device) by a real agent.

The TCP tests of tests/test_rpmem_lifecycle.py and tests/test_rpmem_faults.py whose
assertions hold for any transport run here again, over verbs (the fixtures of
tests/rxe/conftest.py). The tests below cover what only the RDMA path has: GPSPM and APM
(and GPSPM in APM's place where storage sits behind the page cache), message splitting and
the bounded work queue, range checks on both sides, queue-pair errors, memlock limits, the
provider choice and the CONNECT exchange. Under emulation a session costs seconds, so each
test makes few."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pmreplica.header import HDR_SIZE
from pmreplica.hookspecs import hookimpl
from pmreplica.poolset import PoolSet
from pmreplica.status import FAILED
from rpmem_common import proto
from pmreplica.rpmem.client import FLUSH_RELAXED, RemotePool
from pmreplica.rpmem.environ import RpmemConfig
from pmreplica.rpmem.transport import provider, verbs
from rpmem_common.verbs_common import CLIENT_INFO, LANE_QP
from tests.helpers import ROOT, interrupted, replica_bytes, unavailable, write_set
from tests.rpmem_helpers import (M, Node, RawSession, attr, check_no_agents_left,
                                  local_pool)
# the transport-independent remote-pool tests, collected here with the verbs fixtures
from tests.test_rpmem_faults import test_agent_killed_mid_session  # noqa: F401
from tests.test_rpmem_lifecycle import (  # noqa: F401
    test_create_persist_close_open_read, test_flush_then_drain, test_lanes_from_threads_at_once,
    test_nlanes_is_what_both_sides_allow, test_nohdrs_pool_is_writable_from_byte_zero)

HERE = Path(__file__).parent


def create(node, name, pool, **kw) -> RemotePool:
    return RemotePool.create(node.target, name, pool, config=node.config(), **kw)


def on_node(parts, whole: bool = False) -> bytes:
    """The remote pool as its part files hold it (the agent is another process)."""
    return replica_bytes(parts, singlehdr=whole)


@pytest.mark.parametrize("local_node", ["gpspm", "apm"], indirect=True)
def test_every_operation_with_each_persist_method(local_node):
    # two parts: the agent registers one window over two file mappings
    parts = local_node.make_set("r.set", (4 * M, 4 * M))
    size = 8 * M - HDR_SIZE
    pool = local_pool(size, seed=21)
    want = "APM" if "--persist-apm" in local_node.agent_args else "GPSPM"
    ranges = [(HDR_SIZE + 5, 3000), (M + 3, 70_000), (2 * M, 10), (3 * M + 1, 4000),
              (4 * M - 100, 300), (5 * M, 100)]  # (4 M - 100) crosses the part boundary
    new = attr(signature=b"NEWSIG\0\0", seed=2)
    with create(local_node, "r.set", pool, nlanes=2, attr=attr()) as rp:
        assert (rp.provider, rp.persist_method) == ("verbs", want)
        rp.persist(*ranges[0], 1)
        rp.deep_persist(*ranges[1], 0)
        rp.flush(*ranges[2], 0, FLUSH_RELAXED)  # WRITE only: drain sends the persist op
        rp.flush(*ranges[3], 0, FLUSH_RELAXED)
        rp.flush(*ranges[4], 1)  # WRITE and persist op, waited for by drain
        rp.flush(*ranges[5], 1)
        rp.drain(0)
        rp.drain(1)
        # reads: into the registered pool itself, into other memory, across the header end
        into_pool = memoryview(pool)[6 * M:6 * M + 8192]
        rp.read(into_pool, M + 3, 8192)
        assert bytes(into_pool) == pool[M + 3:M + 3 + 8192]
        into_pool.release()
        elsewhere = bytearray(HDR_SIZE + 100)
        rp.read(elsewhere, 0, len(elsewhere), 1)
        assert elsewhere[:8] == attr().signature
        assert elsewhere[HDR_SIZE + 5:] == pool[HDR_SIZE + 5:HDR_SIZE + 100]
        rp.set_attr(new)
        rp.persist(6 * M, 1)  # the data path is untouched by the header rewrite
    on_disk = on_node(parts)
    for off, n in ranges + [(6 * M, 1)]:
        assert on_disk[off:off + n] == pool[off:off + n], off
    assert on_disk[HDR_SIZE:HDR_SIZE + 5] == bytes(5)  # nothing else was sent
    again = local_pool(size, seed=None)
    with RemotePool.open(local_node.target, "r.set", again, config=local_node.config()) as rp:
        assert (rp.attr, rp.persist_method) == (new, want)
        rp.read(again, 0, size)
    assert again[HDR_SIZE:] == on_disk[HDR_SIZE:]


def test_persist_apm_on_storage_behind_a_page_cache_serves_gpspm(rxe_device):
    # --persist-apm says RDMA writes reach persistence, which is true of pmem and RAM only.
    # A pool on a file system with storage behind its pages (9p with cache=mmap: the guest's
    # page cache in front of the host's file) must still be written back: the agent serves
    # GPSPM and msyncs each range. read() on that mount bypasses the guest's page cache, so
    # it sees what reached the host, and only that.
    out = os.environ.get("RXEVM_OUT")
    if not out or not Path(out).is_dir():
        unavailable("RXEVM_OUT (a 9p folder shared with the host) is set only in the rxevm guest")
    sets = Path(tempfile.mkdtemp(prefix="pmreplica-9p-", dir=out))
    try:
        node = Node("verbs", "local", rxe_device.ip, sets, agent_args=("--persist-apm",))
        parts = node.make_set("r.set", (8 * M,))
        pool = local_pool(8 * M, seed=31)
        with create(node, "r.set", pool, nlanes=1, attr=attr()) as rp:
            assert (rp.provider, rp.persist_method) == ("verbs", "GPSPM")
            rp.persist(HDR_SIZE + 10, 5000)
            rp.flush(3 * M, 70_000)
            rp.drain()
            fd = os.open(parts[0][1], os.O_RDONLY)
            try:
                assert os.pread(fd, 5000, HDR_SIZE + 10) == pool[HDR_SIZE + 10:HDR_SIZE + 5010]
                assert os.pread(fd, 70_000, 3 * M) == pool[3 * M:3 * M + 70_000]
                assert os.pread(fd, 100, 5 * M) == bytes(100)  # nothing else was sent
            finally:
                os.close(fd)
        check_no_agents_left(node)
    finally:
        shutil.rmtree(sets, ignore_errors=True)


@pytest.mark.parametrize("local_node", ["gpspm", "apm"], indirect=True)
def test_ranges_split_at_the_message_limit_with_a_small_work_queue(local_node, monkeypatch):
    # a device limit of 4 KiB + 3 and a 4-deep send queue: a 200 KB persist is 49 WRITEs,
    # so the queue fills and empties many times within one call
    monkeypatch.setattr(verbs, "MESSAGE_LIMIT", 4096 + 3)
    parts = local_node.make_set("r.set")
    pool = local_pool(8 * M, seed=22)
    config = local_node.config(RPMEM_WORK_QUEUE_SIZE="4")
    with RemotePool.create(local_node.target, "r.set", pool, nlanes=2, attr=attr(),
                           config=config) as rp:
        rp.persist(HDR_SIZE + 1, 200_000)
        rp.flush(M + 7, 150_000, 1, FLUSH_RELAXED)
        for i in range(20):  # more relaxed WRITEs than the queue holds, then one drain
            rp.flush(2 * M + i * 5000, 4500, 1, FLUSH_RELAXED)
        rp.drain(1)
        rp.deep_persist(3 * M, 9000, 0)
        back = bytearray(300_000)  # read through the lane buffer (256 KiB) in pieces
        rp.read(back, HDR_SIZE + 1, len(back), 0)
        assert back == pool[HDR_SIZE + 1:HDR_SIZE + 200_001] + bytes(100_000)
    on_disk = on_node(parts)
    for off, n in [(HDR_SIZE + 1, 200_000), (M + 7, 150_000), (3 * M, 9000)]:
        assert on_disk[off:off + n] == pool[off:off + n], off
    for i in range(20):
        off = 2 * M + i * 5000
        assert on_disk[off:off + 4500] == pool[off:off + 4500], i
        assert on_disk[off + 4500:off + 5000] == bytes(500), i


def test_bad_ranges_are_refused_on_both_sides(local_node):
    parts = local_node.make_set("r.set")
    pool = local_pool(8 * M, seed=23)
    with create(local_node, "r.set", pool, nlanes=2, attr=attr()) as rp:
        data = rp.data_path  # what the plugin binds: it checks ranges itself
        for off, n in [(0, 1), (HDR_SIZE - 1, 2), (8 * M - 1, 2), (8 * M, 1), (-1, 1),
                       (HDR_SIZE, -1)]:
            for call in (data.persist, data.flush, data.deep_persist):
                with pytest.raises(OSError) as e:
                    call(off, n, 0)
                assert e.value.errno == errno.EINVAL, (call, off, n)
        with pytest.raises(OSError) as e:
            data.read(memoryview(bytearray(2)), 8 * M - 1, 0)
        assert e.value.errno == errno.EINVAL
        # nothing was posted: a WRITE outside the agent's window would have failed the lane
        data.persist(HDR_SIZE, 10, 0)
        # a persist message made by hand, past the client's checks: the agent checks it too
        lane = data._lanes[1]
        data._tail(lane, verbs.PM_GPSPM, 0, 8 * M - 10, 8 * M + 10, False)  # no WRITE
        with pytest.raises(OSError) as e:
            data._settle(lane)
        assert e.value.errno == errno.EINVAL and "durable" in str(e.value), e.value
        with pytest.raises(OSError):
            data.persist(HDR_SIZE, 1, 1)  # that lane stays failed
        data.persist(HDR_SIZE + 10, 10, 0)  # the other one works on
    on_disk = on_node(parts)
    assert on_disk[HDR_SIZE:HDR_SIZE + 20] == pool[HDR_SIZE:HDR_SIZE + 20]
    assert on_disk[HDR_SIZE + 20:] == bytes(8 * M - HDR_SIZE - 20)
    assert on_disk[:8] == attr().signature


class Failures:
    """A host application's pmreplica_replica_failed hook."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, BaseException]] = []

    @hookimpl
    def pmreplica_replica_failed(self, replica, error):
        self.seen.append((replica.index, error))


def test_queue_pair_error_fails_the_replica_not_the_pool(local_node, pool_dir, monkeypatch):
    local_node.make_set("r.set")
    master = write_set(pool_dir / "pool.set", f"8M {pool_dir / 'master.part0'}",
                       f"REPLICA {local_node.target} r.set")
    local_node.use_env(monkeypatch)
    failures = Failures()
    ps = PoolSet.create(master, plugins=[failures])
    try:
        target = ps.replicas[1].target
        assert target.remote.provider == "verbs"
        ps.buf[HDR_SIZE:HDR_SIZE + 5] = b"first"
        ps.persist(HDR_SIZE, 5)
        assert not failures.seen
        # a WRITE with a wrong rkey, for real: the agent's side refuses it, the QP fails
        target.remote.data_path._rkey ^= 0x5A5A00
        ps.buf[2 * HDR_SIZE:2 * HDR_SIZE + 6] = b"second"
        ps.persist(2 * HDR_SIZE, 6)  # no exception: the master carries on
        assert len(failures.seen) == 1, failures.seen
        index, error = failures.seen[0]
        assert index == 1 and isinstance(error, OSError) and error.errno == errno.EACCES
        assert "remote access" in str(error).lower(), error
        assert ps.replicas[1].state == FAILED and ps.replicas[1].target is None
        ps.persist(HDR_SIZE, 5)  # degraded, still working
        assert bytes(ps.buf[2 * HDR_SIZE:2 * HDR_SIZE + 6]) == b"second"
    finally:
        ps.close()


# -- the memlock limit ---------------------------------------------------------------------------
_CLIENT = r"""
import json, mmap, sys
from pmreplica.rpmem.client import RemotePool
from pmreplica.rpmem.environ import RpmemConfig
from tests.rpmem_helpers import attr
target, env = sys.argv[1], json.loads(sys.argv[2])
for size in map(int, sys.argv[3:]):
    try:
        RemotePool.create(target, "r.set", mmap.mmap(-1, size), attr=attr(),
                          config=RpmemConfig.from_env(env)).close()
        print(json.dumps({"errno": 0}), flush=True)
    except OSError as e:
        print(json.dumps({"errno": e.errno, "message": str(e)}), flush=True)
"""
NO_IPC_LOCK = ["setpriv", "--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock"]


def test_memlock_limits_are_reported_as_such(local_node):
    parts = local_node.make_set("r.set", (16 * M,))
    # a client without CAP_IPC_LOCK under an 8 MiB RLIMIT_MEMLOCK (its agent's is lifted):
    # a 16 MiB pool cannot fit (refused before the remote pool is made); an 8 MiB pool fits
    # alone, but the lane buffers registered after it do not, and the kernel refuses them
    # (ENOMEM), for real
    env = local_node.env(RPMEM_CMD=local_node.command(prefix="prlimit --memlock=unlimited"))
    run = subprocess.run([*NO_IPC_LOCK, "prlimit", f"--memlock={8 * M}", sys.executable, "-c",
                          _CLIENT, local_node.target, json.dumps(env), str(16 * M), str(8 * M)],
                         cwd=ROOT, capture_output=True, text=True, timeout=100)
    assert run.returncode == 0, run.stderr
    too_big, exhausted = map(json.loads, run.stdout.splitlines())
    for got in (too_big, exhausted):
        assert got["errno"] == errno.ENOMEM, got
        assert "ulimit -l" in got["message"] and "limits.conf" in got["message"], got
    assert "is 8388608 bytes" in too_big["message"], too_big
    assert "already registered" in exhausted["message"], exhausted
    assert not parts[0][1].exists()  # the CREATE was undone
    # the agent's limit: its refusal comes back with the reason
    prefix = " ".join(NO_IPC_LOCK + ["prlimit", "--memlock=65536"])
    config = local_node.config(RPMEM_CMD=local_node.command(prefix=prefix))
    with pytest.raises(OSError) as e:
        RemotePool.create(local_node.target, "r.set", local_pool(16 * M, None), attr=attr(),
                          config=config)
    assert e.value.errno == errno.EREMOTEIO and "ulimit -l" in str(e.value), e.value
    assert not parts[0][1].exists()


# -- which data path -----------------------------------------------------------------------------
def librpmem_env(**env: str) -> RpmemConfig:
    return RpmemConfig.from_env({"PMREPLICA_LAUNCHER": "local", **env})


# librpmem's order: verbs first whenever it can be used, RPMEM_ENABLE_SOCKETS=1 does not
# override it; TCP otherwise, unless RPMEM_ENABLE_SOCKETS=0 (then ENOMEDIUM with the reason)
@pytest.mark.parametrize("env,loopback,expect", [
    ({}, False, "verbs"),
    ({"RPMEM_ENABLE_SOCKETS": "1"}, False, "verbs"),
    ({"RPMEM_ENABLE_SOCKETS": "1", "RPMEM_ENABLE_VERBS": "1"}, False, "verbs"),
    ({"RPMEM_ENABLE_SOCKETS": "0"}, False, "verbs"),
    ({"RPMEM_ENABLE_VERBS": "0"}, False, "tcp"),
    ({"RPMEM_ENABLE_SOCKETS": "1", "RPMEM_ENABLE_VERBS": "0"}, False, "tcp"),
    ({}, True, "tcp"),
    ({"RPMEM_ENABLE_SOCKETS": "1"}, True, "tcp"),
    ({"RPMEM_ENABLE_SOCKETS": "0"}, True, "no RDMA device carries the route to 127.0.0.1"),
    ({"RPMEM_ENABLE_SOCKETS": "0", "RPMEM_ENABLE_VERBS": "0"}, False, "RPMEM_ENABLE_VERBS=0"),
])
def test_provider_follows_librpmems_order(rxe_device, env, loopback, expect):
    address = "127.0.0.1" if loopback else rxe_device.ip
    config = librpmem_env(**env)
    if expect in ("verbs", "tcp"):
        choice = provider.choose(address, config)
        assert choice.name == expect, choice
        if expect == "verbs":
            assert (choice.gid.device, choice.gid.address) == (rxe_device.name, rxe_device.ip)
        elif not loopback:
            assert choice.reason == "RPMEM_ENABLE_VERBS=0", choice
        return
    with pytest.raises(OSError) as e:
        provider.choose(address, config)
    assert e.value.errno == errno.ENOMEDIUM
    assert expect in str(e.value) and "RPMEM_ENABLE_SOCKETS=0" in str(e.value), e.value


_CHOOSE_WITHOUT_PYVERBS = r"""
import json, os, sys
# the folders that would give this interpreter pyverbs are taken away: importing it fails
sys.path[:] = [p for p in sys.path if not os.path.isdir(os.path.join(p or ".", "pyverbs"))]
from pmreplica.rpmem.environ import RpmemConfig
from pmreplica.rpmem.transport import provider
from rpmem_common import verbs_common
verbs_common.DEBIAN_PYVERBS = "/nonexistent/pyverbs"
for env in map(json.loads, sys.argv[2:]):
    try:
        choice = provider.choose(sys.argv[1], RpmemConfig.from_env(env))
        print(json.dumps({"name": choice.name, "reason": choice.reason}), flush=True)
    except OSError as e:
        print(json.dumps({"errno": e.errno, "message": str(e)}), flush=True)
"""


def test_provider_without_pyverbs_on_the_client(rxe_device):
    # the device carries the route, but this client cannot import pyverbs: TCP whether
    # RPMEM_ENABLE_SOCKETS is unset or 1, ENOMEDIUM naming pyverbs when it is 0
    envs = [{}, {"RPMEM_ENABLE_SOCKETS": "1"}, {"RPMEM_ENABLE_SOCKETS": "0"}]
    run = subprocess.run([sys.executable, "-c", _CHOOSE_WITHOUT_PYVERBS, rxe_device.ip,
                          *map(json.dumps, envs)], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    unset, sockets, no_sockets = map(json.loads, run.stdout.splitlines())
    for got in (unset, sockets):
        assert got["name"] == "tcp" and "pyverbs cannot be imported" in got["reason"], got
    assert no_sockets["errno"] == errno.ENOMEDIUM, no_sockets
    assert "pyverbs cannot be imported" in no_sockets["message"], no_sockets
    assert "RPMEM_ENABLE_SOCKETS=0" in no_sockets["message"], no_sockets


def test_provider_is_shown_by_pmreplica_info(rxe_device, pmreplica_cmd, pool_dir):
    pool_set = write_set(pool_dir / "pool.set", f"8M {pool_dir / 'master.part0'}",
                         f"REPLICA {rxe_device.ip} r.set", "REPLICA 127.0.0.1 r.set")
    env = {"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"}
    info = subprocess.run([*pmreplica_cmd, "info", str(pool_set)], capture_output=True,
                          text=True, env=env, timeout=60)
    assert info.returncode == 0, info.stderr
    lines = [line for line in info.stdout.splitlines() if "transport" in line]
    assert len(lines) == 2, info.stdout
    assert f"verbs ({rxe_device.name} port 1" in lines[0], lines
    assert "tcp (no RDMA device carries the route to 127.0.0.1)" in lines[1], lines


def test_pool_open_follows_librpmems_order(local_node):
    # for real, on a pool: RPMEM_ENABLE_SOCKETS=1 with a device on the route is still verbs;
    # RPMEM_ENABLE_VERBS=0 forces TCP; with both disabled there is no data path
    parts = local_node.make_set("r.set")
    pool = local_pool(8 * M, seed=25)
    config = local_node.config(RPMEM_ENABLE_SOCKETS="1", RPMEM_ENABLE_VERBS=None)
    with RemotePool.create(local_node.target, "r.set", pool, attr=attr(), config=config) as rp:
        assert rp.provider == "verbs"
        rp.persist(HDR_SIZE, 1000)
    assert on_node(parts)[HDR_SIZE:HDR_SIZE + 1000] == pool[HDR_SIZE:HDR_SIZE + 1000]
    pool[HDR_SIZE:HDR_SIZE + 1000] = bytes(range(200)) * 5
    config = local_node.config(RPMEM_ENABLE_SOCKETS="1", RPMEM_ENABLE_VERBS="0")
    with RemotePool.open(local_node.target, "r.set", pool, config=config) as rp:
        assert rp.provider == "tcp"
        rp.persist(HDR_SIZE, 1000)
    assert on_node(parts)[HDR_SIZE:HDR_SIZE + 1000] == pool[HDR_SIZE:HDR_SIZE + 1000]
    config = local_node.config(RPMEM_ENABLE_SOCKETS="0", RPMEM_ENABLE_VERBS="0")
    with pytest.raises(OSError) as e:
        RemotePool.open(local_node.target, "r.set", pool, config=config)
    assert e.value.errno == errno.ENOMEDIUM and "RPMEM_ENABLE_VERBS=0" in str(e.value), e.value


def test_agent_without_pyverbs(local_node, caplog):
    # an agent whose interpreter cannot import pyverbs refuses verbs before touching the
    # pool; the client goes on over TCP unless RPMEM_ENABLE_SOCKETS=0 forbids it
    parts = local_node.make_set("r.set")
    cmd = f"{sys.executable} {HERE / 'agent_without_pyverbs.py'} --poolset-dir {local_node.dir}"
    pool = local_pool(8 * M, seed=26)
    config = local_node.config(RPMEM_CMD=cmd, RPMEM_ENABLE_SOCKETS=None)
    with caplog.at_level(logging.WARNING, logger="pmreplica"):
        with RemotePool.create(local_node.target, "r.set", pool, attr=attr(),
                               config=config) as rp:
            assert rp.provider == "tcp"
            rp.persist(HDR_SIZE, 100)
    assert any("pyverbs" in r.getMessage() and "using TCP" in r.getMessage()
               for r in caplog.records), caplog.text
    assert on_node(parts)[HDR_SIZE:HDR_SIZE + 100] == pool[HDR_SIZE:HDR_SIZE + 100]
    with pytest.raises(OSError) as e:
        RemotePool.open(local_node.target, "r.set", pool,
                        config=local_node.config(RPMEM_CMD=cmd, RPMEM_ENABLE_SOCKETS="0"))
    assert e.value.errno == errno.ENOMEDIUM and "pyverbs" in str(e.value), e.value


def test_connect_refuses_bad_lane_data(local_node):
    local_node.make_set("r.set")
    session = RawSession(local_node)
    try:
        resp = session.create("r.set", 8 * M, attr(), nlanes=2, provider=proto.PROV_VERBS)
        assert resp.status == proto.OK and resp.rkey and resp.raddr and resp.port == 0
        gid = bytes(16)
        lane = LANE_QP.pack(1, 1)
        for blob in [b"", b"x" * 5, CLIENT_INFO.pack(gid, 3, 16),  # no lanes
                     CLIENT_INFO.pack(gid, 3, 16) + lane * 3,  # more lanes than agreed
                     CLIENT_INFO.pack(gid, 3, 16) + lane + b"x",  # a torn lane
                     CLIENT_INFO.pack(gid, 9, 16) + lane,  # no such MTU
                     CLIENT_INFO.pack(gid, 3, 0) + lane]:  # no messages in flight
            answer = session.request(proto.Request(proto.CONNECT, blob=blob))
            assert answer.status == proto.ERR_POOL_CFG, (blob, answer)
        done = session.request(proto.Request(proto.CLOSE, flags=proto.CLOSE_REMOVE))
        assert done.status == proto.OK
    finally:
        session.close()
    assert not (local_node.dir / "r.part0").exists()


def test_an_interrupted_persist_gives_up_its_lane(local_node):
    """GPSPM waits for the agent's reply: with the agent stopped, a signal handler raises in
    that wait. The lane is given up (ECANCELED), as a TCP lane is, rather than kept with
    completions the call may have polled and not handled; the next persist says so."""
    local_node.make_set("r.set")
    pool = local_pool(8 * M, seed=7)
    rp = create(local_node, "r.set", pool, nlanes=1, attr=attr())
    rp.persist(HDR_SIZE, 4096)
    pids = local_node.kill_agents(signal.SIGSTOP)
    try:
        with interrupted():
            rp.persist(HDR_SIZE, 4096)
        assert rp.failure is not None and rp.failure.errno == errno.ECANCELED
        with pytest.raises(OSError) as e:
            rp.persist(HDR_SIZE, 64)
        assert e.value.errno == errno.ECANCELED
        assert "interrupted mid-operation" in str(e.value)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        local_node.wait_agents_gone()
    rp.abort()

"""Failures around a remote pool, caused for real: the agent killed mid-session, garbage on
the control channel, data connections that cannot be made after CREATE, and a client that
dies with its pool open."""

from __future__ import annotations

import errno
import json
import os
import signal
import threading
import time

import pytest

from pmreplica.header import HDR_SIZE
from rpmem_common import proto
from pmreplica.rpmem.client import RemotePool
from rpmem_common.wire import OP, OP_WRITE

from .helpers import interrupted, read_json_line, start_python
from .rpmem_helpers import (M, RawSession, attr, local_node, local_pool,  # noqa: F401
                            remote_bytes, transport)

pytestmark = pytest.mark.timeout(60)

LOST = (errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED)


def create(node, name, pool, **kw) -> RemotePool:
    return RemotePool.create(node.target, name, pool, config=node.config(), **kw)


def killed_then(call, *args) -> OSError:
    """Run ``call``: it must fail with a lost-connection errno within 3 s."""
    t0 = time.monotonic()
    with pytest.raises(OSError) as e:
        call(*args)
    took = time.monotonic() - t0
    assert e.value.errno in LOST, e.value
    assert took < 3, f"{call.__name__} took {took:.1f} s to notice the dead agent"
    return e.value


def failing_call(call, *args) -> tuple[OSError, float]:
    """Run ``call``, which must fail: its error and how long it took."""
    t0 = time.monotonic()
    with pytest.raises(OSError) as e:
        call(*args)
    return e.value, time.monotonic() - t0


# -- the agent dies -----------------------------------------------------------------------------
def test_agent_killed_mid_session(local_node):
    parts = local_node.make_set("r.set")
    pool = local_pool(8 * M, seed=1)
    rp = create(local_node, "r.set", pool, nlanes=3, attr=attr())
    rp.persist(HDR_SIZE, M)
    local_node.kill_agents()
    local_node.wait_agents_gone()
    killed_then(rp.persist, HDR_SIZE, 100, 0)

    def flush_and_drain() -> None:
        rp.flush(2 * M, 100, 1)  # may still fit in the socket buffer
        rp.drain(1)

    killed_then(flush_and_drain)
    killed_then(rp.read, bytearray(10), HDR_SIZE, 10, 2)
    err = killed_then(rp.persist, HDR_SIZE, 100, 0)  # the lane stays failed
    assert "r.set" in str(err)
    killed_then(rp.set_attr, attr(seed=4))  # the control channel is gone as well
    killed_then(rp.stat)
    t0 = time.monotonic()
    with pytest.raises(OSError) as e:
        rp.close()  # the CLOSE request cannot be answered
    assert e.value.errno in LOST and time.monotonic() - t0 < 5
    with pytest.raises(OSError) as e:
        rp.persist(HDR_SIZE, 1)
    assert e.value.errno == errno.EBADF
    # what was persisted before the kill is on the remote node, and the pool opens again
    assert remote_bytes(parts)[HDR_SIZE:HDR_SIZE + M] == pool[HDR_SIZE:HDR_SIZE + M]
    RemotePool.open(local_node.target, "r.set", local_pool(8 * M, None),
                    config=local_node.config()).close()


def test_agent_killed_during_a_large_persist(local_node):
    local_node.make_set("r.set", (64 * M,))
    pool = local_pool(64 * M, seed=None)
    rp = create(local_node, "r.set", pool, nlanes=1, attr=attr())
    errors: list[OSError] = []

    def big() -> None:
        try:
            for _ in range(2000):  # far longer than the test waits
                rp.persist(HDR_SIZE, 64 * M - HDR_SIZE)
        except OSError as e:
            errors.append(e)

    t = threading.Thread(target=big)
    t.start()
    time.sleep(0.3)
    local_node.kill_agents()
    t.join(5)
    assert not t.is_alive(), "persist hangs after the agent died"
    assert errors and errors[0].errno in LOST, errors
    with pytest.raises(OSError):
        rp.close()


def test_client_killed_mid_session_ends_the_agent_and_frees_the_pool(local_node):
    local_node.make_set("r.set")
    code = """
import json, mmap, sys
from pmreplica.rpmem.client import RemotePool
from pmreplica.rpmem.environ import RpmemConfig
from tests.rpmem_helpers import attr
pool = mmap.mmap(-1, 8 << 20)
pool[4096:4101] = b"hello"
rp = RemotePool.create("localhost", "r.set", pool, attr=attr(),
                       config=RpmemConfig.from_env(json.loads(sys.argv[1])))
rp.persist(4096, 5)
print(json.dumps({"persisted": True}), flush=True)
sys.stdin.readline()
"""
    child = start_python(code, json.dumps(local_node.env()))
    assert read_json_line(child) == {"persisted": True}
    assert local_node.agent_pids()
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert local_node.wait_agents_gone() == [], "the agent outlived its client"
    pool = local_pool(8 * M, None)
    with RemotePool.open(local_node.target, "r.set", pool, config=local_node.config()) as rp:
        back = bytearray(5)
        rp.read(back, HDR_SIZE, 5)
        assert back == b"hello"


# -- garbage on the control channel ---------------------------------------------------------------
GARBAGE = {
    "unknown type": proto.REQ_HDR.pack(77, 12),
    "huge size": proto.REQ_HDR.pack(proto.OPEN, 1 << 40),
    "size smaller than a header": proto.REQ_HDR.pack(proto.OPEN, 3),
    "truncated open": proto.REQ_HDR.pack(proto.OPEN, 60) + b"\x01" * 28,
    "open without descriptor": proto.REQ_HDR.pack(proto.OPEN, 40) + b"\x01" * 28,
    "open body too short": proto.REQ_HDR.pack(proto.OPEN, 20) + b"\x00" * 8,
    "descriptor without NUL": proto.encode_request(
        proto.Request(proto.OPEN, pool_size=8 * M, nlanes=1, pool_desc="r.set")).replace(
            b"r.set\0", b"r.setx"),
    "descriptor length lies": proto.REQ_HDR.pack(proto.OPEN, 12 + 28 + 4 + 6)
    + proto.encode_request(proto.Request(proto.OPEN, pool_size=8 * M, nlanes=1,
                                         pool_desc="r.set"))[12:12 + 28]
    + (1000).to_bytes(4, "big") + b"r.set\0",
    "close with a long body": proto.REQ_HDR.pack(proto.CLOSE, 20) + bytes(8),
    "random bytes": bytes(range(7, 250, 3)) * 4,
    "a data-lane write": OP.pack(OP_WRITE, 0, HDR_SIZE, 8) + b"AAAAAAAA",
}
INCOMPLETE = {"truncated open"}


@pytest.mark.parametrize("what", list(GARBAGE))
@pytest.mark.parametrize("with_pool", [False, True], ids=["idle", "pool-open"])
def test_garbage_on_the_control_channel(local_node, what, with_pool):
    parts = local_node.make_set("r.set")
    session = RawSession(local_node)
    if with_pool:
        assert session.create("r.set", 8 * M, attr()).status == proto.OK
    before = remote_bytes(parts) if with_pool else None
    session.send(GARBAGE[what])
    if what in INCOMPLETE:
        # the agent waits for the rest; the end of its input ends the session cleanly
        assert session.close() == 0
    else:
        # the agent answers with an error and ends the session by itself
        resp = session.response()
        assert resp.status == proto.ERR_BADPROTO and resp.message
        assert session.exit_status() == 1
        session.close()
    assert local_node.wait_agents_gone() == []
    if with_pool:
        assert remote_bytes(parts) == before  # the pool stays as it was, and closed:
        RemotePool.open(local_node.target, "r.set", local_pool(8 * M, None),
                        config=local_node.config()).close()
    else:
        assert not parts[0][1].exists()


# -- setup fails after CREATE ----------------------------------------------------------------------
def unreachable_data_port(node) -> str:
    """An agent that listens for data where the client cannot reach it: it takes 127.0.0.2
    for the address the client came in on, while the client connects to 127.0.0.1."""
    return node.command(prefix="env SSH_CONNECTION='127.0.0.1 1 127.0.0.2 22'")


def test_failed_setup_after_create_leaves_no_pool(local_node):
    parts = local_node.make_set("r.set", (4 * M, 4 * M))
    cfg = local_node.config(RPMEM_CMD=unreachable_data_port(local_node))
    t0 = time.monotonic()
    with pytest.raises(OSError) as e:
        RemotePool.create(local_node.target, "r.set", local_pool(8 * M - HDR_SIZE, None),
                          attr=attr(), config=cfg)
    assert e.value.errno == errno.ECONNREFUSED, e.value
    assert time.monotonic() - t0 < 10
    assert not any(p.exists() for _, p in parts)  # CLOSE with REMOVE undid the CREATE
    assert (local_node.dir / "r.set").exists()
    assert local_node.wait_agents_gone() == []


def test_failed_setup_after_open_keeps_the_pool(local_node):
    parts = local_node.make_set("r.set")
    pool = local_pool(8 * M, seed=6)
    with create(local_node, "r.set", pool, attr=attr()) as rp:
        rp.persist(HDR_SIZE, 8 * M - HDR_SIZE)
    before = remote_bytes(parts)
    cfg = local_node.config(RPMEM_CMD=unreachable_data_port(local_node))
    with pytest.raises(OSError) as e:
        RemotePool.open(local_node.target, "r.set", local_pool(8 * M, None), config=cfg)
    assert e.value.errno == errno.ECONNREFUSED
    assert remote_bytes(parts) == before
    RemotePool.open(local_node.target, "r.set", local_pool(8 * M, None),
                    config=local_node.config()).close()  # not left locked either


# -- the remote storage fails ----------------------------------------------------------------------
def test_remote_storage_failure_is_eio_on_the_client(local_node, failing_fs):
    fs = failing_fs.mountpoint
    local_node.write_set("r.set", f"8M {fs}/r.part0")
    pool = local_pool(8 * M, seed=7)
    rp = create(local_node, "r.set", pool, nlanes=2, attr=attr())
    rp.persist(HDR_SIZE, 6)
    failing_fs.shut_down()  # the agent's disk is gone, its pool still mapped
    t0 = time.monotonic()
    with pytest.raises(OSError) as e:
        rp.persist(HDR_SIZE, M)
    assert e.value.errno == errno.EIO and "EIO" in str(e.value)
    assert time.monotonic() - t0 < 3
    with pytest.raises(OSError) as e:  # the lane that failed stays failed
        rp.persist(HDR_SIZE, 1, 0)
    assert e.value.errno == errno.EIO
    rp.close()  # the session itself is intact and closes normally
    failing_fs.remount()
    with open(fs / "r.part0", "rb") as f:  # what was durable before the failure survived
        assert os.pread(f.fileno(), 6, HDR_SIZE) == pool[HDR_SIZE:HDR_SIZE + 6]


def test_stopped_agent_fails_the_call_after_the_op_timeout_not_never(local_node):
    """A stuck agent whose host still answers must fail the lane with ETIMEDOUT after
    PMREPLICA_OP_TIMEOUT instead of hanging the application. (SIGSTOP stops the agent's
    heartbeat too; a peer timeout longer than the op timeout leaves the lane's own
    deadline to act first.)"""
    local_node.make_set("r.set")
    pool = local_pool(8 * M, seed=2)
    rp = RemotePool.create(local_node.target, "r.set", pool, nlanes=1, attr=attr(),
                           config=local_node.config(PMREPLICA_OP_TIMEOUT="1",
                                                    PMREPLICA_PEER_TIMEOUT="30"))
    rp.persist(HDR_SIZE, 4096)
    pids = local_node.kill_agents(signal.SIGSTOP)
    try:
        err, waited = failing_call(rp.persist, HDR_SIZE, 4096)
        assert err.errno == errno.ETIMEDOUT
        assert "did not answer within 1 s" in str(err)
        assert 0.9 < waited < 10
        with pytest.raises(OSError) as e:  # the lane stays failed, at once
            rp.persist(HDR_SIZE, 4096)
        assert e.value.errno == errno.ETIMEDOUT
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        local_node.wait_agents_gone()
    with pytest.raises(OSError):
        rp.close()


def test_a_frozen_agent_fails_within_the_peer_timeout_busy_or_idle(local_node):
    """SIGSTOP of the agent is a frozen host (its kernel still acknowledges data, nothing
    answers): a persist that waits returns ETIMEDOUT within PMREPLICA_PEER_TIMEOUT, and an
    idle pool learns it through on_lost without any call; nothing waits on it again."""
    local_node.make_set("r.set")
    local_node.make_set("s.set")
    cfg = local_node.config(PMREPLICA_PEER_TIMEOUT="0.5")
    busy = RemotePool.create(local_node.target, "r.set", local_pool(8 * M, seed=2), nlanes=1,
                             attr=attr(), config=cfg)
    idle = RemotePool.create(local_node.target, "s.set", local_pool(8 * M, seed=3), nlanes=1,
                             attr=attr(), config=cfg)
    busy.persist(HDR_SIZE, 4096)
    lost: list[tuple[float, OSError]] = []
    idle.on_lost(lambda err: lost.append((time.monotonic(), err)))
    pids = local_node.kill_agents(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        err, waited = failing_call(busy.persist, HDR_SIZE, 4096)
        assert err.errno == errno.ETIMEDOUT
        assert "PMREPLICA_PEER_TIMEOUT" in str(err) and "0.5 s" in str(err)
        assert waited < 1.5, waited
        deadline = time.monotonic() + 2
        while not lost and time.monotonic() < deadline:
            time.sleep(0.01)
        assert lost and lost[0][1].errno == errno.ETIMEDOUT and lost[0][0] - t0 < 1.5
        t0 = time.monotonic()
        with pytest.raises(OSError) as e:  # at once: the session is given up
            idle.persist(HDR_SIZE, 4096)
        assert e.value.errno == errno.ETIMEDOUT
        busy.abort()
        with pytest.raises(OSError) as e:  # the librpmem close says why it could not CLOSE
            idle.close()
        assert e.value.errno == errno.ETIMEDOUT
        assert time.monotonic() - t0 < 0.5, "giving a frozen host up waited on it"
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
            os.kill(pid, signal.SIGCONT)
        local_node.wait_agents_gone()


def test_a_short_stall_is_not_a_failure(local_node):
    """An agent that stops for well under the peer timeout (a scheduling hiccup, swapping)
    costs a slower persist, never the replica."""
    parts = local_node.make_set("r.set")
    pool = local_pool(8 * M, seed=2)
    rp = RemotePool.create(local_node.target, "r.set", pool, nlanes=2, attr=attr(),
                           config=local_node.config(PMREPLICA_PEER_TIMEOUT="1"))
    lost: list[OSError] = []
    rp.on_lost(lost.append)
    stop = threading.Event()

    def writer() -> None:
        while not stop.is_set():
            rp.persist(HDR_SIZE, 64 << 10, 1)

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(3):
            time.sleep(0.2)
            pids = local_node.kill_agents(signal.SIGSTOP)
            time.sleep(0.3)
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        time.sleep(1.2)  # a full timeout after the last stall: still no verdict
    finally:
        stop.set()
        t.join(10)
    assert not lost
    rp.persist(HDR_SIZE, 4096, 0)
    rp.close()
    assert remote_bytes(parts)[HDR_SIZE:HDR_SIZE + 4096] == pool[HDR_SIZE:HDR_SIZE + 4096]


SIGPIPE_CHILD = r"""
import json, os, signal, sys, time
signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # as a C host embedding Python may run
from pmreplica.header import HDR_SIZE, PoolAttr
from pmreplica.rpmem.client import RemotePool
import mmap
pool = mmap.mmap(-1, 8 << 20)
rp = RemotePool.create("localhost", "r.set", pool, nlanes=1, attr=PoolAttr(b"SIGPIPE", 1))
print(json.dumps({"ready": True}), flush=True)
sys.stdin.readline()  # the test kills the agent meanwhile
errors = []
for _ in range(3):  # the first send may still fit in the socket buffer
    try:
        rp.persist(HDR_SIZE, 1 << 20)
    except OSError as e:
        errors.append(e.errno)
print(json.dumps({"errors": errors}), flush=True)
"""


def test_a_dead_agent_is_an_error_not_a_sigpipe(local_node):
    local_node.make_set("r.set")
    child = start_python(SIGPIPE_CHILD, env=local_node.env())
    try:
        assert read_json_line(child) == {"ready": True}
        local_node.kill_agents()
        local_node.wait_agents_gone()
        child.stdin.write("go\n")
        child.stdin.flush()
        out = read_json_line(child)
        assert child.wait(30) == 0
    finally:
        child.kill()
    assert out["errors"] and set(out["errors"]) <= set(LOST)


# -- a call interrupted, the pool closed under a call, a failed lane called again ---------------
@pytest.mark.parametrize("tls", ["0", "1"], ids=["clear", "tls"])
@pytest.mark.parametrize("interrupted_call", ["read", "persist"])
def test_an_interrupted_call_fails_its_lane_instead_of_putting_it_out_of_step(
        local_node, tls, interrupted_call):
    """A signal handler raises while a read waits for its answer (or while a 16 MiB persist
    is being sent) to a stopped agent. The lane's stream is then out of step: the late answer
    would be read as the next persist's status, or half a payload would take the next
    operation as its rest. The lane must fail instead, and the next persist say so, while the
    agent is still stopped (it cannot have made anything durable)."""
    parts = local_node.make_set("r.set", (32 * M,))
    pool = local_pool(32 * M, seed=4)
    rp = RemotePool.create(local_node.target, "r.set", pool, nlanes=1, attr=attr(),
                           config=local_node.config(PMREPLICA_TCP_TLS=tls,
                                                    PMREPLICA_PEER_TIMEOUT="30",
                                                    PMREPLICA_OP_TIMEOUT="30"))
    rp.persist(HDR_SIZE, 4096)
    pids = local_node.kill_agents(signal.SIGSTOP)
    try:
        with interrupted():
            if interrupted_call == "read":
                rp.read(bytearray(M), HDR_SIZE, M)
            else:
                rp.persist(HDR_SIZE, 16 * M)
        assert rp.failure is not None and rp.failure.errno == errno.ECANCELED
        for pid in pids:
            os.kill(pid, signal.SIGCONT)  # the read's answer comes now, or the payload's rest
        time.sleep(0.3)
        local_node.kill_agents(signal.SIGSTOP)
        pool[20 * M:20 * M + 64] = b"B" * 64
        err, _ = failing_call(rp.persist, 20 * M, 64)
        assert err.errno == errno.ECANCELED
        assert "interrupted mid-operation" in str(err)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        local_node.wait_agents_gone()
    rp.abort()
    remote = remote_bytes(parts)
    assert b"B" * 64 not in remote  # nothing of the refused persist landed anywhere


def test_calls_after_close_fail_with_ebadf(local_node):
    """The lanes of a closed pool (a plugin holds its data path) refuse calls with EBADF,
    not with the ValueError of the released pool view."""
    local_node.make_set("r.set")
    pool = local_pool(8 * M, seed=5)
    rp = create(local_node, "r.set", pool, nlanes=2, attr=attr())
    data = rp.data_path
    rp.close()
    for call, args in ((data.persist, (HDR_SIZE, 64, 0)), (data.flush, (HDR_SIZE, 64, 1)),
                       (data.read, (bytearray(8), HDR_SIZE, 0))):
        with pytest.raises(OSError) as e:
            call(*args)
        assert e.value.errno == errno.EBADF, (call.__name__, e.value)
        assert "pool is closed" in str(e.value)


def test_a_failed_lane_raises_a_new_error_each_call(local_node):
    """Every call on a failed lane raises an error of its own: one stored error raised again
    and again would keep every caller's frames, and their locals, alive."""
    local_node.make_set("r.set")
    pool = local_pool(8 * M, seed=6)
    rp = create(local_node, "r.set", pool, nlanes=1, attr=attr())
    rp.persist(HDR_SIZE, 64)
    local_node.kill_agents()
    local_node.wait_agents_gone()
    errors = []
    for _ in range(50):
        with pytest.raises(OSError) as e:
            rp.persist(HDR_SIZE, 64)
        errors.append(e.value)
    assert len({id(e) for e in errors}) == len(errors)
    assert len({e.errno for e in errors[1:]}) == 1
    depth, tb = 0, errors[-1].__traceback__
    while tb is not None:
        depth, tb = depth + 1, tb.tb_next
    assert depth < 10
    rp.abort()


def test_remote_storage_failure_under_pipelined_flushes_is_eio(local_node, failing_fs):
    """The agent answers a flush it cannot make durable with the error and closes the lane,
    before the flushes sent after it are answered: the next call that meets the closed lane
    (a flush's send, or the drain) reports that error (EIO), not the closed connection."""
    fs = failing_fs.mountpoint
    local_node.write_set("r.set", f"8M {fs}/r.part0")
    pool = local_pool(8 * M, seed=8)
    rp = create(local_node, "r.set", pool, nlanes=1, attr=attr())
    rp.persist(HDR_SIZE, 6)
    failing_fs.shut_down()
    with pytest.raises(OSError) as e:
        for i in range(3):
            rp.flush(HDR_SIZE + i * 4096, 64)
        rp.drain()
    assert e.value.errno == errno.EIO and "EIO" in str(e.value)
    rp.close()
    failing_fs.remount()

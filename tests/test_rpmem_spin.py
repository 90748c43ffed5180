"""Polling for answers (rpmem_common/spin.py) costs nothing when nothing happens: an idle pool and
its agent use no CPU, a wait for a frozen agent sleeps, a lane shut down or closed by its peer
ends a wait at once, and polling that keeps missing stops by itself. The client's window
reaches the agent through the CREATE/OPEN flags."""

from __future__ import annotations

import errno
import os
import socket
import threading
import time

import pytest

from pmreplica.header import HDR_SIZE
from pmreplica.rpmem.client import RemotePool
from rpmem_common import proto, spin
from rpmem_common.spin import DEFAULT_WINDOW_US, MISSES, Spinner

from .helpers import wake_ups, woken_since
from .rpmem_helpers import (M, attr, local_node, local_pool, persist_in_thread,  # noqa: F401
                            ssh_node, transport)

pytestmark = pytest.mark.timeout(90)

SIZE = 8 * M
#: the issue's bound for an idle pool: 1% of a CPU
IDLE_SHARE = 0.01


def cpu_seconds(pid: int) -> float:
    """User and system time of process ``pid`` (all its threads) so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_share(pids: list[int], seconds: float) -> list[float]:
    """The share of one CPU each process used over the next ``seconds``; this process first
    (measured by its own clock, finer than /proc's ticks)."""
    before = [time.process_time()] + [cpu_seconds(p) for p in pids]
    time.sleep(seconds)
    after = [time.process_time()] + [cpu_seconds(p) for p in pids]
    return [(b - a) / seconds for a, b in zip(before, after)]


@pytest.fixture
def any_node(request, transport, pool_dir):
    """A node whose agents are started locally, or through the test sshd by paramiko (its
    connection stays open with the pool: its reading thread is part of the pool's cost)."""
    if request.param == "local":
        return request.getfixturevalue("local_node")
    return ssh_node(transport, "paramiko", request.getfixturevalue("sshd"), pool_dir)


@pytest.mark.parametrize("any_node, tls", [("local", "1"), ("local", "0"), ("paramiko", "1")],
                         indirect=["any_node"])
def test_an_idle_pool_and_its_agent_use_no_cpu(any_node, tls):
    any_node.make_set("r.set")
    pool = local_pool(SIZE)
    with RemotePool.create(any_node.target, "r.set", pool, nlanes=4, attr=attr(),
                           config=any_node.config(PMREPLICA_TCP_TLS=tls)) as rp:
        for i in range(3000):  # polling at work: answers come while the lanes poll
            rp.persist(HDR_SIZE + 64 * (i % 1000), 64, i % 4)
            rp.read(bytearray(64), HDR_SIZE, 64, i % 4)
        [agent] = any_node.agent_pids()
        time.sleep(1)  # no operation for a second
        before = wake_ups()
        client, agent_share = cpu_share([agent], 2.0)
        assert client <= IDLE_SHARE and agent_share <= IDLE_SHARE, (
            client, agent_share, woken_since(before))  # which threads of this process woke


def test_a_call_waiting_for_a_frozen_agent_sleeps(local_node):
    """No answer comes (the agent is stopped, its kernel still takes the data): the call
    polls for one window at most, then sleeps until the lane is shut down."""
    local_node.make_set("r.set")
    rp = RemotePool.create(local_node.target, "r.set", local_pool(SIZE), nlanes=1, attr=attr(),
                           config=local_node.config(PMREPLICA_PEER_TIMEOUT="30",
                                                    PMREPLICA_SPIN_US="10000"))
    with local_node.stopped_agents():
        waiter, errors = persist_in_thread(rp, HDR_SIZE, 64)
        time.sleep(0.2)
        [client] = cpu_share([], 1.0)
        assert waiter.is_alive() and client <= IDLE_SHARE, client
        t0 = time.monotonic()
        rp.data_path._lanes[0].sock.shutdown(socket.SHUT_RDWR)  # as the heartbeat would
        waiter.join(5)
        assert not waiter.is_alive() and time.monotonic() - t0 < 1.0
        [error] = errors
        assert isinstance(error, OSError) and error.errno == errno.ECONNRESET, error
    rp.abort()


# -- the poller on plain sockets -----------------------------------------------------------------
@pytest.fixture
def pair():
    """Both ends of a loopback TCP connection, as a lane has."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    yield a, b
    a.close()
    b.close()


def timed_wait(spinner: Spinner) -> float:
    t0 = time.monotonic()
    spinner.wait()
    return time.monotonic() - t0


@pytest.mark.parametrize("event", ["shutdown here", "peer closes", "bytes arrive"])
def test_a_wait_ends_at_once_when_the_lane_can_be_read_or_is_gone(pair, event, monkeypatch):
    a, b = pair
    # a 20-second window, and other work on this CPU must not end the wait (it does, when a
    # sched_yield runs another thread): only the event may
    monkeypatch.setattr(spin, "_RAN", 10**12)
    spinner = Spinner(a.fileno(), 20_000_000)
    act = {"shutdown here": lambda: a.shutdown(socket.SHUT_RDWR),
           "peer closes": b.close, "bytes arrive": lambda: b.sendall(b"x")}[event]
    timer = threading.Timer(0.2, act)
    timer.start()
    took = timed_wait(spinner)
    timer.join()
    assert 0.15 < took < 5, took


def test_polling_that_keeps_missing_stops_by_itself(pair):
    """Nothing ever comes: after MISSES windows in vain, waits skip polling more and more."""
    a, _ = pair
    spinner = Spinner(a.fileno(), 2000)  # 2 ms
    took = sum(timed_wait(spinner) for _ in range(100))
    # every wait polling would take 200 ms; skipping 1, 2, 4 ... polls about 10 of them
    assert took < 0.1, took
    polled = [timed_wait(spinner) > 0.001 for _ in range(MISSES + 300)]
    assert sum(polled) < 10, sum(polled)


def test_bytes_already_there_end_the_wait_without_polling(pair):
    a, b = pair
    b.sendall(b"x")
    assert timed_wait(Spinner(a.fileno(), 20_000_000)) < 1


def test_polling_for_the_rest_of_a_message_ends_with_its_bytes_or_its_window(pair,
                                                                          monkeypatch):
    """Spinner.more (the agent's receive of a large write): True as soon as the next bytes
    can be read, False once the window passed without any; it never skips."""
    a, b = pair
    monkeypatch.setattr(spin, "_RAN", 10**12)  # only bytes or the window end it
    spinner = Spinner(a.fileno(), 50_000)  # 50 ms
    timer = threading.Timer(0.01, lambda: b.sendall(b"x"))
    timer.start()
    t0 = time.monotonic()
    assert spinner.more()
    assert 0.005 < time.monotonic() - t0 < 0.045
    timer.join()
    a.recv(1)
    for _ in range(MISSES + 1):  # a miss does not turn it off, as it does wait()
        t0 = time.monotonic()
        assert not spinner.more()
        assert 0.045 < time.monotonic() - t0 < 1
    assert not Spinner(a.fileno(), 0).more()  # no window: the caller blocks at once


# -- the window on the wire ------------------------------------------------------------------------
def test_the_clients_window_travels_in_the_create_flags():
    for window in (0, 1, DEFAULT_WINDOW_US, 10_000):
        flags = proto.TCP_CLEAR | proto.spin_flags(window)
        req = proto.decode_request(proto.CREATE, proto.encode_request(proto.Request(
            proto.CREATE, pool_size=SIZE, nlanes=1, pool_desc="a.set", flags=flags))[
                proto.REQ_HDR.size:])
        assert proto.spin_window(req.flags) == window and req.flags & proto.TCP_CLEAR
    assert proto.spin_window(0) is None  # a client that does not say: the agent's default

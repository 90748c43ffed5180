"""Pipelined flushes and their batched acknowledgements, against real agents: many small
flushes on several lanes land and drain without a deadlock, over TLS and in clear text; at the
wire, every flush gets its status word (those the agent held back included), in order, and an
answer held back goes out as soon as no request follows it."""

from __future__ import annotations

import errno
import os
import socket

import pytest

from pmreplica.header import HDR_SIZE
from pmreplica.rpmem.client import RemotePool
from pmreplica.rpmem.transport.tcp import NOTSENT_LOWAT
from rpmem_common import proto
from rpmem_common.wire import OP, OP_READ, OP_WRITE, OPF_ACK_LATER

from .helpers import run_threads
from .rpmem_helpers import (M, RawSession, assert_closed, attr, local_node,  # noqa: F401
                            local_pool, recv_status, remote_bytes, transport)

pytestmark = pytest.mark.timeout(120)

SIZE = 8 * M
TLS = {"tls": "1", "clear": "0"}


@pytest.mark.parametrize("tls", TLS)
@pytest.mark.parametrize("work_queue", ["4096", None])
def test_100000_tiny_flushes_on_4_lanes_land_and_drain(local_node, tls, work_queue):
    """Each lane flushes 25,000 8-byte ranges back to back (up to 4,096 unanswered with the
    largest work queue) and drains once; every byte is on the replica afterwards."""
    parts = local_node.make_set("r.set")
    pool = local_pool(SIZE, seed=7)
    config = local_node.config(PMREPLICA_TCP_TLS=TLS[tls], RPMEM_WORK_QUEUE_SIZE=work_queue)
    rp = RemotePool.create(local_node.target, "r.set", pool, nlanes=4, attr=attr(),
                           config=config)
    per_lane, span = 25_000, 8
    region = per_lane * span  # each lane has its own region, 200,000 bytes

    def flushes(lane: int) -> None:
        base = HDR_SIZE + lane * region
        for i in range(per_lane):
            rp.flush(base + i * span, span, lane)
        rp.drain(lane)

    assert run_threads(flushes, 4) == []
    rp.close()
    end = HDR_SIZE + 4 * region
    assert remote_bytes(parts)[HDR_SIZE:end] == pool[HDR_SIZE:end]


@pytest.mark.parametrize("tls", TLS)
def test_large_persists_on_4_lanes_at_once_land_whole(local_node, tls):
    """Each lane persists its own 12 MiB range three times over with new bytes, all lanes
    at once, so that writes wait in the sockets for the agent's window; every lane's socket
    carries the unsent mark (a send sleeps at 512 KiB unsent, not at a full send buffer),
    and the replica ends with the last bytes of each range."""
    size = 64 * M
    parts = local_node.make_set("r.set", (size,))
    pool = local_pool(size, seed=3)
    config = local_node.config(PMREPLICA_TCP_TLS=TLS[tls])
    rp = RemotePool.create(local_node.target, "r.set", pool, nlanes=4, attr=attr(),
                           config=config)
    span = 12 * M
    for ln in rp.data_path._lanes:
        assert ln.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) == NOTSENT_LOWAT

    def persists(lane: int) -> None:
        at = HDR_SIZE + lane * span
        for _ in range(3):
            pool[at:at + span] = os.urandom(span)
            rp.persist(at, span, lane)

    assert run_threads(persists, 4) == []
    rp.close()
    end = HDR_SIZE + 4 * span
    assert remote_bytes(parts)[HDR_SIZE:end] == pool[HDR_SIZE:end]


@pytest.fixture(params=["tls", "clear"])
def lane(local_node, request):
    """A raw lane (hand-written client) to a created pool: (socket, parts)."""
    parts = local_node.make_set("r.set")
    session = RawSession(local_node)
    resp = session.create("r.set", SIZE, attr(), nlanes=1,
                          flags=proto.TCP_CLEAR if request.param == "clear" else 0)
    assert resp.status == proto.OK, resp.message
    sock, status = session.lane(resp, 0)
    assert status == 0
    yield sock, parts
    sock.close()
    session.close()


def flushes(count: int, at: int, fill: bytes = b"f") -> bytes:
    """``count`` flushes of 16 bytes from ``at`` on, each flagged ACK_LATER, as one message."""
    return b"".join(OP.pack(OP_WRITE, OPF_ACK_LATER, at + 16 * i, 16) + fill * 16
                    for i in range(count))


def test_every_flush_held_back_is_answered_in_order(lane):
    sock, parts = lane
    sock.sendall(flushes(200, M))
    assert [recv_status(sock) for _ in range(200)] == [0] * 200
    assert remote_bytes(parts)[M:M + 3200] == b"f" * 3200


def test_an_answer_held_back_goes_out_when_no_request_follows(lane):
    """The client sends three flushes and then waits (a drain): the agent must not wait for a
    fourth request before answering the three."""
    sock, _ = lane
    sock.settimeout(5)
    sock.sendall(flushes(3, M))
    assert [recv_status(sock) for _ in range(3)] == [0, 0, 0]
    sock.sendall(flushes(1, 2 * M))  # and the lane goes on
    assert recv_status(sock) == 0


def test_answers_held_back_precede_a_refusal(lane):
    sock, parts = lane
    header = remote_bytes(parts)[:HDR_SIZE]
    sock.sendall(flushes(5, M, b"a") + OP.pack(OP_WRITE, OPF_ACK_LATER, 0, 16) + b"x" * 16)
    assert [recv_status(sock) for _ in range(6)] == [0] * 5 + [errno.EINVAL]
    assert_closed(sock)
    data = remote_bytes(parts)
    assert data[M:M + 80] == b"a" * 80 and data[:HDR_SIZE] == header


def test_a_read_after_flushes_gets_their_answers_first(lane):
    """A hand-written client may read without draining: the answers to its flushes come
    before the read's bytes."""
    sock, _ = lane
    sock.settimeout(5)
    sock.sendall(flushes(4, M, b"r") + OP.pack(OP_READ, 0, M, 64))
    got = b""
    while len(got) < 16 + 64:
        chunk = sock.recv(16 + 64 - len(got))
        assert chunk
        got += chunk
    assert got == bytes(16) + b"r" * 64


def test_the_client_pipelines_flushes_across_lanes_with_a_persist_between(local_node):
    """A persist after flushes on its lane returns once all of them are durable."""
    parts = local_node.make_set("r.set")
    pool = local_pool(SIZE, seed=9)
    with RemotePool.create(local_node.target, "r.set", pool, nlanes=2, attr=attr(),
                           config=local_node.config(PMREPLICA_TCP_TLS="0")) as rp:
        for i in range(1000):
            rp.flush(HDR_SIZE + 64 * i, 64, 0)
        pool[M:M + 5] = b"after"
        rp.persist(M, 5, 0)
        rp.drain(0)
        data = remote_bytes(parts)
        assert data[HDR_SIZE:HDR_SIZE + 64_000] == pool[HDR_SIZE:HDR_SIZE + 64_000]
        assert data[M:M + 5] == b"after"

"""The agent's TCP data lanes against a hand-written client: the session secret, lane
numbers, ranges the agent must refuse (the header, past the pool), garbage operations, over
TLS and in clear text. Whatever is refused leaves the remote pool's bytes as they were."""

from __future__ import annotations

import errno
import os
import socket
import time

import pytest

from pmreplica.header import HDR_SIZE
from rpmem_common import proto
from pmreplica.rpmem.client import RemotePool
from rpmem_common.wire import (HELLO, OP, OP_DEEP, OP_READ, OP_WRITE, SECRET_LEN,
                               split_connection_blob)

from .rpmem_helpers import (M, Node, RawSession, assert_closed, attr, check_no_agents_left,
                            local_pool, recv_status, remote_bytes, write_op)

pytestmark = pytest.mark.timeout(60)

SIZE = 8 * M


@pytest.fixture
def node(pool_dir):
    """TCP only: these tests speak the TCP lane protocol themselves."""
    sets = pool_dir / "sets"
    sets.mkdir()
    node = Node("tcp", "local", "localhost", sets)
    yield node
    check_no_agents_left(node)


@pytest.fixture(params=["tls", "clear"])
def opened(node, request):
    """A created pool (two lanes, nothing connected yet), its lanes over TLS or in clear
    text: (session, response, parts)."""
    parts = node.make_set("r.set")
    session = RawSession(node)
    resp = session.create("r.set", SIZE, attr(), nlanes=2,
                          flags=proto.TCP_CLEAR if request.param == "clear" else 0)
    assert resp.status == proto.OK, resp.message
    yield session, resp, parts
    session.close()


def test_a_lane_with_the_secret_writes_and_reads(opened):
    session, resp, parts = opened
    sock, status = session.lane(resp, 0)
    assert status == 0
    data = os.urandom(100_000)
    assert write_op(sock, OP_WRITE, HDR_SIZE + 5, data) == 0
    assert write_op(sock, OP_DEEP, M, data[:10]) == 0
    # pipelined operations are each acknowledged
    sock.sendall(b"".join(OP.pack(OP_WRITE, 0, 2 * M + i * 10, 10) + bytes([i]) * 10
                          for i in range(20)))
    assert [recv_status(sock) for _ in range(20)] == [0] * 20
    sock.sendall(OP.pack(OP_READ, 0, HDR_SIZE + 5, len(data)))  # answered by the bytes alone
    back = b""
    while len(back) < len(data):
        back += sock.recv(len(data) - len(back))
    assert back == data
    sock.close()
    on_disk = remote_bytes(parts)
    assert on_disk[HDR_SIZE + 5:HDR_SIZE + 5 + len(data)] == data
    assert on_disk[2 * M:2 * M + 200] == b"".join(bytes([i]) * 10 for i in range(20))


@pytest.mark.parametrize("size, cuts", [
    (3000, (5, 17, 24, 1000, 2500)),
    # past its staging buffer the agent receives a write into the pool as it arrives (in
    # clear text polling for the next segment); pauses longer than the polling window find
    # it asleep in the kernel instead
    (M + 12345, (100, 9000, 300_000, 300_001, 700_000))])
def test_an_operation_sent_in_pieces_lands_whole(opened, size, cuts):
    # the header and the payload each split over several segments, and a read asked for
    # in pieces: the agent waits for each whole, never taking a piece for something else
    session, resp, parts = opened
    sock, _ = session.lane(resp, 0)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    data = os.urandom(size)
    message = OP.pack(OP_WRITE, 0, HDR_SIZE + 7, len(data)) + data
    cuts = (0, *cuts, len(message))
    for a, b in zip(cuts, cuts[1:]):
        sock.sendall(message[a:b])
        time.sleep(0.02)
    assert recv_status(sock) == 0
    request = OP.pack(OP_READ, 0, HDR_SIZE + 7, len(data))
    sock.sendall(request[:10])
    time.sleep(0.02)
    sock.sendall(request[10:])
    back = b""
    while len(back) < len(data):
        back += sock.recv(len(data) - len(back))
    assert back == data
    sock.close()
    on_disk = remote_bytes(parts)
    assert on_disk[HDR_SIZE + 7:HDR_SIZE + 7 + len(data)] == data
    assert on_disk[HDR_SIZE + 7 + len(data)] == 0


def test_a_lane_without_the_secret_is_refused(opened):
    session, resp, parts = opened
    before = remote_bytes(parts)
    wrong = bytes(a ^ 1 for a in resp.blob[:SECRET_LEN])
    sock, status = session.lane(resp, 0, secret=wrong)
    assert status == errno.EACCES
    write_op(sock, OP_WRITE, HDR_SIZE, b"x" * 1000)  # ignored: the connection is closed
    assert_closed(sock)
    # no hello at all: an operation header where the hello should be; where a TLS handshake
    # is due, clear text is dropped before any secret is looked at
    raw = socket.create_connection((session.chan.peer_address, resp.port))
    raw.sendall(OP.pack(OP_WRITE, 0, HDR_SIZE, 64).ljust(HELLO.size, b"\0") + b"y" * 64)
    tls = split_connection_blob(resp.blob)[1] is not None
    assert recv_status(raw) == (-1 if tls else errno.EACCES)
    assert_closed(raw)
    assert remote_bytes(parts) == before
    # the real lanes still get in afterwards
    for lane in (0, 1):
        sock, status = session.lane(resp, lane)
        assert status == 0
        sock.close()


def test_lane_numbers_are_checked_and_the_port_closes_when_all_are_in(opened):
    session, resp, _ = opened
    for bad in (2, 0xFFFFFFFF):
        sock, status = session.lane(resp, bad)
        assert status == errno.EINVAL
        assert_closed(sock)
    lane0, status = session.lane(resp, 0)
    assert status == 0
    dup, status = session.lane(resp, 0)
    assert status == errno.EINVAL  # a lane is taken once
    lane1, status = session.lane(resp, 1)
    assert status == 0
    # every lane is connected: the secret opens nothing more
    with pytest.raises(ConnectionRefusedError):
        for _ in range(50):  # the listener closes right after the last lane's hello
            session.lane(resp, 1)[0].close()
    lane0.close()
    lane1.close()


def test_connections_that_say_nothing_do_not_hold_up_the_lanes(opened):
    session, resp, _ = opened
    silent = socket.create_connection((session.chan.peer_address, resp.port))
    dribble = socket.create_connection((session.chan.peer_address, resp.port))
    dribble.sendall(resp.blob[:5])  # part of the secret, then nothing
    t0 = time.monotonic()
    lanes = [session.lane(resp, lane) for lane in (0, 1)]
    assert [status for _, status in lanes] == [0, 0]
    assert time.monotonic() - t0 < 2, "the real lanes waited for the silent connections"
    assert write_op(lanes[1][0], OP_WRITE, HDR_SIZE, b"in") == 0
    for sock in (silent, dribble, *(s for s, _ in lanes)):
        sock.close()


@pytest.mark.parametrize("op,offset,length,payload,answer", [
    (OP_WRITE, 0, 100, 100, errno.EINVAL),  # the header
    (OP_WRITE, HDR_SIZE - 1, 2, 2, errno.EINVAL),  # the header's last byte
    (OP_DEEP, 10, 10, 10, errno.EINVAL),
    (OP_WRITE, SIZE - 10, 11, 11, errno.EINVAL),  # one byte past the end
    (OP_WRITE, SIZE, 1, 1, errno.EINVAL),
    (OP_WRITE, 2**64 - 1, 2, 0, errno.EINVAL),  # offset + length wraps around 64 bits
    (OP_WRITE, HDR_SIZE, 2**64 - 1, 0, errno.EINVAL),  # a length no pool has
    (OP_READ, SIZE - 1, 2, 0, -1),  # a read's answer has no status: the lane just closes
    (99, HDR_SIZE, 4, 4, errno.EINVAL),  # no such operation
    (0, 0, 0, 0, errno.EINVAL),
])
def test_refused_operations_write_nothing_and_close_the_lane(opened, op, offset, length, payload,
                                                            answer):
    session, resp, parts = opened
    before = remote_bytes(parts)
    sock, status = session.lane(resp, 0)
    assert status == 0
    assert write_op(sock, op, offset, b"\xee" * payload, length=length) == answer
    assert_closed(sock)
    assert remote_bytes(parts) == before
    other, status = session.lane(resp, 1)  # the session and its other lanes live on
    assert status == 0
    assert write_op(other, OP_WRITE, HDR_SIZE, b"ok") == 0
    other.close()


def test_the_agent_bounds_writes_by_the_clients_pool_size(node):
    # the remote set holds 8 MiB; the client declared 4 MiB: nothing may land above that
    parts = node.make_set("r.set")
    session = RawSession(node)
    resp = session.create("r.set", 4 * M, attr(), nlanes=1)
    assert resp.status == proto.OK
    sock, _ = session.lane(resp, 0)
    assert write_op(sock, OP_WRITE, 4 * M - 4, b"abcd") == 0
    assert write_op(sock, OP_WRITE, 4 * M, b"efgh") == errno.EINVAL
    session.close()
    on_disk = remote_bytes(parts)
    assert on_disk[4 * M - 4:4 * M + 4] == b"abcd\0\0\0\0"


def test_acknowledgements_before_a_refusal_are_still_sent(opened):
    session, resp, parts = opened
    sock, _ = session.lane(resp, 0)
    sock.sendall(OP.pack(OP_WRITE, 0, HDR_SIZE, 3) + b"one" + OP.pack(OP_WRITE, 0, M, 3) + b"two"
                 + OP.pack(OP_WRITE, 0, 0, 5) + b"three")
    assert [recv_status(sock) for _ in range(3)] == [0, 0, errno.EINVAL]
    assert_closed(sock)
    on_disk = remote_bytes(parts)
    assert on_disk[HDR_SIZE:HDR_SIZE + 3] == b"one" and on_disk[M:M + 3] == b"two"


@pytest.mark.parametrize("length, sent", [(1000, 10), (2 * M, 100_000)])
def test_a_lane_that_ends_mid_payload_writes_only_what_arrived(opened, length, sent):
    session, resp, parts = opened
    sock, _ = session.lane(resp, 0)
    sock.sendall(OP.pack(OP_WRITE, 0, M, length) + b"z" * sent)
    time.sleep(0.05)  # the large write: the agent is receiving (polling) when the stream ends
    sock.close()  # the agent gets some of the bytes, then the end of the stream
    # the session still works and the bytes around the range are untouched
    other, status = session.lane(resp, 1)
    assert status == 0 and write_op(other, OP_WRITE, HDR_SIZE, b"k") == 0
    other.close()
    assert session.request(proto.Request(proto.CLOSE)).status == proto.OK
    on_disk = remote_bytes(parts)
    assert on_disk[M:M + sent] == b"z" * sent
    assert on_disk[M + sent:M + length + 1] == bytes(length + 1 - sent)
    assert on_disk[M - 1:M] == b"\0"


# -- the client's own data path meets the agent's checks -------------------------------------------
def test_agent_side_checks_catch_what_bypasses_the_client_checks(node):
    parts = node.make_set("r.set")
    pool = local_pool(SIZE, seed=3)
    rp = RemotePool.create(node.target, "r.set", pool, nlanes=2, attr=attr(),
                           config=node.config())
    before = remote_bytes(parts)
    data = rp.data_path  # no range checks on this side: the agent's are the last line
    with pytest.raises(OSError) as e:
        data.persist(0, 200, 0)
    assert e.value.errno == errno.EINVAL
    assert remote_bytes(parts)[:HDR_SIZE] == before[:HDR_SIZE]
    with pytest.raises(OSError):
        data.persist(HDR_SIZE, 10, 0)  # the refused lane is not trusted any more
    data.persist(HDR_SIZE, 10, 1)  # the other lane is fine
    assert remote_bytes(parts)[HDR_SIZE:HDR_SIZE + 10] == pool[HDR_SIZE:HDR_SIZE + 10]
    rp.close()

"""Why SO_RCVLOWAT hung lanes (issue 13: earlier work set it and saw lanes hang, reasons never
found), shown on this machine's kernel, and that the client's lanes leave it at one byte.

Linux wakes a thread that sleeps in ``recv`` when at least SO_RCVLOWAT bytes are *unread on
the socket* (``tcp_data_ready`` -> ``tcp_epollin_ready``: ``rcv_nxt - copied_seq``), but a
receive returns once *the call* has copied its target (``min(SO_RCVLOWAT, len)``, or ``len``
with MSG_WAITALL), counting what it copied before it slept. So a receive that has taken part
of a message before the rest arrives sleeps on until SO_RCVLOWAT *more* bytes are unread; when
the rest is shorter than that, nothing wakes it but SO_RCVTIMEO (a lane's op timeout, 60 s),
after which it returns the whole message as if nothing had happened. A lane that set
SO_RCVLOWAT to the answer it expects (the status words of its flushes, a read's bytes) hung
whenever that answer arrived in two pieces and the receive started between them: with TCP
segments of a few status words, often. ``poll`` counts every unread byte, so a poll for
SO_RCVLOWAT bytes followed by a non-blocking receive does not hang: the agent receives a large
clear-text write that way once polling for it gave up (``_fill_batched`` in
``remote_agent/tcp_server.py``, never more than the bytes still to come, and back to one byte
before its next receive; ``tests/test_rpmem_tcp_wire.py`` sends writes in pieces slower than
its polling)."""

from __future__ import annotations

import select
import socket
import struct
import threading
import time

import pytest

from pmreplica.header import HDR_SIZE
from pmreplica.rpmem.client import RemotePool

from .rpmem_helpers import M, attr, local_node, local_pool, transport  # noqa: F401

pytestmark = pytest.mark.timeout(60)

TIMEOUT = 1.5  # SO_RCVTIMEO of the hanging receive: what ends its wait
LATE = 0.2  # the rest of the message arrives this long after the receive started


@pytest.fixture
def pair():
    """Both ends of a loopback TCP connection with TCP_NODELAY, as a lane has."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    for s in (a, b):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", int(TIMEOUT),
                                                                      int(TIMEOUT % 1 * 1e6)))
    yield a, b
    a.close()
    b.close()


def receive_in_two_pieces(receiver: socket.socket, sender: socket.socket,
                          flags: int) -> tuple[bytes, float]:
    """An 8-byte message: 4 bytes before the receive starts, 4 bytes LATE seconds into it.
    What one ``recv_into`` of 8 bytes returned, and when."""
    sender.sendall(b"aaaa")
    time.sleep(0.1)  # the first piece is in the receiver's queue
    rest = threading.Timer(LATE, sender.sendall, (b"bbbb",))
    buf = bytearray(8)
    t0 = time.monotonic()
    rest.start()
    got = receiver.recv_into(buf, 8, flags)
    took = time.monotonic() - t0
    rest.join()
    return bytes(buf[:got]), took


@pytest.mark.parametrize("flags", [0, socket.MSG_WAITALL], ids=["plain", "waitall"])
def test_a_receive_with_rcvlowat_sleeps_past_the_bytes_it_waits_for(pair, flags):
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 8)
    data, took = receive_in_two_pieces(a, b, flags)
    # the whole message was there after LATE seconds; only the receive timeout woke the call
    assert data == b"aaaabbbb"
    assert took > TIMEOUT * 0.9, took


def test_without_rcvlowat_the_same_receive_returns_when_the_bytes_are_there(pair):
    a, b = pair
    data, took = receive_in_two_pieces(a, b, socket.MSG_WAITALL)
    assert data == b"aaaabbbb"
    assert LATE * 0.9 < took < TIMEOUT * 0.5, took


def test_poll_counts_every_unread_byte_against_rcvlowat(pair):
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 8)
    poller = select.poll()
    poller.register(a, select.POLLIN)
    b.sendall(b"aaaa")
    assert poller.poll(100) == []  # 4 of 8 bytes: not readable yet
    threading.Timer(LATE, b.sendall, (b"bbbb",)).start()
    t0 = time.monotonic()
    assert poller.poll(int(TIMEOUT * 1000)) != []
    assert time.monotonic() - t0 < TIMEOUT * 0.5
    assert a.recv(8, socket.MSG_DONTWAIT) == b"aaaabbbb"


def test_the_lanes_leave_rcvlowat_at_one_byte(local_node):
    for tls in ("1", "0"):
        local_node.make_set(f"r{tls}.set")
        with RemotePool.create(local_node.target, f"r{tls}.set", local_pool(8 * M), nlanes=2,
                               attr=attr(), config=local_node.config(PMREPLICA_TCP_TLS=tls)) as rp:
            rp.persist(HDR_SIZE, 64)
            for lane in rp.data_path._lanes:
                assert lane.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1

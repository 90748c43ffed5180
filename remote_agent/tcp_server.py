"""The agent's TCP data path: a listener for the session's lanes and one thread per lane.

Each connection runs the TLS handshake with the session's own certificate (unless the client
asked for clear text), then must present the session's secret (handed to the client on the
authenticated control channel, with the certificate) and an unused lane number; after the
last lane arrives the listener closes, so the secret is good for this session's lanes only.
A WRITE is received with ``recv_into`` straight into the mapped pool (decrypted there by
OpenSSL on a TLS lane; in clear text polling for its next segments while they arrive), made
durable, then acknowledged; a client's flush (``OPF_ACK_LATER``) is acknowledged together
with the operations already waiting behind it, in one send. After each answer the lane polls
for the next request for the client's spin window (``spin.py``) before it sleeps.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import threading
import time
# hmac's constant-time comparison, without hmac's import of hashlib and OpenSSL at every
# agent start
from _operator import _compare_digest as compare_digest

from pmreplica.pmem import Mapping
from rpmem_common.spin import DEFAULT_WINDOW_US, MAX_WINDOW_US, Spinner
from rpmem_common.wire import (HELLO, OP, OP_DEEP, OP_READ, OP_WRITE, OPF_ACK_LATER,
                               SECRET_LEN, STATUS, connection_blob, recv_exact)

from .hellos import accept_hellos

log = logging.getLogger("remote_agent.tcp")

#: the longest a connection may take to present its hello, all told
HELLO_TIMEOUT = 10.0
#: hellos read at once; a connection beyond them is closed unread
MAX_HELLOS = 32
#: lanes must connect within this long after the pool was created or opened
CONNECT_WINDOW = 60.0
_OK = STATUS.pack(0)
_EINVAL = STATUS.pack(errno.EINVAL)
#: the staging buffer of a lane: the most bytes of requests one receive takes
STAGE = 8192 + OP.size
#: the most acknowledgements a lane holds back: they go out in one send of this many words
ACK_BATCH = 64
_OKS = memoryview(bytes(STATUS.size * ACK_BATCH))
#: a clear-text write whose receive stopped polling sleeps until this many of its bytes (or all
#: that remain) have arrived, not until the next segment: on a CPU shared with its sender a
#: stream of 16 MiB persists ran 1.2-1.35x as fast (256-512 KiB batches gained nothing here,
#: 4 MiB lost: more than the receive buffer holds)
BATCH = 1 << 20
_WAITALL = socket.MSG_WAITALL
_DONTWAIT = socket.MSG_DONTWAIT


def listen_address() -> str:
    """The address the SSH connection came in on (SSH_CONNECTION's server field), so data
    flows over the same network as the login; loopback when started without SSH."""
    fields = os.environ.get("SSH_CONNECTION", "").split()
    return fields[2] if len(fields) == 4 else "127.0.0.1"


class TcpServer:
    """Serves the data lanes of one open pool, over TLS with ``tls``; ``blob`` is what the
    client needs to connect them (the secret and the certificate)."""

    def __init__(self, mapping: Mapping, pool_size: int, data_offset: int, nlanes: int,
                 address: str | None = None, tls: bool = True,
                 spin_us: int | None = None) -> None:
        self.mapping = mapping
        #: how long a lane polls for the next request: the client's window (None: it did
        #: not say), at most MAX_WINDOW_US
        self.spin_us = min(DEFAULT_WINDOW_US if spin_us is None else spin_us, MAX_WINDOW_US)
        self.pool_size = pool_size
        self.data_offset = data_offset
        self.nlanes = nlanes
        self.secret = os.urandom(SECRET_LEN)
        self.identity = None
        if tls:
            from rpmem_common import tls as _tls  # ssl loads only for TLS
            self.identity = _tls.AgentIdentity()
        self.blob = connection_blob(self.secret, self.identity and self.identity.certificate)
        addr = address or listen_address()
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        self._listener = socket.create_server((addr, 0), family=family,
                                               backlog=max(16, nlanes))
        self.port = self._listener.getsockname()[1]
        self._lanes: dict[int, socket.socket] = {}
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closing = False
        self._acceptor = threading.Thread(target=self._accept, name="accept", daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        accept_hellos(self._listener, CONNECT_WINDOW, MAX_HELLOS,
                      lambda: len(self._lanes) < self.nlanes, self._admit)

    def _admit(self, conn: socket.socket, peer: object) -> None:
        """Check the secret and lane of a new connection; start its thread or drop it."""
        try:
            deadline = time.monotonic() + HELLO_TIMEOUT
            conn.settimeout(HELLO_TIMEOUT)
            if self.identity is not None:
                conn = self.identity.wrap(conn)  # the handshake, within the timeout
            raw = recv_exact(conn, HELLO.size, deadline)
            secret, lane = HELLO.unpack(raw)
            if not compare_digest(secret, self.secret):
                log.warning("data connection from %s refused: wrong session secret", peer)
                conn.sendall(STATUS.pack(errno.EACCES))
                conn.close()
                return
            with self._lock:
                if not 0 <= lane < self.nlanes or lane in self._lanes or self._closing:
                    conn.sendall(STATUS.pack(errno.EINVAL))
                    conn.close()
                    return
                self._lanes[lane] = conn
                if len(self._lanes) == self.nlanes:
                    try:  # every lane is in: wake the acceptor, the secret opens no more
                        self._listener.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
            conn.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.sendall(_OK)
        except (OSError, ValueError) as e:
            log.info("data connection from %s dropped during hello: %s", peer, e)
            conn.close()
            return
        t = threading.Thread(target=self._serve_lane, args=(lane, conn), name=f"lane {lane}",
                             daemon=True)
        t.start()
        with self._lock:
            self._threads.append(t)

    def _serve_lane(self, lane: int, conn: socket.socket) -> None:
        """Apply the lane's operations in order.

        Requests are received into a small staging buffer, as many as have arrived (at most
        :data:`STAGE` bytes): a small write costs one receive for its header and payload
        together, and pipelined flushes one receive for dozens, the payload copied into the
        pool from there (a copy of a few KiB costs less than a system call). What a write
        has beyond the staged bytes is received straight into the pool, with MSG_WAITALL in
        one system call.

        A flush's acknowledgement is held back only while the next operation has already
        begun to arrive, which the client sends whole without waiting for anything: so the
        lane never waits for a request while it holds answers a client may be waiting for,
        and pipelining cannot deadlock (tests/test_rpmem_pipeline.py)."""
        stage = bytearray(STAGE)
        staged = memoryview(stage)
        start = end = 0  # the bytes staged and not yet used: stage[start:end]
        pool = self.mapping.buf
        persist, deep = self.mapping.persist, self.mapping.deep_persist
        flush_needed = self.mapping.flush_needed
        lo, hi = self.data_offset, self.pool_size
        recv_into, send, send_some = conn.recv_into, conn.sendall, conn.send
        unpack_from, hdr_size, word = OP.unpack_from, OP.size, STATUS.size
        spin = Spinner(conn.fileno(), self.spin_us, getattr(conn, "pending", None))
        wait, ready, more = spin.wait, spin.ready, spin.more
        # a TLS lane decrypts into the pool in OpenSSL's own pieces: it receives blocking
        polling = self.identity is None
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLIN)
        held = 0  # acknowledgements not sent yet
        try:
            while True:
                if end - start < hdr_size:  # receive: the next requests, or a header's rest
                    if start == end:
                        if held:
                            pass  # held answers: the next request is arriving already
                        elif spin.skip:  # Spinner.wait's first test, without its call
                            spin.skip -= 1
                        else:
                            wait()
                        start, end = 0, recv_into(stage)
                        if not end:
                            return  # the client closed the lane
                    else:
                        staged[:end - start] = staged[start:end]
                        end -= start
                        start = 0
                        got = recv_into(staged[end:], STAGE - end)
                        if not got:
                            return
                        end += got
                    if end - start < hdr_size:
                        continue
                op, flags, off, length = unpack_from(stage, start)
                start += hdr_size
                stop = off + length
                if op == OP_READ:
                    if held:  # the answers to earlier writes come first
                        send(_OKS[:held * word])
                        held = 0
                    if stop > hi:
                        # a read's answer is its bytes alone (wire.py): refuse by closing
                        log.warning("lane %d: refused read at %d+%d", lane, off, length)
                        return
                    sent = send_some(pool[off:stop])
                    if sent < length:  # a large read: the rest
                        send(pool[off + sent:stop])
                    continue
                if op not in (OP_WRITE, OP_DEEP) or off < lo or stop > hi:
                    # never write outside the pool's data; the stream cannot be trusted
                    log.warning("lane %d: refused op %d at %d+%d", lane, op, off, length)
                    send(bytes(held * word) + _EINVAL)
                    return
                if end - start >= length:
                    pool[off:stop] = staged[start:start + length]
                    start += length
                else:  # the staged part, then the rest straight into the pool
                    have = end - start
                    pool[off:off + have] = staged[start:end]
                    start = end = 0
                    rest = pool[off + have:stop]
                    if not (_fill_polling(conn, rest, more, poller.poll) if polling
                            else _fill(recv_into, rest)):
                        return
                if flush_needed and length:
                    try:
                        (deep if op == OP_DEEP else persist)(off, length)
                    except OSError as e:
                        log.error("lane %d: making %d+%d durable failed: %s", lane, off, length,
                                  e)
                        send(bytes(held * word) + STATUS.pack(e.errno or errno.EIO))
                        return
                if flags & OPF_ACK_LATER:
                    held += 1
                    if held < ACK_BATCH and (start < end or ready()):
                        continue
                    send(_OKS[:held * word])
                    held = 0
                elif held:
                    send(_OKS[:(held + 1) * word])
                    held = 0
                else:
                    send(_OK)
        except OSError as e:
            if e.errno == errno.EBADMSG:  # a TLS record failed its check: altered on the way
                log.warning("lane %d: closed on a record that fails its check: %s", lane, e)
            elif not self._closing:
                log.info("lane %d: connection lost: %s", lane, e)
        finally:
            conn.close()

    def close(self) -> None:
        """Stop every lane (their connections are shut down) and the listener."""
        with self._lock:
            self._closing = True
            lanes = list(self._lanes.values())
        try:
            self._listener.close()
        except OSError:
            pass
        for conn in lanes:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(5.0)


def _fill_polling(conn: socket.socket, view: memoryview, more, readable) -> bool:
    """Receive exactly ``len(view)`` bytes into ``view`` from a clear-text lane, taking what has
    arrived and polling for the rest (``more``, the lane's Spinner.more) while it is on its
    way; in batches (:func:`_fill_batched`) once polling gives up. A receiver that sleeps
    until the next segment pays a wake-up for each and finishes that much later after the last
    (a stream of 1 MiB persists, client and agent on two vCPUs, ran 1.3-1.7x as fast
    polling). ``readable(0)`` asks first, so the receive never finds nothing: an EAGAIN would
    cost more than the poll (Python builds an OSError with its strerror text). False on end of
    stream."""
    recv_into = conn.recv_into
    got, n = 0, len(view)
    while got < n:
        if not readable(0) and not more():
            return _fill_batched(conn, view[got:], readable)
        r = recv_into(view[got:])  # bytes are there (or the end, or an error): no wait
        if not r:
            return False
        got += r
    return True


def _fill_batched(conn: socket.socket, view: memoryview, readable) -> bool:
    """Receive exactly ``len(view)`` bytes into ``view``, sleeping each time until
    :data:`BATCH` of them (or all that remain) have arrived: SO_RCVLOWAT holds the wake-up
    back for ``readable`` (the lane's ``poll``), and the receive that follows does not block.
    A blocking receive under SO_RCVLOWAT could sleep past its last bytes
    (tests/test_tcp_rcvlowat.py); a ``poll`` cannot, since every byte counted is still to
    come. SO_RCVLOWAT is back at 1 when this returns. False on end of stream."""
    recv_into, setsockopt = conn.recv_into, conn.setsockopt
    got, n = 0, len(view)
    low = 1
    try:
        while got < n:
            if not readable(0):  # (often the rest came while polling gave way to its sender)
                want = min(BATCH, n - got)
                if want != low:
                    setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, want)
                    low = want
                readable()  # the batch is in, the stream ended or failed, or the lane shut down
            try:
                r = recv_into(view[got:], 0, _DONTWAIT)
            except BlockingIOError:
                continue
            if not r:
                return False
            got += r
    finally:
        if low != 1:
            setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
    return True


def _fill(recv_into, view: memoryview) -> bool:
    """Receive exactly ``len(view)`` bytes into ``view``; False on end of stream. MSG_WAITALL
    lets the kernel gather the whole payload in one call, with the GIL released throughout,
    so the lanes' threads do not take turns at the GIL for every segment."""
    got, n = 0, len(view)
    while got < n:
        r = recv_into(view[got:] if got else view, 0, _WAITALL)
        if not r:
            return False
        got += r
    return True

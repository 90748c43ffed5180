"""The agent's side of the session heartbeat: echo the client's pings, end the session when
they stop.

The client pings on a TCP connection of its own (the same network as the data lanes) and
declares the agent dead when an echo is overdue. The agent judges the client the same way:
pings that stop for :func:`silence_limit` of the client's peer timeout mean the client died,
froze or lost the network, and the session ends (the pool's lock goes with it), so that the
replica can be opened again once the client, or the network, is back. What the client was
told is durable stays durable: every write is made durable before it is acknowledged.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
# hmac's constant-time comparison, without hmac's import of hashlib and OpenSSL at every
# agent start
from _operator import _compare_digest as compare_digest

from rpmem_common.wire import (HEARTBEAT, HEARTBEAT_HELLO, PING, SECRET_LEN,
                               STATUS, recv_exact)

from .hellos import accept_hellos

log = logging.getLogger("remote_agent.heartbeat")

#: the client must connect its heartbeat within this long of the agent's start
CONNECT_WINDOW = 30.0
#: the longest a connection may take to present its hello, all told
HELLO_TIMEOUT = 10.0
#: hellos read at once; a connection beyond them is closed unread
MAX_HELLOS = 16
#: the fewest seconds of silence that end a session, whatever the client's timeout
MIN_SILENCE = 3.0


def silence_limit(peer_timeout: float) -> float:
    """How long the agent waits for a ping before it gives the client up: longer than the
    client waits for an echo, so a client that is merely slow is not cut off first."""
    return max(MIN_SILENCE, 3 * peer_timeout)


class Heartbeat:
    """Listens for the session's heartbeat connection and echoes its pings in a thread;
    ``on_lost(reason)`` is called once when the client goes silent or away."""

    def __init__(self, address: str, on_lost: Callable[[str], None]) -> None:
        self.secret = os.urandom(SECRET_LEN)
        self._on_lost = on_lost
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self._listener = socket.create_server((address, 0), family=family, backlog=16)
        self.port: int = self._listener.getsockname()[1]
        self._stopping = False
        #: the connection that presented the secret, and its silence limit
        self._won: tuple[socket.socket, float] | None = None
        threading.Thread(target=self._run, name="heartbeat", daemon=True).start()

    @property
    def blob(self) -> bytes:
        """What READY carries for the client: port and secret."""
        return HEARTBEAT.pack(self.port, self.secret)

    def _run(self) -> None:
        conn = self._accept()
        if conn is None:
            if not self._stopping:
                self._on_lost(f"the client did not connect its heartbeat within "
                              f"{CONNECT_WINDOW:g} s")
            return
        conn, limit = conn
        reason = self._echo(conn, limit)
        if not self._stopping:
            self._on_lost(reason)

    def _accept(self) -> tuple[socket.socket, float] | None:
        """The first connection that presents the secret, with its silence limit; each hello
        is read within HELLO_TIMEOUT all told (the client's connect waits a few seconds only).
        One heartbeat per session: the listener closes after it."""
        accept_hellos(self._listener, CONNECT_WINDOW, MAX_HELLOS,
                      lambda: self._won is None, self._hello)
        return self._won  # None: the window passed, or stop()

    def _hello(self, conn: socket.socket, peer: object) -> None:
        """Check a connection's secret; the first that presents it wins and ends accepting."""
        try:
            secret, timeout_ms = HEARTBEAT_HELLO.unpack(
                recv_exact(conn, HEARTBEAT_HELLO.size, time.monotonic() + HELLO_TIMEOUT))
            if not compare_digest(secret, self.secret):
                log.warning("heartbeat connection from %s refused: wrong secret", peer)
                conn.sendall(STATUS.pack(errno.EACCES))
                conn.close()
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.sendall(STATUS.pack(0))
            limit = silence_limit(max(timeout_ms, 1) / 1000)
            conn.settimeout(limit)
            self._won = (conn, limit)
            try:  # wakes the accept()
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        except OSError as e:
            log.info("heartbeat connection from %s dropped during hello: %s", peer, e)
            conn.close()

    def _echo(self, conn: socket.socket, limit: float) -> str:
        """Echo pings until the client stops; why it stopped."""
        ping = bytearray(PING.size)
        try:
            while True:
                got = conn.recv_into(ping, PING.size, socket.MSG_WAITALL)
                if got != PING.size:
                    return "the client closed its heartbeat"
                conn.sendall(ping)
        except TimeoutError:
            return f"no heartbeat from the client for {limit:g} s"
        except OSError as e:
            return f"the client's heartbeat failed: {e.strerror or e}"
        finally:
            conn.close()

    def stop(self) -> None:
        """The session ends normally: stop listening; a connected heartbeat ends with the
        process."""
        self._stopping = True
        try:  # wakes the accept() (a close from another thread would not)
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

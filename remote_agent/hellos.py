"""Accepting connections that must present a hello (the data lanes', the heartbeat's).

Each connection's hello is read in a thread of its own, so that one that says nothing, or a
byte at a time, does not hold up the client's behind it; at most ``limit`` are read at once
(beyond them a connection is closed unread: a flood, not the client), and the listener takes
connections for ``window`` seconds in all, not ``window`` from each one.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable


def accept_hellos(listener: socket.socket, window: float, limit: int,
                  wanted: Callable[[], bool],
                  admit: Callable[[socket.socket, object], None]) -> None:
    """Hand each connection to ``admit(conn, peer)`` in a thread, while ``wanted()`` and for
    ``window`` seconds at most, or until the listener is shut down (an admit that got the
    last connection wanted does so to end the wait); then close the listener."""
    hellos = threading.BoundedSemaphore(limit)

    def admit_one(conn: socket.socket, peer: object) -> None:
        try:
            admit(conn, peer)
        finally:
            hellos.release()

    deadline = time.monotonic() + window
    try:
        while wanted():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            listener.settimeout(left)
            try:
                conn, peer = listener.accept()
            except OSError:  # the window passed, or the listener was shut down
                break
            if not hellos.acquire(blocking=False):
                conn.close()
                continue
            threading.Thread(target=admit_one, args=(conn, peer), name="hello",
                             daemon=True).start()
    finally:
        listener.close()

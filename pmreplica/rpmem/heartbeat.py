"""Failure detection for remote pools: a heartbeat per agent session, watched by one thread.

Each session's agent answers pings on a TCP connection of its own, on the network the data
lanes use (``remote_agent/heartbeat.py``). One monitor thread per process sends every watched
session a ping each quarter of its peer timeout and declares the peer dead when no echo has
come for the whole timeout: a host that lost its network, froze or crashed is found within
the timeout whether the pool is busy or idle, and the persist path pays nothing for it. A
heartbeat connection that closes or resets (the agent was killed; its host's kernel still
answers) is a death at once.

A peer that is merely slow keeps echoing (the agent's heartbeat thread runs beside its
lanes), so a stall shorter than the timeout costs nothing. The monitor distrusts its own
clock: when it was itself kept from running for half a timeout or more (the process was
stopped, the machine suspended), every watch gets a fresh timeout instead of a verdict.
An idle monitor sleeps in ``select`` between pings: a few wake-ups a second per session.
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable

from rpmem_common.wire import HEARTBEAT_HELLO, PING, STATUS, recv_exact

from ..errors import RemoteError

log = logging.getLogger(__name__)

#: pings per peer timeout
PINGS_PER_TIMEOUT = 4

OnDead = Callable[[RemoteError], None]


class Watch:
    """One watched session. :meth:`cancel` ends the watch (the session closes normally)."""

    __slots__ = ("sock", "name", "timeout", "interval", "on_dead", "seq", "heard", "next_ping",
                 "ended", "_monitor")

    def __init__(self, monitor: "Monitor", sock: socket.socket, name: str, timeout: float,
                 on_dead: OnDead) -> None:
        self._monitor = monitor
        self.sock = sock
        self.name = name
        self.timeout = timeout
        self.interval = timeout / PINGS_PER_TIMEOUT
        self.on_dead = on_dead
        self.seq = 0
        self.heard = self.next_ping = time.monotonic()
        self.ended = False

    def cancel(self) -> None:
        """Stop watching and close the heartbeat connection (the agent then knows the client
        is gone, so cancel only after the session's last request was answered)."""
        self._monitor.cancel(self)


class Monitor:
    """The thread that pings every watched session (started with the first watch)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._added: list[Watch] = []
        self._cancelled: list[Watch] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._thread: threading.Thread | None = None

    def watch(self, sock: socket.socket, name: str, timeout: float, on_dead: OnDead) -> Watch:
        """Watch the connected, greeted heartbeat ``sock``; ``on_dead(error)`` is called once,
        in a thread of its own, when the peer is found dead."""
        sock.setblocking(False)
        w = Watch(self, sock, name, timeout, on_dead)
        with self._lock:
            self._added.append(w)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pmreplica heartbeat",
                                                daemon=True)
                self._thread.start()
        self._wake()
        return w

    def cancel(self, w: Watch) -> None:
        with self._lock:
            if w.ended:
                return
            w.ended = True
            self._cancelled.append(w)
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except BlockingIOError:
            pass  # a wake-up is pending already

    # -- the thread ------------------------------------------------------------------------
    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        watches: set[Watch] = set()
        ping = bytearray(PING.size)
        while True:
            with self._lock:
                added, self._added = self._added, []
                cancelled, self._cancelled = self._cancelled, []
            for w in added:
                if not w.ended:
                    sel.register(w.sock, selectors.EVENT_READ, w)
                    watches.add(w)
            for w in cancelled:
                if w in watches:
                    watches.discard(w)
                    sel.unregister(w.sock)
                w.sock.close()
            before = time.monotonic()
            sleep = self._sleep(watches, before)
            events = sel.select(sleep)
            now = time.monotonic()
            if sleep is not None and now - (before + sleep) >= min(
                    w.timeout for w in watches) / 2:
                # this thread itself did not run for a while: no verdict from that gap
                for w in watches:
                    w.heard = now
            for key, _ in events:
                w = key.data
                if w is None:
                    self._drain_wake()
                elif w in watches and not w.ended:  # not cancelled since the select
                    self._receive(sel, watches, w)
            now = time.monotonic()
            for w in list(watches):
                if now - w.heard >= w.timeout:
                    self._dead(sel, watches, w, RemoteError(
                        errno.ETIMEDOUT, f"{w.name}: no answer from the agent's host for "
                                         f"{w.timeout:g} s (PMREPLICA_PEER_TIMEOUT)"))
                elif now >= w.next_ping:
                    w.seq += 1
                    PING.pack_into(ping, 0, w.seq)
                    try:
                        w.sock.send(ping, socket.MSG_NOSIGNAL)
                    except BlockingIOError:
                        pass  # 8 bytes a ping: a full buffer means no echo is coming either
                    except OSError as e:
                        self._dead(sel, watches, w, RemoteError(
                            e.errno or errno.ECONNRESET,
                            f"{w.name}: heartbeat connection failed: {e.strerror or e}"))
                        continue
                    w.next_ping = now + w.interval

    def _receive(self, sel: selectors.BaseSelector, watches: set[Watch], w: Watch) -> None:
        """Take the echoes that arrived (any byte is a sign of life), or the connection's end."""
        try:
            if w.sock.recv(4096):
                w.heard = time.monotonic()
                return
            why = "the agent closed its heartbeat connection (the agent is gone)"
        except BlockingIOError:
            return
        except OSError as e:
            why = f"heartbeat connection failed: {e.strerror or e}"
        self._dead(sel, watches, w, RemoteError(errno.ECONNRESET, f"{w.name}: {why}"))

    @staticmethod
    def _sleep(watches: set[Watch], now: float) -> float | None:
        """Seconds until the next ping or verdict is due (None: nothing to watch)."""
        if not watches:
            return None
        due = min(min(w.next_ping, w.heard + w.timeout) for w in watches)
        return max(0.0, due - now)

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(256):
                pass
        except BlockingIOError:
            pass

    def _dead(self, sel: selectors.BaseSelector, watches: set[Watch], w: Watch,
              error: RemoteError) -> None:
        watches.discard(w)
        sel.unregister(w.sock)
        with self._lock:
            w.ended = True
        w.sock.close()
        log.debug("%s", error.strerror)  # the session says it, unless it was ending anyway
        # in a thread of its own: a slow handler must not hold up the verdict on others
        threading.Thread(target=_call, args=(w.on_dead, error), name=f"lost {w.name}",
                         daemon=True).start()


def _call(on_dead: OnDead, error: RemoteError) -> None:
    try:
        on_dead(error)
    except Exception:  # the failure is reported already; a handler's bug must not hide it
        log.exception("handling the loss of a remote pool failed")


_monitor: Monitor | None = None
_monitor_lock = threading.Lock()


def monitor() -> Monitor:
    """The process's monitor."""
    global _monitor
    with _monitor_lock:
        if _monitor is None:
            _monitor = Monitor()
        return _monitor


def _forget() -> None:
    global _monitor, _monitor_lock
    _monitor, _monitor_lock = None, threading.Lock()  # a forked child has no monitor thread


os.register_at_fork(after_in_child=_forget)


def connect(host: str, port: int, secret: bytes, timeout: float, connect_timeout: float,
            name: str, on_dead: OnDead) -> Watch:
    """Open the heartbeat connection of a session and watch it."""
    try:
        sock = socket.create_connection((host, port), timeout=connect_timeout)
    except OSError as e:
        raise RemoteError(e.errno or (errno.ETIMEDOUT if isinstance(e, TimeoutError)
                                      else errno.ECONNREFUSED),
                          f"{name}: cannot open the heartbeat connection to {host}:{port}: "
                          f"{e.strerror or e}") from None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(HEARTBEAT_HELLO.pack(secret, max(1, int(timeout * 1000))),
                     socket.MSG_NOSIGNAL)
        (status,) = STATUS.unpack(recv_exact(sock, STATUS.size))
        if status:
            raise RemoteError(status, f"{name}: agent refused the heartbeat connection")
    except OSError as e:
        sock.close()
        if isinstance(e, RemoteError):
            raise
        raise RemoteError(e.errno or errno.ECONNRESET,
                          f"{name}: heartbeat hello failed: {e.strerror or e}") from None
    return monitor().watch(sock, name, timeout, on_dead)

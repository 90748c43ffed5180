"""The paramiko launcher's connections, kept: one authenticated SSH connection per target, a
new session channel on it for each later launch (two round trips instead of a key exchange
and a login). A connection that died is dropped and replaced; when the server's MaxSessions
is reached a further connection is opened. Connecting itself: :mod:`.connect`.
"""

from __future__ import annotations

import atexit
import errno
import logging
import os
import threading

import paramiko

from pmreplica.errors import RemoteError
from pmreplica.rpmem.ssh.connect import connect
from pmreplica.rpmem.ssh.settings import SshSettings

log = logging.getLogger("pmreplica.rpmem.launch")


class ConnectionPool:
    """Authenticated transports by :class:`SshSettings`; thread-safe. Closed at exit; forgotten
    (not closed: the parent owns them) in a forked child."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._transports: dict[SshSettings, list[paramiko.Transport]] = {}
        self._connecting: dict[SshSettings, threading.Lock] = {}

    def transports(self, s: SshSettings) -> list[paramiko.Transport]:
        with self._lock:
            return list(self._transports.get(s, ()))

    def discard(self, s: SshSettings, t: paramiko.Transport) -> None:
        """Forget and close the connection ``t`` (dead, or to a host that stopped answering)."""
        with self._lock:
            pool = self._transports.get(s, [])
            if t in pool:
                pool.remove(t)
        t.close()

    def _try(self, s: SshSettings, t: paramiko.Transport,
             timeout: float) -> paramiko.Channel | None:
        """A session channel on ``t``; None when ``t`` is dead (then dropped) or full. A
        connection that does not answer within ``timeout`` leads to a host that went away
        since (a cut link sends no reset): it is dropped too."""
        if not t.is_active():
            log.info("%s: SSH connection lost; reconnecting", s.target)
            self.discard(s, t)
            return None
        try:
            return t.open_session(timeout=timeout)
        except paramiko.ChannelException as exc:
            log.debug("%s: connection refuses another session (%s)", s.target, exc)
            return None
        except (paramiko.SSHException, EOFError, OSError) as exc:
            log.info("%s: SSH connection failed (%s); reconnecting", s.target, exc)
            self.discard(s, t)
            return None

    def open_session(self, s: SshSettings, accept_new: bool, reuse_timeout: float
                     ) -> tuple[paramiko.Transport, paramiko.Channel]:
        """A new session channel to ``s``, on a cached connection when one has room and
        answers within ``reuse_timeout`` (a new connection gets ConnectTimeout)."""
        tried: set[int] = set()
        for t in self.transports(s):
            tried.add(id(t))
            chan = self._try(s, t, min(reuse_timeout, s.connect_timeout))
            if chan is not None:
                return t, chan
        with self._lock:
            gate = self._connecting.setdefault(s, threading.Lock())
        with gate:  # one connect per target at a time; latecomers use its result
            for t in self.transports(s):
                if id(t) not in tried:
                    chan = self._try(s, t, min(reuse_timeout, s.connect_timeout))
                    if chan is not None:
                        return t, chan
            t = connect(s, accept_new)
            with self._lock:
                self._transports.setdefault(s, []).append(t)
        try:
            return t, t.open_session(timeout=s.connect_timeout)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            self.discard(s, t)
            raise RemoteError(errno.ECONNABORTED,
                              f"{s.target}: server refused a session channel: {exc}") from None

    def close_all(self) -> None:
        """Close every cached connection (channels on them end too)."""
        with self._lock:
            transports = [t for pool in self._transports.values() for t in pool]
            self._transports.clear()
        for t in transports:
            t.close()

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._transports = {}
        self._connecting = {}


POOL = ConnectionPool()
atexit.register(POOL.close_all)
os.register_at_fork(after_in_child=POOL._forget)


def close_connections() -> None:
    """Close all cached SSH connections (the next launch connects afresh)."""
    POOL.close_all()

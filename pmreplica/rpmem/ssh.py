"""The paramiko launcher: one authenticated SSH connection per target, an exec channel per agent.

The first launch to a target connects (:mod:`.ssh_connect`) as its ssh config says
(:mod:`.ssh_settings`: HostName, User, Port, IdentityFile, IdentitiesOnly, IdentityAgent,
UserKnownHostsFile, GlobalKnownHostsFile, HostKeyAlias, HashKnownHosts, ProxyCommand,
AddressFamily, ConnectTimeout, ServerAliveInterval, with Include and %-tokens), checks the
host key (:mod:`.ssh_host_key`: known_hosts, @revoked, @cert-authority) and logs in
(:mod:`.ssh_auth`: the agent's keys, then key files). Later launches to the same target
open a new session channel on that connection, which costs two round trips instead of a
key exchange and a login. A connection that died is dropped and replaced; when the
server's MaxSessions is reached a further connection is opened.

A target whose config asks for what paramiko cannot do (ProxyJump, CertificateFile, Match
exec, ...: :class:`NeedsOpenSSH`) is handed to the OpenSSH launcher, said once in the log.
Password and keyboard-interactive logins are never tried (BatchMode). StrictHostKeyChecking
in the file is not read: unknown host keys are refused unless PMREPLICA_SSH_ACCEPT_NEW=1.
"""

from __future__ import annotations

import atexit
import errno
import logging
import os
import socket
import threading

import paramiko

from pmreplica.errors import RemoteError
from pmreplica.rpmem.address import Target
from pmreplica.rpmem.channel import AgentChannel, StderrTail
from pmreplica.rpmem.config import RpmemConfig
from pmreplica.rpmem.launch import OpenSSHLauncher
from pmreplica.rpmem.ssh_connect import addresses, connect
from pmreplica.rpmem.ssh_settings import NeedsOpenSSH, SshSettings, resolve

__all__ = ["ConnectionPool", "NeedsOpenSSH", "POOL", "ParamikoChannel", "ParamikoLauncher",
           "SshSettings", "close_connections", "connect", "resolve"]

log = logging.getLogger("pmreplica.rpmem.launch")


# -- the connection cache -------------------------------------------------------------------
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


# -- the channel ------------------------------------------------------------------------------
class ParamikoChannel(AgentChannel):
    """An agent on an SSH exec channel of a (shared) paramiko transport."""

    def __init__(self, target: Target, command: str, transport: paramiko.Transport,
                 channel: paramiko.Channel, settings: SshSettings,
                 pool: "ConnectionPool") -> None:
        super().__init__(target, command)
        self.transport = transport  # shared with other channels to the same target
        self._chan = channel
        self._settings = settings
        self._pool = pool
        self._peer_address: str | None = None
        self._stderr = StderrTail(channel.recv_stderr, str(target))

    @property
    def peer_address(self) -> str:
        if self._peer_address is None:
            sock = self.transport.sock
            if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
                self._peer_address = str(sock.getpeername()[0])
            else:  # through a ProxyCommand: where the host name leads
                infos = addresses(self._settings)
                self._peer_address = str(infos[0][4][0])
        return self._peer_address

    def _send(self, data: bytes | bytearray | memoryview) -> None:
        self._chan.sendall(data)

    def _recv(self, buf: memoryview) -> int:
        data = self._chan.recv(len(buf))
        buf[:len(data)] = data
        return len(data)

    def settimeout(self, timeout: float | None) -> None:
        self._chan.settimeout(timeout)

    def fileno(self) -> int:
        return self._chan.fileno()

    def _wait_exit(self, timeout: float) -> int | None:
        if timeout:
            self._chan.status_event.wait(timeout)
        if not self._chan.status_event.is_set():
            return None
        status = self._chan.exit_status
        return status if status >= 0 else None

    def _abandon(self) -> None:
        # the connection leads to a host that stopped answering: no later launch may use it
        self._pool.discard(self._settings, self.transport)
        super()._abandon()

    def _shutdown(self, timeout: float) -> int | None:
        try:
            self._chan.shutdown_write()
        except (OSError, EOFError, paramiko.SSHException):
            pass
        status = self._wait_exit(timeout)
        if status is None and timeout and not self._chan.status_event.is_set():
            log.warning("%s: agent did not exit within %.1f s of its stdin closing; closing "
                        "its channel", self.target, timeout)
        self._chan.close()
        return status


class ParamikoLauncher:
    """Starts agents over paramiko SSH connections from the shared :data:`POOL`; a target whose
    config needs the OpenSSH client is started through :class:`OpenSSHLauncher` instead."""

    name = "paramiko"

    def __init__(self, config: RpmemConfig, pool: ConnectionPool = POOL) -> None:
        self.config = config
        self.pool = pool

    def launch(self, target: Target, command: str) -> AgentChannel:
        try:
            s = resolve(target, self.config)
        except NeedsOpenSSH as why:
            return self._through_openssh(target, command, why.strerror)
        for attempt in (1, 2):
            t, chan = self.pool.open_session(s, self.config.ssh_accept_new,
                                             self.config.connect_timeout)
            try:
                chan.exec_command(command)
            except (paramiko.SSHException, EOFError, OSError) as exc:
                chan.close()
                if attempt == 1 and not t.is_active():
                    self.pool.discard(s, t)
                    continue  # the cached connection died under us: once more on a new one
                raise RemoteError(errno.ECONNABORTED,
                                  f"{target}: server refused to run {command!r}: {exc}") from None
            return ParamikoChannel(target, command, t, chan, s, self.pool)
        raise AssertionError("unreachable")

    def _through_openssh(self, target: Target, command: str, why: str) -> AgentChannel:
        if (target, why) not in _HANDED_OVER:
            _HANDED_OVER.add((target, why))
            log.warning("%s: using the OpenSSH client (%s): the paramiko launcher cannot do %s",
                        target, " ".join(self.config.ssh_argv0), why)
        return OpenSSHLauncher(self.config).launch(target, command)


#: (target, reason) pairs already said in the log, so a reconnecting pool says it once
_HANDED_OVER: set[tuple[Target, str]] = set()

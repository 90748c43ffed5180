"""The paramiko launcher: starts each agent on an exec channel (:mod:`.exec_channel`) of the
target's kept connection (:mod:`.connections`).

The first launch to a target connects (:mod:`.connect`) as its ssh config says
(:mod:`.settings`: HostName, User, Port, IdentityFile, IdentitiesOnly, IdentityAgent,
UserKnownHostsFile, GlobalKnownHostsFile, HostKeyAlias, HashKnownHosts, ProxyCommand,
AddressFamily, ConnectTimeout, ServerAliveInterval, with Include and %-tokens), checks the
host key (:mod:`.host_key`: known_hosts, @revoked, @cert-authority) and logs in
(:mod:`.auth`: the agent's keys, then key files).

A target whose config asks for what paramiko cannot do (ProxyJump, CertificateFile, Match
exec, ...: :class:`NeedsOpenSSH`) is handed to the OpenSSH launcher, said once in the log.
Password and keyboard-interactive logins are never tried (BatchMode). StrictHostKeyChecking
in the file is not read: unknown host keys are refused unless PMREPLICA_SSH_ACCEPT_NEW=1.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable

import paramiko

from pmreplica.errors import RemoteError
from pmreplica.rpmem.address import Target
from pmreplica.rpmem.channel import AgentChannel
from pmreplica.rpmem.environ import RpmemConfig
from pmreplica.rpmem.launch import OpenSSHLauncher
from pmreplica.rpmem.ssh.connections import POOL, ConnectionPool
from pmreplica.rpmem.ssh.exec_channel import ParamikoChannel
from pmreplica.rpmem.ssh.includes import NeedsOpenSSH
from pmreplica.rpmem.ssh.settings import resolve

log = logging.getLogger("pmreplica.rpmem.launch")


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
            deadline = _Deadline(s.connect_timeout, lambda t=t: self.pool.discard(s, t))
            try:
                with deadline:
                    chan.exec_command(command)
                if deadline.expired:  # answered as the deadline closed the connection
                    raise EOFError("connection closed at the deadline")
            except (paramiko.SSHException, EOFError, OSError) as exc:
                chan.close()
                if deadline.expired:
                    raise RemoteError(errno.ETIMEDOUT,
                                      f"{target}: the SSH server did not answer the request to "
                                      f"run {command!r} within {s.connect_timeout:g} s "
                                      f"(ConnectTimeout)") from None
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


class _Deadline:
    """Calls ``give_up`` if the body has not ended ``seconds`` after it began: paramiko's
    ``exec_command`` waits for the server's answer without a time limit, so on a link cut
    after the session opened it would wait until TCP gives up (minutes); closing the
    connection ends that wait at once with an exception. ``expired`` says it happened."""

    def __init__(self, seconds: float, give_up: Callable[[], None]) -> None:
        self.expired = False
        self._lock = threading.Lock()
        self._done = False
        self._give_up = give_up
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def _fire(self) -> None:
        with self._lock:
            if self._done:
                return  # the answer came first: the connection is in use, keep it
            self.expired = True
        self._give_up()

    def __enter__(self) -> "_Deadline":
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._done = True
        self._timer.cancel()


#: (target, reason) pairs already said in the log, so a reconnecting pool says it once
_HANDED_OVER: set[tuple[Target, str]] = set()

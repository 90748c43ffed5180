"""An agent started by the paramiko launcher: its stdin, stdout and stderr are an SSH exec
channel on a connection shared with other agents on the same target (:mod:`.connections`).
"""

from __future__ import annotations

import logging
import socket

import paramiko

from pmreplica.rpmem.address import Target
from pmreplica.rpmem.channel import AgentChannel, StderrTail
from pmreplica.rpmem.ssh.connect import addresses
from pmreplica.rpmem.ssh.connections import ConnectionPool
from pmreplica.rpmem.ssh.settings import SshSettings

log = logging.getLogger("pmreplica.rpmem.launch")


class ParamikoChannel(AgentChannel):
    """An agent on an SSH exec channel of a (shared) paramiko transport."""

    def __init__(self, target: Target, command: str, transport: paramiko.Transport,
                 channel: paramiko.Channel, settings: SshSettings,
                 pool: ConnectionPool) -> None:
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
        if not self._wait_unless_given_up(self._chan.status_event.wait, timeout):
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
        if (status is None and timeout and not self._chan.status_event.is_set()
                and not self._given_up.is_set()):
            log.warning("%s: agent did not exit within %.1f s of its stdin closing; closing "
                        "its channel", self.target, timeout)
        self._chan.close()
        return status

"""Connecting the paramiko launcher to a target: a TCP connection (the addresses in the order
AddressFamily gives, ACKs sent at once) or a ProxyCommand's socket pair, the SSH handshake
with the host key checked (:mod:`.host_key`), the login (:mod:`.auth`). Errors carry
an errno and name the target. :mod:`.connections` keeps the connections.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
from typing import Any

import paramiko

from pmreplica.errors import RemoteError
from pmreplica.rpmem.ssh import auth, host_key, known_hosts
from pmreplica.rpmem.ssh.settings import SshSettings

#: seconds the reading thread of a logged-in connection waits in ``recv`` before it looks
#: whether a keepalive is due (paramiko's own 0.1 s wakes every idle connection's thread ten
#: times a second, for ever, since the launcher keeps connections); a close wakes it at once
IDLE_WAKE = 10.0


def addresses(s: SshSettings) -> list[tuple[Any, ...]]:
    """getaddrinfo for the AddressFamily; with ``any``, IPv4 first (librpmem ran ``ssh -4``;
    IPv6 when there is no IPv4)."""
    infos = socket.getaddrinfo(s.hostname, s.port, s.address_family, socket.SOCK_STREAM)
    return sorted(infos, key=lambda info: info[0] != socket.AF_INET)


class _WakingSocket(socket.socket):
    """A socket whose close wakes a thread blocked reading it: closing a file descriptor does
    not end a ``recv`` under way on Linux, shutting the socket down does (paramiko's reading
    thread then ends at once instead of at its next timeout)."""

    def close(self) -> None:
        try:
            self.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # not connected, or closed already
        super().close()


class _QuickAckSocket(_WakingSocket):
    """A TCP socket that acknowledges what it receives at once.

    sshd leaves Nagle's algorithm on for sessions without a tty, so when it sends two small
    packets in a row the second waits for our ACK of the first, which Linux delays by up to
    40 ms. It happens on every login (a hostkeys notice, then the reply to our first channel
    open: measured 42 ms of a 60 ms connect). Re-arming TCP_QUICKACK after every read sends
    that ACK right away (one setsockopt per read, on the control path only)."""

    def recv(self, bufsize: int, flags: int = 0) -> bytes:  # type: ignore[override]
        data = super().recv(bufsize, flags)
        try:
            self.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        except OSError:
            pass
        return data


def _tcp_connect(s: SshSettings) -> socket.socket:
    try:
        infos = addresses(s)
    except socket.gaierror as exc:
        raise RemoteError(errno.EHOSTUNREACH, f"{s.target}: cannot resolve host name "
                          f"{s.hostname!r}: {exc.strerror}") from None
    last: OSError | None = None
    for family, kind, proto, _, address in infos:
        sock = _QuickAckSocket(family, kind, proto)
        sock.settimeout(s.connect_timeout)
        try:
            sock.connect(address)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    assert last is not None
    if isinstance(last, TimeoutError):
        raise RemoteError(errno.ETIMEDOUT, f"{s.target}: connecting to {s.hostname} port {s.port} "
                          f"timed out after {s.connect_timeout:g} s") from None
    code = last.errno or errno.ECONNREFUSED
    raise RemoteError(code, f"{s.target}: cannot connect to {s.hostname} port {s.port}: "
                      f"{os.strerror(code)}") from None


class _ProxySocket(_WakingSocket):
    """Our end of a socket pair whose other end is a ProxyCommand's stdin and stdout.

    Used instead of paramiko.ProxyCommand, which spins on a closed pipe instead of seeing
    the end of the stream and leaves its process unreaped; a socket pair (as OpenSSH uses
    for ProxyCommand) gives paramiko real end-of-stream and timeouts."""

    process: subprocess.Popen[bytes] | None = None

    def close(self) -> None:
        super().close()
        process, self.process = self.process, None
        if process is not None:
            try:
                process.wait(timeout=1.0)  # it sees the end of its stdin and exits
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _proxy_connect(s: SshSettings) -> socket.socket:
    assert s.proxy_command is not None
    ours, theirs = socket.socketpair()
    sock = _ProxySocket(ours.family, ours.type, ours.proto, fileno=ours.detach())
    try:
        # Like OpenSSH: run by the shell, stderr left to the user.
        sock.process = subprocess.Popen(["/bin/sh", "-c", "exec " + s.proxy_command],
                                        stdin=theirs, stdout=theirs, start_new_session=True)
    except OSError as exc:
        sock.close()
        raise RemoteError(exc.errno or errno.ENOENT, f"{s.target}: cannot run ProxyCommand "
                          f"{s.proxy_command!r}: {exc.strerror}") from None
    finally:
        theirs.close()
    return sock


def _handshake(s: SshSettings, known: known_hosts.HostKeys,
               accept_new: bool) -> paramiko.Transport:
    """A new transport to ``s`` whose host key has been checked, not yet logged in."""
    sock = _proxy_connect(s) if s.proxy_command else _tcp_connect(s)
    t = paramiko.Transport(sock)
    try:
        t.banner_timeout = t.auth_timeout = t.handshake_timeout = s.connect_timeout
        host_key.prefer_known_key_types(t, known)
        try:
            t.start_client(timeout=s.connect_timeout)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise RemoteError(errno.ECONNABORTED, f"{s.target}: SSH handshake with {s.hostname} "
                              f"port {s.port} failed: {exc or type(exc).__name__}") from None
        host_key.check(t, s, known, accept_new)
        return t
    except BaseException:
        t.close()
        raise


def connect(s: SshSettings, accept_new: bool) -> paramiko.Transport:
    """A new authenticated transport, host key checked; errors carry errno and the target."""
    known = known_hosts.load(s.known_hosts + s.global_known_hosts, s.host_key_name)
    t = auth.login(s, lambda: _handshake(s, known, accept_new))
    wake = IDLE_WAKE
    if s.server_alive_interval > 0:
        t.set_keepalive(s.server_alive_interval)
        wake = min(wake, s.server_alive_interval)  # keepalives are sent from those wake-ups
    t.sock.settimeout(wake)
    return t

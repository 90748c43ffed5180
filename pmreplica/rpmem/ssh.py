"""The paramiko launcher: one authenticated SSH connection per target, an exec channel per agent.

The first launch to a target connects (honouring ssh_config(5): HostName, User, Port,
IdentityFile, IdentitiesOnly, UserKnownHostsFile, GlobalKnownHostsFile, HostKeyAlias,
HashKnownHosts, ProxyCommand, ConnectTimeout, ServerAliveInterval; the ssh-agent; the
default keys), checks the host key against known_hosts and authenticates. Later launches
to the same target open a new session channel on that connection, which costs two round
trips instead of a key exchange and a login. A connection that died is dropped and
replaced; when the server's MaxSessions is reached a further connection is opened.

Include is expanded before paramiko parses the file (ssh_config.py). Not supported (use
PMREPLICA_LAUNCHER=openssh): ProxyJump, an Include of Host or Match blocks from inside a
block, host certificates, password or keyboard-interactive logins.
StrictHostKeyChecking in the file is not read: unknown host keys are refused unless
PMREPLICA_SSH_ACCEPT_NEW=1.
"""

from __future__ import annotations

import atexit
import base64
import binascii
import errno
import getpass
import logging
import os
import re
import shlex
import socket
import subprocess
import threading
from dataclasses import dataclass, field
from typing import Any

import paramiko

from pmreplica.errors import PmReplicaError, RemoteError
from pmreplica.rpmem import known_hosts, ssh_config
from pmreplica.rpmem.channel import AgentChannel, StderrTail
from pmreplica.rpmem.config import RpmemConfig
from pmreplica.rpmem.target import Target

log = logging.getLogger("pmreplica.rpmem.launch")

DEFAULT_KNOWN_HOSTS = ("~/.ssh/known_hosts", "~/.ssh/known_hosts2")
DEFAULT_GLOBAL_KNOWN_HOSTS = ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")
DEFAULT_IDENTITIES = ("~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa")
DEFAULT_CONNECT_TIMEOUT = 15.0


# -- settings -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SshSettings:
    """Everything that decides how a connection is made and checked; also the cache key, so a
    connection is reused only under the same host key and identity settings."""

    target: Target = field(compare=False)  # for messages only: aliases share connections
    hostname: str
    port: int
    user: str
    identity_files: tuple[str, ...]
    identities_only: bool
    known_hosts: tuple[str, ...]
    global_known_hosts: tuple[str, ...]
    host_key_alias: str | None
    hash_known_hosts: bool
    proxy_command: str | None
    connect_timeout: float
    server_alive_interval: int

    @property
    def host_key_name(self) -> str:
        return known_hosts.host_key_name(self.host_key_alias or self.hostname, self.port)


_config_cache: dict[str, tuple[ssh_config.Stamp, list[str], paramiko.SSHConfig]] = {}
_config_lock = threading.Lock()


def _load_ssh_config(config: RpmemConfig) -> paramiko.SSHConfig:
    """Parse the ssh config file and what it includes, again only when one of them changed."""
    path = config.ssh_config_path
    with _config_lock:
        cached = _config_cache.get(path)
    if cached is not None and ssh_config.stamp(cached[1]) == cached[0]:
        return cached[2]
    try:
        text, sources = ssh_config.expand(path)
        parsed = paramiko.SSHConfig.from_text(text)
    except FileNotFoundError:
        if config.ssh_config is not None:
            raise PmReplicaError(errno.ENOENT, f"environment variable PMREPLICA_SSH_CONFIG="
                                 f"{config.ssh_config!r}: no such file") from None
        return paramiko.SSHConfig()
    except PmReplicaError:
        raise  # an Include that cannot be followed, already named
    except (OSError, paramiko.ConfigParseError) as exc:
        raise PmReplicaError(errno.EINVAL, f"ssh config {path}: {exc}") from None
    with _config_lock:
        _config_cache[path] = (ssh_config.stamp(sources), sources, parsed)
    return parsed


def _paths(value: str | None, default: tuple[str, ...], path: str) -> tuple[str, ...]:
    try:
        words = shlex.split(value) if value else list(default)
    except ValueError as exc:
        raise PmReplicaError(errno.EINVAL, f"ssh config {path}: {value!r}: {exc}") from None
    return tuple(os.path.expanduser(w) for w in words if w.lower() != "none")


def _number(options: dict[str, Any], key: str, path: str, default: float) -> float:
    value = options.get(key)
    if value is None:
        return default
    try:
        return float(int(value))
    except ValueError:
        raise PmReplicaError(errno.EINVAL,
                             f"ssh config {path}: {key} {value!r} is not a number") from None


def _expand_proxy_command(command: str, target: Target, hostname: str, port: int,
                          user: str) -> str:
    # ssh_config(5) TOKENS for ProxyCommand, expanded here because paramiko's own expansion
    # takes %p from the config file even when the target names another port.
    tokens = {"%h": hostname, "%p": str(port), "%r": user, "%n": target.host, "%%": "%"}
    return os.path.expanduser(re.sub(r"%[hprn%]", lambda m: tokens[m.group(0)], command))


def resolve(target: Target, config: RpmemConfig) -> SshSettings:
    """Apply the ssh config to ``target``: what the target says wins over the file."""
    path = config.ssh_config_path
    try:
        options = _load_ssh_config(config).lookup(target.host)
    except paramiko.SSHException as exc:  # a Match that cannot be evaluated, canonicalization
        raise PmReplicaError(errno.EINVAL, f"{target}: ssh config {path}: {exc}") from None
    if options.get("proxyjump") and options["proxyjump"].lower() != "none":
        raise PmReplicaError(errno.EOPNOTSUPP, f"{target}: ProxyJump (ssh config {path}) is not "
                             "supported by the paramiko launcher; use PMREPLICA_LAUNCHER=openssh")
    hostname = options.get("hostname", target.host)
    port = target.port if target.port is not None else int(_number(options, "port", path, 22))
    user = target.user or options.get("user") or getpass.getuser()
    identities = tuple(os.path.expanduser(p) for p in options.get("identityfile", ()))
    proxy = options.get("proxycommand")
    return SshSettings(
        target=target,
        hostname=hostname,
        port=port,
        user=user,
        identity_files=identities or tuple(os.path.expanduser(p) for p in DEFAULT_IDENTITIES),
        identities_only=options.get("identitiesonly", "no").lower() == "yes",
        known_hosts=_paths(options.get("userknownhostsfile"), DEFAULT_KNOWN_HOSTS, path),
        global_known_hosts=_paths(options.get("globalknownhostsfile"), DEFAULT_GLOBAL_KNOWN_HOSTS,
                                  path),
        host_key_alias=options.get("hostkeyalias"),
        hash_known_hosts=options.get("hashknownhosts", "no").lower() == "yes",
        proxy_command=_expand_proxy_command(proxy, target, hostname, port, user) if proxy else None,
        connect_timeout=_number(options, "connecttimeout", path, DEFAULT_CONNECT_TIMEOUT),
        server_alive_interval=int(_number(options, "serveraliveinterval", path, 0)),
    )


# -- connecting -----------------------------------------------------------------------------
def _addresses(host: str, port: int) -> list[tuple[Any, ...]]:
    """getaddrinfo, IPv4 first (librpmem ran ``ssh -4``; IPv6 only when there is no IPv4)."""
    infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM)
    return sorted(infos, key=lambda info: info[0] != socket.AF_INET)


class _QuickAckSocket(socket.socket):
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
        infos = _addresses(s.hostname, s.port)
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


class _ProxySocket(socket.socket):
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


def _check_host_key(t: paramiko.Transport, s: SshSettings, known: known_hosts.HostKeys,
                    accept_new: bool) -> None:
    key = t.get_remote_server_key()
    keytype, blob = key.get_name(), key.asbytes()
    shown = f"{keytype} key {known_hosts.fingerprint(blob)}"
    files = s.known_hosts + s.global_known_hosts
    for bad in known.revoked:
        if bad.blob == blob:
            raise RemoteError(errno.EACCES, f"{s.target}: host key of {known.name} ({shown}) is "
                              f"marked revoked in {bad.where}; refusing to connect")
    if any(k.blob == blob for k in known.keys):
        return
    if known.keys:
        where = ", ".join(k.where for k in known.keys)
        raise RemoteError(errno.EACCES, f"{s.target}: HOST KEY MISMATCH for {known.name}: the "
                          f"server offers {shown}, which is not the key recorded in {where} "
                          "(possible man-in-the-middle attack); if the host key was changed on "
                          f"purpose, remove the old entry with: ssh-keygen -R '{known.name}' "
                          f"-f {known.keys[0].path}")
    if not accept_new:
        record = s.known_hosts[0] if s.known_hosts else "~/.ssh/known_hosts"
        raise RemoteError(errno.EACCES, f"{s.target}: host key of {known.name} is not known "
                          f"({shown}; checked {', '.join(files) or 'no files'}); verify the "
                          f"fingerprint and add the key to {record} (for example by connecting "
                          "once with ssh), or set PMREPLICA_SSH_ACCEPT_NEW=1 to accept and "
                          "record new host keys")
    if not s.known_hosts:
        raise RemoteError(errno.EACCES, f"{s.target}: host key of {known.name} is not known and "
                          "UserKnownHostsFile is none, so it cannot be recorded")
    known_hosts.append(s.known_hosts[0], known.name, keytype, blob, s.hash_known_hosts)
    log.warning("%s: recorded new host key of %s (%s) in %s", s.target, known.name, shown,
                s.known_hosts[0])


def _prefer_known_key_types(t: paramiko.Transport, known: known_hosts.HostKeys) -> None:
    """Negotiate a host key type already on record, as OpenSSH does, so that a host known by
    its RSA key is not taken for a changed host when it also offers ed25519."""
    options = t.get_security_options()
    offered = list(options.key_types)
    wanted: list[str] = []
    for keytype in known.keytypes:
        names = ["rsa-sha2-512", "rsa-sha2-256"] if keytype == "ssh-rsa" else [keytype]
        wanted += [n for n in names if n in offered and n not in wanted]
    if wanted:
        options.key_types = wanted + [n for n in offered if n not in wanted]


def _public_blob(path: str) -> bytes | None:
    try:
        with open(path + ".pub", encoding="ascii", errors="replace") as f:
            fields = f.read().split()
        return base64.b64decode(fields[1]) if len(fields) >= 2 else None
    except (OSError, ValueError, binascii.Error):
        return None


def _authenticate(t: paramiko.Transport, s: SshSettings) -> None:
    """Public key authentication only (BatchMode): the config's identities, the agent's keys,
    then the default keys; a key that needs a passphrase is skipped unless the agent holds it."""
    agent = paramiko.Agent() if os.environ.get("SSH_AUTH_SOCK") else None
    try:
        agent_keys = list(agent.get_keys()) if agent is not None else []
        candidates: list[tuple[str, paramiko.PKey | None, str | None]] = []
        used: set[bytes] = set()
        for path in s.identity_files:
            blob = _public_blob(path)
            match = next((k for k in agent_keys if blob is not None and k.asbytes() == blob), None)
            if match is not None:
                candidates.append((f"{path} (agent)", match, None))
                used.add(match.asbytes())
            elif os.path.exists(path):
                candidates.append((path, None, path))
        if not s.identities_only:
            candidates += [(f"agent key {k.get_fingerprint().hex()[:16]}", k, None)
                           for k in agent_keys if k.asbytes() not in used]
        tried: list[str] = []
        for name, key, path in candidates:
            if key is None:
                try:
                    key = paramiko.PKey.from_path(path)
                except paramiko.PasswordRequiredException:
                    tried.append(f"{name} (needs a passphrase; load it into ssh-agent)")
                    continue
                except (OSError, paramiko.SSHException, ValueError) as exc:
                    tried.append(f"{name} (unreadable: {exc})")
                    continue
            try:
                remaining = t.auth_publickey(s.user, key)
            except paramiko.AuthenticationException:
                tried.append(name)
                continue
            except paramiko.SSHException as exc:
                raise RemoteError(errno.ECONNABORTED, f"{s.target}: SSH connection failed "
                                  f"during login: {exc}") from None
            if remaining:
                raise RemoteError(errno.EACCES, f"{s.target}: server wants further "
                                  f"authentication ({', '.join(remaining)}) after key {name}")
            return
        raise RemoteError(errno.EACCES, f"{s.target}: permission denied (publickey) for user "
                          f"{s.user}; tried {', '.join(tried) or 'no keys (none found)'}")
    finally:
        if agent is not None:
            agent.close()


def connect(s: SshSettings, accept_new: bool) -> paramiko.Transport:
    """A new authenticated transport, host key checked; errors carry errno and the target."""
    known = known_hosts.load(s.known_hosts + s.global_known_hosts, s.host_key_name)
    sock = _proxy_connect(s) if s.proxy_command else _tcp_connect(s)
    t = paramiko.Transport(sock)
    try:
        t.banner_timeout = t.auth_timeout = t.handshake_timeout = s.connect_timeout
        _prefer_known_key_types(t, known)
        try:
            t.start_client(timeout=s.connect_timeout)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise RemoteError(errno.ECONNABORTED, f"{s.target}: SSH handshake with {s.hostname} "
                              f"port {s.port} failed: {exc or type(exc).__name__}") from None
        _check_host_key(t, s, known, accept_new)
        try:
            _authenticate(t, s)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            if isinstance(exc, RemoteError):
                raise
            raise RemoteError(errno.ECONNABORTED, f"{s.target}: SSH connection to {s.hostname} "
                              f"port {s.port} failed during login: "
                              f"{exc or type(exc).__name__}") from None
        if s.server_alive_interval > 0:
            t.set_keepalive(s.server_alive_interval)
        return t
    except BaseException:
        t.close()
        raise


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

    def _try(self, s: SshSettings, t: paramiko.Transport) -> paramiko.Channel | None:
        """A session channel on ``t``; None when ``t`` is dead (then dropped) or full."""
        if not t.is_active():
            log.info("%s: SSH connection lost; reconnecting", s.target)
            self.discard(s, t)
            return None
        try:
            return t.open_session(timeout=s.connect_timeout)
        except paramiko.ChannelException as exc:
            log.debug("%s: connection refuses another session (%s)", s.target, exc)
            return None
        except (paramiko.SSHException, EOFError, OSError) as exc:
            log.info("%s: SSH connection failed (%s); reconnecting", s.target, exc)
            self.discard(s, t)
            return None

    def open_session(self, s: SshSettings,
                     accept_new: bool) -> tuple[paramiko.Transport, paramiko.Channel]:
        """A new session channel to ``s``, on a cached connection when one has room."""
        tried: set[int] = set()
        for t in self.transports(s):
            tried.add(id(t))
            chan = self._try(s, t)
            if chan is not None:
                return t, chan
        with self._lock:
            gate = self._connecting.setdefault(s, threading.Lock())
        with gate:  # one connect per target at a time; latecomers use its result
            for t in self.transports(s):
                if id(t) not in tried:
                    chan = self._try(s, t)
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
                infos = _addresses(self._settings.hostname, self._settings.port)
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
    """Starts agents over paramiko SSH connections from the shared :data:`POOL`."""

    name = "paramiko"

    def __init__(self, config: RpmemConfig, pool: ConnectionPool = POOL) -> None:
        self.config = config
        self.pool = pool

    def launch(self, target: Target, command: str) -> ParamikoChannel:
        s = resolve(target, self.config)
        for attempt in (1, 2):
            t, chan = self.pool.open_session(s, self.config.ssh_accept_new)
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

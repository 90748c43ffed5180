"""Starting the agent on a target node; :func:`launch` returns the :class:`AgentChannel` to it.

The remote command line is the next ``RPMEM_CMD`` entry (round robin, as librpmem did),
as written, followed by ``argv`` quoted for the remote shell. Three launchers run it:

``paramiko`` (default)
    An exec channel on a cached, host-key-checked SSH connection (:mod:`.ssh`). A target
    whose ssh config needs what only OpenSSH does (ProxyJump, ...) goes to ``openssh``.
``openssh``
    ``$RPMEM_SSH`` (default ``ssh``) as a child process: ``ssh -T -oBatchMode=yes
    [-F file] [-p port] [-l user] host -- command``. Host keys are OpenSSH's business
    (its StrictHostKeyChecking setting, never turned off here; PMREPLICA_SSH_ACCEPT_NEW=1
    adds ``-oStrictHostKeyChecking=accept-new``).
``local``
    The command under ``/bin/sh -c`` on this machine, no SSH. The agent sees
    ``SSH_CONNECTION="127.0.0.1 0 127.0.0.1 0"`` so it serves data on loopback, and PATH
    ends with this interpreter's bin directory so an installed ``pmreplica-agent`` is found.

With SSH, sshd hands the agent ``SSH_CONNECTION="client_ip client_port server_ip
server_port"``; its server_ip is the address the client reached, which is where the agent
should listen for data connections, and what :attr:`AgentChannel.peer_address` gives here.
"""

from __future__ import annotations

import errno
import os
import shlex
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Protocol

from pmreplica.errors import RemoteError
from pmreplica.rpmem.address import Target, parse_target
from pmreplica.rpmem.channel import AgentChannel, AgentConnectionLost, ProcessChannel, exit_error
from pmreplica.rpmem.environ import RpmemConfig
from pmreplica.rpmem.ssh.includes import NeedsOpenSSH

__all__ = ["AgentChannel", "Launcher", "LocalLauncher", "OpenSSHLauncher", "close_connections",
           "command_line", "describe", "launch", "next_command"]

LOCAL_SSH_CONNECTION = "127.0.0.1 0 127.0.0.1 0"


class Launcher(Protocol):
    """Something that starts a remote command line and hands back its channel."""

    name: str

    def launch(self, target: Target, command: str) -> AgentChannel: ...


# -- RPMEM_CMD round robin ------------------------------------------------------------------
_turn = 0
_turn_lock = threading.Lock()


def next_command(config: RpmemConfig) -> str:
    """The RPMEM_CMD entry for the next agent started by this process (librpmem's order)."""
    global _turn
    with _turn_lock:
        turn, _turn = _turn, _turn + 1
    return config.commands[turn % len(config.commands)]


def _new_turn_lock() -> None:
    global _turn_lock
    _turn_lock = threading.Lock()  # a forked child goes on counting, with a lock of its own


os.register_at_fork(after_in_child=_new_turn_lock)


def command_line(command: str, argv: Sequence[str]) -> str:
    """``command`` as written (a remote shell command), then each argument shell-quoted."""
    return " ".join([command, *(shlex.quote(str(arg)) for arg in argv)])


# -- local ----------------------------------------------------------------------------------
class LocalLauncher:
    """Runs the agent as a child process of this one (one-machine use, no SSH)."""

    name = "local"

    def __init__(self, config: RpmemConfig) -> None:
        self.config = config

    def launch(self, target: Target, command: str) -> AgentChannel:
        env = dict(os.environ)
        env["SSH_CONNECTION"] = LOCAL_SSH_CONNECTION  # not the user's own login session's
        # The console scripts installed with this interpreter (pmreplica-agent) are found even
        # when its bin directory is not on PATH, as under `.venv/bin/python app.py`.
        here = os.path.dirname(sys.executable)
        path = env.get("PATH", os.defpath).split(os.pathsep)
        if here and here not in path:
            env["PATH"] = os.pathsep.join([*path, here])
        return ProcessChannel(target, command, ["/bin/sh", "-c", command], env,
                              peer=lambda: "127.0.0.1", what="local agent")


# -- OpenSSH --------------------------------------------------------------------------------
# What an OpenSSH client's stderr says when it exits 255, and the errno that means.
_SSH_FAILURES = (
    ("Connection refused", errno.ECONNREFUSED),
    ("No route to host", errno.EHOSTUNREACH),
    ("Network is unreachable", errno.ENETUNREACH),
    ("Could not resolve hostname", errno.EHOSTUNREACH),
    ("Name or service not known", errno.EHOSTUNREACH),
    ("timed out", errno.ETIMEDOUT),
    ("Permission denied", errno.EACCES),
    ("Host key verification failed", errno.EACCES),
    ("REMOTE HOST IDENTIFICATION HAS CHANGED", errno.EACCES),
    ("No such file or directory", errno.ENOENT),
)


class OpenSSHChannel(ProcessChannel):
    """An agent behind an OpenSSH client process; ssh's own failures exit 255."""

    def _failure(self, status: int | None, stderr: str) -> RemoteError:
        if status == 255:
            lines = [line.strip() for line in stderr.splitlines() if line.strip()]
            for line in reversed(lines):
                for phrase, code in _SSH_FAILURES:
                    if phrase.lower() in line.lower():
                        return RemoteError(code, f"{self.target}: ssh failed: {line}")
            last = lines[-1] if lines else "exit status 255"
            return AgentConnectionLost(errno.ECONNRESET, f"{self.target}: ssh failed: {last}")
        return exit_error(self.target, self.command, status, stderr)


_FAMILIES = {"inet": socket.AF_INET, "inet6": socket.AF_INET6}


def _reached_address(host: str, port: int, family: int, probe: bool) -> str:
    """The address ssh reaches ``host`` at: the first of getaddrinfo's answers, in its order
    and for the AddressFamily, that takes a TCP connection on ``port`` (ssh's own loop);
    without ``probe`` (a ProxyCommand decides) or when none answers, the first one."""
    try:
        infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
    except socket.gaierror:
        return host
    if probe and len(infos) > 1:
        for fam, kind, proto, _, address in infos:
            with socket.socket(fam, kind, proto) as sock:
                sock.settimeout(5.0)
                if sock.connect_ex(address) == 0:
                    return str(address[0])
    return str(infos[0][4][0]) if infos else host


class OpenSSHLauncher:
    """Runs the agent through the OpenSSH client (``$RPMEM_SSH``)."""

    name = "openssh"

    def __init__(self, config: RpmemConfig) -> None:
        self.config = config

    def _options(self, target: Target) -> list[str]:
        options = []
        if self.config.ssh_config is not None:
            options += ["-F", os.path.expanduser(self.config.ssh_config)]
        if target.port is not None:
            options += ["-p", str(target.port)]
        if target.user is not None:
            options += ["-l", target.user]
        return options

    def argv(self, target: Target, command: str) -> list[str]:
        """The ssh client command line that runs ``command`` on ``target`` (ssh chooses the
        address family, as its AddressFamily setting says)."""
        accept_new = ["-oStrictHostKeyChecking=accept-new"] if self.config.ssh_accept_new else []
        return [*self.config.ssh_argv0, "-T", "-oBatchMode=yes", *accept_new,
                *self._options(target), target.host, "--", command]

    def _peer(self, target: Target) -> str:
        """The address ssh connects to: ``ssh -G`` applies the config (HostName, Port,
        AddressFamily, ProxyCommand, ProxyJump), then the address is chosen as ssh does."""
        if target.is_ipv6:
            return target.host
        found = {"hostname": target.host, "port": "22", "addressfamily": "any"}
        try:
            out = subprocess.run([*self.config.ssh_argv0, "-G", *self._options(target),
                                  target.host], capture_output=True, text=True, timeout=10,
                                 stdin=subprocess.DEVNULL)
            if out.returncode == 0:
                found.update(line.split(" ", 1) for line in out.stdout.splitlines()
                             if " " in line)
        except (OSError, subprocess.SubprocessError):
            pass  # an RPMEM_SSH that is not OpenSSH: the target's own host name it is
        port = int(found["port"]) if found["port"].isdigit() else 22
        return _reached_address(found["hostname"], port,
                                _FAMILIES.get(found["addressfamily"], socket.AF_UNSPEC),
                                probe=not {"proxycommand", "proxyjump"} & found.keys())

    def launch(self, target: Target, command: str) -> AgentChannel:
        return OpenSSHChannel(target, command, self.argv(target, command), None,
                              peer=lambda: self._peer(target), what="ssh")


# -- the entry point ------------------------------------------------------------------------
def _launcher(name: str, config: RpmemConfig) -> Launcher:
    if name == "paramiko":
        from pmreplica.rpmem.ssh.launcher import ParamikoLauncher  # paramiko loads only when used
        return ParamikoLauncher(config)
    if name == "openssh":
        return OpenSSHLauncher(config)
    if name == "local":
        return LocalLauncher(config)
    raise RemoteError(errno.EINVAL, f"unknown launcher {name!r}: use paramiko, openssh or local")


def launch(target: str | Target, argv: Sequence[str] = (), *, config: RpmemConfig | None = None,
           launcher: str | Launcher | None = None) -> AgentChannel:
    """Start the agent on ``target`` with arguments ``argv``; the channel to its stdin/stdout.

    ``config`` defaults to :meth:`RpmemConfig.from_env`; ``launcher`` (a name or a launcher
    object) to the config's. Failures are OSErrors naming the target: ECONNREFUSED,
    EHOSTUNREACH, ETIMEDOUT, EACCES (host key, login), ENOENT (command not found). What
    only the remote side can tell shows on the first receive, when the stream ends before
    the agent's ready word: exit status 127 is ENOENT, and with the openssh launcher every
    connection, host key and login failure (ssh exits 255) arrives this way too.
    """
    if config is None:
        config = RpmemConfig.from_env()
    if isinstance(target, str):
        target = parse_target(target)
    if launcher is None or isinstance(launcher, str):
        chosen = _launcher(launcher or config.launcher, config)
    else:
        chosen = launcher
    return chosen.launch(target, command_line(next_command(config), argv))


def describe(node: str, config: RpmemConfig | None = None) -> str:
    """The launcher that would start the agent on ``node`` ([user@]host[:port]) and why, as
    ``pmreplica info`` shows it: the paramiko launcher hands targets whose ssh config needs
    the OpenSSH client (ProxyJump, ...) to the openssh launcher."""
    try:
        config = config or RpmemConfig.from_env()
        if config.launcher != "paramiko":
            chosen_by = "RPMEM_SSH" if config.ssh_command else "PMREPLICA_LAUNCHER"
            return f"{config.launcher} ({chosen_by})"
        from pmreplica.rpmem.ssh.settings import resolve  # paramiko loads only when used
        resolve(parse_target(node), config)
    except NeedsOpenSSH as why:
        return f"openssh (the paramiko launcher cannot do {why.strerror})"
    except OSError as e:
        return f"none ({e.strerror})"
    return "paramiko"


def close_connections() -> None:
    """Close the paramiko launcher's cached SSH connections, if any were made."""
    import sys
    ssh = sys.modules.get("pmreplica.rpmem.ssh.connections")
    if ssh is not None:
        ssh.close_connections()

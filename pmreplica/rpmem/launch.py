"""Starting the agent on a target node; :func:`launch` returns the :class:`AgentChannel` to it.

The remote command line is the next ``RPMEM_CMD`` entry (round robin, as librpmem did),
as written, followed by ``argv`` quoted for the remote shell. Three launchers run it:

``paramiko`` (default)
    An exec channel on a cached, host-key-checked SSH connection (:mod:`.ssh`).
``openssh``
    ``$RPMEM_SSH`` (default ``ssh``) as a child process: ``ssh -T -4 -oBatchMode=yes
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
import re
import shlex
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Protocol

from pmreplica.errors import RemoteError
from pmreplica.rpmem.channel import AgentChannel, AgentConnectionLost, ProcessChannel, exit_error
from pmreplica.rpmem.config import RpmemConfig
from pmreplica.rpmem.target import Target, parse_target

__all__ = ["AgentChannel", "Launcher", "LocalLauncher", "OpenSSHLauncher", "close_connections",
           "command_line", "launch", "next_command"]

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


def _first_address(host: str) -> str:
    """The address a host name resolves to, IPv4 first (as ``ssh -4``); the name if none."""
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_UNSPEC, socket.SOCK_STREAM)
    except socket.gaierror:
        return host
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
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
        """The ssh client command line that runs ``command`` on ``target``."""
        ipv4 = [] if target.is_ipv6 else ["-4"]
        accept_new = ["-oStrictHostKeyChecking=accept-new"] if self.config.ssh_accept_new else []
        return [*self.config.ssh_argv0, "-T", *ipv4, "-oBatchMode=yes", *accept_new,
                *self._options(target), target.host, "--", command]

    def _peer(self, target: Target) -> str:
        """The host ssh connects to, from ``ssh -G`` (HostName applied), resolved IPv4 first."""
        if target.is_ipv6:
            return target.host
        host = target.host
        try:
            out = subprocess.run([*self.config.ssh_argv0, "-G", *self._options(target),
                                  target.host], capture_output=True, text=True, timeout=10,
                                 stdin=subprocess.DEVNULL)
            found = re.search(r"^hostname (\S+)$", out.stdout, re.MULTILINE)
            if out.returncode == 0 and found:
                host = found.group(1)
        except (OSError, subprocess.SubprocessError):
            pass  # an RPMEM_SSH that is not OpenSSH: the target's own host name it is
        return _first_address(host)

    def launch(self, target: Target, command: str) -> AgentChannel:
        return OpenSSHChannel(target, command, self.argv(target, command), None,
                              peer=lambda: self._peer(target), what="ssh")


# -- the entry point ------------------------------------------------------------------------
def _launcher(name: str, config: RpmemConfig) -> Launcher:
    if name == "paramiko":
        from pmreplica.rpmem.ssh import ParamikoLauncher  # paramiko loads only when used
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


def close_connections() -> None:
    """Close the paramiko launcher's cached SSH connections, if any were made."""
    import sys
    ssh = sys.modules.get("pmreplica.rpmem.ssh")
    if ssh is not None:
        ssh.close_connections()

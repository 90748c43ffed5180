"""Environment settings of the Python librpmem, read once into a frozen :class:`RpmemConfig`.

librpmem's variables keep their meaning (librpmem(7), ENVIRONMENT):

``RPMEM_SSH``
    The ssh client command (shell-split, so ``ssh -v`` works). Setting it selects the
    OpenSSH launcher, since only that one runs an ssh command.
``RPMEM_CMD``
    The command line run on the target node, default ``pmreplica-agent``. Several commands
    separated by ``|`` are used in turn, one per remote replica in the order the replicas
    are opened, round robin over the life of the process. Each is a remote shell command
    line (``cd /x && ./agent`` works); the launcher appends its own, quoted, arguments.
``RPMEM_ENABLE_SOCKETS``, ``RPMEM_ENABLE_VERBS``
    Integers, non-zero enables; librpmem's defaults are kept (sockets off, verbs on), and
    so is its order (``transport/provider.py``): verbs (RDMA) when ``RPMEM_ENABLE_VERBS``
    is not 0 and an RDMA device carries the route to the target, whatever
    ``RPMEM_ENABLE_SOCKETS`` says; else TCP, which unlike librpmem's sockets provider is a
    fallback even when ``RPMEM_ENABLE_SOCKETS`` is unset. Only an explicit
    ``RPMEM_ENABLE_SOCKETS=0`` forbids TCP: then a pool that cannot use verbs fails to open
    with ENOMEDIUM. ``RPMEM_ENABLE_VERBS=0`` forces TCP.
``RPMEM_MAX_NLANES``, ``RPMEM_WORK_QUEUE_SIZE``
    Positive integers: a cap on the lanes per pool and the suggested work queue depth.

pmreplica's own:

``PMREPLICA_LAUNCHER``
    ``paramiko`` (default), ``openssh`` or ``local`` (run the agent as a local process, no
    SSH, for one-machine use).
``PMREPLICA_SSH_CONFIG``
    The ssh_config(5) file to honour (default ``~/.ssh/config`` in the passwd home, as ssh
    reads it; with OpenSSH, ``-F`` is passed only when this is set).
``PMREPLICA_SSH_ACCEPT_NEW``
    ``1`` accepts and records host keys not yet in known_hosts (like OpenSSH's
    ``StrictHostKeyChecking=accept-new``); the default ``0`` refuses them. A key that
    differs from a recorded one is refused either way.
``PMREPLICA_PEER_TIMEOUT``
    Seconds without an answer from an agent's host after which it is declared dead
    (default 1): every session keeps a heartbeat (``heartbeat.py``), so a host that lost
    its network, froze or crashed fails its replica within this bound, busy or idle, and
    the pool goes on degraded. Lower is faster failover; higher tolerates longer stalls
    of a live host (scheduling, swapping, a congested link) without a needless resync.
``PMREPLICA_OP_TIMEOUT``
    Seconds a data-path operation may wait for an agent whose host does answer (default
    60): storage that hangs under a live agent then fails the replica with ETIMEDOUT
    instead of hanging the application.
``PMREPLICA_TCP_TLS``
    ``1`` (default): TCP data lanes run over TLS 1.3, pinned to a certificate the agent makes
    for the session and sends over SSH (``rpmem_common/tls.py``). ``0`` asks for clear text, for
    networks the user trusts; an agent started with ``require-tls`` refuses that (EACCES).
    RDMA lanes are not affected.
``PMREPLICA_SPIN_US``
    Microseconds (default 50, at most 10000; 0 turns it off) that a TCP lane polls for an
    answer before its thread sleeps, on the client and, told by the client, on the agent
    for the next request and for each next segment of a clear-text write that is arriving
    (``rpmem_common/spin.py``). Sleeping costs a wake-up per operation (and per segment),
    20-30 us on a VM when client and agent run on different CPUs; polling costs CPU while
    operations are in flight, at most the window per wait and side, and stops by itself
    when it keeps missing (an idle pool polls nothing). 0 saves that CPU on a machine where
    it is scarce; a larger window covers operations whose answers take longer.

An empty variable counts as unset. A value that cannot be used is an ``EINVAL`` error
naming the variable.
"""

from __future__ import annotations

import errno
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from pmreplica.errors import PmReplicaError
from pmreplica.rpmem.ssh import account
from rpmem_common.spin import DEFAULT_WINDOW_US, MAX_WINDOW_US
from rpmem_common.wire import TLS_NAME

LauncherName = Literal["paramiko", "openssh", "local"]
LAUNCHERS: tuple[LauncherName, ...] = ("paramiko", "openssh", "local")

DEFAULT_CMD = "pmreplica-agent"
DEFAULT_SSH = "ssh"
DEFAULT_SSH_CONFIG = "~/.ssh/config"
_UINT_MAX = 2**32 - 1


def _bad(name: str, value: str, why: str) -> PmReplicaError:
    return PmReplicaError(errno.EINVAL, f"environment variable {name}={value!r}: {why}")


def _get(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name)
    return value if value else None


def _int_flag(environ: Mapping[str, str], name: str, default: bool | None) -> bool | None:
    """librpmem's env_get_bool: any integer, non-zero means enabled."""
    value = _get(environ, name)
    if value is None:
        return default
    try:
        return int(value.strip(), 10) != 0
    except ValueError:
        raise _bad(name, value, "must be an integer (0 disables, 1 enables)") from None


def _positive(environ: Mapping[str, str], name: str) -> int | None:
    """librpmem's rpmem_util_get_env_uint: a positive integer, capped at UINT_MAX."""
    value = _get(environ, name)
    if value is None:
        return None
    number = _integer(value)
    if number is None or number <= 0:
        raise _bad(name, value, "must be a positive integer")
    return min(number, _UINT_MAX)


def _integer(value: str) -> int | None:
    """``value`` as a decimal integer, or None if it is not one."""
    try:
        return int(value.strip(), 10)
    except ValueError:
        return None


def _shell_words(name: str, value: str) -> tuple[str, ...]:
    try:
        words = tuple(shlex.split(value))
    except ValueError as exc:
        raise _bad(name, value, f"cannot be split into words ({exc})") from None
    if not words:
        raise _bad(name, value, "names no command")
    return words


def _zero_or_one(environ: Mapping[str, str], name: str, default: bool) -> bool:
    value = _get(environ, name)
    if value is None:
        return default
    if value.strip() not in ("0", "1"):
        raise _bad(name, value, "must be 0 or 1")
    return value.strip() == "1"


def _seconds(environ: Mapping[str, str], name: str, default: float) -> float:
    value = _get(environ, name)
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < 1e6:
        raise _bad(name, value, "must be a positive number of seconds")
    return seconds


def _bounded(environ: Mapping[str, str], name: str, default: int, most: int) -> int:
    """An integer from 0 to ``most``; ``default`` when unset."""
    value = _get(environ, name)
    if value is None:
        return default
    number = _integer(value)
    if number is None or not 0 <= number <= most:
        raise _bad(name, value, f"must be an integer from 0 to {most}")
    return number


def _commands(environ: Mapping[str, str]) -> tuple[str, ...]:
    value = _get(environ, "RPMEM_CMD")
    if value is None:
        return (DEFAULT_CMD,)
    commands = tuple(part.strip() for part in value.split("|"))
    for command in commands:
        if not command:
            raise _bad("RPMEM_CMD", value, "has an empty command ('|'-separated list)")
        _shell_words("RPMEM_CMD", command)  # a command with unbalanced quotes is refused here
    return commands


@dataclass(frozen=True, slots=True)
class RpmemConfig:
    """The librpmem and pmreplica settings a launch and a remote pool use."""

    commands: tuple[str, ...] = (DEFAULT_CMD,)
    ssh_command: tuple[str, ...] | None = None
    enable_sockets: bool | None = None  # None: RPMEM_ENABLE_SOCKETS unset
    enable_verbs: bool = True
    max_nlanes: int | None = None
    work_queue_size: int | None = None
    launcher: LauncherName = "paramiko"
    ssh_config: str | None = None
    ssh_accept_new: bool = False
    op_timeout: float = 60.0
    peer_timeout: float = 1.0
    tcp_tls: bool = True
    spin_us: int = DEFAULT_WINDOW_US

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "RpmemConfig":
        """Read every variable; raise EINVAL naming the first one that is unusable."""
        ssh_value = _get(environ, "RPMEM_SSH")
        ssh_command = _shell_words("RPMEM_SSH", ssh_value) if ssh_value is not None else None

        launcher_value = _get(environ, "PMREPLICA_LAUNCHER")
        if launcher_value is None:
            launcher: LauncherName = "openssh" if ssh_command is not None else "paramiko"
        elif launcher_value.strip().lower() in LAUNCHERS:
            launcher = launcher_value.strip().lower()  # type: ignore[assignment]
        else:
            raise _bad("PMREPLICA_LAUNCHER", launcher_value,
                       f"must be one of {', '.join(LAUNCHERS)}")
        if ssh_command is not None and launcher != "openssh":
            raise _bad("RPMEM_SSH", ssh_value or "",
                       "an ssh command needs the openssh launcher, but "
                       f"PMREPLICA_LAUNCHER={launcher_value}")

        return cls(
            commands=_commands(environ),
            ssh_command=ssh_command,
            enable_sockets=_int_flag(environ, "RPMEM_ENABLE_SOCKETS", None),
            enable_verbs=bool(_int_flag(environ, "RPMEM_ENABLE_VERBS", True)),
            max_nlanes=_positive(environ, "RPMEM_MAX_NLANES"),
            work_queue_size=_positive(environ, "RPMEM_WORK_QUEUE_SIZE"),
            launcher=launcher,
            ssh_config=_get(environ, "PMREPLICA_SSH_CONFIG"),
            ssh_accept_new=_zero_or_one(environ, "PMREPLICA_SSH_ACCEPT_NEW", False),
            op_timeout=_seconds(environ, "PMREPLICA_OP_TIMEOUT", 60.0),
            peer_timeout=_seconds(environ, "PMREPLICA_PEER_TIMEOUT", 1.0),
            tcp_tls=_zero_or_one(environ, "PMREPLICA_TCP_TLS", True),
            spin_us=_bounded(environ, "PMREPLICA_SPIN_US", DEFAULT_WINDOW_US, MAX_WINDOW_US),
        )

    @property
    def connect_timeout(self) -> float:
        """Seconds a data or heartbeat connection to an agent that answered over SSH may take
        (a lost SYN is resent after 1 s and 3 s: two losses are tolerated)."""
        return max(3 * self.peer_timeout, 4.0)

    @property
    def sockets_allowed(self) -> bool:
        """TCP may carry the data: only an explicit ``RPMEM_ENABLE_SOCKETS=0`` forbids it."""
        return self.enable_sockets is not False

    @property
    def tcp_security(self) -> str:
        """How TCP lanes are protected, as the logs and ``pmreplica info`` say it."""
        return TLS_NAME if self.tcp_tls else "clear text (PMREPLICA_TCP_TLS=0)"

    @property
    def ssh_config_path(self) -> str:
        """The ssh_config(5) file the paramiko launcher reads (may not exist): by default the
        one in the passwd home, as ssh reads it, whatever ``$HOME`` says."""
        if self.ssh_config is None:
            return account.expand_tilde(DEFAULT_SSH_CONFIG)
        return os.path.expanduser(self.ssh_config)

    @property
    def ssh_argv0(self) -> tuple[str, ...]:
        """The ssh client command the OpenSSH launcher runs."""
        return self.ssh_command or (DEFAULT_SSH,)

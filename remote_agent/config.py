"""The agent's settings: command line over config file over defaults (rpmemd's scheme).

Config files, later ones winning: /etc/pmreplica/agent.conf, ~/.pmreplica-agent.conf,
then ``--config FILE``. Lines are ``name = value``; ``#`` starts a comment.
"""

from __future__ import annotations

import errno
import os
from collections import namedtuple

from pmreplica.errors import PmReplicaError

SYSTEM_CONFIG = "/etc/pmreplica/agent.conf"
USER_CONFIG = "~/.pmreplica-agent.conf"


class AgentConfig(namedtuple("AgentConfig", "poolset_dir log_file log_level persist_apm "
                                           "max_lanes require_tls",
                              defaults=("~", None, "warning", False, 64, False))):
    """``log_file`` None logs to stderr (which the client shows on failures); ``persist_apm``
    says the platform makes RDMA writes durable without a flush (allows APM);
    ``require_tls`` refuses clients that ask for clear-text TCP lanes."""

    __slots__ = ()

    @property
    def root(self) -> str:
        return os.path.realpath(os.path.expanduser(self.poolset_dir))


def _coerce(name: str, value: str, where: str) -> object:
    if name in ("persist_apm", "require_tls"):
        v = value.lower()
        if v in ("yes", "true", "1", "on"):
            return True
        if v in ("no", "false", "0", "off"):
            return False
        raise PmReplicaError(errno.EINVAL, f"{where}: {name.replace('_', '-')} must be yes or no")
    if name == "max_lanes":
        try:
            n = int(value)
        except ValueError:
            n = 0
        if n < 1:
            raise PmReplicaError(errno.EINVAL, f"{where}: max-lanes must be a positive integer")
        return n
    if name == "log_level" and value.lower() not in ("debug", "info", "warning", "error"):
        raise PmReplicaError(errno.EINVAL, f"{where}: log-level must be debug, info, warning "
                                           "or error")
    return value


def read_file(config: AgentConfig, path: str) -> AgentConfig:
    """Apply the settings in ``path`` (missing file: nothing changes)."""
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return config
    except OSError as e:
        raise PmReplicaError(e.errno or errno.EIO, f"cannot read config file {path}: "
                                                   f"{e.strerror}") from None
    known = set(AgentConfig._fields)
    changes = {}
    for lineno, line in enumerate(lines, start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{path}:{lineno}"
        name, sep, value = line.partition("=")
        key = name.strip().replace("-", "_")
        if not sep or key not in known:
            raise PmReplicaError(errno.EINVAL, f"{where}: unknown setting {name.strip()!r}")
        changes[key] = _coerce(key, value.strip(), where)
    return config._replace(**changes)


def load(explicit: str | None = None) -> AgentConfig:
    config = AgentConfig()
    for path in (SYSTEM_CONFIG, USER_CONFIG):
        config = read_file(config, path)
    if explicit:
        if not os.path.exists(explicit):
            raise PmReplicaError(errno.ENOENT, f"config file {explicit} does not exist")
        config = read_file(config, explicit)
    return config

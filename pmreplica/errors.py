"""Exceptions of pmreplica: every failure is an ``OSError`` carrying an errno, as librpmem's were."""

from __future__ import annotations

import errno as _errno
import os


class PmReplicaError(OSError):
    """Base class: ``err.errno`` is the errno value, ``str(err)`` the one-line message."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(errno, message)

    def __str__(self) -> str:
        return f"{self.strerror} ({_errno.errorcode.get(self.errno, self.errno)})"


class PoolSetError(PmReplicaError):
    """A pool set file that poolset(5) refuses; the message names file and line."""

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None,
                 line: int | None = None, errno: int = _errno.EINVAL) -> None:
        where = ""
        if path is not None:
            where = f"{os.fspath(path)}:{line}: " if line is not None else f"{os.fspath(path)}: "
        super().__init__(errno, where + message)
        self.path = None if path is None else os.fspath(path)
        self.line = line


class HeaderError(PmReplicaError):
    """A pool header that is corrupted, inconsistent with its set, or of another format."""


class ReplicaError(PmReplicaError):
    """A replica target failed; the pool keeps working on its other replicas."""


class RemoteError(PmReplicaError):
    """An error reported by, or on the way to, a remote agent."""

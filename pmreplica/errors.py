"""Exceptions of pmreplica: every failure is an ``OSError`` carrying an errno, as librpmem's were."""

from __future__ import annotations

import errno as _errno
import logging
import os

# the agent imports this module, and its start stays clear of typing (which imports re,
# functools and more): the type variable exists for type checkers only
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import TypeVar

    _E = TypeVar("_E", bound=OSError)


class PmReplicaError(OSError):
    """Base class: ``err.errno`` is the errno value, ``str(err)`` the one-line message."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(errno, message)

    def __str__(self) -> str:
        return f"{self.strerror} ({_errno.errorcode.get(self.errno, self.errno)})"


def fresh(error: _E) -> _E:
    """A new exception like the stored ``error`` (a failed lane's, a lost session's, a
    replica's failure told to the hooks), to raise in its place: one object raised again
    and again collects every raise's frames in its traceback, and they keep their locals
    alive (a caller's views of its pool among them)."""
    return type(error)(error.errno, error.strerror)


def as_replica_failure(name: str, error: BaseException, raised: bool = False) -> OSError:
    """What replica ``name``'s target raised, as that replica's failure: an OSError as it is
    (one without an errno an EIO naming it: hooks and callers read ``errno``); an interrupt
    (not an Exception) ECANCELED; anything else (a plugin's bug) logged, its traceback at
    debug level, and made an EIO naming it. ``raised``: the failure is raised to a caller
    with the bug as its cause, not logged."""
    if isinstance(error, OSError):
        if error.errno is None:
            return ReplicaError(_errno.EIO, f"{name}: {error}")
        return error
    if not isinstance(error, Exception):  # KeyboardInterrupt, say: the call was cut short
        return ReplicaError(_errno.ECANCELED, f"{name}: a call was interrupted mid-operation "
                                              f"({type(error).__name__})")
    if raised:
        return ReplicaError(_errno.EIO, f"{name}: {type(error).__name__}: {error}")
    log = logging.getLogger("pmreplica")
    log.error("%s raised %r (a bug in its plugin?)", name, error)
    log.debug("%s: the traceback", name, exc_info=error)
    return ReplicaError(_errno.EIO, f"{name}: {type(error).__name__}: {error}")


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

"""Opening pool set and part files without trusting what they are.

A FIFO opened for reading blocks until a writer comes, and one opened for writing until a
reader does; a device or socket is no pool either. Every pool set or part file pmreplica
opens goes through :func:`open_regular`: opened non-blocking, then refused unless it is a
regular file, so that a hostile or mistaken path is an error at once, never a hang.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from .errors import PmReplicaError

_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISDIR, "a directory"))


def kind_of(mode: int) -> str:
    """What a file of ``st_mode`` ``mode`` is, in words ("a FIFO", "a regular file")."""
    return next((name for test, name in _KINDS if test(mode)),
                "a regular file" if stat.S_ISREG(mode) else "a file of an unknown kind")


def not_regular(path: str, mode: int) -> PmReplicaError:
    """The error for ``path`` that is not a regular file (EISDIR for a directory)."""
    code = errno.EISDIR if stat.S_ISDIR(mode) else errno.EINVAL
    return PmReplicaError(code, f"{path}: not a regular file ({kind_of(mode)})")


def open_regular(path: str, flags: int = os.O_RDONLY) -> int:
    """``os.open`` that never blocks on a FIFO and refuses anything but a regular file
    (EINVAL naming what it is; EISDIR for a directory). The fd is blocking again on return."""
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ENXIO, errno.EISDIR):  # a FIFO without reader; a directory
            check_regular(path)
        raise
    try:
        st_mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(st_mode):
            raise not_regular(path, st_mode)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_regular(path: str) -> None:
    """Refuse ``path`` if it exists and is not a regular file (symlinks followed)."""
    try:
        st_mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st_mode):
        raise not_regular(path, st_mode)


def read_regular(path: str) -> bytes:
    """The contents of regular file ``path``."""
    fd = open_regular(path)
    try:
        return read_fd(fd, path)
    finally:
        os.close(fd)


def read_fd(fd: int, path: str, limit: int | None = None) -> bytes:
    """Everything from ``fd`` (the file ``path``) to its end; EFBIG if that is more than
    ``limit`` bytes, of which no more than ``limit + 1`` are read."""
    with os.fdopen(fd, "rb", closefd=False) as f:
        data = f.read() if limit is None else f.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise PmReplicaError(errno.EFBIG, f"{path}: larger than {limit} bytes, the most "
                                          "read from such a file here")
    return data


def pwrite_all(fd: int, data: bytes | memoryview, offset: int, path: str) -> None:
    """``os.pwrite`` of all of ``data`` at ``offset``; a short write is EIO naming ``path``."""
    if os.pwrite(fd, data, offset) != len(data):
        raise OSError(errno.EIO, f"{path}: short write")


def sync_dir(path: str) -> None:
    """fsync the directory ``path``: a name made in it survives a power failure."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""Reading a poolset(5) file: byte for byte as PMDK 1.12's ``util_poolset_parse``
(src/common/set.c) decides, naming the same line in the same words; stricter only where the
README's list of deliberate differences says. Refusals are :class:`PoolSetError`."""

from __future__ import annotations

import errno
import os
import stat

from ..errors import PmReplicaError, PoolSetError
from ..files import kind_of, open_regular, read_regular
from . import text as _text
from .model import OPTIONS, LocalReplica, Part, PoolSetFile, RemoteReplica, Replica, \
    check_pool_set_name, single_file


def load_set(path: str | os.PathLike[str], size: int | None = None) -> PoolSetFile:
    """The pool set at ``path``: a PMEMPOOLSET file, or a single pool file (``size`` for one
    that does not exist yet; its current size otherwise)."""
    path = os.fspath(path)
    if "\0" in path:  # the OS takes no such name (os.stat would raise ValueError)
        raise PmReplicaError(errno.EINVAL, f"{path!r}: a NUL byte in the file name")
    if os.path.isdir(path):
        raise PmReplicaError(errno.EISDIR, f"{path} is a directory, not a pool file or a pool "
                                           "set file")
    if os.path.exists(path) and is_poolset_file(path):
        return parse(path)
    if size is None:
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            raise PmReplicaError(errno.ENOENT, f"{path}: no such pool or pool set file") from None
    return single_file(path, size)


def is_poolset_file(path: str | os.PathLike[str]) -> bool:
    """True if the file starts with the 11 bytes ``PMEMPOOLSET``, as PMDK's
    ``util_is_poolset_file`` decides: the parser then judges the rest of the first line. A
    directory is not a pool set; a FIFO, socket or device is an error (never a hang)."""
    path = os.fspath(path)
    try:
        fd = open_regular(path)
    except PmReplicaError as e:
        if e.errno == errno.EISDIR:
            return False
        raise
    try:
        return os.pread(fd, len(_text.SIGNATURE), 0) == _text.SIGNATURE
    finally:
        os.close(fd)


def parse(path: str | os.PathLike[str]) -> PoolSetFile:
    """Read and parse the pool set file at ``path`` (never waiting on a FIFO)."""
    path = os.fspath(path)
    try:
        data = read_regular(path)
    except PmReplicaError as e:
        raise PoolSetError(f"cannot read pool set file: {e.strerror.removeprefix(path + ': ')}",
                           path, errno=e.errno) from None
    except OSError as e:
        raise PoolSetError(f"cannot read pool set file: {e.strerror}", path,
                           errno=e.errno or errno.EINVAL) from e
    return parse_bytes(data, path)


def parse_text(text: str, path: str | None = None) -> PoolSetFile:
    """Parse pool set text (a str holds the file's bytes as UTF-8, undecodable ones as
    surrogate escapes, as ``os.fsdecode`` gives them)."""
    return parse_bytes(text.encode("utf-8", "surrogateescape"), path)


def parse_bytes(data: bytes, path: str | None = None) -> PoolSetFile:
    """Parse the bytes of a pool set file, as ``util_poolset_parse`` does."""
    return _Reader(path).read(data)


class _Reader:
    """One pass of ``util_poolset_parse`` over a file: PMDK's state, PMDK's checks."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.replicas: list[Replica] = [LocalReplica()]
        self.option_lines: dict[str, int] = {}
        #: PMDK's ``nparts``: part lines since the last local REPLICA (a remote one does not
        #: reset it, so a set may end on a remote replica after a local one with parts)
        self.nparts = 0
        self.directory_based = False
        self.dirs: set[str] = set()  # real paths of the directories named so far
        self.sizes: dict[bytes, int | None] = {}  # size fields read so far: most repeat

    def error(self, message: str, line: int, code: int = errno.EINVAL) -> PoolSetError:
        return PoolSetError(message, self.path, line, code)

    def no_parts(self, line: int) -> PoolSetError:
        return self.error("no pool set parts" if len(self.replicas) == 1 else
                          "no replica parts", line)

    def read(self, data: bytes) -> PoolSetFile:
        if not _text.has_signature(data):
            raise self.error("the first line must be exactly 'PMEMPOOLSET'", 1)
        lines = _text.lines(data)
        for lineno, line in enumerate(lines[1:], start=2):
            if b"\0" in line:  # PMDK's reader cuts the line there and runs on into the next
                raise self.error("a NUL byte in the line", lineno)
            text = line.partition(b"#")[0]
            if not text:  # an empty line or one starting with '#' (not blanks before it)
                continue
            if text.startswith(b"OPTION"):
                self.option(text[6:], lineno)
            elif text.startswith(b"REPLICA"):
                self.replica(text[7:], lineno)
            else:
                self.part(text, lineno)
        if not self.nparts:
            raise self.no_parts(len(lines) + 1)  # PMDK counts the end of file as a line
        return PoolSetFile(replicas=self.replicas, options=frozenset(self.option_lines),
                           path=self.path, option_lines=self.option_lines)

    def option(self, rest: bytes, lineno: int) -> None:
        names = _text.fields(rest)
        if not names:
            raise self.error("missing option name", lineno)
        for name in names:
            opt = os.fsdecode(name)
            if opt not in OPTIONS:
                raise self.error(f"unknown option '{opt}'", lineno)
            self.option_lines.setdefault(opt, lineno)

    def replica(self, rest: bytes, lineno: int) -> None:
        if not rest:
            if not self.nparts:
                raise self.no_parts(lineno)
            self.replicas.append(LocalReplica(line=lineno))
            self.nparts = 0
            return
        if rest[0] not in _text.BLANKS:
            raise self.error("exactly 'REPLICA' expected", lineno)
        words = _text.fields(rest)
        if len(words) < 2:
            raise self.error("address of remote node and descriptor of remote pool set "
                             "expected", lineno)
        if len(words) > 2:
            raise self.error("invalid token found in the current line", lineno)
        node, desc = (os.fsdecode(w) for w in words)
        if desc.startswith("/"):
            raise self.error("incorrect descriptor (must be a relative path)", lineno)
        if self.directory_based:  # PMDK gives a remote replica a part file of its own
            raise self.error("cannot mix directories and files in a set", lineno)
        # deliberately stricter than PMDK: a node ssh can reach, a name inside the agent's
        # directory (the agent checks again; this names the line)
        check_pool_set_name(desc, self.path, lineno)
        _check_node(node, self.path, lineno)
        self.replicas.append(RemoteReplica(node=node, pool_set=desc, line=lineno))

    def part(self, text: bytes, lineno: int) -> None:
        rep = self.replicas[-1]
        if isinstance(rep, RemoteReplica):
            raise self.error("unexpected parts for remote replica", lineno)
        words = _text.fields(text)
        if len(words) != 2:
            raise self.error("invalid token found in the current line", lineno)
        if not words[1].startswith(b"/"):
            raise self.error("incorrect path (must be an absolute one)", lineno)
        if words[0] == b"AUTO":  # PMDK asks the device; pmreplica maps no device DAX
            raise self.error("cannot determine size of a part (AUTO is for device DAX, which "
                             "pmreplica does not support)", lineno)
        size = self.sizes.get(words[0], 0)
        if size == 0:
            size = self.sizes[words[0]] = _text.parse_size(words[0])
        if size is None:
            raise self.error("incorrect format of size", lineno)
        path = os.fsdecode(words[1])
        rep.parts.append(self.element(path, size, lineno))
        self.nparts += 1

    def element(self, path: str, size: int, lineno: int) -> Part:
        """A part line's file or directory, checked as ``util_parse_add_element`` does."""
        try:
            st: os.stat_result | OSError | None = os.stat(path)
        except FileNotFoundError:
            st = None  # to be created
        except OSError as e:
            st = e
        if isinstance(st, os.stat_result) and stat.S_ISDIR(st.st_mode):
            if not self.directory_based:
                if self.nparts or len(self.replicas) > 1:
                    raise self.error("cannot mix directories and files in a set", lineno)
                self.directory_based = True
            real = os.path.realpath(path)
            if real in self.dirs:
                raise self.error("cannot use the same directory twice", lineno, errno.EEXIST)
            self.dirs.add(real)
            return Part(size, path, lineno, True)
        if self.directory_based:
            raise self.error("cannot mix directories and files in a set", lineno)
        if isinstance(st, OSError):
            raise self.error(f"{path}: {st.strerror}", lineno, st.errno or errno.EINVAL)
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise self.error(f"{path}: not a regular file ({kind_of(st.st_mode)})", lineno)
        return Part(size, path, lineno)


def _check_node(node: str, path: str | None, lineno: int) -> None:
    # the client's own parser of target addresses (imported here: the agent, which only
    # meets this in a set it refuses anyway, starts without it)
    from ..rpmem.address import parse_target
    try:
        parse_target(node)
    except PmReplicaError as e:
        raise PoolSetError(e.strerror, path, lineno) from None

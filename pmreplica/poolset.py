"""poolset(5): parse, validate and write PMDK pool set files.

A pool set lists the parts of the master replica, then optional ``REPLICA`` sections: local
ones with their own parts, or remote ones (``REPLICA [user@]host[:port] relative.set``).

:func:`parse` decides as PMDK 1.12's ``util_poolset_parse`` (src/common/set.c) does, byte for
byte, and names the same line in the same words; it is stricter only where the README's list
of deliberate differences says. :meth:`PoolSetFile.validate` then applies the rules PMDK
checks when it creates or opens the pool. Refusals are :class:`PoolSetError`, an OSError
naming file and line (EINVAL unless PMDK's errno says otherwise).
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
import sys
from collections import namedtuple

from . import poolset_text as _text
from .errors import PmReplicaError, PoolSetError
from .files import kind_of, open_regular, read_regular

SIGNATURE = _text.SIGNATURE.decode()
HDR_SIZE = 4096
#: PMDK rounds part sizes down to the mapping alignment (the page size on Linux).
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
#: Smallest part file PMDK accepts (PMEMOBJ_MIN_PART, RPMEM_MIN_PART).
MIN_PART = 2 << 20
#: Smallest remote pool librpmem accepts (RPMEM_MIN_POOL).
MIN_REMOTE_POOL = 8 << 10
#: the largest file (off_t) and mapping (ssize_t) there can be
MAX_FILE = sys.maxsize

OPT_SINGLEHDR = "SINGLEHDR"
OPT_NOHDRS = "NOHDRS"
OPTIONS = (OPT_SINGLEHDR, OPT_NOHDRS)


def parse_size(text: str) -> int:
    """Return the byte count of a poolset size such as ``2G``, ``512MiB``, ``10kB`` or ``4096``."""
    size = _text.parse_size(text.encode("utf-8", "surrogateescape"))
    if size is None:
        raise ValueError(f"incorrect format of size: {text!r}")
    return size


def format_size(size: int) -> str:
    """Return the shortest exact poolset spelling of ``size`` (binary suffixes)."""
    for suffix in ("P", "T", "G", "M", "K"):
        mag = _text.SUFFIXES[suffix]
        if size % mag == 0:
            return f"{size // mag}{suffix}"
    return str(size)


class Part(namedtuple("Part", "size path line is_dir", defaults=(0, False))):
    """One part line: ``size`` bytes at ``path`` (a directory for directory-based replicas)."""

    __slots__ = ()

    @property
    def aligned_size(self) -> int:
        """The size PMDK maps: rounded down to the page size."""
        return self.size & ~(PAGE_SIZE - 1)


class LocalReplica(namedtuple("LocalReplica", "parts line", defaults=((), 0))):
    """The master (index 0) or a local ``REPLICA`` section with its parts."""

    __slots__ = ()
    is_remote = False

    def __new__(cls, parts=None, line: int = 0) -> "LocalReplica":
        return super().__new__(cls, list(parts or ()), line)


class RemoteReplica(namedtuple("RemoteReplica", "node pool_set line", defaults=(0,))):
    """``REPLICA node pool_set``: a pool set file served by the agent on ``node``."""

    __slots__ = ()
    is_remote = True


Replica = LocalReplica | RemoteReplica


class PoolSetFile:
    """A parsed pool set: replicas in file order (index 0 is the master) and options."""

    def __init__(self, replicas: list[Replica], options: frozenset[str] = frozenset(),
                 path: str | None = None, option_lines: dict[str, int] | None = None) -> None:
        self.replicas = replicas
        self.options = frozenset(options)
        self.path = path
        #: line of each option's first mention, for messages
        self.option_lines = option_lines or {}

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, PoolSetFile) and self.replicas == other.replicas
                and self.options == other.options)

    def __repr__(self) -> str:
        return f"PoolSetFile({self.replicas!r}, {set(self.options) or ''}, path={self.path!r})"

    # -- sizes ---------------------------------------------------------------------------
    @property
    def master(self) -> LocalReplica:
        master = self.replicas[0]
        assert isinstance(master, LocalReplica)
        return master

    @property
    def has_headers(self) -> bool:
        return OPT_NOHDRS not in self.options

    def nhdrs(self, replica: LocalReplica) -> int:
        """How many of the replica's parts carry a 4 KiB header (PMDK's ``rep->nhdrs``)."""
        if OPT_NOHDRS in self.options:
            return 0
        if OPT_SINGLEHDR in self.options:
            return 1
        return len(replica.parts)

    def replica_size(self, replica: LocalReplica) -> int:
        """Size of the replica's contiguous mapping: the first header counted, the others not."""
        size = sum(p.aligned_size for p in replica.parts)
        nhdrs = self.nhdrs(replica)
        return size - (nhdrs - 1) * HDR_SIZE if nhdrs else size

    @property
    def pool_size(self) -> int:
        """Mapped size of the pool: the smallest local replica's size, as in PMDK (a larger
        replica's tail is not used; remote replicas must hold at least this much)."""
        return min(self.replica_size(r) for r in self.local_replicas())

    @property
    def is_directory_based(self) -> bool:
        return any(p.is_dir for r in self.local_replicas() for p in r.parts)

    def local_replicas(self) -> list[LocalReplica]:
        return [r for r in self.replicas if isinstance(r, LocalReplica)]

    def remote_replicas(self) -> list[RemoteReplica]:
        return [r for r in self.replicas if isinstance(r, RemoteReplica)]

    # -- text ------------------------------------------------------------------------------
    def to_text(self) -> str:
        """Render the set in poolset(5) syntax; parsing the result gives an equal set."""
        lines = [SIGNATURE]
        for opt in OPTIONS:
            if opt in self.options:
                lines.append(f"OPTION {opt}")
        for i, rep in enumerate(self.replicas):
            if isinstance(rep, RemoteReplica):
                lines.append(f"REPLICA {rep.node} {rep.pool_set}")
                continue
            if i:
                lines.append("REPLICA")
            lines.extend(f"{format_size(p.size)} {p.path}" for p in rep.parts)
        return "\n".join(lines) + "\n"

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write the set to ``path`` (atomically: a temporary file renamed over it)."""
        path = os.fspath(path)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(self.to_text())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def equivalent(self, other: "PoolSetFile") -> bool:
        """Same replicas, parts and options (line numbers and file path ignored)."""
        return _shape(self) == _shape(other)

    # -- validation ------------------------------------------------------------------------
    def validate(self, *, remote: bool = False) -> None:
        """Apply the rules PMDK checks when it creates or opens a pool from the set (used as
        a local pool, or with ``remote=True`` as the set an agent serves for a remote
        replica), in PMDK's order. Raises :class:`PoolSetError`."""
        path = self.path
        if OPT_NOHDRS in self.options and not remote:
            raise PoolSetError("the NOHDRS poolset option is not supported for local poolsets",
                               path, self.option_lines.get(OPT_NOHDRS))
        if OPT_SINGLEHDR in self.options and OPT_NOHDRS in self.options:
            # PMDK logs this and goes on as if only SINGLEHDR were given
            raise PoolSetError("both SINGLEHDR and NOHDRS poolset options used at the same time",
                               path, max(self.option_lines.values()))
        if remote and len(self.replicas) > 1:
            raise PoolSetError("remote pool set cannot have replicas", path, self.replicas[1].line)
        if self.is_directory_based and OPT_SINGLEHDR not in self.options:
            raise PoolSetError("directory based pools are not supported for poolsets with "
                               "headers (without SINGLEHDR option)", path,
                               self.master.parts[0].line)
        seen: dict[str, Part] = {}
        for rep in self.local_replicas():
            for p in rep.parts:
                if p.size > MAX_FILE:
                    raise PoolSetError(f"invalid size ({p.size}) for a file: the largest is "
                                       f"{MAX_FILE}", path, p.line, errno.EFBIG)
                if not p.is_dir and p.size < MIN_PART:
                    raise PoolSetError(f"part size {p.size} smaller than the minimum part size "
                                       f"{MIN_PART} ({format_size(MIN_PART)})", path, p.line)
                first = seen.setdefault(os.path.normpath(p.path), p)
                if first is not p:  # (the parser refuses a directory named twice)
                    raise PoolSetError(f"cannot use the same part file twice (line "
                                       f"{first.line})", path, p.line)
        if self.pool_size > MAX_FILE:
            raise PoolSetError(f"pool size {self.pool_size} is larger than can be mapped",
                               path, errno=errno.EFBIG)


def _shape(s: PoolSetFile) -> tuple:
    reps = tuple(
        ("remote", r.node, r.pool_set) if isinstance(r, RemoteReplica)
        else ("local", tuple((p.size, os.path.normpath(p.path), p.is_dir) for p in r.parts))
        for r in s.replicas)
    return reps, s.options




def check_pool_set_name(name: str, path: str | None = None, line: int | None = None) -> str:
    """Refuse a remote pool set name that is absolute or climbs out of the agent's directory."""
    if not name or posixpath.isabs(name) or "\0" in name:
        raise PoolSetError("incorrect descriptor (must be a relative path)", path, line)
    if ".." in posixpath.normpath(name).split("/") or posixpath.normpath(name) == ".":
        raise PoolSetError(f"pool set name {name!r} leaves the pool set directory", path, line)
    return name


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
    from .rpmem.address import parse_target
    try:
        parse_target(node)
    except PmReplicaError as e:
        raise PoolSetError(e.strerror, path, lineno) from None


def single_file(path: str | os.PathLike[str], size: int) -> PoolSetFile:
    """A one-part set for a plain pool file (PMDK's ``util_poolset_single``)."""
    p = os.path.abspath(os.fspath(path))
    return PoolSetFile(replicas=[LocalReplica(parts=[Part(size=size, path=p, line=0)])])


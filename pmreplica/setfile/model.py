"""The poolset(5) model: a pool set's replicas and parts, its sizes, its text, and the rules
PMDK checks when it creates or opens a pool from it.

A pool set lists the parts of the master replica, then optional ``REPLICA`` sections: local
ones with their own parts, or remote ones (``REPLICA [user@]host[:port] relative.set``).
:meth:`PoolSetFile.validate` applies PMDK's rules; refusals are :class:`PoolSetError`, an
OSError naming file and line (EINVAL unless PMDK's errno says otherwise).
"""

from __future__ import annotations

import errno
import os
import posixpath
import sys
from collections import namedtuple

from ..errors import PoolSetError
from . import text as _text

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


def single_file(path: str | os.PathLike[str], size: int) -> PoolSetFile:
    """A one-part set for a plain pool file (PMDK's ``util_poolset_single``)."""
    p = os.path.abspath(os.fspath(path))
    return PoolSetFile(replicas=[LocalReplica(parts=[Part(size=size, path=p, line=0)])])

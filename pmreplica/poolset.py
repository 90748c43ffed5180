"""poolset(5): parse, validate and write PMDK pool set files.

A pool set lists the parts of the master replica, then optional ``REPLICA`` sections: local
ones with their own parts, or remote ones (``REPLICA [user@]host[:port] relative.set``).
Refusals are :class:`PoolSetError` (EINVAL) naming the file and line, in PMDK's words where
PMDK (1.12, ``src/common/set.c``) has words for them.
"""

from __future__ import annotations

import errno
import os
import posixpath
import re
from collections import namedtuple

from .errors import PoolSetError

SIGNATURE = "PMEMPOOLSET"
HDR_SIZE = 4096
#: PMDK rounds part sizes down to the mapping alignment (the page size on Linux).
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
#: Smallest part file PMDK accepts (PMEMOBJ_MIN_PART, RPMEM_MIN_PART).
MIN_PART = 2 << 20
#: Smallest remote pool librpmem accepts (RPMEM_MIN_POOL).
MIN_REMOTE_POOL = 8 << 10

#: the largest size a part line may give (PMDK's size_t)
MAX_SIZE = 2**64 - 1

OPT_SINGLEHDR = "SINGLEHDR"
OPT_NOHDRS = "NOHDRS"
OPTIONS = (OPT_SINGLEHDR, OPT_NOHDRS)

# util_parse_size(): JEDEC and IEC suffixes are binary, SI ones decimal, "B" is bytes.
_SUFFIXES = {"": 1, "B": 1}
for _i, _p in enumerate("KMGTP", start=1):
    _SUFFIXES[_p] = _SUFFIXES[_p + "iB"] = 1 << (10 * _i)
    _SUFFIXES[("k" if _p == "K" else _p) + "B"] = 1000 ** _i
_SIZE_RE = re.compile(r"(\d+)([A-Za-z]{0,3})")


def parse_size(text: str) -> int:
    """Return the byte count of a poolset size such as ``2G``, ``512MiB``, ``10kB`` or ``4096``."""
    m = _SIZE_RE.fullmatch(text)
    if not m or m.group(2) not in _SUFFIXES or int(m.group(1)) == 0:
        raise ValueError(f"incorrect format of size: {text!r}")
    size = int(m.group(1)) * _SUFFIXES[m.group(2)]
    if size > MAX_SIZE:  # PMDK reads sizes into a size_t
        raise ValueError(f"incorrect format of size: {text!r} does not fit in 64 bits")
    return size


def format_size(size: int) -> str:
    """Return the shortest exact poolset spelling of ``size`` (binary suffixes)."""
    for suffix in ("P", "T", "G", "M", "K"):
        mag = _SUFFIXES[suffix]
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
        """Mapped size of the pool: the master replica's size."""
        return self.replica_size(self.master)

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
        """Apply PMDK's rules for a set used as a local pool (or, ``remote=True``, as the set
        an agent serves for a remote replica). Raises :class:`PoolSetError`."""
        path = self.path
        if OPT_NOHDRS in self.options and not remote:
            raise PoolSetError("the NOHDRS poolset option is not supported for local poolsets",
                               path, self.option_lines.get(OPT_NOHDRS))
        if remote and len(self.replicas) > 1:
            raise PoolSetError("remote pool set cannot have replicas", path, self.replicas[1].line)
        if self.is_directory_based and OPT_SINGLEHDR not in self.options:
            raise PoolSetError("directory based pools are not supported for poolsets with "
                               "headers (without SINGLEHDR option)", path, self.master.parts[0].line)
        for rep in self.local_replicas():
            for p in rep.parts:
                if not p.is_dir and p.size < MIN_PART:
                    raise PoolSetError(f"part size {p.size} smaller than the minimum part size "
                                       f"{MIN_PART} ({format_size(MIN_PART)})", path, p.line)
        pool = self.pool_size
        for i, rep in enumerate(self.replicas[1:], start=1):
            if isinstance(rep, LocalReplica) and self.replica_size(rep) < pool:
                raise PoolSetError(f"replica {i} is smaller than the master replica "
                                   f"({self.replica_size(rep)} < {pool} bytes)", path, rep.line)


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
    """True if the file starts with the ``PMEMPOOLSET`` signature line."""
    try:
        with open(path, "rb") as f:
            return f.read(len(SIGNATURE) + 1).rstrip(b"\r\n") == SIGNATURE.encode()
    except IsADirectoryError:
        return False


def parse(path: str | os.PathLike[str]) -> PoolSetFile:
    """Read and parse the pool set file at ``path``."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    except OSError as e:
        raise PoolSetError(f"cannot read pool set file: {e.strerror}", path,
                           errno=e.errno or errno.EINVAL) from e
    return parse_text(text, path)


def parse_text(text: str, path: str | None = None) -> PoolSetFile:
    """Parse pool set text. Follows ``util_poolset_parse``: the first line is exactly
    ``PMEMPOOLSET``, ``#`` starts a comment, fields are separated by blanks. Unlike PMDK,
    lines holding only blanks are skipped rather than refused."""
    lines = text.split("\n")
    if lines[0].removesuffix("\r") != SIGNATURE:  # PMDK reads CRLF files too
        raise PoolSetError("the first line must be exactly 'PMEMPOOLSET'", path, 1)
    replicas: list[Replica] = [LocalReplica(line=0)]
    options: set[str] = set()
    option_lines: dict[str, int] = {}

    def no_parts_error(lineno: int) -> PoolSetError:
        what = "no pool set parts" if len(replicas) == 1 else "no replica parts"
        return PoolSetError(what, path, lineno)

    def current_local_without_parts() -> bool:
        cur = replicas[-1]
        return isinstance(cur, LocalReplica) and not cur.parts

    for lineno, raw in enumerate(lines[1:], start=2):
        line = raw.split("#", 1)[0]
        fields = line.split()
        if not fields:
            continue
        keyword = fields[0]
        if keyword.startswith("OPTION"):
            if keyword != "OPTION":
                raise PoolSetError("unknown option", path, lineno)
            if len(fields) == 1:
                raise PoolSetError("missing option name", path, lineno)
            for opt in fields[1:]:
                if opt not in OPTIONS:
                    raise PoolSetError(f"unknown option '{opt}'", path, lineno)
                options.add(opt)
                option_lines.setdefault(opt, lineno)
        elif keyword.startswith("REPLICA"):
            if keyword != "REPLICA":
                raise PoolSetError("exactly 'REPLICA' expected", path, lineno)
            if current_local_without_parts():
                raise no_parts_error(lineno)
            if len(fields) == 1:
                replicas.append(LocalReplica(line=lineno))
                continue
            if len(fields) == 2:
                raise PoolSetError("address of remote node and descriptor of remote pool set "
                                   "expected", path, lineno)
            if len(fields) > 3:
                raise PoolSetError("invalid token found in the current line", path, lineno)
            node, desc = fields[1], fields[2]
            check_pool_set_name(desc, path, lineno)
            _check_node(node, path, lineno)
            replicas.append(RemoteReplica(node=node, pool_set=desc, line=lineno))
        else:
            cur = replicas[-1]
            if isinstance(cur, RemoteReplica):
                raise PoolSetError("unexpected parts for remote replica", path, lineno)
            cur.parts.append(_parse_part(fields, path, lineno, replicas))
    if current_local_without_parts():
        raise no_parts_error(len(lines))
    if OPT_SINGLEHDR in options and OPT_NOHDRS in options:
        raise PoolSetError("both SINGLEHDR and NOHDRS poolset options used at the same time",
                           path, max(option_lines.values()))
    return PoolSetFile(replicas=replicas, options=frozenset(options), path=path,
                       option_lines=option_lines)


def _parse_part(fields: list[str], path: str | None, lineno: int,
                replicas: list[Replica]) -> Part:
    if len(fields) != 2:
        raise PoolSetError("invalid token found in the current line", path, lineno)
    size_text, part_path = fields
    if not posixpath.isabs(part_path):
        raise PoolSetError("incorrect path (must be an absolute one)", path, lineno)
    if size_text == "AUTO":
        raise PoolSetError("size autodetection is supported only for device dax", path, lineno)
    try:
        size = parse_size(size_text)
    except ValueError:
        raise PoolSetError("incorrect format of size", path, lineno) from None
    is_dir = part_path.endswith("/") or os.path.isdir(part_path)
    locals_ = [r for r in replicas if isinstance(r, LocalReplica)]
    parts = [p for r in locals_ for p in r.parts]
    if parts and any(p.is_dir != is_dir for p in parts):
        raise PoolSetError("cannot mix directories and files in a set", path, lineno)
    norm = os.path.normpath(part_path)
    for p in parts:
        if os.path.normpath(p.path) == norm:
            what = "directory" if is_dir else "part file"
            raise PoolSetError(f"cannot use the same {what} twice (line {p.line})", path, lineno)
    return Part(size=size, path=part_path, line=lineno, is_dir=is_dir)


_NODE_RE = re.compile(r"(?:[^@\s/]+@)?(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(?::\d{1,5})?")


def _check_node(node: str, path: str | None, lineno: int) -> None:
    if not _NODE_RE.fullmatch(node):
        raise PoolSetError(f"invalid remote node address {node!r} "
                           "(expected [user@]host[:port])", path, lineno)


def single_file(path: str | os.PathLike[str], size: int) -> PoolSetFile:
    """A one-part set for a plain pool file (PMDK's ``util_poolset_single``)."""
    p = os.path.abspath(os.fspath(path))
    return PoolSetFile(replicas=[LocalReplica(parts=[Part(size=size, path=p, line=0)])])


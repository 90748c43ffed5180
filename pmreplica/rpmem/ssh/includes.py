"""ssh_config(5) files with their Include directives expanded, for paramiko's parser.

paramiko reads one file and skips ``Include``, so a host defined in an included file (the
usual ``Include config.d/*`` layout) would silently fall back to defaults: another user,
port or key than ``ssh`` uses. Here each Include is replaced by the files it names, in
place, as OpenSSH reads them: glob patterns in lexical order, relative names under
``~/.ssh``, a pattern that matches nothing skipped, at most 16 levels deep (``~`` is
``$HOME`` here, unlike everywhere else in ssh: OpenSSH globs Include patterns with
GLOB_TILDE, which reads ``$HOME``). Two rules keep
the flattened text meaning what OpenSSH makes of the files:

- after an included file that opened Host or Match blocks, a ``Host *`` line returns the
  lines that follow the Include to the scope they were written in (the global one);
- inside a Host or Match block an Include may bring in options only. An included file
  with blocks of its own would apply under both conditions at once, which paramiko's
  config cannot say; it raises :class:`NeedsOpenSSH` naming the file and line rather
  than being read differently, and the launcher hands such a config to OpenSSH.
"""

from __future__ import annotations

import errno
import glob
import os
import re
import shlex

from pmreplica.errors import PmReplicaError

MAX_DEPTH = 16  # OpenSSH's READCONF_MAX_DEPTH
_SETTING = re.compile(r"(\w+)(?:\s*=\s*|\s+)(.+)")  # the keyword split paramiko uses
_BLOCKS = ("host", "match")

class NeedsOpenSSH(PmReplicaError):
    """The ssh config asks for something only the OpenSSH client does (ProxyJump, ...);
    the message says what and where. The paramiko launcher hands such targets to OpenSSH."""

    def __init__(self, reason: str) -> None:
        super().__init__(errno.EOPNOTSUPP, reason)


#: what a stamp records per source: (mtime_ns, size), or None for a missing path
Stamp = tuple[tuple[str, tuple[int, int] | None], ...]


def expand(path: str) -> tuple[str, list[str]]:
    """The text of the config file ``path`` with every Include expanded, and the files
    and directories it was read from (see :func:`stamp`). OSError if ``path`` is unreadable."""
    sources: list[str] = []
    lines, _ = _read(path, path, 0, False, sources)
    return "".join(lines), sources


def stamp(sources: list[str]) -> Stamp:
    """What changes when one of ``sources`` does: an edited file, or a file added to or
    removed from a directory an Include pattern looked in."""
    out = []
    for src in sources:
        try:
            st = os.stat(src)
            out.append((src, (st.st_mtime_ns, st.st_size)))
        except OSError:
            out.append((src, None))
    return tuple(out)


def _read(path: str, top: str, depth: int, in_block: bool,
          sources: list[str]) -> tuple[list[str], bool]:
    """``path``'s lines with its Includes expanded, and whether they open any block;
    ``in_block`` says whether the Include that brought ``path`` in stood inside one."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        text = f.readlines()
    sources.append(path)
    out: list[str] = []
    opens_blocks = False
    for number, line in enumerate(text, 1):
        match = _SETTING.match(line.strip())
        keyword = match.group(1).lower() if match else ""
        if keyword in _BLOCKS:
            in_block = opens_blocks = True
        if match is None or keyword != "include":
            out.append(line if line.endswith("\n") else line + "\n")
            continue
        where = f"ssh config {path}, line {number}"
        if depth >= MAX_DEPTH:
            raise PmReplicaError(errno.ELOOP, f"{where}: Include nested more than {MAX_DEPTH} "
                                              f"levels deep (reading {top})")
        for included in _included(match.group(2), where, sources):
            try:
                lines, has_blocks = _read(included, top, depth + 1, in_block, sources)
            except FileNotFoundError:
                continue  # gone between the glob and the open: as if never matched
            except OSError as e:
                raise PmReplicaError(e.errno or errno.EIO,
                                     f"{where}: cannot read {included}: {e.strerror}") from None
            if has_blocks and in_block:
                raise NeedsOpenSSH(f"{where}: {included} has Host or Match blocks and is "
                                   "included inside a block")
            out += lines
            if has_blocks:
                out.append("Host *\n")  # back to the global scope the Include stood in
                opens_blocks = True
    return out, opens_blocks


def _included(value: str, where: str, sources: list[str]) -> list[str]:
    """The files an Include line names, in the order OpenSSH reads them."""
    try:
        patterns = shlex.split(value)
    except ValueError as e:
        raise PmReplicaError(errno.EINVAL, f"{where}: Include {value!r}: {e}") from None
    files: list[str] = []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)  # $HOME, as OpenSSH's glob(3) GLOB_TILDE
        if not os.path.isabs(pattern):
            pattern = os.path.join(os.path.expanduser("~/.ssh"), pattern)
        if glob.has_magic(pattern):  # watch where a new match would appear
            sources += _directories(os.path.dirname(pattern))
        else:
            sources.append(pattern)
        files += sorted(glob.glob(pattern))
    return files


def _directories(pattern: str) -> list[str]:
    """The directories a pattern's directory part names now, and the fixed directory above
    its first wildcard (whose entries change when a new matching directory appears)."""
    if not glob.has_magic(pattern):
        return [pattern]
    fixed = pattern
    while glob.has_magic(fixed):
        fixed = os.path.dirname(fixed)
    return [fixed, *sorted(glob.glob(pattern))]

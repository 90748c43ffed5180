"""What PMDK's pool set parser says of a file, asked through Debian's ``pmempool``.

``pmempool create obj SET`` parses the set with libpmemobj's copy of ``util_poolset_parse``
and prints the error of the first step that fails. Its answer is sorted here into: refused
at a line (the parser's own errors, ``[what:line]``), refused without a line (the parser's
checks of the files it names), or accepted (a later step failed, or the pool was made).
Sets handed to it keep their part files where nothing can be created (a directory that
does not exist), so that asking costs a few milliseconds and changes nothing. An answer
that fits none of these fails the test rather than being guessed at.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import NamedTuple

_AT_LINE = re.compile(r" \[(?P<what>[^\[\]]*):(?P<line>\d+)\]$")
#: errors util_poolset_parse reports without a line (its checks of directories and files)
_REFUSED = ("cannot mix directories and files in a set", "cannot use the same directory twice",
            "file type ", "os_access ", "stat:", "cannot resolve realpath")
#: errors of the steps after a successful parse
_LATER = ('open "', "the NOHDRS poolset option", "directory based pools are not supported",
          "reservation pool size", "net pool size", "the pool set requires a remote replica",
          "size ", "invalid size (", 'posix_fallocate "', "file size does not match config",
          'flock "', "replication not supported", "mmap")


class Verdict(NamedTuple):
    """``accepted`` by the parser, or refused at ``line`` (None: no line named) with ``what``."""

    accepted: bool
    line: int | None = None
    what: str = ""


def ask(pmempool: str, path: Path | str) -> Verdict:
    """PMDK's verdict on the pool set file at ``path``."""
    run = subprocess.run([pmempool, "create", "obj", str(path)], capture_output=True,
                         timeout=60)
    return judge(run.returncode, run.stderr.decode("utf-8", "backslashreplace"), str(path))


def judge(returncode: int, stderr: str, path: str) -> Verdict:
    """Sort pmempool's exit status and first error line into a :class:`Verdict`."""
    if returncode == 0:
        return Verdict(True)
    first = stderr.splitlines()[0] if stderr else ""
    prefix = f"error: '{path}' -- "
    if not first.startswith(prefix):
        raise AssertionError(f"pmempool answered in an unknown way: {stderr!r}")
    message = first[len(prefix):]
    m = _AT_LINE.search(message)
    if m is not None:
        return Verdict(False, int(m.group("line")), m.group("what"))
    if message.startswith(_REFUSED):
        return Verdict(False, None, message)
    if message.startswith(_LATER):
        return Verdict(True, None, message)
    raise AssertionError(f"pmempool answered in an unknown way: {stderr!r}")

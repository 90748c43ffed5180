"""The local account as OpenSSH sees it: the passwd entry of the real user id.

ssh(1) takes the home directory (``~``, ``%d``, ``~/.ssh/...``) and the local user name
(``%u``) from the passwd database and ignores ``$HOME`` and ``$USER``. Under ``sudo -E``,
in services and in containers the two differ; reading the same entry here keeps the
paramiko and OpenSSH launchers on the same keys, config and known_hosts files.
"""

from __future__ import annotations

import os
import pwd


def _entry() -> pwd.struct_passwd | None:
    try:
        return pwd.getpwuid(os.getuid())
    except KeyError:  # a uid without a passwd entry (some containers)
        return None


def home() -> str:
    """The passwd home of the real user; ``$HOME`` only when there is no passwd entry."""
    entry = _entry()
    return entry.pw_dir if entry is not None else os.path.expanduser("~")


def user_name() -> str:
    """The passwd name of the real user (``%u``); the uid as text without an entry."""
    entry = _entry()
    return entry.pw_name if entry is not None else str(os.getuid())


def expand_tilde(path: str) -> str:
    """``~`` and ``~/x`` under :func:`home`, ``~user/x`` under that user's home, as
    OpenSSH's tilde_expand_filename does; any other path unchanged."""
    if not path.startswith("~"):
        return path
    name, sep, rest = path[1:].partition("/")
    if not name:
        base = home()
    else:
        try:
            base = pwd.getpwnam(name).pw_dir
        except KeyError:
            return path  # OpenSSH refuses the path; leaving it unexpanded makes it not found
    return os.path.join(base, rest) if sep and rest else base

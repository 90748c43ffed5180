"""Host key checking against OpenSSH known_hosts files (sshd(8), SSH_KNOWN_HOSTS FILE FORMAT).

Hand-rolled rather than paramiko's ``HostKeys`` because that class skips what a careful
check needs: ``@revoked`` and ``@cert-authority`` lines, wildcard and negated patterns,
several keys of one type for a host, and it rewrites whole files when saving. Here a file
is only ever appended to.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import hmac
import logging
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache

from pmreplica.errors import RemoteError

log = logging.getLogger("pmreplica.rpmem.launch")


def host_key_name(host: str, port: int) -> str:
    """The name a host is recorded under: ``host``, or ``[host]:port`` off port 22."""
    host = host.lower()
    return host if port == 22 else f"[{host}]:{port}"


def fingerprint(blob: bytes) -> str:
    """OpenSSH's SHA256 fingerprint of a public key blob."""
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


@lru_cache(maxsize=256)
def _pattern(pattern: str) -> re.Pattern[str]:
    # OpenSSH patterns know only '*' and '?'; brackets are literal (as in "[host]:port").
    parts = (".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern.lower())
    return re.compile("".join(parts))


def _hashed_matches(entry: str, name: str) -> bool:
    try:
        _, magic, salt64, hash64 = entry.split("|")
        if magic != "1":
            return False
        salt = base64.b64decode(salt64, validate=True)
        want = base64.b64decode(hash64, validate=True)
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(hmac.new(salt, name.encode(), hashlib.sha1).digest(), want)


def _hosts_match(field_: str, name: str) -> bool:
    """ssh's match_hostname: a positive pattern matches and no negated one does."""
    if field_.startswith("|"):
        return _hashed_matches(field_, name)
    matched = False
    for pattern in field_.split(","):
        negated = pattern.startswith("!")
        if _pattern(pattern[1:] if negated else pattern).fullmatch(name):
            if negated:
                return False
            matched = True
    return matched


@dataclass(frozen=True, slots=True)
class KnownKey:
    """One key line: where it is, and the key (type name and public blob)."""

    path: str
    lineno: int
    keytype: str
    blob: bytes

    @property
    def where(self) -> str:
        return f"{self.path}:{self.lineno}"


@dataclass(slots=True)
class HostKeys:
    """The keys the known_hosts files hold for one host name, the certificate authorities
    trusted for it, and all revoked keys."""

    name: str
    keys: list[KnownKey] = field(default_factory=list)
    revoked: list[KnownKey] = field(default_factory=list)
    authorities: list[KnownKey] = field(default_factory=list)

    @property
    def keytypes(self) -> list[str]:
        seen: list[str] = []
        for key in self.keys:
            if key.keytype not in seen:
                seen.append(key.keytype)
        return seen


def load(paths: list[str] | tuple[str, ...], name: str) -> HostKeys:
    """Collect the keys for ``name`` (see :func:`host_key_name`) from the existing files."""
    found = HostKeys(name)
    for path in paths:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                lines = f.readlines()
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("cannot read known hosts file %s: %s", path, exc.strerror)
            continue
        for lineno, line in enumerate(lines, 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            marker = fields.pop(0) if fields[0].startswith("@") else None
            if len(fields) < 3 or marker not in (None, "@revoked", "@cert-authority"):
                log.debug("%s:%d: not a known_hosts key line, skipped", path, lineno)
                continue
            hosts, keytype, key64 = fields[:3]
            try:
                blob = base64.b64decode(key64, validate=True)
            except (ValueError, binascii.Error):
                log.debug("%s:%d: bad base64 key, skipped", path, lineno)
                continue
            key = KnownKey(path, lineno, keytype, blob)
            if marker == "@revoked":
                found.revoked.append(key)  # revoked for every host, whatever the pattern
            elif _hosts_match(hosts, name):
                (found.keys if marker is None else found.authorities).append(key)
    return found


def append(path: str, name: str, keytype: str, blob: bytes, hashed: bool) -> None:
    """Record a host key at the end of ``path`` (created 0600, its directory 0700)."""
    if hashed:
        salt = os.urandom(20)
        digest = hmac.new(salt, name.encode(), hashlib.sha1).digest()
        host_field = f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"
    else:
        host_field = name
    line = f"{host_field} {keytype} {base64.b64encode(blob).decode()}\n"
    directory = os.path.dirname(path)
    try:
        if directory:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "ab") as f:
            if f.tell() > 0:
                with open(path, "rb") as check:
                    check.seek(-1, os.SEEK_END)
                    if check.read(1) != b"\n":
                        line = "\n" + line
            f.write(line.encode())
    except OSError as exc:
        raise RemoteError(exc.errno or errno.EIO, f"cannot record the host key of {name} "
                          f"in {path}: {exc.strerror}") from None

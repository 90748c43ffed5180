"""Target node addresses, ``[user@]host[:port]`` as librpmem and poolset(5) write them.

An IPv6 literal goes in brackets when a port follows (``[fe80::1%eth0]:2222``); a bare
IPv6 literal without a port is accepted too. Names that an SSH client would read as an
option (a leading ``-``) are refused, so a pool set file cannot smuggle ssh options in.
"""

from __future__ import annotations

import errno
import ipaddress
import re
from dataclasses import dataclass

from pmreplica.errors import PmReplicaError

# Host names and ssh_config(5) aliases: letters, digits, '.', '_', '-', not starting with '-'/'.'.
_HOSTNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
# User names as useradd(8) allows them, plus '.' and '$'; never a leading '-'.
_USER = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.$-]*")


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed target node: ``user`` and ``port`` are None when the address leaves them out."""

    host: str
    user: str | None = None
    port: int | None = None

    @property
    def is_ipv6(self) -> bool:
        """True when ``host`` is an IPv6 literal (which needs brackets next to a port)."""
        return ":" in self.host

    def __str__(self) -> str:
        host = f"[{self.host}]" if self.is_ipv6 and self.port is not None else self.host
        user = f"{self.user}@" if self.user is not None else ""
        port = f":{self.port}" if self.port is not None else ""
        return f"{user}{host}{port}"


def _invalid(text: str, why: str) -> PmReplicaError:
    return PmReplicaError(errno.EINVAL, f"invalid target node address {text!r}: {why}")


def _parse_port(text: str, port: str) -> int:
    if not port.isascii() or not port.isdigit():
        raise _invalid(text, f"port {port!r} is not a number")
    value = int(port)
    if not 1 <= value <= 65535:
        raise _invalid(text, f"port {value} is out of range 1-65535")
    return value


def _check_ipv6(text: str, host: str) -> str:
    addr, _, zone = host.partition("%")
    try:
        ipaddress.IPv6Address(addr)
    except ValueError:
        raise _invalid(text, f"{host!r} is not an IPv6 address") from None
    if "%" in host and not re.fullmatch(r"[A-Za-z0-9_.-]+", zone):
        raise _invalid(text, f"bad IPv6 zone {zone!r}")
    return host


def parse_target(text: str) -> Target:
    """Parse ``[user@]host[:port]``; anything malformed is an EINVAL error naming the text."""
    if not isinstance(text, str):
        raise PmReplicaError(errno.EINVAL, "target node address must be a string, "
                             f"not {type(text).__name__}")
    if not text:
        raise _invalid(text, "empty")
    if text != text.strip() or any(c.isspace() or not c.isprintable() for c in text):
        raise _invalid(text, "contains white space or control characters")

    user: str | None = None
    rest = text
    if "@" in text:
        user, _, rest = text.rpartition("@")
        if not user:
            raise _invalid(text, "empty user name before '@'")
        if not _USER.fullmatch(user):
            raise _invalid(text, f"bad user name {user!r}")

    port: int | None = None
    if rest.startswith("["):
        close = rest.find("]")
        if close < 0:
            raise _invalid(text, "missing ']' after IPv6 address")
        host = _check_ipv6(text, rest[1:close])
        after = rest[close + 1:]
        if after:
            if not after.startswith(":"):
                raise _invalid(text, f"unexpected {after!r} after ']'")
            port = _parse_port(text, after[1:])
    elif rest.count(":") > 1:
        host = _check_ipv6(text, rest)  # a bare IPv6 literal cannot carry a port
    else:
        host, sep, port_text = rest.partition(":")
        if sep:
            port = _parse_port(text, port_text)
        if not host:
            raise _invalid(text, "empty host name")
        if not _HOSTNAME.fullmatch(host):
            raise _invalid(text, f"bad host name {host!r}")
    return Target(host=host, user=user, port=port)

"""What the ssh config says for one target: :func:`resolve` gives its :class:`SshSettings`.

paramiko parses the file (its Includes expanded by :mod:`.includes`) and matches Host and
Match blocks; the values are expanded here as ssh_config(5) defines them, not by paramiko,
whose expansion takes ``~`` and ``%d`` from ``$HOME`` and ``%u`` from ``$USER``, knows no
``%%``, ``%k``, ``%i``, ``${VAR}`` and leaves IdentityAgent and UserKnownHostsFile alone:

- HostName: ``%h`` and ``%%``; ProxyCommand: ``%h %n %p %r %%``;
- IdentityFile, IdentityAgent, UserKnownHostsFile: ``~`` (the passwd home, :mod:`.account`),
  ``${VAR}``, and ``%% %C %d %h %i %j %k %L %l %n %p %r %u``.

What the paramiko launcher cannot do (ProxyJump, CertificateFile, ...) raises
:class:`NeedsOpenSSH`; the launcher then runs the OpenSSH client instead.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shlex
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

import paramiko

from pmreplica.errors import PmReplicaError
from pmreplica.rpmem.ssh import account, includes, known_hosts
from pmreplica.rpmem.address import Target
from pmreplica.rpmem.environ import RpmemConfig
from pmreplica.rpmem.ssh.includes import NeedsOpenSSH

__all__ = ["NeedsOpenSSH", "SshSettings", "resolve"]

DEFAULT_KNOWN_HOSTS = ("~/.ssh/known_hosts", "~/.ssh/known_hosts2")
DEFAULT_GLOBAL_KNOWN_HOSTS = ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")
# OpenSSH's default IdentityFile list and order (the security-key and DSA ones left out:
# paramiko signs with neither)
DEFAULT_IDENTITIES = ("~/.ssh/id_rsa", "~/.ssh/id_ecdsa", "~/.ssh/id_ed25519")
DEFAULT_CONNECT_TIMEOUT = 15.0

#: options the paramiko launcher cannot honour (by their ssh_config(5) names); "none" is unset
_OPENSSH_ONLY = {name.lower(): name for name in (
    "ProxyJump", "CertificateFile", "PKCS11Provider", "KnownHostsCommand", "RevokedHostKeys",
    "BindAddress", "BindInterface")}
_FAMILIES = {"any": socket.AF_UNSPEC, "inet": socket.AF_INET, "inet6": socket.AF_INET6}


@dataclass(frozen=True, slots=True)
class SshSettings:
    """Everything that decides how a connection is made and checked; also the cache key, so a
    connection is reused only under the same host key and identity settings."""

    target: Target = field(compare=False)  # for messages only: aliases share connections
    hostname: str
    port: int
    user: str
    identity_files: tuple[str, ...]
    identities_only: bool
    identity_agent: str | None  # the agent's socket; None: no agent
    known_hosts: tuple[str, ...]
    global_known_hosts: tuple[str, ...]
    host_key_alias: str | None
    hash_known_hosts: bool
    proxy_command: str | None
    connect_timeout: float
    server_alive_interval: int
    address_family: int = socket.AF_UNSPEC  # AddressFamily: AF_UNSPEC is "any"

    @property
    def host_key_name(self) -> str:
        """The name the host's keys are recorded under in known_hosts."""
        return known_hosts.host_key_name(self.host_key_alias or self.hostname, self.port)

    @property
    def cert_name(self) -> str:
        """The name a host certificate must list as a principal (OpenSSH: the HostKeyAlias,
        else the host name, without the port)."""
        return (self.host_key_alias or self.hostname).lower()


# -- the file -------------------------------------------------------------------------------
class _RawConfig(paramiko.SSHConfig):
    """paramiko's parser and Host/Match matching, with values left as written: they are
    expanded by :func:`_expand` (ssh_config(5) TOKENS), which paramiko's expansion is not."""

    def _expand_variables(self, config: Any, target_hostname: str) -> Any:
        return config


_cache: dict[str, tuple[includes.Stamp, list[str], paramiko.SSHConfig]] = {}
_cache_lock = threading.Lock()


def _load(config: RpmemConfig) -> paramiko.SSHConfig:
    """Parse the ssh config file and what it includes, again only when one of them changed."""
    path = config.ssh_config_path
    with _cache_lock:
        cached = _cache.get(path)
    if cached is not None and includes.stamp(cached[1]) == cached[0]:
        return cached[2]
    try:
        text, sources = includes.expand(path)
        parsed = _RawConfig.from_text(text)
    except FileNotFoundError:
        if config.ssh_config is not None:
            raise PmReplicaError(errno.ENOENT, f"environment variable PMREPLICA_SSH_CONFIG="
                                 f"{config.ssh_config!r}: no such file") from None
        return _RawConfig()
    except PmReplicaError:
        raise  # an Include that cannot be followed, already named
    except (OSError, paramiko.ConfigParseError) as exc:
        raise PmReplicaError(errno.EINVAL, f"ssh config {path}: {exc}") from None
    with _cache_lock:
        _cache[path] = (includes.stamp(sources), sources, parsed)
    return parsed


def _lookup(target: Target, config: RpmemConfig) -> dict[str, Any]:
    path = config.ssh_config_path
    try:
        return dict(_load(config).lookup(target.host))
    except ImportError:  # Match exec: paramiko runs it through invoke, which is not installed
        raise NeedsOpenSSH(f"Match exec (ssh config {path})") from None
    except paramiko.SSHException as exc:  # canonicalization failed, or a Match paramiko lacks
        raise NeedsOpenSSH(f"{exc} (ssh config {path})") from None


# -- expansion --------------------------------------------------------------------------------
_TOKEN = re.compile(r"\$\{([^}]*)\}|%(.?)")


def _expand(value: str, tokens: dict[str, str], what: str, path: str, dollar: bool) -> str:
    """``value`` with its %-tokens (and, with ``dollar``, ``${VAR}``) replaced in one pass,
    as OpenSSH's percent_dollar_expand does; an unknown token is EINVAL naming the option."""

    def one(match: re.Match[str]) -> str:
        if match.group(1) is not None:
            name = match.group(1)
            if not dollar:
                return match.group(0)
            if name not in os.environ:
                raise PmReplicaError(errno.EINVAL, f"ssh config {path}: {what} {value!r}: "
                                     f"environment variable ${{{name}}} is not set")
            return os.environ[name]
        token = match.group(2)
        if token not in tokens:
            raise PmReplicaError(errno.EINVAL, f"ssh config {path}: {what} {value!r}: unknown "
                                 f"token %{token}")
        return tokens[token]

    return _TOKEN.sub(one, value)


def _file_tokens(target: Target, hostname: str, port: int, user: str,
                 options: dict[str, Any]) -> dict[str, str]:
    """The tokens of IdentityFile, IdentityAgent and UserKnownHostsFile (ssh_config(5))."""
    local_host = socket.gethostname()
    tokens = {"%": "%", "d": account.home(), "h": hostname, "i": str(os.getuid()),
              "j": "", "k": options.get("hostkeyalias") or target.host,
              "L": local_host.split(".")[0], "l": local_host, "n": target.host,
              "p": str(port), "r": user, "u": account.user_name()}
    tokens["C"] = hashlib.sha1(f"{local_host}{hostname}{port}{user}".encode()).hexdigest()
    return tokens


def _paths(values: list[str], tokens: dict[str, str], what: str, path: str) -> tuple[str, ...]:
    out = []
    for value in values:
        if value.lower() == "none":
            continue
        out.append(_expand(account.expand_tilde(value), tokens, what, path, dollar=True))
    return tuple(out)


def _words(value: str | None, default: tuple[str, ...], what: str, path: str) -> list[str]:
    try:
        return shlex.split(value) if value else list(default)
    except ValueError as exc:
        raise PmReplicaError(errno.EINVAL, f"ssh config {path}: {what} {value!r}: {exc}") from None


def _number(options: dict[str, Any], key: str, path: str, default: float) -> float:
    value = options.get(key)
    if value is None:
        return default
    try:
        return float(int(value))
    except ValueError:
        raise PmReplicaError(errno.EINVAL,
                             f"ssh config {path}: {key} {value!r} is not a number") from None


def _identity_agent(value: str | None, tokens: dict[str, str], path: str) -> str | None:
    """The agent socket: IdentityAgent (a path, ``SSH_AUTH_SOCK``, ``$VAR`` or ``none``),
    else ``$SSH_AUTH_SOCK``; None for no agent."""
    if value is None or value == "SSH_AUTH_SOCK":
        return os.environ.get("SSH_AUTH_SOCK") or None
    if value.lower() == "none":
        return None
    if value.startswith("$"):
        return os.environ.get(value[1:]) or None
    return _expand(account.expand_tilde(value), tokens, "IdentityAgent", path, dollar=True)


def _openssh_only(options: dict[str, Any], path: str) -> None:
    for key, name in _OPENSSH_ONLY.items():
        value = options.get(key)
        shown = value if isinstance(value, str) or value is None else " ".join(value)
        if shown is not None and shown.lower() != "none":
            raise NeedsOpenSSH(f"{name} {shown} (ssh config {path})")


def resolve(target: Target, config: RpmemConfig) -> SshSettings:
    """Apply the ssh config to ``target``: what the target says wins over the file.
    :class:`NeedsOpenSSH` when the paramiko launcher cannot honour it."""
    path = config.ssh_config_path
    options = _lookup(target, config)
    _openssh_only(options, path)
    hostname = _expand(options.get("hostname") or target.host, {"h": target.host, "%": "%"},
                       "HostName", path, dollar=False)
    port = target.port if target.port is not None else int(_number(options, "port", path, 22))
    user = target.user or options.get("user") or account.user_name()
    family = options.get("addressfamily", "any").lower()
    if family not in _FAMILIES:
        raise PmReplicaError(errno.EINVAL, f"ssh config {path}: AddressFamily {family!r} is "
                             "not any, inet or inet6")
    tokens = _file_tokens(target, hostname, port, user, options)
    identities = _paths(options.get("identityfile") or list(DEFAULT_IDENTITIES), tokens,
                        "IdentityFile", path)
    proxy = options.get("proxycommand")
    if proxy is not None:
        proxy = _expand(proxy, {"h": hostname, "n": target.host, "p": str(port), "r": user,
                                "%": "%"}, "ProxyCommand", path, dollar=False)
    return SshSettings(
        target=target,
        hostname=hostname,
        port=port,
        user=user,
        identity_files=identities,
        identities_only=options.get("identitiesonly", "no").lower() == "yes",
        identity_agent=_identity_agent(options.get("identityagent"), tokens, path),
        known_hosts=_paths(_words(options.get("userknownhostsfile"), DEFAULT_KNOWN_HOSTS,
                                  "UserKnownHostsFile", path), tokens, "UserKnownHostsFile", path),
        global_known_hosts=tuple(w for w in _words(options.get("globalknownhostsfile"),
                                                   DEFAULT_GLOBAL_KNOWN_HOSTS,
                                                   "GlobalKnownHostsFile", path)
                                 if w.lower() != "none"),  # taken as written, as by OpenSSH
        host_key_alias=options.get("hostkeyalias"),
        hash_known_hosts=options.get("hashknownhosts", "no").lower() == "yes",
        proxy_command=proxy if proxy and proxy.lower() != "none" else None,
        connect_timeout=_number(options, "connecttimeout", path, DEFAULT_CONNECT_TIMEOUT),
        server_alive_interval=int(_number(options, "serveraliveinterval", path, 0)),
        address_family=_FAMILIES[family],
    )

"""Public key login as ssh(1) does it in BatchMode: agent keys first, then key files.

The order is OpenSSH's (sshconnect2.c, pubkey_prepare): the agent's keys that match an
IdentityFile (the agent signs for them, so a passphrase-protected file works while its key
is loaded), then the agent's other keys (unless IdentitiesOnly), then the key files not in
the agent, in the order the config lists them (OpenSSH's default files when it lists none).
A file's public key comes from its ``.pub`` or, for OpenSSH-format keys, from the private
file's unencrypted header, as ssh reads it. A file that is encrypted, unreadable, too open
(group or other may read it) or not a key is skipped with the reason; nothing asks for a
passphrase. When no key gets in, one EACCES error lists every key tried and why it failed.
"""

from __future__ import annotations

import base64
import binascii
import errno
import os
import re
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass

import paramiko
from paramiko.agent import AgentSSH

from pmreplica.errors import RemoteError
from pmreplica.rpmem.ssh import account, known_hosts
from pmreplica.rpmem.ssh.settings import DEFAULT_IDENTITIES, SshSettings

_OPENSSH_KEY = re.compile(rb"-----BEGIN OPENSSH PRIVATE KEY-----(.*?)-----END OPENSSH PRIVATE KEY",
                          re.S)
_OPENSSH_MAGIC = b"openssh-key-v1\0"


class _AgentKey(paramiko.AgentKey):
    """An agent's key that remembers when the agent would not sign with it (a key added with
    ``ssh-add -c`` whose use was not confirmed): paramiko's transport dies of that, and the
    login goes on with the next key on a new connection, where ssh goes on on the same one."""

    refused = False

    def sign_ssh_data(self, data: bytes, algorithm: str | None = None) -> bytes:
        try:
            return super().sign_ssh_data(data, algorithm)
        except paramiko.SSHException:
            self.refused = True
            raise


class _Agent(AgentSSH):
    """An ssh-agent at a given socket (paramiko's Agent only reads ``$SSH_AUTH_SOCK``)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            self._connect(sock)
        except BaseException:
            sock.close()
            raise
        self._keys = tuple(_AgentKey(self, k.blob, k.comment) for k in self._keys)

    def close(self) -> None:
        self._close()


@dataclass(slots=True)
class _Identity:
    """One key to offer: from the agent (``agent_key``) or from a file (``path``)."""

    label: str
    public: bytes | None = None
    path: str | None = None
    agent_key: _AgentKey | None = None


def _describe(key: paramiko.PKey, where: str) -> str:
    """OpenSSH's way of naming a key: where it is, its type and fingerprint."""
    kind = key.get_name().upper().removeprefix("SSH-").split("-")[0]
    return f"{where} {kind} {known_hosts.fingerprint(key.asbytes())}"


def _file_public_key(path: str) -> tuple[bytes | None, bool]:
    """(public key blob if known without a passphrase, whether the file is encrypted)."""
    public = None
    try:
        with open(path + ".pub", encoding="ascii", errors="replace") as f:
            fields = f.read().split()
        public = base64.b64decode(fields[1]) if len(fields) >= 2 else None
    except (OSError, ValueError, binascii.Error):
        pass
    try:
        with open(path, "rb") as f:
            text = f.read(1 << 20)
    except OSError:
        return public, False
    found = _OPENSSH_KEY.search(text)
    if found is None:  # PEM: only the header says whether it is encrypted
        return public, b"ENCRYPTED" in text.split(b"\n\n", 1)[0] or b"BEGIN ENCRYPTED" in text
    try:
        m = paramiko.Message(base64.b64decode(b"".join(found.group(1).split())))
        if m.get_bytes(len(_OPENSSH_MAGIC)) != _OPENSSH_MAGIC:
            return public, False
        cipher = m.get_text()
        m.get_string()  # kdf name
        m.get_string()  # kdf options
        if m.get_int() >= 1:
            public = public or m.get_binary()
        return public, cipher != "none"
    except (ValueError, binascii.Error, paramiko.SSHException):
        return public, False


def _load_file(ident: _Identity) -> tuple[paramiko.PKey | None, str]:
    """The private key of a file identity, or None and why not (in OpenSSH's words)."""
    assert ident.path is not None
    path = ident.path
    try:
        st = os.stat(path)
    except OSError as exc:
        return None, f"no such identity: {path}: {exc.strerror}"
    if st.st_uid == os.getuid() and st.st_mode & 0o077:
        return None, (f"UNPROTECTED PRIVATE KEY FILE: permissions {stat.S_IMODE(st.st_mode):04o} "
                      f"for '{path}' are too open; the key is ignored (chmod 600 it)")
    _, encrypted = _file_public_key(path)
    if encrypted:
        return None, ("encrypted, and BatchMode asks for no passphrase: load it into ssh-agent "
                      f"(ssh-add {path})")
    try:
        return paramiko.PKey.from_path(path), ""
    except OSError as exc:
        return None, f"Load key \"{path}\": {exc.strerror}"
    except (paramiko.SSHException, ValueError, TypeError) as exc:
        # TypeError: paramiko's word for a passphrase it was not given (a format we did not
        # recognize as encrypted above)
        return None, f"Load key \"{path}\": invalid format ({exc})"


def _identities(s: SshSettings, agent: _Agent | None) -> tuple[list[_Identity], list[str]]:
    """The keys to offer, in OpenSSH's order, and notes on files that cannot be offered."""
    notes: list[str] = []
    defaults = {account.expand_tilde(p) for p in DEFAULT_IDENTITIES}
    files: list[_Identity] = []
    for path in s.identity_files:
        if not os.path.lexists(path):
            if path not in defaults:  # ssh is silent about default files that do not exist
                notes.append(f"no such identity: {path}: No such file or directory")
            continue
        files.append(_Identity(path, public=_file_public_key(path)[0], path=path))
    preferred: list[_Identity] = []
    others: list[_Identity] = []
    for key in agent.get_keys() if agent is not None else ():
        blob = key.asbytes()
        match = next((f for f in files if f.public == blob), None)
        if match is not None:
            files.remove(match)
            preferred.append(_Identity(_describe(key, f"{match.path} (agent)"), blob,
                                       agent_key=key))
        elif not s.identities_only:
            comment = f" ({key.comment})" if key.comment else ""
            others.append(_Identity(_describe(key, "agent key") + comment, blob, agent_key=key))
    return preferred + others + files, notes


def _agent(s: SshSettings) -> tuple[_Agent | None, str]:
    """The agent named by the settings, or None and why (empty when none is configured)."""
    if s.identity_agent is None:
        return None, ""
    try:
        return _Agent(s.identity_agent), ""
    except (OSError, paramiko.SSHException) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return None, f"ssh-agent at {s.identity_agent}: cannot connect: {why}"


def _offer(t: paramiko.Transport, s: SshSettings, ident: _Identity,
           key: paramiko.PKey) -> bool:
    """Offer one key; True when the login is complete, False when the server said no."""
    try:
        remaining = t.auth_publickey(s.user, key)
    except paramiko.BadAuthenticationType as exc:
        raise RemoteError(errno.EACCES, f"{s.target}: Permission denied for user {s.user}: the "
                          f"server does not take public keys (it allows "
                          f"{', '.join(exc.allowed_types)})") from None
    except paramiko.AuthenticationException:
        return False
    if remaining:
        raise RemoteError(errno.EACCES, f"{s.target}: server wants further authentication "
                          f"({', '.join(remaining)}) after key {ident.label}")
    return True


def login(s: SshSettings, connect: Callable[[], paramiko.Transport]) -> paramiko.Transport:
    """A transport from ``connect`` logged in with the first key the server accepts (another
    one when the agent refused to sign); EACCES listing what was tried."""
    t = connect()  # first, as ssh: a host that cannot be reached or trusted is said so
    agent, agent_note = _agent(s)
    try:
        identities, notes = _identities(s, agent)
        if agent_note:
            notes.insert(0, agent_note)
        for ident in identities:
            key = ident.agent_key
            if key is None:
                key, why = _load_file(ident)
                if key is None:
                    notes.append(f"{ident.label}: {why}")
                    continue
                ident.label = _describe(key, ident.label)
            if not t.is_active():  # the agent's refusal ended the last one
                t = connect()
            try:
                if _offer(t, s, ident, key):
                    return t
            except (paramiko.SSHException, EOFError, OSError) as exc:
                if isinstance(exc, RemoteError):
                    raise
                if ident.agent_key is None or not ident.agent_key.refused:
                    raise RemoteError(errno.ECONNABORTED, f"{s.target}: SSH connection to "
                                      f"{s.hostname} port {s.port} failed during login: "
                                      f"{exc or type(exc).__name__}") from None
                notes.append(f"{ident.label}: agent refused operation")
                continue
            notes.append(f"{ident.label}: offered, not accepted by the server")
    except BaseException:
        t.close()
        raise
    finally:
        if agent is not None:
            agent.close()
    t.close()
    if not identities and not notes:
        agent_said = (f"the ssh-agent at {s.identity_agent} holds none" if s.identity_agent
                      else "no ssh-agent (SSH_AUTH_SOCK unset, no IdentityAgent)")
        notes.append(f"no keys: {agent_said}, and none of "
                     f"{', '.join(s.identity_files) or 'no IdentityFile'} exists")
    raise RemoteError(errno.EACCES, f"{s.target}: Permission denied (publickey) for user "
                      f"{s.user}; tried: {'; '.join(notes)}")

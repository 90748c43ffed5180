"""Is the server's host key the one on record? Checked as ssh(1) checks it.

Revoked keys (the host's or its CA's) are refused; a host certificate is accepted when an
``@cert-authority`` line for the host holds its CA and :func:`cert.problem` finds
nothing wrong; otherwise, as OpenSSH does, its plain key is checked like any host key: a
recorded key lets it in, a different recorded key is refused as a changed host, and an
unknown key is refused unless PMREPLICA_SSH_ACCEPT_NEW=1 records it.
"""

from __future__ import annotations

import errno
import logging

import paramiko

from pmreplica.errors import RemoteError
from pmreplica.rpmem.ssh import cert as ssh_cert
from pmreplica.rpmem.ssh import known_hosts
from pmreplica.rpmem.ssh.settings import SshSettings

log = logging.getLogger("pmreplica.rpmem.launch")

_CERT = "-cert-v01@openssh.com"


def prefer_known_key_types(t: paramiko.Transport, known: known_hosts.HostKeys) -> None:
    """Negotiate what is on record, as OpenSSH orders HostKeyAlgorithms: every certificate
    type first when a CA is trusted for the host, then the types of its recorded keys (so a
    host known by its RSA key is not taken for a changed host when it also offers ed25519)."""
    options = t.get_security_options()
    offered = list(options.key_types)
    wanted: list[str] = []
    if known.authorities:
        wanted += [n + _CERT for n in offered if not n.endswith(_CERT)]
    for keytype in known.keytypes:
        names = ["rsa-sha2-512", "rsa-sha2-256"] if keytype == "ssh-rsa" else [keytype]
        wanted += [n for n in names if n in offered and n not in wanted]
    if wanted:
        options.key_types = wanted + [n for n in offered if n not in wanted]


def _certificate(key: paramiko.PKey, s: SshSettings,
                 known: known_hosts.HostKeys) -> tuple[bool, str]:
    """(accepted, why not) for the certificate ``key`` carries; (False, "") without one."""
    blob = key.public_blob.key_blob if key.public_blob is not None else None
    if blob is None:
        return False, ""
    try:
        cert = ssh_cert.parse(blob)
    except ValueError as exc:
        return False, f"its host certificate cannot be read ({exc})"
    ca_shown = known_hosts.fingerprint(cert.ca_blob)
    for bad in known.revoked:
        if bad.blob == cert.ca_blob:
            raise RemoteError(errno.EACCES, f"{s.target}: the CA key {ca_shown} that signed the "
                              f"host certificate of {known.name} is marked revoked in "
                              f"{bad.where}; refusing to connect")
    if not any(ca.blob == cert.ca_blob for ca in known.authorities):
        return False, (f"its host certificate is signed by CA {ca_shown}, which no "
                       f"@cert-authority line for {known.name} names")
    why = ssh_cert.problem(cert, s.cert_name)
    if why is not None:
        return False, f"its host certificate (ID {cert.key_id!r}) was not accepted: {why}"
    log.debug("%s: host certificate %r of %s signed by trusted CA %s", s.target, cert.key_id,
              known.name, ca_shown)
    return True, ""


def check(t: paramiko.Transport, s: SshSettings, known: known_hosts.HostKeys,
          accept_new: bool) -> None:
    """Accept the server's host key or raise EACCES saying why, with the way out."""
    key = t.get_remote_server_key()
    keytype, blob = key.get_name(), key.asbytes()
    shown = f"{keytype} key {known_hosts.fingerprint(blob)}"
    for bad in known.revoked:
        if bad.blob == blob:
            raise RemoteError(errno.EACCES, f"{s.target}: host key of {known.name} ({shown}) is "
                              f"marked revoked in {bad.where}; refusing to connect")
    accepted, cert_problem = _certificate(key, s, known)
    if accepted or any(k.blob == blob for k in known.keys):
        return
    also = f"; {cert_problem}" if cert_problem else ""
    if known.keys:
        where = ", ".join(k.where for k in known.keys)
        raise RemoteError(errno.EACCES, f"{s.target}: HOST KEY MISMATCH for {known.name}: the "
                          f"server offers {shown}, which is not the key recorded in {where} "
                          f"(possible man-in-the-middle attack){also}; if the host key was "
                          "changed on purpose, remove the old entry with: ssh-keygen -R "
                          f"'{known.name}' -f {known.keys[0].path}")
    if not accept_new:
        files = s.known_hosts + s.global_known_hosts
        record = s.known_hosts[0] if s.known_hosts else "~/.ssh/known_hosts"
        raise RemoteError(errno.EACCES, f"{s.target}: host key of {known.name} is not known "
                          f"({shown}; checked {', '.join(files) or 'no files'}){also}; verify "
                          f"the fingerprint and add the key to {record} (for example by "
                          "connecting once with ssh), or set PMREPLICA_SSH_ACCEPT_NEW=1 to "
                          "accept and record new host keys")
    if not s.known_hosts:
        raise RemoteError(errno.EACCES, f"{s.target}: host key of {known.name} is not known and "
                          "UserKnownHostsFile is none, so it cannot be recorded")
    known_hosts.append(s.known_hosts[0], known.name, keytype, blob, s.hash_known_hosts)
    log.warning("%s: recorded new host key of %s (%s) in %s", s.target, known.name, shown,
                s.known_hosts[0])

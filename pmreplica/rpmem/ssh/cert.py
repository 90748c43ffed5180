"""OpenSSH host certificates (PROTOCOL.certkeys): read one, and judge it as ssh(1) does.

paramiko negotiates a certificate host key and proves the server holds the certified key
(the key exchange signature), but it neither checks the certificate's own signature nor
its type, validity window or principals; :func:`problem` does, with OpenSSH's rules for
host certificates: a host (not user) certificate, signed by the CA with an algorithm of
OpenSSH's default CASignatureAlgorithms, valid now, listing the host name among its
principals (exactly, no wildcards; an empty list is valid for every host) and carrying no
critical options. The reasons are OpenSSH's own words.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import paramiko

HOST_CERT = 2  # SSH2_CERT_TYPE_HOST
#: OpenSSH's default CASignatureAlgorithms that paramiko can verify (ssh-rsa, SHA-1, is not one)
CA_SIGNATURE_ALGORITHMS = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
                           "ecdsa-sha2-nistp521", "rsa-sha2-512", "rsa-sha2-256")
_SUFFIX = "-cert-v01@openssh.com"


@dataclass(frozen=True, slots=True)
class Certificate:
    """The fields of an OpenSSH certificate that a host check needs."""

    key_type: str  # the certificate's type name, e.g. ssh-ed25519-cert-v01@openssh.com
    serial: int
    kind: int  # 1 user, 2 host
    key_id: str
    principals: tuple[str, ...]
    valid_after: int
    valid_before: int
    critical_options: bytes
    ca_blob: bytes  # the CA's public key blob (as in an @cert-authority line)
    signature: bytes
    signed: bytes  # every byte before the signature: what the CA signed


def _skip_key_fields(m: paramiko.Message, key_type: str) -> None:
    """Read past the certified public key's fields, which follow the nonce."""
    if key_type.startswith("ssh-rsa"):
        m.get_mpint()  # e
        m.get_mpint()  # n
    elif key_type.startswith("ecdsa-sha2-"):
        m.get_string()  # curve
        m.get_string()  # Q
    elif key_type.startswith("ssh-ed25519"):
        m.get_string()
    else:
        raise ValueError(f"unsupported certificate type {key_type}")


def parse(blob: bytes) -> Certificate:
    """Read a certificate blob (as the server sent it); ValueError if it is not one."""
    m = paramiko.Message(blob)
    key_type = m.get_text()
    if not key_type.endswith(_SUFFIX):
        raise ValueError(f"{key_type} is not a certificate type")
    m.get_string()  # nonce
    _skip_key_fields(m, key_type)
    serial, kind = m.get_int64(), m.get_int()
    key_id = m.get_text()
    names = paramiko.Message(m.get_binary())
    principals = []
    while names.get_remainder():
        principals.append(names.get_text())
    valid_after, valid_before = m.get_int64(), m.get_int64()
    critical = m.get_binary()
    m.get_binary()  # extensions
    m.get_binary()  # reserved
    ca_blob = m.get_binary()
    signed = m.get_so_far()
    signature = m.get_binary()
    if m.get_remainder() or not ca_blob or not signature:
        raise ValueError("malformed certificate")
    return Certificate(key_type, serial, kind, key_id, tuple(principals), valid_after,
                       valid_before, critical, ca_blob, signature, signed)


def _signature_problem(cert: Certificate) -> str | None:
    try:
        ca_type = paramiko.Message(cert.ca_blob).get_text()
        algorithm = paramiko.Message(cert.signature).get_text()
        if algorithm not in CA_SIGNATURE_ALGORITHMS:
            return f"Certificate signed with disallowed algorithm {algorithm}"
        ca = paramiko.PKey.from_type_string(ca_type, cert.ca_blob)
        if ca.verify_ssh_sig(cert.signed, paramiko.Message(cert.signature)):
            return None
    except (paramiko.SSHException, ValueError, TypeError) as exc:
        return f"Certificate signature cannot be verified: {exc}"
    return "Certificate signature does not verify with its CA key"


def problem(cert: Certificate, name: str, now: float | None = None) -> str | None:
    """Why ``cert`` does not vouch for host ``name`` (OpenSSH's words), or None if it does."""
    if cert.kind != HOST_CERT:
        return "Certificate invalid: not a host certificate"
    now = time.time() if now is None else now
    if now < cert.valid_after:
        return "Certificate invalid: not yet valid"
    if now >= cert.valid_before:
        return "Certificate invalid: expired"
    if cert.principals and name not in cert.principals:
        return "Certificate invalid: name is not a listed principal"
    if cert.critical_options:
        return "Certificate contains unsupported critical options"
    return _signature_problem(cert)

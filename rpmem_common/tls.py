"""TLS 1.3 on the TCP data lanes, keyed over the SSH control channel.

For each session the agent makes an Ed25519 key and a self-signed certificate, in memory,
and sends the certificate to the client in its CREATE/OPEN response, which travels over the
authenticated SSH channel. The client accepts a data port only if its handshake presents
exactly that certificate; TLS 1.3 has the server sign the handshake with the certificate's
key, so pinning the certificate pins the key. No CA, no file, nothing that expires: the
identity lives and dies with the session. Inside TLS each lane still opens with the
session's one-time secret (``wire.HELLO``), which binds the lane to its session.

:class:`TlsLane` gives a TLS connection the socket methods the lanes use (``sendmsg``,
``sendall``, ``send``, ``recv_into`` with ``MSG_WAITALL``), so the data path code is one for
clear and encrypted lanes, and turns ssl's errors into the OSErrors a socket raises.
"""

from __future__ import annotations

import base64
import errno
import functools
import os
import signal
import socket
import ssl
from _operator import _compare_digest as compare_digest  # hmac's, without importing hashlib
# the signal module's getsignal() makes an enum of the answer: 1.1 us of every send
from _signal import SIG_IGN, getsignal

from pmreplica.errors import RemoteError

#: the most plaintext one TLS record carries: a header and a payload up to this size go out
#: as one record (one write, one receive, one authentication tag) rather than two
_RECORD = 16384
#: ssl refuses writes over INT_MAX bytes; a larger range goes out in pieces this big
_MAX_WRITE = 1 << 30
_PIPE = {signal.SIGPIPE}
_SIGPIPE = int(signal.SIGPIPE)
_WAITALL = socket.MSG_WAITALL


# -- the agent's identity ---------------------------------------------------------------------
class AgentIdentity:
    """A session's server side: a TLS context holding a fresh key and its self-signed
    ``certificate`` (DER), made without a file system."""

    def __init__(self) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        key = Ed25519PrivateKey.generate()
        self.certificate = _self_signed(key.public_key().public_bytes_raw(), key.sign)
        self.context = _server_context(_pem("PRIVATE KEY", _pkcs8(key.private_bytes_raw()))
                                       + ssl.DER_cert_to_PEM_cert(self.certificate).encode())

    def wrap(self, sock: socket.socket) -> "TlsLane":
        """The agent's end of a lane: the handshake on ``sock``, bounded by its timeout."""
        try:
            tls = _without_sigpipe(self.context.wrap_socket, sock, True)
        except OSError as e:
            raise _plain(e) from e
        return TlsLane(tls)


def _server_context(pem: bytes) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.num_tickets = 0  # no resumption: after the handshake only lane data flows
    # ssl loads keys only from files: an anonymous memory file, opened again through /proc
    fd = os.memfd_create("pmreplica-tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, pem)
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    return ctx


def _der(tag: int, *parts: bytes) -> bytes:
    body = b"".join(parts)
    n = len(body)
    if n < 0x80:
        return bytes((tag, n)) + body
    size = (n.bit_length() + 7) // 8
    return bytes((tag, 0x80 | size)) + n.to_bytes(size, "big") + body


# The key and the certificate are fixed templates (PKCS #8 and RFC 5280, for Ed25519 as RFC
# 8410 has them) around the key's bytes and the signature, written here because
# cryptography's x509 and serialization modules take some 60 ms to import, on every agent
# start. Nobody checks the certificate's name or dates: the client compares the whole of it.
_ED25519 = _der(0x30, _der(0x06, b"\x2b\x65\x70"))  # AlgorithmIdentifier id-Ed25519
_NAME = _der(0x30, _der(0x31, _der(0x30, _der(0x06, b"\x55\x04\x03"),  # commonName
                                   _der(0x0C, b"pmreplica-agent"))))
_VALIDITY = _der(0x30, _der(0x17, b"700101000000Z"),
                 _der(0x18, b"99991231235959Z"))  # RFC 5280's end for "never expires"


def _pkcs8(private: bytes) -> bytes:
    """The DER PKCS #8 form of Ed25519 private key ``private`` (its 32 raw bytes)."""
    return _der(0x30, _der(0x02, b"\0"), _ED25519, _der(0x04, _der(0x04, private)))


def _pem(label: str, der: bytes) -> bytes:
    return (f"-----BEGIN {label}-----\n".encode() + base64.encodebytes(der)
            + f"-----END {label}-----\n".encode())


def _self_signed(public: bytes, sign) -> bytes:
    """The DER certificate of Ed25519 key ``public``, signed with ``sign``."""
    tbs = _der(0x30, _der(0xA0, _der(0x02, b"\x02")), _der(0x02, b"\x01"), _ED25519, _NAME,
               _VALIDITY, _NAME, _der(0x30, _ED25519, _der(0x03, b"\0" + public)))
    return _der(0x30, tbs, _ED25519, _der(0x03, b"\0" + sign(tbs)))


# -- the client -------------------------------------------------------------------------------
@functools.cache
def _client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # loads no CA certificates
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    # no chain to verify: client_lane pins the certificate itself. The handshake still checks
    # that the server holds its key (its CertificateVerify signature), whatever this mode says.
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_lane(sock: socket.socket, certificate: bytes, name: str) -> "TlsLane":
    """The client's end of a lane: the handshake on ``sock`` (bounded by its timeout), then
    EACCES unless the peer presented exactly ``certificate``, before anything is sent."""
    try:
        tls = _without_sigpipe(_client_context().wrap_socket, sock)
    except OSError as e:
        raise _plain(e) from e
    if not compare_digest(tls.getpeercert(binary_form=True) or b"", certificate):
        tls.close()
        raise RemoteError(errno.EACCES, f"{name}: the data port presented another TLS "
                                        "certificate than the one the agent sent over SSH "
                                        "(a man in the middle?); lane refused")
    return TlsLane(tls)


# -- a lane over TLS ----------------------------------------------------------------------------
def _plain(e: OSError) -> OSError:
    """An ssl error as the OSError a socket would raise in its place, with an errno; always a
    new one, without ``e``'s traceback (see :class:`TlsLane`)."""
    if isinstance(e, (ssl.SSLWantReadError, ssl.SSLWantWriteError, TimeoutError)):
        return BlockingIOError(errno.EAGAIN, "timed out")  # as SO_RCVTIMEO does on a socket
    if isinstance(e, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return ConnectionResetError(errno.ECONNRESET, "TLS connection closed")
    if isinstance(e, ssl.SSLError):  # a record that fails its check, an alert, a bad handshake
        reason = e.reason or str(e)
        if "BAD_RECORD_MAC" in reason:  # found here, or by the peer (then it is an alert)
            return OSError(errno.EBADMSG, f"TLS: a record was altered on the way ({reason})")
        return OSError(errno.EBADMSG, f"TLS: {reason}")
    return type(e)(e.errno, e.strerror) if e.errno else OSError(errno.ECONNRESET, str(e))


def _without_sigpipe(call, *args):
    """``call(*args)`` with SIGPIPE blocked in this thread, and one it raised taken off.

    OpenSSL writes with write(2) (data, and the alert it sends when a read fails), which
    raises SIGPIPE on a broken connection: a process that does not ignore SIGPIPE, as a
    host application may run, would die of a lost replica."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _PIPE)
    try:
        return call(*args)
    except OSError:
        if signal.SIGPIPE not in old:
            signal.sigtimedwait(_PIPE, 0)
        raise
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _no_connection(*_args: object) -> int:
    raise OSError(errno.EBADF, "lane is closed")


class TlsLane:
    """A TLS connection with the socket methods the lanes use.

    Reads and writes go to the connection's OpenSSL object itself: ``ssl.SSLSocket`` drops
    it when another thread shuts the socket down (a lane monitor), and would then read the
    raw stream, and its wrappers cost two Python calls per operation on the hot path.
    Attributes not defined here are the ``ssl.SSLSocket``'s (``fileno``, ``setsockopt``...).

    A failed lane keeps its error, and an error keeps the frames it went through with their
    variables: so the methods here drop the caller's buffer (often a view of the pool, which
    the pool could not be closed under) before they raise, and raise new errors only.
    """

    __slots__ = ("_tls", "_read", "_write", "_out", "_outview", "pending")

    def __init__(self, tls: ssl.SSLSocket) -> None:
        self._tls = tls
        self._read = tls._sslobj.read  # type: ignore[union-attr]
        self._write = tls._sslobj.write  # type: ignore[union-attr]
        #: bytes OpenSSL decrypted and holds: a reader must take them before polling the socket
        self.pending = tls._sslobj.pending  # type: ignore[union-attr]
        self._out = bytearray(_RECORD)
        self._outview = memoryview(self._out)

    def __getattr__(self, name: str):
        return getattr(self._tls, name)

    def settimeout(self, timeout: float | None) -> None:
        """As a socket's; but blocking (None) keeps the kernel's deadlines working.

        OpenSSL takes a receive that SO_RCVTIMEO cut short for "try again", and ssl retries
        it forever on a blocking socket. So the file descriptor blocks while ssl believes the
        socket non-blocking: then "try again" surfaces as EAGAIN, as on a clear lane, and no
        poll() precedes each receive."""
        if timeout is not None:
            self._tls.settimeout(timeout)
            return
        self._tls.setblocking(False)
        os.set_blocking(self._tls.fileno(), True)

    # -- receiving ----------------------------------------------------------------------------
    def recv_into(self, buffer, nbytes: int = 0, flags: int = 0) -> int:
        """Up to ``nbytes`` (default: the buffer's size) into ``buffer``, decrypted in place
        by OpenSSL; all of them with ``MSG_WAITALL``, unless the stream ends. 0 at its end."""
        try:
            if getsignal(_SIGPIPE) == SIG_IGN:
                return self._receive(buffer, nbytes or len(buffer), flags)
            return _without_sigpipe(self._receive, buffer, nbytes or len(buffer), flags)
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
            return 0  # the end of the stream; a length-framed message cut short stays short
        except OSError as e:
            error = _plain(e)
        buffer = None
        raise error

    def _receive(self, buffer, n: int, flags: int) -> int:
        got = self._read(n, buffer)
        if got == n or not got or not flags & _WAITALL:
            return got
        view = memoryview(buffer)
        while got < n:
            r = self._read(n - got, view[got:])
            if not r:
                break
            got += r
        return got

    # -- sending ------------------------------------------------------------------------------
    def sendmsg(self, buffers, ancdata=(), flags: int = 0, address=None) -> int:
        """Send ``buffers`` in order, a lane's operation header and its payload as one record
        when they fit. Returns the bytes sent: all of them."""
        try:
            if len(buffers) == 2:
                head, body = buffers
                n = len(head)
                total = n + len(body)
                if total <= _RECORD:
                    out = self._outview
                    out[:n] = head
                    out[n:total] = body
                    return self.send(out[:total])
            total = 0
            for b in buffers:
                total += self.send(b)
            return total
        except OSError as e:
            error = e
        buffers = head = body = b = None
        raise error

    def send(self, data, flags: int = 0) -> int:
        """Sends all of ``data`` (a TLS write is never partial); returns its length."""
        try:
            if getsignal(_SIGPIPE) == SIG_IGN and len(data) <= _MAX_WRITE:
                self._write(data)
            else:
                _without_sigpipe(self._write_pieces, data)
            return len(data)
        except OSError as e:
            error = _plain(e)
        data = None
        raise error

    sendall = send

    def _write_pieces(self, data) -> None:
        view = memoryview(data).cast("B")
        for at in range(0, len(view), _MAX_WRITE):
            self._write(view[at:at + _MAX_WRITE])

    # -- the end ------------------------------------------------------------------------------
    def shutdown(self, how: int) -> None:
        """Wakes a thread blocked on the lane; its OpenSSL object stays for it to fail on."""
        socket.socket.shutdown(self._tls, how)

    def close(self) -> None:
        # the OpenSSL object keeps the file descriptor's number: nothing may use it after the
        # socket closed it (another file may get that number)
        self._read = self._write = _no_connection
        try:
            socket.socket.shutdown(self._tls, socket.SHUT_RDWR)
        except OSError:
            pass
        self._tls.close()

"""Data-path message layouts, shared by the client and the agent (network byte order).

The CREATE/OPEN response's connection data for TCP is the session's one-time secret, then,
when the lanes run over TLS (``tls.py``), the agent's certificate (DER) for the client to
pin. A lane connection opens with the TLS handshake, if any, then HELLO (the secret and the
lane number) and the agent's one-word status. Then each operation is an OP header: a WRITE or
DEEP carries ``length`` payload bytes and is answered by a one-word status once the range is
durable; a READ is answered by the ``length`` bytes alone. Like an RDMA READ, a read's answer
has no status: it is the data, or the lane closes (the agent refuses only a read outside the
pool, which a client checked before asking). One buffer to receive into saves a scatter receive
on the client and a gather send on the agent: 0.7 of the 5.8 us a 64-byte read took.
"""

from __future__ import annotations

import errno
import socket
import struct
import time

SECRET_LEN = 32
#: what the logs and ``pmreplica info`` call TCP lanes with TLS (tls.py)
TLS_NAME = "TLS 1.3"
HELLO = struct.Struct(">32sI")  # secret, lane
OP = struct.Struct(">IIQQ")  # op, flags, offset, length
STATUS = struct.Struct(">I")  # 0 or an errno

OP_WRITE = 1  # payload follows; made durable, then acknowledged
OP_DEEP = 2  # like WRITE, through the deepest durability domain
OP_READ = 3  # no payload; answered with the data alone
#: OP flag: the client does not wait for this answer yet (a flush); the agent may hold its
#: status word while further operations are already waiting, and send the words together
OPF_ACK_LATER = 1 << 31

#: Liveness (heartbeat.py on both ends): READY's blob names the session's heartbeat port and
#: secret; the client connects there, sends HEARTBEAT_HELLO (the secret and its peer timeout
#: in milliseconds, so that the agent can judge the client's silence by the same bound),
#: gets a status word, then sends a PING every quarter of the timeout, each echoed at once.
HEARTBEAT = struct.Struct(">H32s")  # port, secret
HEARTBEAT_HELLO = struct.Struct(">32sI")  # secret, client's peer timeout (ms)
PING = struct.Struct(">Q")  # sequence number

#: the GPSPM persist message RDMA peers exchange: flags, lane, address (pool offset), size
PERSIST_MSG = struct.Struct(">IIQQ")


def connection_blob(secret: bytes, certificate: bytes | None) -> bytes:
    """The TCP connection data the agent sends in its CREATE/OPEN response."""
    return secret + (certificate or b"")


def split_connection_blob(blob: bytes) -> tuple[bytes, bytes | None]:
    """(secret, certificate or None for clear-text lanes); ValueError if it is too short."""
    if len(blob) < SECRET_LEN:
        raise ValueError(f"TCP connection data of {len(blob)} bytes, less than a secret")
    return blob[:SECRET_LEN], blob[SECRET_LEN:] or None


def recv_exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytes:
    """Exactly ``n`` bytes from ``sock`` (a HELLO, or the status answering it), for both ends;
    ConnectionResetError if the peer closes first. ``deadline`` (a ``time.monotonic()``
    instant) bounds the whole of it, where a socket timeout bounds each receive only: a peer
    sending a byte at a time would otherwise hold the receiver as long as it likes."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(errno.ETIMEDOUT, f"{got} of {n} bytes in the time allowed")
            sock.settimeout(left)
        r = sock.recv_into(view[got:], n - got)
        if not r:
            raise ConnectionResetError(errno.ECONNRESET,
                                       f"connection closed after {got} of {n} bytes")
        got += r
    return bytes(buf)

"""Control-channel messages between the client and the agent, and status <-> errno.

The layout is librpmem's (``rpmem_proto.h``, packed, big-endian): requests start with
``type:u32 size:u64``, responses with ``status:u32 type:u32 size:u64``; ``size`` counts the
whole message. pmreplica adds, after librpmem's fields: a flags word ending CREATE/OPEN
requests (since protocol 1.1; :data:`TCP_CLEAR`, :func:`spin_flags`), a provider-specific
connection blob in CREATE/OPEN responses (the TCP secret and TLS certificate, RDMA queue-pair
data), an optional UTF-8 message in error responses, and the STAT, CONNECT, CHECKSUM and
GENERATION requests.
"""

from __future__ import annotations

import errno
import struct
from collections import namedtuple

from pmreplica.header import ATTR_SIZE, PoolAttr

PROTO_MAJOR = 1
PROTO_MINOR = 1  # 1.1: CREATE/OPEN end with a flags word

# message types; a response is its request's type + 1
CREATE, CREATE_RESP = 1, 2
OPEN, OPEN_RESP = 3, 4
CLOSE, CLOSE_RESP = 5, 6
SET_ATTR, SET_ATTR_RESP = 7, 8
STAT, STAT_RESP = 9, 10  # pool size and header health (librpmem could not tell)
CONNECT, CONNECT_RESP = 11, 12  # client's connection data, for providers that need it (verbs)
CHECKSUM, CHECKSUM_RESP = 13, 14  # range checksums computed where the data lives (sync --verify)
GENERATION, GENERATION_RESP = 15, 16  # record the pool's generation (generation.py)
REQUEST_TYPES = (CREATE, OPEN, CLOSE, SET_ATTR, STAT, CONNECT, CHECKSUM, GENERATION)

# providers (librpmem: RPMEM_PROV_LIBFABRIC_VERBS = 1, _SOCKETS = 2)
PROV_VERBS = 1
PROV_TCP = 2
PROVIDER_NAMES = {PROV_VERBS: "verbs", PROV_TCP: "tcp"}

# persist methods
PM_GPSPM = 1
PM_APM = 2
PERSIST_METHOD_NAMES = {PM_GPSPM: "GPSPM", PM_APM: "APM"}

CLOSE_REMOVE = 1
#: CREATE/OPEN flag: the client asks for clear-text TCP lanes (PMREPLICA_TCP_TLS=0). A request
#: without the flags word comes from a client older than TLS, which speaks clear text only.
TCP_CLEAR = 1
#: CREATE/OPEN flags, bits 16-31: the client's spin window (``PMREPLICA_SPIN_US``) plus one, for
#: the agent's TCP lanes; 0 (a client that does not say) leaves the agent's default. Agents
#: that predate it ignore these bits.
_SPIN_SHIFT = 16


def spin_flags(window_us: int) -> int:
    """The CREATE/OPEN flag bits that pass the client's spin window to the agent."""
    return (min(window_us, 0xFFFE) + 1) << _SPIN_SHIFT


def spin_window(flags: int) -> int | None:
    """The spin window a CREATE/OPEN request's flags ask for; None if they do not say."""
    value = flags >> _SPIN_SHIFT & 0xFFFF
    return value - 1 if value else None


# status codes (librpmem's enum rpmem_err) and the errno each becomes on the client
OK = 0
ERR_BADPROTO, ERR_BADNAME, ERR_BADSIZE, ERR_BADNLANES, ERR_BADPROVIDER = 1, 2, 3, 4, 5
ERR_FATAL, ERR_FATAL_CONN, ERR_BUSY, ERR_EXISTS, ERR_PROVNOSUP = 6, 7, 8, 9, 10
ERR_NOEXIST, ERR_NOACCESS, ERR_POOL_CFG = 11, 12, 13
STATUS_ERRNO = {
    ERR_BADPROTO: errno.EPROTONOSUPPORT, ERR_BADNAME: errno.EINVAL, ERR_BADSIZE: errno.EFBIG,
    ERR_BADNLANES: errno.EINVAL, ERR_BADPROVIDER: errno.EINVAL, ERR_FATAL: errno.EREMOTEIO,
    ERR_FATAL_CONN: errno.ECONNABORTED, ERR_BUSY: errno.EBUSY, ERR_EXISTS: errno.EEXIST,
    ERR_PROVNOSUP: errno.EMEDIUMTYPE, ERR_NOEXIST: errno.ENOENT, ERR_NOACCESS: errno.EACCES,
    ERR_POOL_CFG: errno.EINVAL,
}
STATUS_TEXT = {
    ERR_BADPROTO: "protocol version not supported by the agent",
    ERR_BADNAME: "invalid pool set name", ERR_BADSIZE: "remote pool is too small",
    ERR_BADNLANES: "invalid number of lanes", ERR_BADPROVIDER: "invalid provider",
    ERR_FATAL: "fatal error on the agent", ERR_FATAL_CONN: "agent lost its connection",
    ERR_BUSY: "remote pool is busy (already open)", ERR_EXISTS: "remote pool already exists",
    ERR_PROVNOSUP: "provider not supported by the agent",
    ERR_NOEXIST: "remote pool does not exist", ERR_NOACCESS: "access to the remote pool denied",
    ERR_POOL_CFG: "remote pool set configuration is invalid",
}
# errno the agent meets -> status it reports (anything else is FATAL)
_ERRNO_STATUS = {errno.EEXIST: ERR_EXISTS, errno.ENOENT: ERR_NOEXIST, errno.EACCES: ERR_NOACCESS,
                 errno.EPERM: ERR_NOACCESS, errno.EBUSY: ERR_BUSY, errno.EFBIG: ERR_BADSIZE,
                 errno.EINVAL: ERR_POOL_CFG, errno.EPROTONOSUPPORT: ERR_BADPROTO,
                 errno.EMEDIUMTYPE: ERR_PROVNOSUP}


def status_for_errno(err: int | None) -> int:
    return _ERRNO_STATUS.get(err or 0, ERR_FATAL)


def encode_ready(status: int, blob: bytes = b"") -> bytes:
    """The agent's announcement: marker, start status, blob."""
    return READY_MARKER + READY.pack(status, len(blob)) + blob


REQ_HDR = struct.Struct(">IQ")
RESP_HDR = struct.Struct(">IIQ")

#: The agent's first words on stdout: this marker, then READY (its start status, 0 or an
#: errno, and the length of a blob that follows: the session's heartbeat port and secret,
#: :data:`~rpmem_common.wire.HEARTBEAT`, when the status is 0). A remote login
#: shell may print before the agent runs (a banner in .bashrc): the client scans up to
#: :data:`MAX_LOGIN_OUTPUT` bytes for the marker and shows what came before it on failure.
READY_MARKER = b"\0pmreplica-agent\0"
READY = struct.Struct(">II")  # status, blob length
MAX_LOGIN_OUTPUT = 64 << 10
_COMMON = struct.Struct(">HHQIIQ")  # major, minor, pool_size, nlanes, provider, buff_size
_IBC = struct.Struct(">IIQQI")  # port, persist_method, rkey, raddr, nlanes
_U32 = struct.Struct(">I")
_STAT = struct.Struct(">QI")  # size, healthy
#: refuse control messages bigger than this (a garbage length must not make the agent
#: allocate gigabytes)
MAX_MESSAGE = 1 << 20


class ProtocolError(ValueError):
    """A message that does not parse; the peer gets BADPROTO/FATAL and the session ends."""


class Request(namedtuple("Request", "type major minor pool_size nlanes provider buff_size "
                                   "pool_desc attr flags blob",
                         defaults=(PROTO_MAJOR, PROTO_MINOR, 0, 0, PROV_TCP, 0, "", None, 0,
                                   b""))):
    """A decoded request; fields its type does not carry keep their defaults. ``flags`` are
    CLOSE's or CREATE/OPEN's; ``blob`` is the CONNECT provider data or the CHECKSUM range
    request."""

    __slots__ = ()


class Response(namedtuple("Response", "type status port persist_method rkey raddr nlanes attr "
                                     "blob size healthy message",
                          defaults=(OK, 0, PM_GPSPM, 0, 0, 0, None, b"", 0, False, ""))):
    """A decoded response; a ``status`` other than OK carries ``message`` instead of a body."""

    __slots__ = ()


def _desc(text: str) -> bytes:
    # a path from a pool set file may hold bytes that are not UTF-8 (os.fsdecode's escapes)
    raw = text.encode(errors="backslashreplace") + b"\0"
    return _U32.pack(len(raw)) + raw


def _read_desc(body: bytes, at: int) -> tuple[str, int]:
    if at + 4 > len(body):
        raise ProtocolError("truncated pool descriptor")
    (n,) = _U32.unpack_from(body, at)
    at += 4
    raw = body[at:at + n]
    if n == 0 or len(raw) != n or raw[-1:] != b"\0" or b"\0" in raw[:-1]:
        raise ProtocolError("pool descriptor is not one NUL-terminated string")
    try:
        return raw[:-1].decode(), at + n
    except UnicodeDecodeError:
        raise ProtocolError("pool descriptor is not UTF-8") from None


def _blob(data: bytes) -> bytes:
    return _U32.pack(len(data)) + data


def _read_blob(body: bytes, at: int) -> bytes:
    if at == len(body):
        return b""
    if at + 4 > len(body):
        raise ProtocolError("truncated data blob")
    (n,) = _U32.unpack_from(body, at)
    if at + 4 + n != len(body):
        raise ProtocolError("data blob length does not match the message")
    return body[at + 4:at + 4 + n]


def encode_request(req: Request) -> bytes:
    t = req.type
    if t in (CREATE, OPEN):
        body = _COMMON.pack(req.major, req.minor, req.pool_size, req.nlanes, req.provider,
                            req.buff_size)
        if t == CREATE:
            body += (req.attr or PoolAttr()).pack()
        body += _desc(req.pool_desc) + _U32.pack(req.flags)
    elif t == CLOSE:
        body = _U32.pack(req.flags)
    elif t == SET_ATTR:
        body = (req.attr or PoolAttr()).pack()
    elif t == STAT:
        body = _desc(req.pool_desc)
    elif t in (CONNECT, CHECKSUM, GENERATION):
        body = _blob(req.blob)
    else:
        raise ValueError(f"unknown request type {t}")
    return REQ_HDR.pack(t, REQ_HDR.size + len(body)) + body


def decode_request(t: int, body: bytes) -> Request:
    """Decode a request body (the header already read); raises ProtocolError."""
    try:
        if t in (CREATE, OPEN):
            major, minor, pool_size, nlanes, provider, buff = _COMMON.unpack_from(body)
            at = _COMMON.size
            attr = None
            if t == CREATE:
                attr = PoolAttr.unpack(body[at:at + ATTR_SIZE])
                at += ATTR_SIZE
            desc, at = _read_desc(body, at)
            if at == len(body):
                flags = TCP_CLEAR
            elif at + _U32.size == len(body):
                (flags,) = _U32.unpack_from(body, at)
            else:
                raise ProtocolError("trailing bytes after the flags")
            return Request(t, major, minor, pool_size, nlanes, provider, buff, desc, attr, flags)
        if t == CLOSE and len(body) == 4:
            return Request(t, flags=_U32.unpack(body)[0])
        if t == SET_ATTR and len(body) == ATTR_SIZE:
            return Request(t, attr=PoolAttr.unpack(body))
        if t == STAT:
            desc, at = _read_desc(body, 0)
            if at != len(body):
                raise ProtocolError("trailing bytes after the pool descriptor")
            return Request(t, pool_desc=desc)
        if t in (CONNECT, CHECKSUM, GENERATION):
            return Request(t, blob=_read_blob(body, 0))
    except struct.error as e:
        raise ProtocolError(f"truncated message: {e}") from None
    raise ProtocolError(f"malformed message of type {t} ({len(body)} bytes)")


def encode_response(resp: Response) -> bytes:
    t = resp.type
    if resp.status != OK:
        body = resp.message.encode(errors="backslashreplace")[:4096]
    elif t in (CREATE_RESP, OPEN_RESP):
        body = _IBC.pack(resp.port, resp.persist_method, resp.rkey, resp.raddr, resp.nlanes)
        if t == OPEN_RESP:
            body += (resp.attr or PoolAttr()).pack()
        body += _blob(resp.blob)
    elif t == STAT_RESP:  # the pool's generation record as the blob
        body = _STAT.pack(resp.size, int(resp.healthy)) + _desc(resp.message) + _blob(resp.blob)
    elif t in (CONNECT_RESP, CHECKSUM_RESP):
        body = _blob(resp.blob)
    else:
        body = b""
    return RESP_HDR.pack(resp.status, t, RESP_HDR.size + len(body)) + body


def decode_response(status: int, t: int, body: bytes) -> Response:
    if status != OK:
        return Response(t, status, message=body.decode("utf-8", "replace"))
    try:
        if t in (CREATE_RESP, OPEN_RESP):
            port, pm, rkey, raddr, nlanes = _IBC.unpack_from(body)
            at = _IBC.size
            attr = None
            if t == OPEN_RESP:
                attr = PoolAttr.unpack(body[at:at + ATTR_SIZE])
                at += ATTR_SIZE
            return Response(t, status, port, pm, rkey, raddr, nlanes, attr, _read_blob(body, at))
        if t == STAT_RESP:
            size, healthy = _STAT.unpack_from(body)
            detail, at = _read_desc(body, _STAT.size)
            return Response(t, status, size=size, healthy=bool(healthy), message=detail,
                            blob=_read_blob(body, at))
        if t in (CONNECT_RESP, CHECKSUM_RESP):
            return Response(t, status, blob=_read_blob(body, 0))
        if t in (CLOSE_RESP, SET_ATTR_RESP, GENERATION_RESP) and not body:
            return Response(t, status)
    except struct.error as e:
        raise ProtocolError(f"truncated response: {e}") from None
    raise ProtocolError(f"malformed response of type {t} ({len(body)} bytes)")

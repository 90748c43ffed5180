"""One client session on the control channel (the agent's stdin/stdout).

The agent answers each request, never more than one pool per session, and ends the session
on CLOSE, on end of input, or on a message it cannot parse (after answering it with an error
when it can): garbage never reaches a pool.
"""

from __future__ import annotations

import errno
import logging
import os

from pmreplica.header import PoolAttr
from pmreplica.setfile import MIN_REMOTE_POOL, PAGE_SIZE
from rpmem_common import proto
from rpmem_common.proto import Request, Response
from rpmem_common.wire import TLS_NAME

from .config import AgentConfig
from .heartbeat import Heartbeat
from .pooldb import OpenPool, PoolDB, PoolError
from .tcp_server import TcpServer, listen_address

# typing.TYPE_CHECKING without importing typing into every agent start
TYPE_CHECKING = False
if TYPE_CHECKING:
    from .verbs_server import VerbsServer

log = logging.getLogger("remote_agent.session")


class Stdio:
    """Exact reads and writes on file descriptors (no buffering layers in between)."""

    def __init__(self, rfd: int = 0, wfd: int = 1) -> None:
        self.rfd, self.wfd = rfd, wfd

    def read_exact(self, n: int) -> bytes | None:
        """``n`` bytes, or None at end of input (also mid-message: the client is gone)."""
        chunks, got = [], 0
        while got < n:
            chunk = os.read(self.rfd, n - got)
            if not chunk:
                return None
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.wfd, view):]


class Session:
    def __init__(self, db: PoolDB, config: AgentConfig, io: Stdio) -> None:
        self.db = db
        self.config = config
        self.io = io
        self.pool: OpenPool | None = None
        self.server: TcpServer | VerbsServer | None = None

    def run(self) -> int:
        """Serve requests until the session ends; the exit status of the agent."""
        self.heartbeat = Heartbeat(listen_address(), self._client_lost)
        self.io.write(proto.encode_ready(0, self.heartbeat.blob))
        try:
            while True:
                raw = self.io.read_exact(proto.REQ_HDR.size)
                if raw is None:
                    log.info("control channel closed by the client")
                    return 0
                rtype, size = proto.REQ_HDR.unpack(raw)
                if (rtype not in proto.REQUEST_TYPES
                        or not proto.REQ_HDR.size <= size <= proto.MAX_MESSAGE):
                    log.warning("garbage on the control channel (type %d, size %d)", rtype, size)
                    self._reply(Response((rtype + 1) & 0xFFFFFFFF, proto.ERR_BADPROTO,
                                         message=f"unknown message (type {rtype}, size {size})"))
                    return 1
                body = self.io.read_exact(size - proto.REQ_HDR.size)
                if body is None:
                    return 0
                try:
                    req = proto.decode_request(rtype, body)
                except proto.ProtocolError as e:
                    log.warning("malformed request: %s", e)
                    self._reply(Response(rtype + 1, proto.ERR_BADPROTO, message=str(e)))
                    return 1
                resp = self._dispatch(req)
                self._reply(resp)
                if req.type == proto.CLOSE:
                    return 0
        finally:
            self.heartbeat.stop()
            self._end(remove=False)

    def _client_lost(self, reason: str) -> None:
        """The client went silent (heartbeat.py): end the agent now, from the heartbeat's
        thread, whatever the session's thread waits for. Every acknowledged write is durable
        already; exiting releases the pool's lock for the client's next session."""
        log.warning("ending the session: %s", reason)
        if self.server is not None:
            self.server.close()
        logging.shutdown()
        os._exit(errno.ETIMEDOUT)

    def _reply(self, resp: Response) -> None:
        self.io.write(proto.encode_response(resp))

    def _dispatch(self, req: Request) -> Response:
        rtype = req.type + 1
        try:
            if req.type in (proto.CREATE, proto.OPEN):
                return self._start(req)
            if req.type == proto.CLOSE:
                self._end(remove=bool(req.flags & proto.CLOSE_REMOVE))
                return Response(rtype)
            if req.type == proto.SET_ATTR:
                if self.pool is None:
                    raise PoolError(errno.EINVAL, "no pool is open in this session")
                self.pool.set_attr(req.attr or PoolAttr())
                return Response(rtype)
            if req.type == proto.STAT:
                size, healthy, detail, record = self.db.stat(req.pool_desc)
                return Response(rtype, size=size, healthy=healthy, message=detail, blob=record)
            if req.type == proto.GENERATION:
                if self.pool is None:
                    raise PoolError(errno.EINVAL, "no pool is open in this session")
                self.pool.store_generation(req.blob)
                return Response(rtype)
            if req.type == proto.CONNECT:  # the client's RDMA queue pairs, for ours
                connect = getattr(self.server, "connect_lanes", None)
                if connect is None:
                    raise PoolError(errno.EINVAL, "CONNECT needs a pool open over verbs")
                return Response(rtype, blob=connect(req.blob))
            if req.type == proto.CHECKSUM:  # replica-sync --verify; hashlib loads only here
                from . import digests
                return Response(rtype, blob=digests.handle(self.pool, req.blob))
            raise PoolError(errno.EPROTONOSUPPORT, f"request type {req.type} is not supported")
        except OSError as e:
            log.warning("%s failed: %s", _NAMES.get(req.type, req.type), e)
            text = e.strerror or str(e)
            if e.filename:  # an OSError of the OS names the file: keep it in the message
                text = f"{e.filename}: {text}"
            return Response(rtype, proto.status_for_errno(e.errno), message=text)
        except Exception:  # a bug of ours must not end the session without an answer
            log.exception("%s failed", _NAMES.get(req.type, req.type))
            return Response(rtype, proto.ERR_FATAL,
                            message="internal error on the agent (see its log)")

    def _start(self, req: Request) -> Response:
        rtype = req.type + 1
        if self.pool is not None:
            raise PoolError(errno.EINVAL, "a pool is already open in this session")
        if req.major != proto.PROTO_MAJOR:
            return Response(rtype, proto.ERR_BADPROTO,
                            message=f"protocol {req.major}.{req.minor} not supported "
                                    f"(agent speaks {proto.PROTO_MAJOR}.{proto.PROTO_MINOR})")
        if req.nlanes < 1:
            return Response(rtype, proto.ERR_BADNLANES, message="nlanes must be at least 1")
        if req.pool_size < MIN_REMOTE_POOL or req.pool_size % PAGE_SIZE:
            return Response(rtype, proto.ERR_BADSIZE,
                            message=f"pool size {req.pool_size} is not a multiple of the page "
                                    f"size of at least {MIN_REMOTE_POOL} bytes")
        if req.provider not in (proto.PROV_TCP, proto.PROV_VERBS):
            return Response(rtype, proto.ERR_BADPROVIDER,
                            message=f"provider {req.provider} is not available on this agent")
        verbs = req.provider == proto.PROV_VERBS
        clear = not verbs and bool(req.flags & proto.TCP_CLEAR)
        if clear and self.config.require_tls:
            return Response(rtype, proto.ERR_NOACCESS,
                            message="this agent requires TLS on TCP data lanes (require-tls) "
                                    "and the client asked for clear text "
                                    "(PMREPLICA_TCP_TLS=0, or a client older than TLS)")
        if verbs:
            from . import verbs_server  # pyverbs loads only in sessions that ask for RDMA
            why = verbs_server.unavailable()
            if why:
                return Response(rtype, proto.ERR_PROVNOSUP, message=why)
        if req.type == proto.CREATE:
            pool = self.db.create(req.pool_desc, req.pool_size, req.attr or PoolAttr())
        else:
            pool = self.db.open(req.pool_desc, req.pool_size)
        nlanes = min(req.nlanes, self.config.max_lanes)
        try:
            if verbs:
                self.server = verbs_server.VerbsServer(pool, nlanes, self.config.persist_apm)
            else:
                self.server = TcpServer(pool.mapping, pool.pool_size, pool.data_offset, nlanes,
                                        tls=not clear, spin_us=proto.spin_window(req.flags))
        except BaseException:  # an OSError, or a bug (then the session answers FATAL)
            pool.close(remove=True)
            raise
        self.pool = pool
        log.info("%s %s: %d bytes, %d lanes, %s", "created" if pool.created else "opened",
                 pool.name, pool.pool_size, nlanes,
                 "RDMA" if verbs else f"data port {self.server.port}, "
                                      + ("clear text (the client asked)" if clear else TLS_NAME))
        if verbs:
            server = self.server
            return Response(rtype, persist_method=server.persist_method, rkey=server.rkey,
                            raddr=server.raddr, nlanes=nlanes, attr=pool.attr, blob=server.blob)
        return Response(rtype, port=self.server.port, persist_method=proto.PM_GPSPM,
                        nlanes=nlanes, attr=pool.attr, blob=self.server.blob)

    def _end(self, remove: bool) -> None:
        """Stop the data path and close (with ``remove``: delete a pool created here)."""
        if self.server is not None:
            self.server.close()
            self.server = None
        if self.pool is not None:
            self.pool.close(remove=remove)
            self.pool = None


_NAMES = {proto.CREATE: "CREATE", proto.OPEN: "OPEN", proto.CLOSE: "CLOSE",
          proto.SET_ATTR: "SET_ATTR", proto.STAT: "STAT", proto.CONNECT: "CONNECT",
          proto.CHECKSUM: "CHECKSUM", proto.GENERATION: "GENERATION"}

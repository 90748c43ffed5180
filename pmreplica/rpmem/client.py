"""RemotePool: librpmem's API in Python — a local pool buffer replicated to a remote pool.

The agent runs on the target node (started over SSH), serves the pool set named relative
to its pool-set directory, and receives the data on per-lane connections. ``persist``
returns once the range is durable on the remote node. Errors are :class:`RemoteError`
(an ``OSError``) with librpmem's errno values.
"""

from __future__ import annotations

import errno
import logging
import struct
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Union

from rpmem_common import checksum as _checksum
from rpmem_common import proto, wire

from ..errors import PmReplicaError, PoolSetError, RemoteError, fresh
from ..header import HDR_SIZE, SIG_LEN, PoolAttr
from ..pmem import buffer_address
from ..setfile import MIN_REMOTE_POOL, check_pool_set_name
from . import heartbeat
from .address import parse_target
from .channel import AgentChannel
from .environ import RpmemConfig
from .launch import launch
from .transport import provider
from .transport.tcp import DEFAULT_WORK_QUEUE, TcpDataPath

if TYPE_CHECKING:
    from .transport.verbs import VerbsDataPath

DataPath = Union[TcpDataPath, "VerbsDataPath"]

log = logging.getLogger(__name__)

MAJOR_VERSION = 1
MINOR_VERSION = 3

PERSIST_RELAXED = 1
FLUSH_RELAXED = 1
REMOVE_FORCE = 1
REMOVE_POOL_SET = 2
_U32_MAX = 0xFFFF_FFFF

DEFAULT_NLANES = 4
#: how long a live agent may take to answer a control request (the heartbeat catches a
#: dead host much sooner)
CONTROL_TIMEOUT = 60.0
#: how long a started agent may take to announce itself (an interpreter starting on a busy
#: host)
READY_TIMEOUT = 15.0
_PAGE = 4096


def check_version(major_required: int, minor_required: int) -> str | None:
    """None if this library provides API version ``major.minor``, else the reason."""
    if major_required != MAJOR_VERSION:
        return (f"librpmem major version mismatch (need {major_required}, "
                f"found {MAJOR_VERSION})")
    if minor_required > MINOR_VERSION:
        return (f"librpmem minor version mismatch (need {minor_required}, "
                f"found {MINOR_VERSION})")
    return None


class ControlChannel:
    """Requests and responses over the agent's stdin/stdout, and the session's heartbeat.

    Once the heartbeat declares the agent's host dead, the channel is given up at once
    (nothing waits on that host again), calls fail with the heartbeat's error, and the
    callbacks registered with :meth:`on_lost` run."""

    def __init__(self, channel: AgentChannel, name: str) -> None:
        self.channel = channel
        self.name = name
        #: the heartbeat's verdict, once the agent's host was found dead
        self.lost: RemoteError | None = None
        self._watch: heartbeat.Watch | None = None
        self._listeners: list[Callable[[RemoteError], None]] = []
        self._lock = threading.Lock()
        self._call_lock = threading.Lock()
        self._closing = False

    def wait_ready(self, config: RpmemConfig) -> None:
        """Read the agent's announcement; start watching its heartbeat."""
        status, blob = read_ready(self.channel, self.name)
        if status:
            raise self._start_failed(status)
        try:
            port, secret = wire.HEARTBEAT.unpack(blob)
        except struct.error:
            raise RemoteError(errno.EPROTO, f"{self.name}: the agent announced no heartbeat "
                                            "(an older pmreplica-agent?)") from None
        self._watch = heartbeat.connect(self.channel.peer_address, port, secret,
                                        config.peer_timeout, config.connect_timeout, self.name,
                                        self._peer_lost)

    def _start_failed(self, status: int) -> RemoteError:
        # the agent exits right after its status; its reason is on stderr, which may not
        # have been read yet: wait for the exit (and the stderr reader) before quoting it
        self.channel.close()
        return RemoteError(status, f"{self.name}: agent failed to start "
                                   f"({errno.errorcode.get(status, status)})"
                                   + _tail(self.channel))

    def on_lost(self, callback: Callable[[RemoteError], None]) -> None:
        """Call ``callback(error)`` (from another thread) when the agent's host is found dead;
        at once, in this thread, if it was found dead already."""
        with self._lock:
            lost = self.lost
            if lost is None:
                self._listeners.append(callback)
        if lost is not None:
            callback(lost)

    def _peer_lost(self, error: RemoteError) -> None:
        with self._lock:
            if self._closing and error.errno != errno.ETIMEDOUT:
                # CLOSE is on its way and the agent exits after answering it, its heartbeat
                # with it: that is the session ending, and the answer is still to be read
                return
            self.lost = error
            listeners, self._listeners = ([] if self._closing else self._listeners), []
        log.warning("%s", error.strerror)
        self.channel.abort()
        for callback in listeners:
            callback(error)

    def end(self, flags: int = 0) -> None:
        """Send CLOSE (with ``flags``) and wait for its answer: the session's last request."""
        with self._lock:
            self._closing = True
        self.call(proto.Request(proto.CLOSE, flags=flags))

    def call(self, req: proto.Request) -> proto.Response:
        """Send ``req``, return its response; an error status raises RemoteError. Calls
        from several threads take turns (the pool's failure handling records generations
        from whichever thread found the failure)."""
        try:
            with self._call_lock:
                return self._call(req)
        except RemoteError:
            if self.lost is not None:  # the channel was given up under this call
                raise fresh(self.lost) from None
            raise

    def _call(self, req: proto.Request) -> proto.Response:
        if self.lost is not None:
            raise fresh(self.lost)
        self.channel.sendall(proto.encode_request(req))
        status, rtype, size = proto.RESP_HDR.unpack(self.channel.recv_exact(proto.RESP_HDR.size))
        if rtype != req.type + 1 or not proto.RESP_HDR.size <= size <= proto.MAX_MESSAGE:
            raise RemoteError(errno.EPROTO, f"{self.name}: unexpected response "
                                            f"(type {rtype}, size {size}) to request {req.type}")
        body = self.channel.recv_exact(size - proto.RESP_HDR.size)
        try:
            resp = proto.decode_response(status, rtype, body)
        except proto.ProtocolError as e:
            raise RemoteError(errno.EPROTO, f"{self.name}: {e}") from None
        if resp.status != proto.OK:
            err = proto.STATUS_ERRNO.get(resp.status, errno.EREMOTEIO)
            text = resp.message or proto.STATUS_TEXT.get(resp.status, f"status {resp.status}")
            raise RemoteError(err, f"{self.name}: {text}")
        return resp

    def close(self) -> int | None:
        """End the session: close the channel and wait for the agent to exit (not if its host
        was found dead), then stop the heartbeat."""
        if self.lost is not None:
            self.abort()
            return None
        with self._lock:
            self._closing = True
        try:
            return self.channel.close()  # the agent ends on the end of its input...
        finally:
            if self._watch is not None:  # ...not on the end of its heartbeat
                self._watch.cancel()

    def abort(self) -> None:
        """Give the session up without waiting on the agent (its host failed)."""
        if self._watch is not None:
            self._watch.cancel()
        self.channel.abort()


def read_ready(channel: AgentChannel, name: str) -> tuple[int, bytes]:
    """The agent's announcement (proto.READY_MARKER, status, blob), found after whatever a
    login shell printed first; EPROTO quoting that output if no agent announces itself."""
    marker = proto.READY_MARKER
    buf = bytearray()
    chunk = bytearray(4096)

    def more() -> None:
        try:
            n = channel.recv_into(chunk)
        except RemoteError as e:
            if buf.find(marker) < 0 and buf.strip():
                raise type(e)(e.errno, f"{e.strerror}; the login printed: "
                                       f"{_printed(buf)}") from None
            raise
        buf.extend(memoryview(chunk)[:n])

    while (at := buf.find(marker)) < 0:
        if len(buf) > proto.MAX_LOGIN_OUTPUT:
            raise RemoteError(errno.EPROTO, f"{name}: no agent announced itself in the first "
                                            f"{proto.MAX_LOGIN_OUTPUT} bytes; the login "
                                            f"printed: {_printed(buf)}")
        more()
    start = at + len(marker) + proto.READY.size
    while len(buf) < start:
        more()
    status, size = proto.READY.unpack_from(buf, at + len(marker))
    if size > proto.MAX_MESSAGE:
        raise RemoteError(errno.EPROTO, f"{name}: malformed agent announcement")
    while len(buf) < start + size:
        more()
    if at:
        log.info("%s: the login printed before the agent started: %s", name, _printed(buf[:at]))
    return status, bytes(buf[start:start + size])


def _printed(output: bytes | bytearray) -> str:
    """What a login printed, on one line, shortened."""
    text = " ".join(bytes(output).decode("utf-8", "replace").split())
    return repr(text[:200] + ("..." if len(text) > 200 else ""))


def _tail(channel: AgentChannel) -> str:
    tail = channel.stderr_tail().strip()
    return f": {tail.splitlines()[-1]}" if tail else ""


def _pool_view(pool: Any) -> memoryview:
    """The caller's pool as a flat writable byte view; EINVAL unless page aligned."""
    try:
        view = memoryview(pool).cast("B")
    except TypeError as e:
        raise PmReplicaError(errno.EINVAL, f"pool must be a writable buffer: {e}") from None
    if view.readonly:
        raise PmReplicaError(errno.EINVAL, "pool must be a writable buffer")
    size = len(view)
    if size == 0 or size % _PAGE:
        raise PmReplicaError(errno.EINVAL, f"pool size {size} is not a multiple of the page size")
    if buffer_address(view) % _PAGE:
        raise PmReplicaError(errno.EINVAL, "pool address is not page aligned")
    return view


class RemotePool:
    """An open remote pool (librpmem's ``RPMEMpool``). Create with :meth:`create` or
    :meth:`open`; ``nlanes`` is the negotiated lane count, ``attr`` the pool attributes."""

    def __init__(self, ctl: ControlChannel, data: DataPath, pool: memoryview,
                 attr: PoolAttr, persist_method: int, target: str, pool_set: str,
                 provider: str = "tcp") -> None:
        self._ctl = ctl
        self._data = data
        self._pool = pool
        self.size = len(pool)
        self.nlanes = data.nlanes
        self.attr = attr
        self.persist_method = proto.PERSIST_METHOD_NAMES.get(persist_method, "?")
        self.provider = provider  # "tcp" or "verbs"
        self.target = target
        self.pool_set = pool_set
        # a pool with attributes has a header the data path must not overwrite
        self.data_offset = 0 if attr.is_zeroed else HDR_SIZE
        self.closed = False
        ctl.on_lost(data.abort)  # first: the lanes fail before anyone is told

    # -- lifecycle ---------------------------------------------------------------------------
    @classmethod
    def create(cls, target: str, pool_set_name: str, pool: Any, *,
               nlanes: int = DEFAULT_NLANES, attr: PoolAttr | None = None,
               config: RpmemConfig | None = None) -> "RemotePool":
        """Create the remote pool ``pool_set_name`` on ``target`` for the local ``pool``.

        With ``attr`` (not all zero) the remote pool gets a header holding it and its first
        4096 bytes are off limits to persist; without, the remote set must say NOHDRS."""
        return cls._start(proto.CREATE, target, pool_set_name, pool, nlanes, attr, config)

    @classmethod
    def open(cls, target: str, pool_set_name: str, pool: Any, *,
             nlanes: int = DEFAULT_NLANES, config: RpmemConfig | None = None) -> "RemotePool":
        """Open an existing remote pool; ``.attr`` holds its attributes (zeroed if none)."""
        return cls._start(proto.OPEN, target, pool_set_name, pool, nlanes, None, config)

    @classmethod
    def _start(cls, rtype: int, target: str, pool_set_name: str, pool: Any, nlanes: int,
               attr: PoolAttr | None, config: RpmemConfig | None) -> "RemotePool":
        config = config or RpmemConfig.from_env()
        _check_name(pool_set_name)
        if attr is not None:
            _check_attr(attr)
        if nlanes < 1:
            raise PmReplicaError(errno.EINVAL, "nlanes must be at least 1")
        # lowered to what the agent grants; librpmem's is an unsigned int, as on the wire
        nlanes = min(nlanes, config.max_nlanes or _U32_MAX)
        name = f"{target}:{pool_set_name}"
        view = _pool_view(pool)
        try:
            if len(view) < MIN_REMOTE_POOL:
                raise PmReplicaError(errno.EINVAL, f"pool size {len(view)} is smaller than the "
                                                   f"minimum {MIN_REMOTE_POOL}")
            return cls._connect(rtype, target, pool_set_name, view, nlanes, attr, config, name)
        except BaseException:
            view.release()  # the caller may unmap its pool after a failed create/open
            raise

    @classmethod
    def _connect(cls, rtype: int, target: str, pool_set_name: str, view: memoryview,
                 nlanes: int, attr: PoolAttr | None, config: RpmemConfig,
                 name: str) -> "RemotePool":
        ctl = start_session(target, name, config)
        channel = ctl.channel
        try:
            choice = provider.choose(provider.data_address(parse_target(target).host,
                                                           channel.peer_address), config,
                                     len(view))
            flags = (0 if config.tcp_tls else proto.TCP_CLEAR) | proto.spin_flags(config.spin_us)
            try:
                resp = ctl.call(proto.Request(rtype, pool_size=len(view), nlanes=nlanes,
                                              provider=choice.provider,
                                              pool_desc=pool_set_name, attr=attr, flags=flags))
            except RemoteError as e:  # an agent without RDMA refuses verbs: TCP if allowed
                choice = provider.after_refusal(choice, e, config)
                resp = ctl.call(proto.Request(rtype, pool_size=len(view), nlanes=nlanes,
                                              provider=choice.provider,
                                              pool_desc=pool_set_name, attr=attr, flags=flags))
        except BaseException:
            ctl.close()
            raise
        got_attr = (attr if rtype == proto.CREATE else resp.attr) or PoolAttr()
        try:
            data: DataPath
            if choice.provider == proto.PROV_VERBS:
                from .transport.verbs import VerbsDataPath  # pyverbs loads only for RDMA
                data = VerbsDataPath.connect(
                    choice.gid, view, 0 if got_attr.is_zeroed else HDR_SIZE, resp.rkey,
                    resp.raddr, resp.blob, resp.persist_method, min(nlanes, resp.nlanes), name,
                    config.work_queue_size or DEFAULT_WORK_QUEUE,
                    lambda blob: ctl.call(proto.Request(proto.CONNECT, blob=blob)).blob,
                    lambda: ctl.lost is None and channel.exit_status is None)
            else:
                secret, certificate = _tcp_keys(resp.blob, config, name)
                data = TcpDataPath.connect(channel.peer_address, resp.port, secret,
                                           min(nlanes, resp.nlanes), view, name,
                                           config.work_queue_size or DEFAULT_WORK_QUEUE,
                                           timeout=config.connect_timeout,
                                           op_timeout=config.op_timeout,
                                           certificate=certificate, spin_us=config.spin_us)
        except BaseException:
            # do not leave a half-made pool behind: CLOSE with REMOVE undoes a CREATE
            flags = proto.CLOSE_REMOVE if rtype == proto.CREATE else 0
            try:
                ctl.end(flags)
            except OSError as e:
                log.debug("%s: close after failed setup: %s", name, e)
            ctl.close()
            raise
        log.info("%s: %s over %s%s, %d lanes, %s", name,
                 "created" if rtype == proto.CREATE else "opened", choice,
                 f", {config.tcp_security}" if choice.provider == proto.PROV_TCP else "",
                 data.nlanes, proto.PERSIST_METHOD_NAMES.get(resp.persist_method, "?"))
        return cls(ctl, data, view, got_attr, resp.persist_method, target, pool_set_name,
                   choice.name)

    def on_lost(self, callback: Callable[[RemoteError], None]) -> None:
        """Call ``callback(error)``, from another thread, when the heartbeat finds the agent's
        host dead; by then every lane has failed with ``error``, so calls blocked on the
        pool return it, and so do later ones."""
        self._ctl.on_lost(callback)

    @property
    def failure(self) -> RemoteError | None:
        """Why the session failed (its host was found dead, or a lane broke); None while not."""
        return self._ctl.lost or self._data.failure

    def close(self) -> None:
        """Close the remote pool; its data stays on the target. If the agent's host was
        found dead, the session is given up (as :meth:`abort`) and its error raised."""
        if self.closed:
            return
        self.closed = True
        try:
            if self._ctl.lost is not None:
                raise fresh(self._ctl.lost)
            self._ctl.end()
        finally:
            self._release()

    def abort(self) -> None:
        """Give the session up without a word to the agent and without waiting on it (after
        a failure: the host may be gone); the agent ends when it misses the client."""
        if not self.closed:
            self.closed = True
            self._ctl.abort()
            self._release()

    def _release(self) -> None:
        self._data.close()
        self._ctl.close()
        self._pool.release()  # the caller may unmap its pool now

    def __enter__(self) -> "RemotePool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- data path ---------------------------------------------------------------------------
    @property
    def data_path(self) -> DataPath:
        """The lanes without this class's argument checks, for callers (the rpmem plugin)
        that validated the range already: ``persist(off, n, lane, flags)``, ``flush``,
        ``drain(lane)``, ``deep_persist(off, n, lane)``, ``read(dest, off, lane)``."""
        return self._data

    def _check(self, offset: int, length: int, lane: int) -> None:
        if self.closed:
            raise RemoteError(errno.EBADF, f"{self._data.name}: pool is closed")
        if offset < self.data_offset or length < 0 or offset + length > self.size:
            raise PmReplicaError(errno.EINVAL, f"range {offset}+{length} is outside the remote "
                                               f"pool's data [{self.data_offset}, {self.size})")
        if not 0 <= lane < self.nlanes:
            raise PmReplicaError(errno.EINVAL, f"lane {lane} out of range (nlanes={self.nlanes})")

    def persist(self, offset: int, length: int, lane: int = 0, flags: int = 0) -> None:
        """Send ``[offset, offset+length)`` of the local pool; return when durable remotely."""
        # one test for every way the call can be wrong (the hot path), the details after
        if (flags & ~PERSIST_RELAXED or self.closed or offset < self.data_offset or length < 0
                or offset + length > self.size or not 0 <= lane < self.nlanes):
            if flags & ~PERSIST_RELAXED:
                raise _bad_flags("persist", flags)
            self._check(offset, length, lane)
        self._data.persist(offset, length, lane, flags)

    def deep_persist(self, offset: int, length: int, lane: int = 0) -> None:
        """Persist through the remote node's deepest durability domain."""
        self._check(offset, length, lane)
        self._data.deep_persist(offset, length, lane)

    def flush(self, offset: int, length: int, lane: int = 0, flags: int = 0) -> None:
        """Send the range without waiting; :meth:`drain` waits for every flush on the lane."""
        if flags & ~FLUSH_RELAXED:
            raise _bad_flags("flush", flags)
        self._check(offset, length, lane)
        self._data.flush(offset, length, lane, flags)

    def drain(self, lane: int = 0, flags: int = 0) -> None:
        """Wait until every range flushed on ``lane`` is durable remotely."""
        if flags:
            raise _bad_flags("drain", flags)
        self._check(self.data_offset, 0, lane)
        self._data.drain(lane)

    def read(self, buf: Any, offset: int, length: int, lane: int = 0) -> None:
        """Read ``length`` bytes of the remote pool at ``offset`` into ``buf``."""
        # checked before the request goes out: a buffer refused after it would leave the
        # answer on the lane, to be taken for the answer of the next operation
        if type(buf) is bytearray:  # the common case needs no memoryview: a byte per item
            dest, size = buf, len(buf)
        else:
            dest = _byte_view(buf)
            size = len(dest)
        if (length > size or offset < 0 or length <= 0 or offset + length > self.size
                or self.closed or not 0 <= lane < self.nlanes):
            if length > size:
                raise PmReplicaError(errno.EINVAL, f"buffer of {size} bytes cannot hold {length}")
            if offset < 0 or length < 0 or offset + length > self.size:
                raise PmReplicaError(errno.EINVAL, f"range {offset}+{length} is outside the "
                                                   f"remote pool [0, {self.size})")
            self._check(self.data_offset, 0, lane)
            if not length:
                return
        self._data.read(dest if length == size else memoryview(dest)[:length], offset, lane)

    def set_attr(self, attr: PoolAttr | None) -> None:
        """Overwrite the remote pool's attributes (zeroed if ``attr`` is None)."""
        if self.closed:
            raise RemoteError(errno.EBADF, f"{self._data.name}: pool is closed")
        if attr is not None:
            _check_attr(attr)
        self._ctl.call(proto.Request(proto.SET_ATTR, attr=attr or PoolAttr()))
        self.attr = attr or PoolAttr()

    def stat(self) -> proto.Response:
        """The open remote pool's size, header health and generation record (the blob), as
        the agent sees them."""
        return self._ctl.call(proto.Request(proto.STAT, pool_desc=self.pool_set))

    def store_generation(self, record: bytes) -> None:
        """Record the pool's generation (:mod:`pmreplica.generation`) in the remote pool's
        header page, durably."""
        if self.closed:
            raise RemoteError(errno.EBADF, f"{self._data.name}: pool is closed")
        self._ctl.call(proto.Request(proto.GENERATION, blob=record))

    def checksum(self, offset: int, length: int, block: int = _checksum.DEFAULT_BLOCK,
                 algorithm: int = _checksum.ALGO_SHA256) -> list[bytes]:
        """Digests of the remote pool's ``block``-byte blocks in ``[offset, offset+length)``
        (the last may be shorter), computed by the agent: the data stays where it is.
        At most :data:`~rpmem_common.checksum.MAX_BLOCKS` blocks per call."""
        if self.closed:
            raise RemoteError(errno.EBADF, f"{self._data.name}: pool is closed")
        if offset < 0 or length <= 0 or offset + length > self.size:
            raise PmReplicaError(errno.EINVAL, f"range {offset}+{length} is outside the remote "
                                               f"pool [0, {self.size})")
        try:
            blob = _checksum.encode_request(offset, length, block, algorithm)
        except _checksum.ChecksumError as e:
            raise PmReplicaError(errno.EINVAL, str(e)) from None
        resp = self._ctl.call(proto.Request(proto.CHECKSUM, blob=blob))
        try:
            return _checksum.decode_response(resp.blob, _checksum.nblocks(length, block),
                                             algorithm)
        except _checksum.ChecksumError as e:
            raise RemoteError(errno.EPROTO, f"{self._data.name}: {e}") from None


def _tcp_keys(blob: bytes, config: RpmemConfig, name: str) -> tuple[bytes, bytes | None]:
    """The session secret and the certificate to pin (None for clear text) from the agent's
    TCP connection data; EPROTO if it does not offer what was asked for."""
    try:
        secret, certificate = wire.split_connection_blob(blob)
    except ValueError as e:
        raise RemoteError(errno.EPROTO, f"{name}: {e}") from None
    if (certificate is not None) != config.tcp_tls:
        raise RemoteError(errno.EPROTO, f"{name}: asked for {config.tcp_security} lanes, the "
                                        "agent answered " + ("with" if certificate else
                                                             "without") + " a TLS certificate")
    return secret, certificate


def _byte_view(buf: Any) -> memoryview:
    """``buf`` as a flat, writable view of bytes; EINVAL for what cannot be read into."""
    try:
        view = memoryview(buf)
        if view.itemsize != 1 or view.ndim != 1 or not view.c_contiguous:
            view = view.cast("B")  # TypeError for what cannot be a flat byte buffer
    except TypeError as e:
        raise PmReplicaError(errno.EINVAL,
                             f"read buffer must be a writable buffer: {e}") from None
    if view.readonly:
        raise PmReplicaError(errno.EINVAL, "read buffer is read-only")
    return view


def _bad_flags(call: str, flags: int) -> PmReplicaError:
    # librpmem refuses flags it does not know rather than ignoring them
    return PmReplicaError(errno.EINVAL, f"invalid {call} flags {flags:#x}")


def _check_name(name: str) -> None:
    try:
        check_pool_set_name(name)
    except PoolSetError as e:
        raise PmReplicaError(errno.EINVAL, str(e.strerror)) from None


def _check_attr(attr: PoolAttr) -> None:
    """EINVAL for attributes that do not fit librpmem's ``struct rpmem_pool_attr`` (a
    shorter signature or user_flags is padded with NULs, as in C; nothing is cut)."""
    wrong = [f"{name} longer than {n} bytes" for name, n in (("signature", SIG_LEN),
                                                              ("user_flags", 16))
             if len(getattr(attr, name)) > n]
    wrong += [f"{name} not 16 bytes" for name in ("poolset_uuid", "uuid", "next_uuid",
                                                   "prev_uuid") if len(getattr(attr, name)) != 16]
    wrong += [f"{name} not a 32-bit unsigned integer" for name in (
        "major", "compat_features", "incompat_features", "ro_compat_features")
        if not 0 <= getattr(attr, name) <= _U32_MAX]
    if wrong:
        raise PmReplicaError(errno.EINVAL, "pool attributes: " + "; ".join(wrong))


def remove(target: str, pool_set_name: str, flags: int = 0, *,
           config: RpmemConfig | None = None) -> None:
    """Remove the remote pool's part files (and with REMOVE_POOL_SET its set file)."""
    if flags & ~(REMOVE_FORCE | REMOVE_POOL_SET):
        raise PmReplicaError(errno.EINVAL, f"invalid flags {flags:#x} (REMOVE_FORCE and "
                                           "REMOVE_POOL_SET are defined)")
    _check_name(pool_set_name)
    argv = ["--remove", pool_set_name]
    if flags & REMOVE_FORCE:
        argv.append("--force")
    if flags & REMOVE_POOL_SET:
        argv.append("--pool-set")
    channel = launch(target, argv, config=config)
    try:
        channel.settimeout(CONTROL_TIMEOUT)
        # in removal mode the agent's start status is the result
        status, _ = read_ready(channel, f"{target}:{pool_set_name}")
    finally:
        channel.close()
    if status:
        raise RemoteError(status, f"{target}:{pool_set_name}: cannot remove the pool: "
                                  f"{errno.errorcode.get(status, status)}" + _tail(channel))


def start_session(target: str, name: str, config: RpmemConfig) -> ControlChannel:
    """Start an agent on ``target`` and wait for it; its heartbeat is watched from here on."""
    ctl = ControlChannel(launch(target, (), config=config), name)
    try:
        ctl.channel.settimeout(READY_TIMEOUT)
        ctl.wait_ready(config)
        ctl.channel.settimeout(CONTROL_TIMEOUT)
    except BaseException:
        ctl.close()
        raise
    return ctl


def stat(target: str, pool_set_name: str, *, config: RpmemConfig | None = None) -> proto.Response:
    """Size and header health of a remote pool without opening it (a STAT request)."""
    _check_name(pool_set_name)
    ctl = start_session(target, f"{target}:{pool_set_name}", config or RpmemConfig.from_env())
    try:
        return ctl.call(proto.Request(proto.STAT, pool_desc=pool_set_name))
    finally:
        try:
            ctl.end()
        except OSError:
            pass
        ctl.close()

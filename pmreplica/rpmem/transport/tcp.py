"""The TCP data path of a remote pool: one connection per lane, payload sent from the pool.

Lanes run over TLS 1.3 unless the user turned it off (``tls.py``: a :class:`~.tls.TlsLane`
stands in for the socket; the code below is the same for both).

A flush sends the OP header and the range in one ``sendmsg`` straight from the caller's
pool buffer (the kernel copies it; Python never does) and does not wait; the agent receives
into its mapped pool, makes the range durable and answers with a status word. ``drain``
collects the outstanding answers of the lane, so several flushes cost one round trip (a flush
tells the agent it may answer it together with the operations already queued behind it,
``wire.OPF_ACK_LATER``). The number of unanswered flushes per lane is bounded by the work queue
size. A lane that waits for an answer polls for it for a short window before it sleeps
(``spin.py``): the answer then finds it awake, on whichever CPU.
"""

from __future__ import annotations

import errno
import socket
import struct
import threading

from rpmem_common.spin import DEFAULT_WINDOW_US, Spinner
from rpmem_common.wire import (HELLO, OP, OP_DEEP, OP_READ, OP_WRITE, OPF_ACK_LATER, STATUS,
                               recv_exact)

from ...errors import RemoteError, fresh

DEFAULT_WORK_QUEUE = 256
_ZEROS = bytes(STATUS.size * 4096)
_OK_WORD = bytes(STATUS.size)
_pack_op = OP.pack_into
_OP_SIZE = OP.size
#: a persist of at most this many bytes is copied behind its header and sent with ``send``:
#: cheaper than ``sendmsg``'s two buffers (250 ns less per 64 B call here), up to about 1 KiB
SMALL = 1024


DEFAULT_OP_TIMEOUT = 60.0
#: how long close() waits for a call still running on a lane it shut down
CLOSE_WAIT = 5.0
# sends never raise SIGPIPE: a host application with SIGPIPE at its default would die of
# a replica whose agent went away
_NOSIGNAL = socket.MSG_NOSIGNAL
#: a send sleeps once this many of its bytes wait unsent in the socket (TCP_NOTSENT_LOWAT),
#: not when the autotuned send buffer (up to 4 MiB) is full. While the agent's window is
#: closed, a large write otherwise parks megabytes per lane in the socket, and streams of
#: 16 MiB persists ran 1.1-1.3x as fast with the mark here (4 lanes; 1 lane 1.15-1.3x),
#: presumably for the copies' caches: a fixed SO_SNDBUF of 1 MiB gained as much or more, but
#: it also caps the bytes in flight on a long link, which this mark leaves alone. 512 KiB
#: measured better than 128 KiB and than 1-2 MiB.
NOTSENT_LOWAT = 512 << 10


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # a peer that vanishes without a FIN/RST fails the connection instead of hanging it
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3),
                       ("TCP_USER_TIMEOUT", 30_000)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)
    if hasattr(socket, "TCP_NOTSENT_LOWAT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)


def _deadline(sock: socket.socket, op_timeout: float) -> None:
    """Bound every send and receive of a blocking socket by the kernel (SO_RCVTIMEO and
    SO_SNDTIMEO), so that a live but stuck agent fails the lane with EAGAIN instead of
    hanging it, at no cost per call (a Python socket timeout polls before each recv)."""
    whole = int(op_timeout)
    timeval = struct.pack("ll", whole, int((op_timeout - whole) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


class TcpLane:
    """One lane: its connection and the count of flushes not yet answered."""

    __slots__ = ("sock", "hdr", "small", "status", "status_word", "pending", "lock", "broken",
                 "spin")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock  # or a tls.TlsLane, which has the methods used here
        self.hdr = bytearray(OP.size)
        #: a small persist's header and bytes, sent in one ``send``
        self.small = memoryview(bytearray(OP.size + SMALL))
        self.status = bytearray(STATUS.size * 4096)
        #: a persist's answer: a bytearray of its own compares with _OK_WORD 4x faster than a view
        self.status_word = bytearray(STATUS.size)
        self.pending = 0
        self.lock = threading.Lock()
        self.broken: OSError | None = None
        self.spin: Spinner | None = None  # set once the lane is connected


class TcpDataPath:
    """The lanes of one remote pool over TCP; ``pool`` is the client's pool buffer."""

    def __init__(self, pool: memoryview, lanes: list[TcpLane], name: str,
                 work_queue: int = DEFAULT_WORK_QUEUE,
                 op_timeout: float = DEFAULT_OP_TIMEOUT) -> None:
        self._pool = pool
        self._lanes = lanes
        self.name = name
        self.op_timeout = op_timeout
        self.nlanes = len(lanes)
        self._wq = max(1, min(work_queue, 4096))

    @classmethod
    def connect(cls, host: str, port: int, secret: bytes, nlanes: int, pool: memoryview,
                name: str, work_queue: int = DEFAULT_WORK_QUEUE,
                timeout: float = 30.0,
                op_timeout: float = DEFAULT_OP_TIMEOUT,
                certificate: bytes | None = None,
                spin_us: int = DEFAULT_WINDOW_US) -> "TcpDataPath":
        """Open and authenticate ``nlanes`` connections to the agent's data port, over TLS
        pinned to the agent's ``certificate`` unless it is None; an operation the agent does
        not answer within ``op_timeout`` seconds fails its lane; a lane polls for an answer
        for up to ``spin_us`` microseconds before it sleeps."""
        lanes: list[TcpLane] = []
        try:
            for lane in range(nlanes):
                sock = socket.create_connection((host, port), timeout=timeout)
                lanes.append(TcpLane(sock))
                _tune(sock)
                if certificate is not None:
                    from rpmem_common.tls import client_lane  # ssl loads with the first TLS lane
                    sock = lanes[-1].sock = client_lane(sock, certificate, name)
                sock.sendall(HELLO.pack(secret, lane), _NOSIGNAL)
                answer = recv_exact(sock, STATUS.size)
                (status,) = STATUS.unpack(answer)
                if status:
                    raise RemoteError(status, f"{name}: agent refused data lane {lane}")
                sock.settimeout(None)  # blocking from here: no poll() before each recv
                _deadline(sock, op_timeout)
                lanes[-1].spin = Spinner(sock.fileno(), spin_us, getattr(sock, "pending", None))
        except OSError as e:
            for lane_ in lanes:
                lane_.sock.close()
            if isinstance(e, RemoteError):
                raise
            raise RemoteError(e.errno or (errno.ETIMEDOUT if isinstance(e, TimeoutError)
                                          else errno.ECONNREFUSED),
                              f"{name}: cannot open data connection to {host}:{port}: "
                              f"{e.strerror or e}") from e
        return cls(pool, lanes, name, work_queue, op_timeout)

    # -- operations -------------------------------------------------------------------------
    def _lost(self, lane: TcpLane, e: BaseException) -> RemoteError:
        err = getattr(e, "errno", None) or errno.ECONNRESET
        if lane.broken is None and lane.pending:
            self._refused_waiting(lane)  # what the agent said before it closed the lane
        if lane.broken is not None:
            pass  # aborted (abort): the reason is the heartbeat's, not the shut-down socket's
        elif err in (errno.EAGAIN, errno.EWOULDBLOCK):  # the kernel's deadline (_deadline)
            lane.broken = RemoteError(errno.ETIMEDOUT, f"{self.name}: the agent did not answer "
                                                       f"within {self.op_timeout:g} s")
        else:
            lane.broken = RemoteError(err, f"{self.name}: data connection lost ({e})")
        try:
            lane.sock.close()
        except OSError:
            pass
        return fresh(lane.broken)

    def _interrupted(self, lane: TcpLane, e: BaseException) -> None:
        """A call on the lane was ended by an exception from outside it (KeyboardInterrupt, a
        signal handler's): part of an operation may be sent, or its answer still on the way,
        so the lane's stream is out of step and the lane is given up. Its next call fails,
        instead of reading an old answer as its own or writing bytes where they do not go."""
        if isinstance(e, struct.error):
            return  # an offset or length that is not an integer: _pack_op refused it unsent
        if lane.broken is None:
            lane.broken = RemoteError(errno.ECANCELED, f"{self.name}: a call on the lane was "
                                                       "interrupted mid-operation; lane closed")
        lane.pending = 0
        try:
            lane.sock.close()
        except OSError:
            pass

    def _refused(self, lane: TcpLane, err: int) -> RemoteError:
        """The agent refused or failed an operation: after that the lane is not trusted."""
        lane.broken = RemoteError(err, f"{self.name}: agent failed an operation: "
                                       f"{errno.errorcode.get(err, err)}")
        lane.pending = 0
        lane.sock.close()
        return fresh(lane.broken)

    def _send_write(self, lane: TcpLane, op: int, offset: int, length: int, flags: int) -> None:
        _pack_op(lane.hdr, 0, op, flags, offset, length)
        sent = lane.sock.sendmsg((lane.hdr, self._pool[offset:offset + length]), (), _NOSIGNAL)
        lane.pending += 1
        if sent != _OP_SIZE + length:
            self._send_rest(lane, offset, length, sent)

    def _send_rest(self, lane: TcpLane, offset: int, length: int, sent: int) -> None:
        """What a ``sendmsg`` of an operation left unsent (rare: signals, huge ranges)."""
        done = max(0, sent - OP.size)
        if sent < OP.size:
            lane.sock.sendall(memoryview(lane.hdr)[sent:], _NOSIGNAL)
        lane.sock.sendall(self._pool[offset + done:offset + length], _NOSIGNAL)

    def _collect(self, lane: TcpLane) -> None:
        """Read every outstanding status of the lane; raise on the first error."""
        if lane.pending:
            lane.spin.wait()
        while lane.pending:
            n = min(lane.pending, 4096) * STATUS.size
            view = memoryview(lane.status)[:n]
            got = 0
            while got < n:
                try:
                    r = lane.sock.recv_into(view[got:], n - got)
                except OSError:
                    self._refused_before(lane, got)
                    raise
                if not r:
                    self._refused_before(lane, got)
                    raise ConnectionResetError(errno.ECONNRESET, "agent closed the connection")
                got += r
            lane.pending -= n // STATUS.size
            if lane.status[:n] != _ZEROS[:n]:
                raise self._refused(lane, next(e for (e,) in STATUS.iter_unpack(lane.status[:n])
                                                if e))

    def _refused_waiting(self, lane: TcpLane) -> None:
        """Raise the error among the answers that wait on a failed lane, if one came (read as
        far as they go without waiting): a send that failed because the agent closed the
        lane after failing an operation reports that operation's error."""
        n = min(lane.pending, 4096) * STATUS.size
        view = memoryview(lane.status)[:n]
        got = 0
        try:
            while got < n and lane.spin.ready():
                r = lane.sock.recv_into(view[got:], n - got)
                if not r:
                    break
                got += r
        except OSError:
            pass  # the connection's end: what came before it is in view
        self._refused_before(lane, got)

    def _refused_before(self, lane: TcpLane, got: int) -> None:
        """Raise the error among the first ``got`` bytes of statuses, if one came: an agent
        that fails an operation sends its error and closes the lane, so the end of the stream
        (or a reset) after it is not what went wrong."""
        for (e,) in STATUS.iter_unpack(lane.status[:got - got % STATUS.size]):
            if e:
                raise self._refused(lane, e)

    def flush(self, offset: int, length: int, lane: int = 0, flags: int = 0) -> None:
        ln = self._lanes[lane]
        with ln.lock:
            if ln.broken:
                raise fresh(ln.broken)
            try:
                if ln.pending >= self._wq:
                    self._collect(ln)
                self._send_write(ln, OP_WRITE, offset, length, flags | OPF_ACK_LATER)
            except RemoteError:
                raise
            except OSError as e:
                raise self._lost(ln, e) from e
            except BaseException as e:
                self._interrupted(ln, e)
                raise

    def drain(self, lane: int = 0) -> None:
        ln = self._lanes[lane]
        with ln.lock:
            try:
                self._settle(ln)
            except RemoteError:
                raise
            except OSError as e:
                raise self._lost(ln, e) from e
            except BaseException as e:
                self._interrupted(ln, e)
                raise

    def persist(self, offset: int, length: int, lane: int = 0, flags: int = 0,
                op: int = OP_WRITE) -> None:
        ln = self._lanes[lane]
        lock = ln.lock
        lock.acquire()  # not `with`: half the cost, on the hot path
        try:
            if ln.broken or ln.pending:
                if ln.broken:
                    raise fresh(ln.broken)
                self._send_write(ln, op, offset, length, flags)
                self._collect(ln)  # its answer comes after those to the flushes before it
                return
            # the usual case, written out: this is the hot loop of a pool with remote replicas
            sock = ln.sock
            if length <= SMALL:
                out = ln.small
                _pack_op(out, 0, op, flags, offset, length)
                end = _OP_SIZE + length
                out[_OP_SIZE:end] = self._pool[offset:offset + length]
                sent = sock.send(out[:end], _NOSIGNAL)
                ln.pending = 1  # until its answer is read, whatever interrupts this
                if sent != end:
                    sock.sendall(out[sent:end], _NOSIGNAL)
            else:
                _pack_op(ln.hdr, 0, op, flags, offset, length)
                sent = sock.sendmsg((ln.hdr, self._pool[offset:offset + length]), (), _NOSIGNAL)
                ln.pending = 1
                if sent != _OP_SIZE + length:
                    self._send_rest(ln, offset, length, sent)
            spin = ln.spin
            if spin.skip:
                spin.skip -= 1
            else:
                spin.wait()
            word = ln.status_word
            got = sock.recv_into(word)
            if got != STATUS.size or word != _OK_WORD:
                self._finish_word(ln, got)
            ln.pending = 0
        except RemoteError:
            raise
        except OSError as e:
            raise self._lost(ln, e) from e
        except BaseException as e:
            self._interrupted(ln, e)
            raise
        finally:
            lock.release()

    def _finish_word(self, ln: TcpLane, got: int) -> None:
        """Complete a status word of which ``got`` bytes arrived; raise unless it is 0."""
        while got < STATUS.size:
            r = ln.sock.recv_into(memoryview(ln.status_word)[got:])
            if not r:
                raise ConnectionResetError(errno.ECONNRESET, "agent closed the connection")
            got += r
        if ln.status_word != _OK_WORD:
            raise self._refused(ln, STATUS.unpack(ln.status_word)[0])

    def deep_persist(self, offset: int, length: int, lane: int = 0) -> None:
        self.persist(offset, length, lane, 0, OP_DEEP)

    def read(self, dest: memoryview | bytearray, offset: int, lane: int = 0) -> None:
        """Fill ``dest`` with the remote pool's bytes at ``offset``, received in place."""
        n = len(dest)
        if not n:
            return  # nothing is asked, nothing would answer
        ln = self._lanes[lane]
        lock = ln.lock
        lock.acquire()
        try:
            if ln.broken or ln.pending:
                self._settle(ln)  # answers to earlier flushes come first
            _pack_op(ln.hdr, 0, OP_READ, 0, offset, n)
            sock = ln.sock
            sock.sendall(ln.hdr, _NOSIGNAL)
            spin = ln.spin
            if spin.skip:  # as in persist: Spinner.wait's first test, without its call
                spin.skip -= 1
            else:
                spin.wait()
            got = sock.recv_into(dest)
            if got != n:
                self._finish_read(ln, memoryview(dest), got)
        except RemoteError:
            raise
        except OSError as e:
            raise self._lost(ln, e) from e
        except BaseException as e:
            self._interrupted(ln, e)
            raise
        finally:
            lock.release()

    def _settle(self, ln: TcpLane) -> None:
        """Raise the lane's failure, or collect the answers to the flushes it still owes."""
        if ln.broken:
            raise fresh(ln.broken)
        self._collect(ln)

    @staticmethod
    def _finish_read(ln: TcpLane, dest: memoryview, got: int) -> None:
        """The rest of a read's answer, when it did not arrive in one piece."""
        n = len(dest)
        while got < n:  # MSG_WAITALL: the rest in one call, unless the deadline cuts it short
            r = ln.sock.recv_into(dest[got:], n - got, socket.MSG_WAITALL)
            if not r:
                raise ConnectionResetError(errno.ECONNRESET, "the agent closed the lane during "
                                                             "a read (it refuses a read outside "
                                                             "the pool)")
            got += r

    @property
    def failure(self) -> RemoteError | None:
        """The error of the first lane that failed, if any did."""
        return next((ln.broken for ln in self._lanes if ln.broken is not None), None)

    def abort(self, error: RemoteError) -> None:
        """Fail every lane with ``error`` (the agent's host was found dead), from any thread:
        a call blocked on a lane returns it now, later calls at once."""
        for ln in self._lanes:
            if ln.broken is None:
                ln.broken = error
            _shut(ln.sock)

    def close(self) -> None:
        """Close every lane, also while other threads are in calls on them: each socket is
        shut down first (which returns those calls), and closed once its lane is free, so
        that its descriptor cannot be reused under a call still running; a later call fails
        with EBADF."""
        closed = RemoteError(errno.EBADF, f"{self.name}: pool is closed")
        for ln in self._lanes:
            if ln.broken is None:
                ln.broken = closed
            _shut(ln.sock)
        for ln in self._lanes:
            free = ln.lock.acquire(timeout=CLOSE_WAIT)
            try:
                ln.sock.close()
            finally:
                if free:
                    ln.lock.release()


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # not connected any more, or closed already

"""The RDMA data path of a remote pool (pyverbs): one RC queue pair per lane.

The client registers its pool once; the agent registers the remote pool and hands out
``rkey``/``raddr``. A flush is an RDMA WRITE straight from the pool followed, on the same
queue pair, by the persist operation of the pool's method:

GPSPM
    a SEND of a persist message ``{flags, lane, offset, size}``; the agent makes the range
    durable (msync or a CPU cache flush) and answers with a status word.
APM
    an 8-byte RDMA READ of the written range: its completion means the WRITE reached the
    target's memory, which the agent declared durable (``persist-apm``). deep_persist uses
    the GPSPM message even then, as the agent must flush to its deepest domain.

A relaxed flush (``FLUSH_RELAXED``) posts the WRITE only; ``drain`` then sends one persist
operation for everything written since. WRITEs are unsignalled; the send queue (the work
queue size) bounds what is in flight, and every so often one WRITE is signalled so that its
completion frees the queue. Ranges longer than the device's maximum message are split.
"""

from __future__ import annotations

import errno
import mmap
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from rpmem_common.verbs_common import (AGENT_GID, AGENT_INFO, CLIENT_INFO, LANE_QP, MAX_DEPTH,
                                       MSG_DEEP, REPLY, RoceGid, Waiter, completion_channel,
                                       connect_rc_qp, create_rc_qp, device_limits,
                                       load_pyverbs, open_context, random_psn, register,
                                       verbs_error, wc_errno, wc_status_text)
from rpmem_common.wire import PERSIST_MSG

from ...errors import PmReplicaError, RemoteError, fresh
from ...pmem import buffer_address

DEFAULT_WORK_QUEUE = 256
RELAXED = 1  # client.FLUSH_RELAXED: the WRITE only, the persist operation waits for drain
PM_GPSPM, PM_APM = 1, 2  # proto.PM_GPSPM, proto.PM_APM
#: the largest message posted, below the device's own limit; None: the device's limit
MESSAGE_LIMIT: int | None = None
BOUNCE = 256 << 10  # per-lane registered buffer for reads into memory outside the pool
POLL_BATCH = 16
SPIN = 64  # polls of an empty CQ before sleeping on the completion channel
WAIT_SLICE = 0.1  # s between checks that the session still stands while waiting
REPLY_TIMEOUT = 60.0  # s without any completion before a lane is declared dead
_APM_READ = 8
_SLOT = PERSIST_MSG.size


class _Lane:
    """One lane: its queue pair, CQ, prepared work requests and send-queue accounting.

    ``posted`` counts work requests posted; ``freed`` is the number of the last signalled
    one seen complete (every earlier one has completed too); ``signalled`` the last
    signalled one posted; ``run`` how many were posted since it."""

    __slots__ = ("index", "qp", "cq", "waiter", "lock", "broken", "posted", "freed",
                 "signalled", "run", "replies_due", "msg_seq", "dirty_lo", "dirty_hi",
                 "sge", "w_alone", "w_send", "w_read", "send", "apm_read", "scratch", "rd",
                 "msg_sge", "msg_off", "reply_off", "recvs", "bounce", "bounce_mr", "channel",
                 "psn")

    def __init__(self, index: int) -> None:
        self.index = index
        self.lock = threading.Lock()
        self.broken: OSError | None = None
        self.posted = self.freed = self.signalled = self.run = 0
        self.replies_due = self.msg_seq = 0
        self.dirty_lo, self.dirty_hi = -1, -1
        self.bounce: mmap.mmap | None = None
        self.bounce_mr = None


class VerbsDataPath:
    """The lanes of one remote pool over RDMA; ``pool`` is the client's pool buffer."""

    def __init__(self, pv: SimpleNamespace, ctx: object, name: str, pool: memoryview,
                 pool_addr: int, size: int, data_offset: int, rkey: int, hdr_rkey: int,
                 raddr: int, method: int, depth: int, max_msg: int,
                 alive: Callable[[], bool]) -> None:
        self._pv, self._ctx = pv, ctx
        self.name = name
        self._pool, self._pool_addr = pool, pool_addr
        self._size, self._lo = size, data_offset
        self._rkey, self._hdr_rkey, self._raddr = rkey, hdr_rkey, raddr
        self.persist_method = method
        self._depth = depth
        self._half = max(1, depth // 2)
        self._max_msg = max_msg
        self._alive = alive
        self._aborted: RemoteError | None = None
        self._lanes: list[_Lane] = []
        self.nlanes = 0
        self._pd = self._pool_mr = self._ctrl_mr = None
        self._ctrl: mmap.mmap | None = None
        self._ctrl_view: memoryview | None = None
        self._ctrl_addr = 0
        ev = pv.ev
        self._SIG, self._RECV, self._OK = ev.IBV_SEND_SIGNALED, ev.IBV_WC_RECV, ev.IBV_WC_SUCCESS
        self._tail_op = PM_APM if method == PM_APM else PM_GPSPM

    # -- setup ------------------------------------------------------------------------------
    @classmethod
    def connect(cls, gid: RoceGid, pool: memoryview, data_offset: int, rkey: int, raddr: int,
                agent_blob: bytes, method: int, nlanes: int, name: str, work_queue: int,
                exchange: Callable[[bytes], bytes],
                alive: Callable[[], bool]) -> "VerbsDataPath":
        """Open ``nlanes`` queue pairs on ``gid``'s device and connect them to the agent's.

        ``exchange`` sends the CONNECT blob on the control channel and returns the answer's;
        ``alive`` tells whether the agent still runs (checked while waiting long)."""
        pv = load_pyverbs()
        if len(agent_blob) != AGENT_INFO.size:
            raise RemoteError(errno.EPROTO, f"{name}: the agent's RDMA data is "
                                            f"{len(agent_blob)} bytes, not {AGENT_INFO.size}")
        agent_mtu, hdr_rkey, agent_rd = AGENT_INFO.unpack(agent_blob)
        try:
            ctx = open_context(pv, gid.device)
        except pv.PyverbsError as e:
            raise verbs_error(e, f"{name}: cannot open RDMA device {gid.device}") from None
        try:
            max_wr, max_rd, max_msg, mtu = device_limits(ctx, gid.port)
            # the agent's send queue holds twice as many replies as messages in flight
            depth = max(4, min(work_queue, MAX_DEPTH, max_wr // 2))
            if MESSAGE_LIMIT:
                max_msg = min(max_msg, MESSAGE_LIMIT)
            self = cls(pv, ctx, name, pool, buffer_address(pool), len(pool), data_offset, rkey,
                       hdr_rkey, raddr, method, depth, max_msg, alive)
            self._setup(pv, gid, nlanes)
            hello = CLIENT_INFO.pack(gid.gid, mtu, depth) + b"".join(
                LANE_QP.pack(ln.qp.qp_num, ln.psn) for ln in self._lanes)
            answer = exchange(hello)
            if len(answer) != AGENT_GID.size + LANE_QP.size * len(self._lanes):
                raise RemoteError(errno.EPROTO, f"{name}: the agent answered CONNECT with "
                                                f"{len(answer)} bytes for {self.nlanes} lanes")
            (agent_gid,) = AGENT_GID.unpack_from(answer)
            rd = max(1, min(max_rd, agent_rd, 16))
            lanes = LANE_QP.iter_unpack(answer[AGENT_GID.size:])
            for ln, (qpn, psn) in zip(self._lanes, lanes):
                connect_rc_qp(pv, ln.qp, gid, agent_gid, qpn, psn, ln.psn,
                              min(mtu, agent_mtu), rd)
        except BaseException as e:
            try:
                ctx.close()
            except pv.PyverbsError:
                pass
            if isinstance(e, pv.PyverbsError):
                raise verbs_error(e, f"{name}: RDMA setup on {gid.device} failed") from None
            raise
        return self

    def _setup(self, pv: SimpleNamespace, gid: RoceGid, nlanes: int) -> None:
        ev = pv.ev
        depth = self._depth
        self._pd = pd = pv.PD(self._ctx)
        self._pool_mr = register(pv, pd, self._pool_addr, self._size, ev.IBV_ACCESS_LOCAL_WRITE,
                                 f"{self.name}: the local pool")
        # per lane: persist-message slots, reply slots, the APM read target
        reply_off = depth * _SLOT
        scratch_off = reply_off + depth * REPLY.size
        per_lane = (scratch_off + _APM_READ + 63) & ~63
        self._ctrl = mmap.mmap(-1, max(per_lane * nlanes, mmap.PAGESIZE))
        self._ctrl_view = memoryview(self._ctrl)
        self._ctrl_addr = buffer_address(self._ctrl_view)
        self._ctrl_mr = register(pv, pd, self._ctrl_addr, len(self._ctrl),
                                 ev.IBV_ACCESS_LOCAL_WRITE, f"{self.name}: lane buffers")
        lkey, clkey = self._pool_mr.lkey, self._ctrl_mr.lkey
        WRITE, READ, SEND = ev.IBV_WR_RDMA_WRITE, ev.IBV_WR_RDMA_READ, ev.IBV_WR_SEND
        for i in range(nlanes):
            ln = _Lane(i)
            base = self._ctrl_addr + i * per_lane
            ln.msg_off, ln.reply_off = i * per_lane, i * per_lane + reply_off
            ln.channel, fd = completion_channel(pv, self._ctx)
            ln.cq = pv.CQ(self._ctx, 2 * depth + 8, None, ln.channel, 0)
            ln.waiter = Waiter(ln.cq, ln.channel, fd)
            ln.qp = create_rc_qp(pv, pd, ln.cq, gid.port, depth, depth)
            ln.psn = random_psn()
            # prepared work requests; a SendWR made with next_wr posts as a chain, and
            # `sg_list = sge` makes it use that SGE object, so a post only updates fields
            ln.sge = pv.SGE(self._pool_addr, 0, lkey)
            ln.msg_sge = pv.SGE(base, _SLOT, clkey)
            ln.send = pv.SendWR(opcode=SEND, num_sge=1, sg=[ln.msg_sge], send_flags=self._SIG)
            ln.send.sg_list = ln.msg_sge
            ln.scratch = pv.SGE(base + scratch_off, _APM_READ, clkey)
            ln.apm_read = pv.SendWR(opcode=READ, num_sge=1, sg=[ln.scratch],
                                    send_flags=self._SIG)
            ln.apm_read.sg_list = ln.scratch
            ln.w_alone = pv.SendWR(opcode=WRITE, num_sge=1, sg=[ln.sge], send_flags=0)
            ln.w_send = pv.SendWR(opcode=WRITE, num_sge=1, sg=[ln.sge], send_flags=0,
                                  next_wr=ln.send)
            ln.w_read = pv.SendWR(opcode=WRITE, num_sge=1, sg=[ln.sge], send_flags=0,
                                  next_wr=ln.apm_read)
            ln.rd = pv.SendWR(opcode=READ, num_sge=1, sg=[ln.sge], send_flags=0)
            for wr in (ln.w_alone, ln.w_send, ln.w_read, ln.rd):
                wr.sg_list = ln.sge
            ln.recvs = [pv.RecvWR(wr_id=k, num_sge=1,
                                  sg=[pv.SGE(base + reply_off + k * REPLY.size, REPLY.size,
                                             clkey)]) for k in range(depth)]
            for wr in ln.recvs:
                ln.qp.post_recv(wr)
            self._lanes.append(ln)
        self.nlanes = nlanes

    # -- completions -------------------------------------------------------------------------
    def _lost(self, ln: _Lane, err: int, text: str) -> RemoteError:
        ln.broken = RemoteError(err, f"{self.name}: lane {ln.index}: {text}")
        return fresh(ln.broken)

    def _handle(self, ln: _Lane, wcs: list) -> None:
        for wc in wcs:
            if wc.status != self._OK:
                raise self._lost(ln, wc_errno(self._pv, wc.status),
                                 f"RDMA operation failed: {wc_status_text(wc.status)} "
                                 f"(queue pair now in error)")
            if wc.opcode == self._RECV:
                slot = wc.wr_id
                (status,) = REPLY.unpack_from(self._ctrl_view, ln.reply_off + slot * REPLY.size)
                ln.qp.post_recv(ln.recvs[slot])
                ln.replies_due -= 1
                if status:
                    raise self._lost(ln, status, "agent failed to make a range durable: "
                                                 f"{errno.errorcode.get(status, status)}")
            elif wc.wr_id > ln.freed:
                ln.freed = wc.wr_id

    def _progress(self, ln: _Lane) -> None:
        """Handle at least one completion of the lane, waiting for it if need be."""
        cq = ln.cq
        for _ in range(SPIN):
            n, wcs = cq.poll(POLL_BATCH)
            if n:
                self._handle(ln, wcs)
                return
        waiter = ln.waiter
        deadline = time.monotonic() + REPLY_TIMEOUT
        while True:
            waiter.arm()
            n, wcs = cq.poll(POLL_BATCH)  # a completion that came before the arm
            if n:
                waiter.reset()
                self._handle(ln, wcs)
                return
            if waiter.wait(WAIT_SLICE):
                continue
            if self._aborted is not None:
                ln.broken = self._aborted
                raise fresh(self._aborted)
            if not self._alive():
                raise self._lost(ln, errno.ECONNRESET, "the agent exited")
            if time.monotonic() > deadline:
                raise self._lost(ln, errno.ETIMEDOUT, f"no completion in {REPLY_TIMEOUT:.0f} s")

    def _settle(self, ln: _Lane) -> None:
        """Wait for every signalled operation and persist reply of the lane."""
        while ln.freed < ln.signalled or ln.replies_due:
            self._progress(ln)

    # -- posting -------------------------------------------------------------------------------
    def _room(self, ln: _Lane, k: int) -> None:
        """Wait until ``k`` more work requests fit in the send queue. At most ``run`` (under
        half the queue) follow the last signalled one, so when the queue is full a signalled
        request is outstanding and its completion makes room."""
        while ln.posted - ln.freed + k > self._depth:
            self._progress(ln)

    def _post_write(self, ln: _Lane, offset: int, length: int) -> None:
        """One unsignalled WRITE (signalled when the run since the last signal is long)."""
        self._room(ln, 1)
        ln.sge.addr = self._pool_addr + offset
        ln.sge.length = length
        wr = ln.w_alone
        wr.set_wr_rdma(self._rkey, self._raddr + offset)
        self._post_counted(ln, wr, False)

    def _post_counted(self, ln: _Lane, wr: Any, last: bool) -> None:
        """Post one work request: signalled when it is the ``last`` of an operation or the
        run since the last signalled one is long, unsignalled otherwise."""
        ln.posted += 1
        if last or ln.run + 1 >= self._half:
            wr.send_flags = self._SIG
            wr.wr_id = ln.signalled = ln.posted
            ln.run = 0
        else:
            wr.send_flags = 0
            ln.run += 1
        ln.qp.post_send(wr)

    def _message(self, ln: _Lane, flags: int, offset: int, length: int) -> None:
        """Fill the lane's next persist-message slot; the SEND WR points at it."""
        while ln.replies_due >= self._depth:
            self._progress(ln)
        slot = ln.msg_seq % self._depth
        ln.msg_seq += 1
        at = ln.msg_off + slot * _SLOT
        PERSIST_MSG.pack_into(self._ctrl_view, at, flags, ln.index, offset, length)
        ln.msg_sge.addr = self._ctrl_addr + at

    def _tail(self, ln: _Lane, op: int, flags: int, lo: int, hi: int, chained: bool) -> None:
        """Post the persist operation for [lo, hi): after the WRITE already prepared in the
        lane's SGE (``chained``) or alone."""
        self._room(ln, 2 if chained else 1)
        if op == PM_GPSPM:
            self._message(ln, flags, lo, hi - lo)
            tail, head = ln.send, ln.w_send
            ln.replies_due += 1
        else:
            tail, head = ln.apm_read, ln.w_read
            tail.set_wr_rdma(self._rkey, self._raddr + lo)
            ln.scratch.length = min(_APM_READ, hi - lo)
        ln.posted += 2 if chained else 1
        tail.wr_id = ln.signalled = ln.posted
        ln.run = 0
        ln.qp.post_send(head if chained else tail)

    def _flush(self, ln: _Lane, offset: int, length: int, op: int, flags: int) -> None:
        """WRITE [offset, offset+length) and post the persist operation ``op`` for it and
        for whatever relaxed flushes left behind."""
        lo, hi = offset, offset + length
        if ln.dirty_hi >= 0:
            lo, hi = min(lo, ln.dirty_lo), max(hi, ln.dirty_hi)
            ln.dirty_lo = ln.dirty_hi = -1
        step = self._max_msg
        end = offset + length
        while end - offset > step:
            self._post_write(ln, offset, step)
            offset += step
        if offset == end:  # nothing to write (length 0): the operation alone
            if hi > lo:
                self._tail(ln, op, flags, lo, hi, False)
            return
        ln.sge.addr = self._pool_addr + offset
        ln.sge.length = end - offset
        (ln.w_send if op == PM_GPSPM else ln.w_read).set_wr_rdma(self._rkey,
                                                                 self._raddr + offset)
        self._tail(ln, op, flags, lo, hi, True)

    def _check(self, ln: _Lane, offset: int, length: int) -> None:
        if ln.broken is not None:
            raise fresh(ln.broken)
        if offset < self._lo or length < 0 or offset + length > self._size:
            raise PmReplicaError(errno.EINVAL, f"{self.name}: range {offset}+{length} is "
                                               f"outside the remote pool's data "
                                               f"[{self._lo}, {self._size})")

    def _failed(self, ln: _Lane, e: Exception) -> RemoteError:
        """A pyverbs error on a post: the lane cannot be trusted any more."""
        code = getattr(e, "error_code", None) or errno.EIO
        return self._lost(ln, code, f"posting to the queue pair failed: {e}")

    def _cut_short(self, ln: _Lane) -> None:
        """A call on the lane was ended by an exception from outside it (KeyboardInterrupt,
        a signal handler's). The lane's counters keep later calls in step with what it left
        outstanding, but not with completions it had polled and not yet handled (a reply
        never counted is waited for until the timeout, an agent's error in it never seen):
        the lane is given up, as a TCP lane is, and its next call fails with ECANCELED.
        The lane's own failures have set ``broken`` already."""
        if ln.broken is None:
            ln.broken = RemoteError(errno.ECANCELED, f"{self.name}: lane {ln.index}: a call "
                                                     "was interrupted mid-operation; lane "
                                                     "given up")

    # -- operations ----------------------------------------------------------------------------
    def flush(self, offset: int, length: int, lane: int = 0, flags: int = 0) -> None:
        ln = self._lanes[lane]
        with ln.lock:
            self._check(ln, offset, length)
            try:
                if flags & RELAXED:
                    step, end = self._max_msg, offset + length
                    while offset < end:
                        n = min(step, end - offset)
                        self._post_write(ln, offset, n)
                        if ln.dirty_hi < 0:
                            ln.dirty_lo, ln.dirty_hi = offset, offset + n
                        else:
                            ln.dirty_lo = min(ln.dirty_lo, offset)
                            ln.dirty_hi = max(ln.dirty_hi, offset + n)
                        offset += n
                else:
                    self._flush(ln, offset, length, self._tail_op, 0)
            except self._pv.PyverbsError as e:
                raise self._failed(ln, e) from None
            except BaseException:
                self._cut_short(ln)
                raise

    def drain(self, lane: int = 0) -> None:
        ln = self._lanes[lane]
        with ln.lock:
            if ln.broken is not None:
                raise fresh(ln.broken)
            try:
                if ln.dirty_hi >= 0:
                    self._flush(ln, ln.dirty_lo, 0, self._tail_op, 0)
                self._settle(ln)
            except self._pv.PyverbsError as e:
                raise self._failed(ln, e) from None
            except BaseException:
                self._cut_short(ln)
                raise

    def persist(self, offset: int, length: int, lane: int = 0, flags: int = 0) -> None:
        ln = self._lanes[lane]
        with ln.lock:
            self._check(ln, offset, length)
            try:
                self._flush(ln, offset, length, self._tail_op, 0)
                self._settle(ln)
            except self._pv.PyverbsError as e:
                raise self._failed(ln, e) from None
            except BaseException:
                self._cut_short(ln)
                raise

    def deep_persist(self, offset: int, length: int, lane: int = 0) -> None:
        ln = self._lanes[lane]
        with ln.lock:
            self._check(ln, offset, length)
            try:
                self._flush(ln, offset, length, PM_GPSPM, MSG_DEEP)
                self._settle(ln)
            except self._pv.PyverbsError as e:
                raise self._failed(ln, e) from None
            except BaseException:
                self._cut_short(ln)
                raise

    def read(self, dest: memoryview, offset: int, lane: int = 0) -> None:
        """Fill ``dest`` with the remote pool's bytes at ``offset`` by RDMA READ: straight
        into ``dest`` when it lies in the registered pool, else through a lane buffer."""
        ln = self._lanes[lane]
        n = len(dest)
        with ln.lock:
            if ln.broken is not None:
                raise fresh(ln.broken)
            if offset < 0 or offset + n > self._size:
                raise PmReplicaError(errno.EINVAL, f"{self.name}: range {offset}+{n} is "
                                                   f"outside the remote pool [0, {self._size})")
            if not n:
                return
            addr = buffer_address(dest)  # a buffer it cannot take is the caller's error
            try:
                if self._pool_addr <= addr and addr + n <= self._pool_addr + self._size:
                    self._read(ln, addr, self._pool_mr.lkey, offset, n)
                    return
                buf, mr = self._bounce(ln)
                done = 0
                while done < n:
                    k = min(len(buf), n - done)
                    self._read(ln, buffer_address(memoryview(buf)), mr.lkey, offset + done, k)
                    dest[done:done + k] = memoryview(buf)[:k]
                    done += k
            except self._pv.PyverbsError as e:
                raise self._failed(ln, e) from None
            except BaseException:
                self._cut_short(ln)
                raise

    def _read(self, ln: _Lane, local: int, lkey: int, offset: int, n: int) -> None:
        """RDMA READ remote [offset, offset+n) to ``local``: split at the header window's
        end and the message limit, the last request signalled, then wait for the lane."""
        ln.sge.lkey = lkey
        try:
            self._read_posts(ln, local, offset, n)
        finally:
            ln.sge.lkey = self._pool_mr.lkey
        self._settle(ln)

    def _read_posts(self, ln: _Lane, local: int, offset: int, n: int) -> None:
        wr = ln.rd
        end = offset + n
        while offset < end:
            stop = min(end, offset + self._max_msg)
            if offset < self._lo:
                stop, rkey = min(stop, self._lo), self._hdr_rkey
            else:
                rkey = self._rkey
            self._room(ln, 1)
            ln.sge.addr, ln.sge.length = local, stop - offset
            wr.set_wr_rdma(rkey, self._raddr + offset)
            self._post_counted(ln, wr, stop == end)
            local += stop - offset
            offset = stop

    def _bounce(self, ln: _Lane) -> tuple[mmap.mmap, object]:
        if ln.bounce is None:
            buf = mmap.mmap(-1, BOUNCE)
            ln.bounce_mr = register(self._pv, self._pd, buffer_address(memoryview(buf)), BOUNCE,
                                    self._pv.ev.IBV_ACCESS_LOCAL_WRITE,
                                    f"{self.name}: read buffer of lane {ln.index}")
            ln.bounce = buf
        return ln.bounce, ln.bounce_mr

    @property
    def failure(self) -> RemoteError | None:
        """The error of the first lane that failed, if any did."""
        return self._aborted or next((ln.broken for ln in self._lanes if ln.broken is not None),
                                     None)

    def abort(self, error: RemoteError) -> None:
        """Fail every lane with ``error`` (the agent's host was found dead), from any thread:
        a call waiting for a completion returns it within :data:`WAIT_SLICE`."""
        self._aborted = error
        for ln in self._lanes:
            if ln.broken is None:
                ln.broken = error

    def close(self) -> None:
        """Destroy the queue pairs and deregister the memory (the agent's side goes with
        its session)."""
        if self._ctx is None:
            return
        ctx, self._ctx = self._ctx, None
        try:
            ctx.close()
        except self._pv.PyverbsError:
            pass
        for ln in self._lanes:
            if ln.bounce is not None:
                ln.bounce.close()
        self._lanes = []
        if self._ctrl_view is not None:
            self._ctrl_view.release()
            self._ctrl.close()

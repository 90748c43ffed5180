"""The agent's RDMA data path: the open pool registered on the RDMA device that reaches the
client, one RC queue pair per lane, and a thread per lane answering GPSPM persist messages.

Imported only by sessions that ask for verbs, so pyverbs never slows down an agent that
serves TCP. Only the session's own queue pairs belong to its protection domain, and they are
connected to the queue pairs the client named on the authenticated control channel: no other
peer can reach the registered pool. The data window (``[data_offset, pool_size)``) is the
only memory remote peers may write; the header is registered for reads only, so the NIC
refuses a WRITE to the header or past the pool's end.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import mmap
import os
import threading

from pmreplica.pmem import buffer_address, memory_backed
from rpmem_common.verbs_common import (
    AGENT_GID, AGENT_INFO, CLIENT_INFO, LANE_QP, MAX_DEPTH, MSG_DEEP, REPLY, RoceGid, Waiter,
    completion_channel, connect_rc_qp, create_rc_qp, device_limits, gid_for_address,
    gid_toward, is_loopback, load_pyverbs, open_context, random_psn, register, roce_gids,
    verbs_error, wc_status_text)
from rpmem_common.wire import PERSIST_MSG

from .pooldb import OpenPool, PoolError

log = logging.getLogger("remote_agent.verbs")

PM_GPSPM, PM_APM = 1, 2  # proto.PM_GPSPM, proto.PM_APM
SPIN = 64  # polls of an empty CQ before sleeping on the completion channel
_SLOT = PERSIST_MSG.size


def _ssh_connection() -> tuple[str, str] | None:
    fields = os.environ.get("SSH_CONNECTION", "").split()
    return (fields[0], fields[2]) if len(fields) == 4 else None


def choose_gid() -> RoceGid | None:
    """The GID the agent serves from: the one holding the address the client reached
    (SSH_CONNECTION's server address), else the one on the route back to the client. A
    session from this node itself (local launcher, ssh to localhost) uses the node's only
    RDMA device; with several it cannot tell which one the client chose."""
    peers = _ssh_connection()
    if peers is not None:
        client, server = peers
        gid = gid_for_address(server) or gid_toward(client)
        if gid is not None or not (is_loopback(client) and is_loopback(server)):
            return gid
    gids = roce_gids()
    if len({g.device for g in gids}) != 1:
        return None
    ipv4 = [g for g in gids if ipaddress.IPv6Address(g.gid).ipv4_mapped]
    return (ipv4 or gids)[0]


def unavailable() -> str | None:
    """Why this agent cannot serve a pool over verbs, or None if it can."""
    try:
        load_pyverbs()
    except ImportError as e:
        return f"RDMA is not available on the agent's node: {e}"
    if choose_gid() is None:
        return ("no RDMA device (RoCE v2) on the agent's node reaches the client"
                if roce_gids() else "the agent's node has no RDMA device (RoCE v2)")
    return None


def _durable_in_memory(pool: OpenPool) -> bool:
    """True if a store that reached the pool's memory is durable: pmem, or files whose
    only storage is RAM (tmpfs), where msync has nothing to write back."""
    if pool.mapping.is_pmem:
        return True
    for part in pool.set_file.master.parts:
        fd = os.open(part.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if not memory_backed(fd):
                return False
        finally:
            os.close(fd)
    return True


class _Lane:
    __slots__ = ("index", "qp", "cq", "waiter", "channel", "recvs", "reply_off", "reply_sge",
                 "reply_wr", "buf", "view", "base", "mr", "thread")


class VerbsServer:
    """Serves the lanes of one open pool over RDMA."""

    def __init__(self, pool: OpenPool, nlanes: int, persist_apm: bool) -> None:
        self.pv = pv = load_pyverbs()
        gid = choose_gid()
        if gid is None:
            raise PoolError(errno.EMEDIUMTYPE, unavailable() or "no RDMA device")
        self.gid = gid
        self.mapping = pool.mapping
        self.lo, self.hi = pool.data_offset, pool.pool_size
        self.nlanes = nlanes
        self.port = 0
        self._lanes: list[_Lane] = []
        self._closing = False
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)  # wakes the lanes on close
        self.ctx = None
        try:
            self.ctx = open_context(pv, gid.device)
            self._max_wr, self.rd_atomic, _, self.mtu = device_limits(self.ctx, gid.port)
            self.rd_atomic = max(1, min(self.rd_atomic, 16))
            self.pd = pv.PD(self.ctx)
            ev = pv.ev
            addr = self.mapping.addr
            self.data_mr = register(pv, self.pd, addr + self.lo, self.hi - self.lo,
                                    ev.IBV_ACCESS_LOCAL_WRITE | ev.IBV_ACCESS_REMOTE_WRITE
                                    | ev.IBV_ACCESS_REMOTE_READ, f"pool {pool.name}")
            self.header_mr = (register(pv, self.pd, addr, self.lo, ev.IBV_ACCESS_REMOTE_READ,
                                       f"the header of pool {pool.name}") if self.lo else None)
        except BaseException as e:
            self._release()
            if isinstance(e, pv.PyverbsError):
                raise verbs_error(e, f"RDMA setup on {gid.device} failed") from None
            raise
        self.rkey = self.data_mr.rkey
        self.raddr = addr
        if persist_apm and not _durable_in_memory(pool):
            log.warning("persist-apm is set, but pool %s is neither on pmem nor in RAM: "
                        "using GPSPM, which makes ranges durable with msync", pool.name)
            persist_apm = False
        self.persist_method = PM_APM if persist_apm else PM_GPSPM
        hdr_rkey = self.header_mr.rkey if self.header_mr is not None else 0
        self.blob = AGENT_INFO.pack(self.mtu, hdr_rkey, self.rd_atomic)
        log.info("pool %s registered on %s", pool.name, gid)

    # -- CONNECT -----------------------------------------------------------------------------
    def connect_lanes(self, blob: bytes) -> bytes:
        """Create and connect one queue pair per lane the client offers; start serving them.
        The answer carries this side's GID and queue pairs."""
        if self._lanes:
            raise PoolError(errno.EINVAL, "the lanes of this session are connected already")
        body = len(blob) - CLIENT_INFO.size
        n = body // LANE_QP.size if body > 0 else 0
        if body <= 0 or body % LANE_QP.size or not 1 <= n <= self.nlanes:
            raise PoolError(errno.EINVAL, f"CONNECT data of {len(blob)} bytes does not describe "
                                          f"1 to {self.nlanes} lanes")
        client_gid, mtu, depth = CLIENT_INFO.unpack_from(blob)
        if not 1 <= mtu <= 5 or not 1 <= depth <= min(MAX_DEPTH, self._max_wr // 2):
            raise PoolError(errno.EINVAL, f"CONNECT asks for MTU {mtu}, {depth} messages in "
                                          "flight: out of range")
        gid = self._gid_for(client_gid)
        pv = self.pv
        try:
            answer = [AGENT_GID.pack(gid.gid)]
            for i, (qpn, psn) in enumerate(LANE_QP.iter_unpack(blob[CLIENT_INFO.size:])):
                ln = self._lane(i, depth, gid.port)
                my_psn = random_psn()
                connect_rc_qp(pv, ln.qp, gid, client_gid, qpn, psn, my_psn,
                              min(mtu, self.mtu), self.rd_atomic)
                answer.append(LANE_QP.pack(ln.qp.qp_num, my_psn))
        except pv.PyverbsError as e:
            raise verbs_error(e, "cannot connect the RDMA lanes") from None
        for ln in self._lanes:
            ln.thread = threading.Thread(target=self._serve, args=(ln,), daemon=True,
                                         name=f"rdma lane {ln.index}")
            ln.thread.start()
        log.info("%d RDMA lanes connected to %s", n,
                 ipaddress.IPv6Address(client_gid).ipv4_mapped or
                 ipaddress.IPv6Address(client_gid))
        return b"".join(answer)

    def _gid_for(self, client_gid: bytes) -> RoceGid:
        """This device's GID on the route to the client's address (the CREATE-time choice
        when the route leaves through another device)."""
        ip = ipaddress.IPv6Address(client_gid)
        toward = gid_toward(str(ip.ipv4_mapped or ip))
        return toward if toward is not None and toward.device == self.gid.device else self.gid

    def _lane(self, index: int, depth: int, port: int) -> _Lane:
        pv, ev = self.pv, self.pv.ev
        ln = _Lane()
        ln.index = index
        # memory for `depth` incoming messages and as many replies (a reply slot is reused
        # only after the client has the earlier reply: it never has more than `depth` out)
        ln.reply_off = depth * _SLOT
        ln.buf = mmap.mmap(-1, max(depth * (_SLOT + REPLY.size), mmap.PAGESIZE))
        ln.view = memoryview(ln.buf)
        ln.thread = None
        self._lanes.append(ln)
        ln.base = base = buffer_address(ln.view)
        ln.mr = mr = register(pv, self.pd, base, len(ln.buf), ev.IBV_ACCESS_LOCAL_WRITE,
                              f"lane {index} buffers")
        ln.channel, fd = completion_channel(pv, self.ctx)
        ln.cq = pv.CQ(self.ctx, 3 * depth + 8, None, ln.channel, 0)
        ln.waiter = Waiter(ln.cq, ln.channel, fd, self._wake_r)
        ln.qp = create_rc_qp(pv, self.pd, ln.cq, port, 2 * depth, depth)
        ln.recvs = [pv.RecvWR(wr_id=k, num_sge=1, sg=[pv.SGE(base + k * _SLOT, _SLOT, mr.lkey)])
                    for k in range(depth)]
        for wr in ln.recvs:
            ln.qp.post_recv(wr)
        ln.reply_sge = pv.SGE(base + ln.reply_off, REPLY.size, mr.lkey)
        ln.reply_wr = pv.SendWR(opcode=ev.IBV_WR_SEND, num_sge=1, sg=[ln.reply_sge],
                                send_flags=ev.IBV_SEND_SIGNALED)
        ln.reply_wr.sg_list = ln.reply_sge
        return ln

    # -- serving -----------------------------------------------------------------------------
    def _serve(self, ln: _Lane) -> None:
        """Answer the lane's persist messages in order until the session closes or the
        queue pair fails."""
        pv = self.pv
        reply_wr, base, view = ln.reply_wr, ln.base, ln.view
        ok, recv_op = pv.ev.IBV_WC_SUCCESS, pv.ev.IBV_WC_RECV
        persist, deep = self.mapping.persist, self.mapping.deep_persist
        lo, hi = self.lo, self.hi
        cq, qp, waiter = ln.cq, ln.qp, ln.waiter
        spins = 0
        try:
            while not self._closing:
                n, wcs = cq.poll(16)
                if not n:
                    spins += 1
                    if spins < SPIN:
                        continue
                    waiter.arm()
                    n, wcs = cq.poll(16)
                    if not n:
                        waiter.wait(1.0)
                        continue
                spins = 0
                for wc in wcs:
                    if wc.status != ok:
                        if not self._closing:
                            log.warning("lane %d: RDMA operation failed: %s", ln.index,
                                        wc_status_text(wc.status))
                        return
                    if wc.opcode != recv_op:
                        continue  # a reply went out
                    slot = wc.wr_id
                    flags, lane, off, size = PERSIST_MSG.unpack_from(view, slot * _SLOT)
                    qp.post_recv(ln.recvs[slot])
                    status = 0
                    if lane != ln.index or off < lo or off + size > hi:
                        log.warning("lane %d: refused persist of %d+%d (lane %d)", ln.index,
                                    off, size, lane)
                        status = errno.EINVAL
                    elif size:
                        try:
                            (deep if flags & MSG_DEEP else persist)(off, size)
                        except OSError as e:
                            log.error("lane %d: making %d+%d durable failed: %s", ln.index,
                                      off, size, e)
                            status = e.errno or errno.EIO
                    at = ln.reply_off + slot * REPLY.size
                    REPLY.pack_into(view, at, status)
                    ln.reply_sge.addr = base + at
                    qp.post_send(reply_wr)
        except pv.PyverbsError as e:
            if not self._closing:
                log.warning("lane %d: %s", ln.index, e)

    def close(self) -> None:
        """Stop the lane threads, destroy the queue pairs, deregister the pool."""
        self._closing = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        for ln in self._lanes:
            if ln.thread is not None:
                ln.thread.join(5.0)
        self._release()

    def _release(self) -> None:
        ctx, self.ctx = self.ctx, None
        if ctx is not None:
            try:
                ctx.close()
            except self.pv.PyverbsError as e:
                log.warning("closing the RDMA device: %s", e)
        for ln in self._lanes:
            ln.view.release()
            ln.buf.close()
        self._lanes = []
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

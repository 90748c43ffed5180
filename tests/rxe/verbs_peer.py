"""One end of an RC queue pair on an rxe device, whose memory region is an mmap'd file.

The tests import it for their own end. `python verbs_peer.py FILE SIZE SEED` is the other end in
a process of its own: it fills the upper half of FILE with pattern(SEED), prints its coordinates
as a JSON line, reads the peer's, connects, prints "connected" and keeps its memory registered
until a line "done" (or end of input) arrives.
"""

import ctypes
import json
import mmap
import os
import random
import sys
import time

import pyverbs.enums as ev
from pyverbs.addr import GID, AHAttr, GlobalRoute
from pyverbs.cq import CQ
from pyverbs.device import Context
from pyverbs.mr import MR
from pyverbs.pd import PD
from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr
from pyverbs.wr import SGE, SendWR

PORT = 1
ACCESS = ev.IBV_ACCESS_LOCAL_WRITE | ev.IBV_ACCESS_REMOTE_WRITE | ev.IBV_ACCESS_REMOTE_READ


def pattern(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


class Endpoint:
    """File FILE of SIZE bytes, mapped shared and registered as one MR, with an RC QP."""

    def __init__(self, device: str, gid_index: int, path: str, size: int) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            self.map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._view = (ctypes.c_char * size).from_buffer(self.map)
        self.addr = ctypes.addressof(self._view)
        self.gid_index = gid_index
        self.ctx = Context(name=device)
        self.pd = PD(self.ctx)
        self.cq = CQ(self.ctx, 16)
        self.mr = MR(self.pd, size, ACCESS, address=self.addr)
        cap = QPCap(max_send_wr=16, max_recv_wr=1, max_send_sge=1, max_recv_sge=1)
        self.qp = QP(self.pd, QPInitAttr(qp_type=ev.IBV_QPT_RC, scq=self.cq, rcq=self.cq, cap=cap))
        self.psn = random.getrandbits(24)
        self.gid = str(self.ctx.query_gid(PORT, gid_index))

    def coordinates(self) -> dict:
        """What the peer needs to connect to this QP and to address this MR."""
        return {"qpn": self.qp.qp_num, "psn": self.psn, "gid": self.gid,
                "addr": self.addr, "rkey": self.mr.rkey}

    def connect(self, peer: dict) -> None:
        attr = QPAttr(qp_state=ev.IBV_QPS_INIT)
        attr.port_num = PORT
        attr.path_mtu = ev.IBV_MTU_1024
        attr.qp_access_flags = ACCESS
        attr.dest_qp_num = peer["qpn"]
        attr.rq_psn = peer["psn"]
        attr.sq_psn = self.psn
        attr.max_rd_atomic = attr.max_dest_rd_atomic = 4
        attr.min_rnr_timer, attr.timeout, attr.retry_cnt, attr.rnr_retry = 12, 14, 7, 7
        route = GlobalRoute(dgid=GID(peer["gid"]), sgid_index=self.gid_index)
        attr.ah_attr = AHAttr(gr=route, is_global=1, port_num=PORT)
        self.qp.to_rts(attr)

    def rdma(self, opcode: int, offset: int, length: int, remote_addr: int, rkey: int,
             timeout: float = 30.0) -> None:
        """Post one signaled RDMA WRITE or READ of MR[offset:offset+length] and wait for it."""
        wr = SendWR(opcode=opcode, num_sge=1, sg=[SGE(self.addr + offset, length, self.mr.lkey)],
                    send_flags=ev.IBV_SEND_SIGNALED)
        wr.set_wr_rdma(rkey, remote_addr)
        self.qp.post_send(wr)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            n, wcs = self.cq.poll()
            if n:
                if wcs[0].status != ev.IBV_WC_SUCCESS:
                    raise OSError(f"RDMA opcode {opcode} completed with status {wcs[0].status}")
                return
        raise TimeoutError(f"RDMA opcode {opcode} did not complete within {timeout} s")

    def close(self) -> None:
        self.ctx.close()  # closes the QP, MR, CQ and PD made from it
        del self._view  # the mapping cannot close while a ctypes view exports it
        self.map.close()

    def __enter__(self) -> "Endpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve(path: str, size: int, seed: int) -> None:
    with Endpoint(os.environ.get("RXE_DEV", "rxe0"), int(os.environ.get("RXE_GID_INDEX", "1")),
                  path, size) as me:
        me.map[size // 2:] = pattern(seed, size - size // 2)
        print(json.dumps(me.coordinates()), flush=True)
        me.connect(json.loads(sys.stdin.readline()))
        print(json.dumps("connected"), flush=True)
        sys.stdin.readline()


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))

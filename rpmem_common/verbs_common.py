"""What the RDMA client and agent share: finding the RoCE device that carries the route to a
peer, the pyverbs import, memory registration with memlock diagnostics, RC queue-pair setup,
completion-channel waits, and the connection data both sides exchange on the control channel.

Importing this module does not import pyverbs; :func:`load_pyverbs` does, once.
"""

from __future__ import annotations

import errno
import importlib.util
import ipaddress
import os
import resource
import select
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace

from pmreplica.errors import PmReplicaError

SYSFS = "/sys/class/infiniband"
README_HINT = ("install Debian's python3-pyverbs (PyPI's pyverbs does not build against "
               "Debian 12's rdma-core); a venv of the same Python version finds it there "
               "(README, RDMA)")

# -- connection data (control channel blobs, network byte order) ---------------------------
#: CREATE_RESP/OPEN_RESP blob of a verbs pool: the agent's active MTU (ibv enum), the rkey
#: of the read-only header window, and the RDMA READs it accepts in flight per lane
AGENT_INFO = struct.Struct(">III")
#: CONNECT request blob: the client's GID, MTU, persist messages it keeps in flight per lane
#: (the agent posts that many receives), then one LANE_QP per lane
CLIENT_INFO = struct.Struct(">16sII")
#: CONNECT response blob: the agent's GID (chosen once the client's is known), then LANE_QPs
AGENT_GID = struct.Struct(">16s")
#: one lane's queue pair: number and first packet sequence number (CONNECT and its response)
LANE_QP = struct.Struct(">II")
#: the agent's answer to a GPSPM persist message: 0 or an errno
REPLY = struct.Struct(">I")

#: persist-message flags (wire.PERSIST_MSG ``flags``)
MSG_DEEP = 1  # make the range durable through the deepest domain (deep_persist)

MAX_DEPTH = 4096  # persist messages in flight per lane, the most either side accepts

# RC transport parameters: ack timeout 4.096 us * 2**14 = 67 ms, 7 retries (a peer that
# vanished fails the queue pair in about half a second); a bounded RNR retry
QP_TIMEOUT, QP_RETRY, QP_RNR_RETRY, QP_MIN_RNR_TIMER = 14, 7, 6, 12


# -- finding the device -------------------------------------------------------------------
@dataclass(frozen=True)
class RoceGid:
    """One RoCE v2 GID of a local RDMA device: where a queue pair's packets leave from."""

    device: str
    port: int
    index: int
    gid: bytes  # 16 raw bytes; an IPv4 address appears IPv4-mapped (::ffff:a.b.c.d)

    @property
    def address(self) -> str:
        ip = ipaddress.IPv6Address(self.gid)
        return str(ip.ipv4_mapped or ip)

    def __str__(self) -> str:
        return f"{self.device} port {self.port} GID index {self.index} ({self.address})"


def _read(path: str) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 4096).decode("ascii", "replace").strip()
    except OSError:
        return None  # an empty GID table slot reads as EINVAL
    finally:
        os.close(fd)


_ZERO_GID = "0000:0000:0000:0000:0000:0000:0000:0000"
_GIDS_TTL = 2.0  # s: a table read serves the lookups of one pool open (they come in bursts)
_gids_cache: tuple[float, list[RoceGid]] = (-_GIDS_TTL, [])


def roce_gids() -> list[RoceGid]:
    """Every RoCE v2 GID of every local RDMA device, from sysfs (no pyverbs needed). A GID
    table has hundreds of slots, so a read is reused for a moment."""
    global _gids_cache
    now = time.monotonic()
    if now - _gids_cache[0] < _GIDS_TTL:
        return _gids_cache[1]
    found = []
    try:
        devices = sorted(os.listdir(SYSFS))
    except OSError:
        devices = []
    for dev in devices:
        ports = os.path.join(SYSFS, dev, "ports")
        try:
            port_names = sorted(p for p in os.listdir(ports) if p.isdigit())
        except OSError:
            continue
        for port in port_names:
            gids = os.path.join(ports, port, "gids")
            try:
                indexes = sorted(int(i) for i in os.listdir(gids) if i.isdigit())
            except OSError:
                continue
            for i in indexes:
                text = _read(f"{gids}/{i}")
                if not text or text == _ZERO_GID:
                    continue
                if _read(f"{ports}/{port}/gid_attrs/types/{i}") != "RoCE v2":
                    continue
                try:
                    raw = ipaddress.IPv6Address(text).packed
                except ValueError:
                    continue
                found.append(RoceGid(dev, int(port), i, raw))
    _gids_cache = (now, found)
    return found


def is_loopback(address: str) -> bool:
    """True for a loopback IP address (a zone suffix allowed); False for anything else."""
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def gid_bytes(address: str) -> bytes:
    """The RoCE v2 GID an IP address has: IPv4 mapped into IPv6, IPv6 as it is."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip.version == 4:
        ip = ipaddress.IPv6Address(f"::ffff:{ip}")
    return ip.packed


def gid_for_address(address: str) -> RoceGid | None:
    """The local RoCE v2 GID holding ``address``, if an RDMA device carries it."""
    try:
        want = gid_bytes(address)
    except ValueError:
        return None
    return next((g for g in roce_gids() if g.gid == want), None)


def route_source(address: str) -> str | None:
    """The local address the kernel's routing picks to reach ``address`` (None if none)."""
    try:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((address, 9))  # connect() on UDP only chooses a route; nothing is sent
            return str(s.getsockname()[0])
    except (OSError, ValueError):
        return None


def gid_toward(address: str) -> RoceGid | None:
    """The RoCE v2 GID on the device that carries the route to ``address``."""
    if not os.path.isdir(SYSFS):
        return None
    source = route_source(address)
    return gid_for_address(source) if source else None


def resolve(host: str) -> str | None:
    """An address of ``host``, IPv4 first (as the SSH launchers connect); None if unknown."""
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_UNSPEC, socket.SOCK_DGRAM)
    except (socket.gaierror, UnicodeError):
        return None
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    return str(infos[0][4][0]) if infos else None


# -- pyverbs --------------------------------------------------------------------------------
#: where Debian's python3-pyverbs lives; used when ``import pyverbs`` finds nothing (a venv
#: without the .pth file tools/bootstrap writes)
DEBIAN_PYVERBS = "/usr/lib/python3/dist-packages/pyverbs"
_pv: SimpleNamespace | None = None
_pv_lock = threading.Lock()


def _import_debian_pyverbs() -> None:
    """Load the ``pyverbs`` package from Debian's folder by itself: putting all of Debian's
    dist-packages on sys.path would shadow the venv's own versions of other packages."""
    init = os.path.join(DEBIAN_PYVERBS, "__init__.py")
    if not os.path.exists(init):
        raise ModuleNotFoundError("No module named 'pyverbs'", name="pyverbs")
    spec = importlib.util.spec_from_file_location("pyverbs", init,
                                                  submodule_search_locations=[DEBIAN_PYVERBS])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["pyverbs"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["pyverbs"]
        raise


def load_pyverbs() -> SimpleNamespace:
    """The pyverbs classes this package uses; ImportError saying how to get them."""
    global _pv
    with _pv_lock:
        if _pv is None:
            try:
                if importlib.util.find_spec("pyverbs") is None:
                    _import_debian_pyverbs()
                import pyverbs.enums as ev
                from pyverbs.addr import GID, AHAttr, GlobalRoute
                from pyverbs.cq import CQ, CompChannel
                from pyverbs.device import Context
                from pyverbs.mr import MR
                from pyverbs.pd import PD
                from pyverbs.pyverbs_error import PyverbsError, PyverbsRDMAError
                from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr
                from pyverbs.wr import SGE, RecvWR, SendWR
            except ImportError as e:
                where = getattr(sys.modules.get("pyverbs"), "__path__", None)
                found = (f" (pyverbs at {where[0]}, Python {sys.version.split()[0]})"
                         if where else "")
                raise ImportError(f"pyverbs cannot be imported: {e}{found}: {README_HINT}") from e
            _pv = SimpleNamespace(
                ev=ev, GID=GID, AHAttr=AHAttr, GlobalRoute=GlobalRoute, CQ=CQ,
                CompChannel=CompChannel, Context=Context, MR=MR, PD=PD, QP=QP, QPAttr=QPAttr,
                QPCap=QPCap, QPInitAttr=QPInitAttr, SGE=SGE, RecvWR=RecvWR, SendWR=SendWR,
                PyverbsError=PyverbsError, PyverbsRDMAError=PyverbsRDMAError)
        return _pv


def verbs_error(e: Exception, what: str) -> PmReplicaError:
    """A pyverbs exception as an OSError with the errno the library reported."""
    code = getattr(e, "error_code", None) or errno.EIO
    return PmReplicaError(code, f"{what}: {e}")


# -- memory registration -------------------------------------------------------------------
_CAP_IPC_LOCK = 14


def _can_lock_unlimited() -> bool:
    """True with CAP_IPC_LOCK in the effective set: registrations ignore RLIMIT_MEMLOCK."""
    status = _read("/proc/self/status") or ""
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> _CAP_IPC_LOCK & 1)
    return False


def _memlock_text(soft: int) -> str:
    limit = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft} bytes"
    return (f"the locked-memory limit (RLIMIT_MEMLOCK) is {limit}: raise it with `ulimit -l` "
            "or a memlock line in /etc/security/limits.conf (or LimitMEMLOCK= for a "
            "systemd service), or grant CAP_IPC_LOCK")


def check_memlock(nbytes: int, what: str) -> None:
    """ENOMEM naming the memlock limit if registering ``nbytes`` cannot fit under it."""
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY or nbytes <= soft or _can_lock_unlimited():
        return
    raise PmReplicaError(errno.ENOMEM, f"cannot register {what} ({nbytes} bytes) for RDMA: "
                                       + _memlock_text(soft))


def register(pv: SimpleNamespace, pd: object, address: int, length: int, access: int,
             what: str) -> object:
    """Register ``length`` bytes at ``address``; a memlock failure says so, not just ENOMEM."""
    check_memlock(length, what)
    try:
        return pv.MR(pd, length, access, address=address)
    except pv.PyverbsError as e:
        code = getattr(e, "error_code", None) or errno.EIO
        if code in (errno.ENOMEM, errno.EPERM, errno.EAGAIN):
            soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
            raise PmReplicaError(code, f"cannot register {what} ({length} bytes) for RDMA "
                                       f"({os.strerror(code)}); memory already registered "
                                       "by this process counts against the same limit; "
                                       + _memlock_text(soft)) from None
        raise verbs_error(e, f"cannot register {what} for RDMA") from None


# -- completion channels ---------------------------------------------------------------------
_EVENT_FD = "anon_inode:[infinibandevent]"
_channel_lock = threading.Lock()


def _event_fds() -> set[int]:
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == _EVENT_FD:
                fds.add(int(name))
        except OSError:
            pass  # the descriptor of the listing itself, or one closed meanwhile
    return fds


def open_context(pv: SimpleNamespace, device: str) -> object:
    """Open ``device`` (its asynchronous-event descriptor appears while no completion
    channel is being told apart)."""
    with _channel_lock:
        return pv.Context(name=device)


def completion_channel(pv: SimpleNamespace, ctx: object) -> tuple[object, int | None]:
    """A completion channel and its file descriptor (None if it could not be told apart).

    pyverbs does not expose the channel's descriptor, and its ``get_cq_event`` blocks while
    holding the GIL, so the descriptor is found as the one event descriptor the creation
    added; waiting on it with poll() needs no GIL and can time out."""
    with _channel_lock:
        before = _event_fds()
        channel = pv.CompChannel(ctx)
        new = _event_fds() - before
    return channel, (new.pop() if len(new) == 1 else None)


class Waiter:
    """Blocks until a CQ has a completion: armed notification + poll() on the channel
    descriptor, or short sleeps when the descriptor is unknown."""

    __slots__ = ("cq", "channel", "fd", "_poll", "_sleep")

    def __init__(self, cq: object, channel: object, fd: int | None,
                 wake_fd: int | None = None) -> None:
        self.cq, self.channel, self.fd = cq, channel, fd
        self._poll = select.poll()
        if fd is not None:
            self._poll.register(fd, select.POLLIN)
        if wake_fd is not None:
            self._poll.register(wake_fd, select.POLLIN)
        self._sleep = 0.0

    def arm(self) -> None:
        """Ask for an event on the next completion (poll the CQ again after this)."""
        if self.fd is not None:
            self.cq.req_notify()

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the armed event; True if one came (or may have)."""
        if self.fd is None:
            self._sleep = min(max(self._sleep * 2, 50e-6), 2e-3, timeout)
            select.select([], [], [], self._sleep)
            return True
        events = self._poll.poll(timeout * 1000)
        for fd, _ in events:
            if fd == self.fd:
                self.channel.get_cq_event(self.cq)  # does not block: the descriptor is readable
                self.cq.ack_events(1)
        return bool(events)

    def reset(self) -> None:
        self._sleep = 0.0


# -- queue pairs -------------------------------------------------------------------------
def device_limits(ctx: object, port: int) -> tuple[int, int, int, int]:
    """(max work requests per queue, max outstanding RDMA READs, max message size, MTU)."""
    dev = ctx.query_device()
    pattr = ctx.query_port(port)
    return (dev.max_qp_wr, min(dev.max_qp_rd_atom, dev.max_qp_init_rd_atom),
            pattr.max_msg_sz, pattr.active_mtu)


def create_rc_qp(pv: SimpleNamespace, pd: object, cq: object, port: int, send_depth: int,
                 recv_depth: int) -> object:
    """An RC queue pair on ``port`` whose send WRs complete only when signalled, in the INIT
    state (receives may be posted before it connects)."""
    cap = pv.QPCap(max_send_wr=send_depth, max_recv_wr=recv_depth, max_send_sge=1,
                   max_recv_sge=1)
    qp = pv.QP(pd, pv.QPInitAttr(qp_type=pv.ev.IBV_QPT_RC, scq=cq, rcq=cq, cap=cap,
                                 sq_sig_all=0))
    attr = pv.QPAttr(qp_state=pv.ev.IBV_QPS_INIT)
    attr.port_num = port
    attr.pkey_index = 0
    attr.qp_access_flags = (pv.ev.IBV_ACCESS_LOCAL_WRITE | pv.ev.IBV_ACCESS_REMOTE_WRITE
                            | pv.ev.IBV_ACCESS_REMOTE_READ)
    qp.to_init(attr)
    return qp


def connect_rc_qp(pv: SimpleNamespace, qp: object, local: RoceGid, remote_gid: bytes,
                  remote_qpn: int, remote_psn: int, local_psn: int, mtu: int,
                  rd_atomic: int) -> None:
    """Move an INIT queue pair through RTR to RTS, connected to the peer's queue pair."""
    ev = pv.ev
    attr = pv.QPAttr(qp_state=ev.IBV_QPS_RTR)
    attr.port_num = local.port
    attr.path_mtu = mtu
    attr.dest_qp_num = remote_qpn
    attr.rq_psn = remote_psn
    attr.sq_psn = local_psn
    attr.max_rd_atomic = attr.max_dest_rd_atomic = max(1, rd_atomic)
    attr.min_rnr_timer, attr.timeout = QP_MIN_RNR_TIMER, QP_TIMEOUT
    attr.retry_cnt, attr.rnr_retry = QP_RETRY, QP_RNR_RETRY
    attr.qp_access_flags = (ev.IBV_ACCESS_LOCAL_WRITE | ev.IBV_ACCESS_REMOTE_WRITE
                            | ev.IBV_ACCESS_REMOTE_READ)
    route = pv.GlobalRoute(dgid=pv.GID(ipaddress.IPv6Address(remote_gid).exploded),
                           sgid_index=local.index, hop_limit=64)
    attr.ah_attr = pv.AHAttr(gr=route, is_global=1, port_num=local.port)
    qp.to_rts(attr)


def random_psn() -> int:
    return int.from_bytes(os.urandom(3), "big")


# -- completion status -> errno --------------------------------------------------------------
def wc_errno(pv: SimpleNamespace, status: int) -> int:
    ev = pv.ev
    table = {
        ev.IBV_WC_REM_ACCESS_ERR: errno.EACCES,  # outside the agent's registration, bad rkey
        ev.IBV_WC_LOC_PROT_ERR: errno.EFAULT,
        ev.IBV_WC_LOC_ACCESS_ERR: errno.EFAULT,
        ev.IBV_WC_LOC_LEN_ERR: errno.EMSGSIZE,
        ev.IBV_WC_REM_INV_REQ_ERR: errno.EINVAL,
        ev.IBV_WC_RETRY_EXC_ERR: errno.ECONNRESET,  # the peer stopped answering
        ev.IBV_WC_RNR_RETRY_EXC_ERR: errno.ECONNRESET,
        ev.IBV_WC_WR_FLUSH_ERR: errno.ECONNABORTED,  # the queue pair failed earlier
        ev.IBV_WC_REM_OP_ERR: errno.EREMOTEIO,
    }
    return table.get(status, errno.EIO)


def wc_status_text(status: int) -> str:
    try:
        from pyverbs.cq import cqe_status_to_str
        return str(cqe_status_to_str(status))
    except Exception:  # a name for a message only; the number says it too
        return f"status {status}"

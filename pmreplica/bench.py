"""Persist benchmark: pmreplica's remote pool against raw TCP baselines in the same run.

Every figure is printed beside a baseline measured moments before it, as a ratio: a raw
TCP ping-pong of the same size between two plain Python processes (for a persist, n bytes
out and a word back; for a read, a request out and n bytes back) and a raw TCP stream into
an mmap'd file (for throughput). The pool is measured twice, with clear-text lanes
(``PMREPLICA_TCP_TLS=0``) against the raw baseline, and with TLS lanes (the default) against
the clear ones (rows ending "TLS"); create+close (TLS, the default) is shown beside a
clear-text create+close. Baseline, clear and TLS alternate in rounds, so noise from other
work on the machine hits all alike.

Placement is fixed, the same for baseline and pmreplica, because where the scheduler puts
the two processes changes a figure by 2-3x from one run to the next on a small VM. Client
and server share one CPU, so a figure measures the software path. Across two virtual CPUs
a transfer pays for each wake-up of a receiver that caught up and went to sleep, and the
figures follow how often that happens: the agent, receiving whole payloads in the kernel,
slept 16 times per MiB on 4 lanes (5.0 GB/s) and 4.8 on one (9.3 GB/s); the raw stream's
receiver, a Python loop that lags behind, 7.3 on 4 streams (9.4 GB/s) and 10.7 on one
(6.7 GB/s). So on two CPUs 4 lanes persisted 0.55-0.9x the raw stream and 1 lane 1.0-1.8x,
depending on the host's placement of the vCPUs, against 0.93-1.2x on one CPU.
``--two-cpus`` measures throughput that way (latency always stays on one CPU).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

from .header import PoolAttr

POOL_SIZE = 64 << 20
LAT_SIZES = (64, 4096, 65536)
TPUT = ((1 << 20, 1), (16 << 20, 1), (1 << 20, 4), (16 << 20, 4))

# The baseline peer: plain Python, one connection per client socket. Mode "pp" answers each
# n-byte message with a 4-byte word (the baseline of a persist); mode "get" answers each
# 8-byte request with n bytes (of a read: the payload travels the other way); mode "stream"
# receives into an mmap'd file and answers one byte after `total` bytes.
_PEER = r"""
import mmap, os, socket, sys, threading
mode, n = sys.argv[1], int(sys.argv[2])
ls = socket.create_server(("127.0.0.1", 0)); print(ls.getsockname()[1], flush=True)
def pingpong(c):
    buf = memoryview(bytearray(n))
    while True:
        got = 0
        while got < n:
            r = c.recv_into(buf[got:])
            if not r: return
            got += r
        c.sendall(b"\0\0\0\0")
def get(c):
    req, data = memoryview(bytearray(8)), bytes(n)
    while True:
        got = 0
        while got < 8:
            r = c.recv_into(req[got:])
            if not r: return
            got += r
        c.sendall(data)
def stream(c):
    path = f"/dev/shm/pmreplica-bench-{os.getpid()}-{c.fileno()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, n); mm = mmap.mmap(fd, n); os.close(fd); os.unlink(path); view = memoryview(mm)
    hdr = bytearray(8)
    while True:
        if c.recv_into(hdr, 8) < 8: return
        total = int.from_bytes(hdr, "big"); got = 0
        while got < total:
            r = c.recv_into(view[got % n:], min(n - got % n, total - got))
            if not r: return
            got += r
        c.sendall(b"!")
while True:
    c, _ = ls.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    serve = {"pp": pingpong, "get": get, "stream": stream}[mode]
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


#: the CPUs this process may use, taken at import: run() pins itself to the first, and the
#: processes it starts afterwards must still be placed on the others
_ALLOWED = sorted(os.sched_getaffinity(0))


def _cpus() -> tuple[int, int] | None:
    """(client CPU, the other CPU), or None on a one-CPU machine."""
    return (_ALLOWED[0], _ALLOWED[1]) if len(_ALLOWED) >= 2 else None


def _pinned(argv: list[str], same_cpu: bool) -> list[str]:
    """``argv`` run on the client's CPU or on the other one (util-linux's taskset)."""
    pin = _cpus()
    if pin is None or shutil.which("taskset") is None:
        return argv
    return ["taskset", "-c", str(pin[0] if same_cpu else pin[1]), *argv]


@dataclass
class Row:
    metric: str
    value: float
    unit: str
    baseline: float | None = None
    ratio: float | None = None
    target: str = ""
    ok: bool | None = None


class Peer:
    """A baseline peer process and connections to it."""

    def __init__(self, mode: str, n: int, same_cpu: bool = True) -> None:
        self.proc = subprocess.Popen(_pinned([sys.executable, "-c", _PEER, mode, str(n)],
                                             same_cpu),
                                     stdout=subprocess.PIPE, text=True)
        self.port = int(self.proc.stdout.readline())  # type: ignore[union-attr]

    def connect(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _samples(fn: Callable[[], None], count: int) -> list[int]:
    out = []
    clock = time.perf_counter_ns
    for _ in range(count):
        t = clock()
        fn()
        out.append(clock() - t)
    return out


def _p(samples: list[int], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))] / 1000.0


def latency(remotes: list, n: int, rounds: int, count: int,
            read: bool = False) -> tuple[list[list[int]], list[int]]:
    """(samples of each remote pool, baseline samples) in ns, alternating rounds. The baseline
    of a persist sends n bytes and waits for a word; that of a read asks and receives n."""
    peer = Peer("get" if read else "pp", n)
    sock = peer.connect()
    payload, ack = bytes(n), bytearray(4)
    request, dest = bytes(8), bytearray(n)
    view = memoryview(dest)

    def pingpong() -> None:
        sock.sendall(payload)
        sock.recv_into(ack, 4)

    def get() -> None:
        sock.sendall(request)
        got = 0
        while got < n:
            got += sock.recv_into(view[got:])

    fns = [(lambda r=r: r.read(dest, 4096, n)) if read else (lambda r=r: r.persist(4096, n))
           for r in remotes]
    base_fn = get if read else pingpong
    ours: list[list[int]] = [[] for _ in remotes]
    base: list[int] = []
    try:
        for _ in range(rounds):
            base += _samples(base_fn, count)
            for samples, fn in zip(ours, fns):
                samples += _samples(fn, count)
    finally:
        sock.close()
        peer.close()
    return ours, base


def _parallel(nlanes: int, work: Callable[[int], None]) -> float:
    """Run ``work(lane)`` on ``nlanes`` threads at once; the wall time in seconds."""
    start = threading.Barrier(nlanes + 1)
    threads = [threading.Thread(target=lambda i=i: (start.wait(), work(i))) for i in range(nlanes)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def throughput(remotes: list, pool: memoryview, size: int, nlanes: int, rounds: int,
               seconds: float, same_cpu: bool = True) -> tuple[list[float], float]:
    """([bytes/s of each remote pool], raw stream bytes/s): ``size`` bytes per step split
    over lanes, all sent from the same bytes of ``pool``; the receivers on the client's CPU
    or not."""
    chunk = size // nlanes
    steps = max(2, int(seconds * 3e9 / size))
    peer = Peer("stream", chunk, same_cpu)
    socks = [peer.connect() for _ in range(nlanes)]
    ours: list[list[float]] = [[] for _ in remotes]
    base = []

    def raw(lane: int) -> None:
        s = socks[lane]
        payload = pool[4096 + lane * chunk:4096 + (lane + 1) * chunk]
        s.sendall((steps * chunk).to_bytes(8, "big"))
        for _ in range(steps):
            s.sendall(payload)
        s.recv(1)

    def persist(remote, lane: int) -> None:
        off = 4096 + lane * chunk
        for _ in range(steps):
            remote.persist(off, chunk, lane)

    try:
        for _ in range(rounds):
            base.append(steps * size / _parallel(nlanes, raw))
            for speeds, remote in zip(ours, remotes):
                speeds.append(steps * size / _parallel(nlanes, lambda i: persist(remote, i)))
    finally:
        for s in socks:
            s.close()
        peer.close()
    return [statistics.median(speeds) for speeds in ours], statistics.median(base)


@contextlib.contextmanager
def _running_on(cpu: int | None) -> Iterator[None]:
    """This process on ``cpu`` alone for the block (all of it if None), as it was after."""
    saved = os.sched_getaffinity(0)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)


@contextlib.contextmanager
def _environ_restored(*names: str) -> Iterator[None]:
    """Let the body change the variables ``names``; restore them (or their absence) after."""
    saved = {k: os.environ.get(k) for k in names}
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _agent_cmd(poolset_dir: str, same_cpu: bool = True) -> str:
    agent = os.path.join(os.path.dirname(sys.executable), "pmreplica-agent")
    argv = [agent] if os.path.exists(agent) else [sys.executable, "-m", "remote_agent.main"]
    return shlex.join(_pinned([*argv, "--poolset-dir", poolset_dir], same_cpu))


def create_close(target: str, poolset_dir: str, count: int, fresh_login: bool,
                 configs: tuple = (None,)) -> list[list[float]]:
    """Seconds per create+close of a new remote pool (parts removed between runs), for each
    client config in turn (None: the environment's), alternating."""
    from .rpmem import RemotePool
    from .rpmem.launch import close_connections
    import mmap
    pool = mmap.mmap(-1, 8 << 20)
    times: list[list[float]] = [[] for _ in configs]
    for i in range(count):
        for config, samples in zip(configs, times):
            name = f"cc{i}.set"
            with open(os.path.join(poolset_dir, name), "w") as f:
                f.write(f"PMEMPOOLSET\n8M {poolset_dir}/cc{i}.part\n")
            if fresh_login:
                close_connections()
            t = time.perf_counter()
            RemotePool.create(target, name, pool, nlanes=1, attr=PoolAttr(b"BENCH", 1),
                              config=config).close()
            samples.append(time.perf_counter() - t)
            os.unlink(f"{poolset_dir}/cc{i}.part")
    pool.close()
    return times


def _row(metric: str, value: float, unit: str, baseline: float, at_most: float | None = None,
         at_least: float | None = None) -> Row:
    """A figure beside its baseline, with its target: a ratio of at most or at least."""
    ratio = value / baseline
    if at_most is not None:
        return Row(metric, value, unit, baseline, ratio, f"<= {at_most}x", ratio <= at_most)
    if at_least is not None:
        return Row(metric, value, unit, baseline, ratio, f">= {at_least:.0%}", ratio >= at_least)
    return Row(metric, value, unit, baseline, ratio)


def _latency_rows(what: str, clear: list[int], tls: list[int], base: list[int],
                  clear_at_most: float | None, tls_at_most: float | None) -> list[Row]:
    """Median and p99 of clear lanes against the raw baseline, of TLS lanes against clear."""
    rows = []
    for name, q in (("median", .5), ("p99", .99)):
        first = q == .5
        rows.append(_row(f"{what} {name}", _p(clear, q), "us", _p(base, q),
                         clear_at_most if first else None))
        rows.append(_row(f"{what} {name}, TLS", _p(tls, q), "us", _p(clear, q),
                         tls_at_most if first else None))
    return rows


#: the two pools measured side by side, and the PMREPLICA_TCP_TLS of each
POOLS = (("clear.set", "0"), ("tls.set", "1"))


@contextlib.contextmanager
def _pools(pool, open_: bool, d: str) -> Iterator[list]:
    """The clear-text and the TLS remote pool, created (or with ``open_``, opened) on ``d``."""
    from .rpmem import RemotePool
    from .rpmem.config import RpmemConfig
    with contextlib.ExitStack() as stack:
        remotes = []
        for name, tls in POOLS:
            config = RpmemConfig.from_env({**os.environ, "PMREPLICA_TCP_TLS": tls})
            if open_:
                remote = RemotePool.open("localhost", name, pool, nlanes=4, config=config)
            else:
                remote = RemotePool.create("localhost", name, pool, nlanes=4,
                                           attr=PoolAttr(b"BENCH", 1), config=config)
            remotes.append(stack.enter_context(remote))
        yield remotes


def run(quick: bool = False, ssh_target: str | None = None, ssh_env: dict[str, str] | None = None,
        out=sys.stdout, as_json: bool = False, two_cpus: bool = False) -> list[Row]:
    """Run every measurement; ``ssh_target`` adds create+close through a real sshd;
    ``two_cpus`` puts the receiving side of the throughput runs on the other CPU."""
    import mmap
    from .rpmem.config import RpmemConfig
    rounds, count, secs = (3, 300, 0.1) if quick else (7, 2000, 0.5)
    rows: list[Row] = []
    pin = _cpus()
    with _running_on(pin[0] if pin else None), \
            tempfile.TemporaryDirectory(prefix="pmreplica-bench-", dir="/dev/shm") as d:
        for name, _ in POOLS:
            with open(os.path.join(d, name), "w") as f:
                f.write(f"PMEMPOOLSET\n{POOL_SIZE >> 20}M {d}/{name}.part\n")
        with _environ_restored("PMREPLICA_LAUNCHER", "RPMEM_CMD"):
            os.environ["PMREPLICA_LAUNCHER"] = "local"
            pool = mmap.mmap(-1, POOL_SIZE)
            pool.write(os.urandom(1 << 20) * (POOL_SIZE >> 20))  # real memory, not the zero page
            view = memoryview(pool)
            os.environ["RPMEM_CMD"] = _agent_cmd(d, same_cpu=True)
            with _pools(pool, False, d) as remotes:
                for n in LAT_SIZES:
                    (clear, tls), base = latency(remotes, n, rounds, count)
                    rows += _latency_rows(f"persist {_size(n)}", clear, tls, base,
                                          1.5 if n == 64 else None, 1.3 if n == 64 else None)
                (clear, tls), base = latency(remotes, 64, rounds, count, read=True)
                rows += _latency_rows("read 64 B", clear, tls, base, 1.2, None)[:2]
            os.environ["RPMEM_CMD"] = _agent_cmd(d, same_cpu=not two_cpus)
            with _pools(pool, True, d) as remotes:
                for size, lanes in TPUT:
                    (clear_bps, tls_bps), base_bps = throughput(remotes, view, size, lanes,
                                                                rounds, secs, not two_cpus)
                    what = (f"persist {_size(size)} x{lanes} lane{'s' * (lanes > 1)}"
                            + (", two CPUs" if two_cpus else ""))
                    rows.append(_row(what, clear_bps / 1e9, "GB/s", base_bps / 1e9,
                                     at_least=0.85 if lanes == 1 else 0.90))
                    rows.append(_row(f"{what}, TLS", tls_bps / 1e9, "GB/s", clear_bps / 1e9,
                                     at_least=0.70))
            view.release()
            pool.close()
            os.environ["RPMEM_CMD"] = _agent_cmd(d)
            clear_cc, tls_cc = create_close("localhost", d, 3 if quick else 7, False, tuple(
                RpmemConfig.from_env({**os.environ, "PMREPLICA_TCP_TLS": tls})
                for _, tls in POOLS))
            med = statistics.median(tls_cc)
            rows.append(Row("create+close, local launcher", med * 1e3, "ms",
                            statistics.median(clear_cc) * 1e3,
                            med / statistics.median(clear_cc), "< 300 ms", med < 0.3))
        if ssh_target:
            rows += _ssh_rows(ssh_target, d, ssh_env or {}, quick)
    _print(rows, out, as_json)
    return rows


def _ssh_rows(target: str, d: str, env: dict[str, str], quick: bool) -> list[Row]:
    with _environ_restored(*env, "RPMEM_CMD", "PMREPLICA_LAUNCHER"):
        os.environ.update(env)
        os.environ["RPMEM_CMD"] = _agent_cmd(d)
        os.environ.pop("PMREPLICA_LAUNCHER", None)
        first = statistics.median(create_close(target, d, 3 if quick else 5, True)[0])
        reuse = statistics.median(create_close(target, d, 5 if quick else 10, False)[0][1:])
    return [Row("create+close through sshd (login)", first * 1e3, "ms", target="<= 500 ms",
                ok=first <= 0.5),
            Row("create+close, reused SSH connection", reuse * 1e3, "ms", target="<= 50 ms",
                ok=reuse <= 0.05)]


def _size(n: int) -> str:
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def _print(rows: list[Row], out, as_json: bool) -> None:
    if as_json:
        json.dump([asdict(r) for r in rows], out, indent=1)
        out.write("\n")
        return
    out.write(f"{'metric':42} {'pmreplica':>12} {'baseline':>12} {'ratio':>7}  target\n")
    for r in rows:
        base = f"{r.baseline:9.2f} {r.unit:>2}" if r.baseline is not None else ""
        ratio = f"{r.ratio:6.2f}x" if r.ratio is not None else ""
        verdict = "" if r.ok is None else ("ok" if r.ok else "MISSED")
        out.write(f"{r.metric:42} {r.value:9.2f} {r.unit:>2} {base:>12} {ratio:>7}  "
                  f"{r.target} {verdict}\n")


def register(sub) -> None:
    """Add ``bench`` to the ``pmreplica`` command (cli.COMMAND_MODULES)."""
    p = sub.add_parser("bench", help="persist latency/throughput against raw TCP baselines",
                       description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--ssh", metavar="TARGET",
                   help="also time create+close through SSH to this [user@]host[:port] "
                        "(its agent must serve pool sets in a directory writable here)")
    p.add_argument("--two-cpus", action="store_true",
                   help="measure throughput with the receiving side on another CPU")
    p.set_defaults(func=lambda args: 0 if all(
        r.ok is not False for r in run(args.quick, args.ssh, as_json=args.json,
                                       two_cpus=args.two_cpus)) else 1)

"""Persist benchmark: pmreplica's remote pool against raw TCP baselines in the same run.

Every figure is printed beside a baseline of the same transport measured moments before it,
as a ratio: a raw ping-pong of the same size between two plain Python processes (for a
persist, n bytes out and a word back; for a read, a request out and n bytes back) and a raw
stream into an mmap'd file (for throughput). The pool is measured twice: with TLS lanes (the
default; rows ending "TLS") against that ping-pong and stream through Python's ``ssl`` with
the agent's TLS 1.3 context and key, and with clear-text lanes (``PMREPLICA_TCP_TLS=0``)
against them over plain TCP; create+close (TLS, the default) is shown beside a clear-text
create+close. Baselines and pools alternate in rounds, so noise from other work on the
machine hits all alike; a figure is the median over the rounds of each round's median or p99.

Every figure is taken in three placements, one after the other in the same run, the same for
baseline and pmreplica: client and agent pinned to one CPU (the software path alone), pinned
to two CPUs (each answer crosses to the other CPU, where a receiver that went to sleep must be
woken: on a VM a halted virtual CPU takes 20-30 us to wake), and left to the scheduler, as
users run. Targets (issue 13), in each placement, for clear-text lanes: 64 B and 4 KiB
persists and 64 B reads at most 1.2x the baseline's median and 1.5x its p99; streams of 1 MiB
and 16 MiB persists, on 1 and 4 lanes, at least the raw stream's speed; for TLS and clear-text
lanes alike.
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
# receives into an mmap'd file and answers one byte after `total` bytes. With "tls", every
# connection runs through Python's ssl with the context and key kind an agent's lanes have.
_PEER = r"""
import mmap, os, socket, sys, threading
mode, n, tls, host = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "tls", sys.argv[4]
if tls:
    from rpmem_common.tls import AgentIdentity
    context = AgentIdentity().context
ls = socket.create_server((host, 0)); print(ls.getsockname()[1], flush=True)
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
    if tls:
        c = context.wrap_socket(c, server_side=True)
    serve = {"pp": pingpong, "get": get, "stream": stream}[mode]
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


#: the CPUs this process may use, taken at import: run() pins itself for a placement, and the
#: processes it starts meanwhile must still be placed on the others
_ALLOWED = sorted(os.sched_getaffinity(0))


@dataclass(frozen=True)
class Placement:
    """Where a measurement runs: this process (the client) on CPU ``client``, the agents and
    baseline peers on CPU ``server``; None leaves a side to the scheduler."""

    name: str
    client: int | None
    server: int | None


def placements() -> list[Placement]:
    """Client and server on one CPU (the software path alone), on two (every wake-up of a
    sleeping receiver crosses CPUs) and left to the scheduler (as users run)."""
    if len(_ALLOWED) < 2 or shutil.which("taskset") is None:
        return [Placement("unpinned", None, None)]
    a, b = _ALLOWED[:2]
    return [Placement("one CPU", a, a), Placement("two CPUs", a, b),
            Placement("unpinned", None, None)]


def _pinned(argv: list[str], cpu: int | None) -> list[str]:
    """``argv`` run on ``cpu`` (util-linux's taskset), or where the scheduler puts it."""
    return argv if cpu is None else ["taskset", "-c", str(cpu), *argv]


@dataclass
class Row:
    metric: str
    value: float
    unit: str
    baseline: float | None = None
    ratio: float | None = None
    target: str = ""
    ok: bool | None = None
    placement: str = ""


class Peer:
    """A baseline peer process (on CPU ``cpu``, None: anywhere) and connections to it, over
    TLS 1.3 (Python's ``ssl``, as plain as a user would write it) if ``tls``. It listens on
    ``host``; ``prefix`` starts it elsewhere (``ip netns exec NS`` on another "host")."""

    def __init__(self, mode: str, n: int, cpu: int | None, tls: bool = False,
                 host: str = "127.0.0.1", prefix: tuple[str, ...] = ()) -> None:
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.tls = tls
        self.host = host
        argv = [sys.executable, "-c", _PEER, mode, str(n), "tls" if tls else "tcp", host]
        self.proc = subprocess.Popen(
            [*prefix, *_pinned(argv, cpu)], stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": here})  # the peer imports this pmreplica
        self.port = int(self.proc.stdout.readline())  # type: ignore[union-attr]

    def connect(self) -> socket.socket:
        s = socket.create_connection((self.host, self.port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls:
            from rpmem_common.tls import _client_context
            s = _client_context().wrap_socket(s)
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


def _p(rounds: list[list[int]], q: float) -> float:
    """The median over ``rounds`` of each round's quantile ``q``, in microseconds."""
    def quantile(samples: list[int]) -> float:
        s = sorted(samples)
        return s[min(len(s) - 1, int(q * len(s)))] / 1000.0
    return statistics.median(quantile(r) for r in rounds)


Rounds = list[list[int]]


def latency(remotes: list, n: int, rounds: int, count: int, cpu: int | None,
            read: bool = False) -> list[tuple[Rounds, Rounds]]:
    """For each remote pool (in POOLS order), its samples and those of its transport's
    baseline in ns, round by round, all alternating; the baseline peers on ``cpu``. The
    baseline of a persist sends n bytes and waits for a word; that of a read asks and
    receives n."""
    peers = [Peer("get" if read else "pp", n, cpu, tls == "1") for _, tls in POOLS]
    socks = [peer.connect() for peer in peers]
    payload, ack = bytes(n), bytearray(4)
    request, dest = bytes(8), bytearray(n)
    view = memoryview(dest)

    def pingpong(sock: socket.socket) -> None:
        sock.sendall(payload)
        sock.recv_into(ack, 4)

    def get(sock: socket.socket) -> None:
        sock.sendall(request)
        got = 0
        while got < n:
            got += sock.recv_into(view[got:])

    base_fn = get if read else pingpong
    arms = [((lambda r=r: r.read(dest, 4096, n)) if read else (lambda r=r: r.persist(4096, n)),
             lambda s=s: base_fn(s)) for r, s in zip(remotes, socks)]
    found: list[tuple[Rounds, Rounds]] = [([], []) for _ in arms]
    try:
        for fn, base_one in arms:  # warm up: caches, the lanes' polling state, the peers
            _samples(fn, count // 10)
            _samples(base_one, count // 10)
        for _ in range(rounds):
            for (ours, base), (fn, base_one) in zip(found, arms):
                base.append(_samples(base_one, count))
                ours.append(_samples(fn, count))
    finally:
        for sock in socks:
            sock.close()
        for peer in peers:
            peer.close()
    return found


def parallel(nlanes: int, work: Callable[[int], None]) -> float:
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


def raw_stream(sock: socket.socket, payload: memoryview, steps: int,
               answered_per_step: bool = False) -> None:
    """Send ``payload`` ``steps`` times to a "stream" peer: announced as one stream and
    answered at its end, or (``answered_per_step``) each step announced and answered on its
    own, as a persist is."""
    n = len(payload)
    if not answered_per_step:
        sock.sendall((steps * n).to_bytes(8, "big"))
    for _ in range(steps):
        if answered_per_step:
            sock.sendall(n.to_bytes(8, "big"))
        sock.sendall(payload)
        if answered_per_step:
            sock.recv(1)
    if not answered_per_step:
        sock.recv(1)


def stream_label(size: int, nlanes: int) -> str:
    """``1 MiB x4 lanes``: a stream of ``size``-byte steps split over ``nlanes`` lanes."""
    return f"{_size(size)} x{nlanes} lane{'s' * (nlanes > 1)}"


def throughput(remotes: list, pool: memoryview, size: int, nlanes: int, rounds: int,
               nbytes: list[int], cpu: int | None) -> list[tuple[float, float]]:
    """For each remote pool (in POOLS order), its bytes/s and its transport's raw stream's,
    medians of alternating rounds: ``size`` bytes per step split over lanes, all sent from
    the same bytes of ``pool``, ``nbytes`` (one figure per pool) per round; the streams'
    receivers on ``cpu``."""
    chunk = size // nlanes
    peers = [Peer("stream", chunk, cpu, tls == "1") for _, tls in POOLS]
    socks = [[peer.connect() for _ in range(nlanes)] for peer in peers]

    def raw(lanes: list[socket.socket], steps: int, lane: int) -> None:
        raw_stream(lanes[lane], pool[4096 + lane * chunk:4096 + (lane + 1) * chunk], steps)

    def persist(remote, steps: int, lane: int) -> None:
        off = 4096 + lane * chunk
        for _ in range(steps):
            remote.persist(off, chunk, lane)

    found: list[tuple[list[float], list[float]]] = [([], []) for _ in remotes]
    try:
        for _ in range(rounds):
            for (ours, base), remote, lanes, n in zip(found, remotes, socks, nbytes):
                steps = max(2, n // size)
                base.append(steps * size / parallel(nlanes, lambda i: raw(lanes, steps, i)))
                ours.append(steps * size / parallel(nlanes, lambda i: persist(remote, steps, i)))
    finally:
        for s in sum(socks, []):
            s.close()
        for peer in peers:
            peer.close()
    return [(statistics.median(ours), statistics.median(base)) for ours, base in found]


@contextlib.contextmanager
def running_on(cpu: int | None) -> Iterator[None]:
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


def agent_cmd(poolset_dir: str, cpu: int | None = None) -> str:
    agent = os.path.join(os.path.dirname(sys.executable), "pmreplica-agent")
    argv = [agent] if os.path.exists(agent) else [sys.executable, "-m", "remote_agent.main"]
    return shlex.join(_pinned([*argv, "--poolset-dir", poolset_dir], cpu))


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


#: issue 13's targets against the same transport's raw baseline: latency ratios (p50, p99)
#: for the sizes that have them, and the share of the raw stream a persist stream reaches
LATENCY_TARGET = (1.2, 1.5)
STREAM_TARGET = 1.0


def _latency_rows(what: str, found: list[tuple[Rounds, Rounds]], targets: bool) -> list[Row]:
    """Median and p99 of each pool's lanes against its transport's raw baseline."""
    rows = []
    for (name, q), limit in zip((("median", .5), ("p99", .99)), LATENCY_TARGET):
        for (ours, base), suffix in zip(found, SUFFIX):
            rows.append(_row(f"{what} {name}{suffix}", _p(ours, q), "us", _p(base, q),
                             limit if targets else None))
    return rows


#: the two pools measured side by side, and the PMREPLICA_TCP_TLS of each
POOLS = (("clear.set", "0"), ("tls.set", "1"))
#: what each pool's rows add to their metric's name
SUFFIX = ("", ", TLS")


@contextlib.contextmanager
def _pools(pool, open_: bool, d: str) -> Iterator[list]:
    """The clear-text and the TLS remote pool, created (or with ``open_``, opened) on ``d``."""
    from .rpmem import RemotePool
    from .rpmem.environ import RpmemConfig
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
        out=sys.stdout, as_json: bool = False,
        where: list[Placement] | None = None) -> list[Row]:
    """Run every measurement in each placement (default: all three); ``ssh_target`` adds
    create+close through a real sshd."""
    import mmap
    from .rpmem.environ import RpmemConfig
    # 5,000 round trips a round: a p99 is then the 50th slowest, not the 20th, steadier where
    # the VM holds up some 0.5-1% of round trips by 40-60 us
    rounds, count, nbytes = (2, 200, 100 << 20) if quick else (7, 5000, 1500 << 20)
    rows: list[Row] = []
    if not as_json:
        out.write(machine() + "\n")
    with tempfile.TemporaryDirectory(prefix="pmreplica-bench-", dir="/dev/shm") as d:
        for name, _ in POOLS:
            with open(os.path.join(d, name), "w") as f:
                f.write(f"PMEMPOOLSET\n{POOL_SIZE >> 20}M {d}/{name}.part\n")
        with _environ_restored("PMREPLICA_LAUNCHER", "RPMEM_CMD"):
            os.environ["PMREPLICA_LAUNCHER"] = "local"
            pool = mmap.mmap(-1, POOL_SIZE)
            pool.write(os.urandom(1 << 20) * (POOL_SIZE >> 20))  # real memory, not the zero page
            view = memoryview(pool)
            for i, place in enumerate(where or placements()):
                with running_on(place.client):
                    os.environ["RPMEM_CMD"] = agent_cmd(d, place.server)
                    found = _placement_rows(pool, view, d, i > 0, place, rounds, count, nbytes)
                for r in found:
                    r.placement = place.name
                rows += found
                if not as_json:
                    _print(found, out, place.name)
            view.release()
            pool.close()
            os.environ["RPMEM_CMD"] = agent_cmd(d)
            clear_cc, tls_cc = create_close("localhost", d, 3 if quick else 7, False, tuple(
                RpmemConfig.from_env({**os.environ, "PMREPLICA_TCP_TLS": tls})
                for _, tls in POOLS))
            med = statistics.median(tls_cc)
            rest = [Row("create+close, local launcher", med * 1e3, "ms",
                        statistics.median(clear_cc) * 1e3,
                        med / statistics.median(clear_cc), "< 300 ms", med < 0.3)]
        if ssh_target:
            rest += _ssh_rows(ssh_target, d, ssh_env or {}, quick)
    rows += rest
    if as_json:
        json.dump([asdict(r) for r in rows], out, indent=1)
        out.write("\n")
    else:
        _print(rest, out, "")
        out.write(machine() + "\n")
    return rows


def _placement_rows(pool, view: memoryview, d: str, open_: bool, place: Placement,
                    rounds: int, count: int, nbytes: int) -> list[Row]:
    """Every latency and throughput figure with client and agents placed as ``place`` says."""
    rows: list[Row] = []
    with _pools(pool, open_, d) as remotes:
        for n in LAT_SIZES:
            rows += _latency_rows(f"persist {_size(n)}",
                                  latency(remotes, n, rounds, count, place.server), n <= 4096)
        rows += _latency_rows("read 64 B",
                              latency(remotes, 64, rounds, count, place.server, read=True), True)
        for size, lanes in TPUT:
            # TLS streams run at a fraction of clear ones: fewer bytes keep their rounds short
            found = throughput(remotes, view, size, lanes, rounds, [nbytes, nbytes // 4],
                               place.server)
            what = f"persist {stream_label(size, lanes)}"
            for (ours, base), suffix in zip(found, SUFFIX):
                rows.append(_row(what + suffix, ours / 1e9, "GB/s", base / 1e9,
                                 at_least=STREAM_TARGET))
    return rows


def machine() -> str:
    """The CPUs and the load while the figures were taken (other work skews them)."""
    model = ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), "")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"# {len(_ALLOWED)} CPUs ({model or 'unknown model'}), load average {load}"


def _ssh_rows(target: str, d: str, env: dict[str, str], quick: bool) -> list[Row]:
    with _environ_restored(*env, "RPMEM_CMD", "PMREPLICA_LAUNCHER"):
        os.environ.update(env)
        os.environ["RPMEM_CMD"] = agent_cmd(d)
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


def _print(rows: list[Row], out, title: str) -> None:
    if title:
        out.write(f"\n{title}\n")
    out.write(f"{'metric':42} {'pmreplica':>12} {'baseline':>12} {'ratio':>7}  target\n")
    for r in rows:
        base = f"{r.baseline:9.2f} {r.unit:>2}" if r.baseline is not None else ""
        ratio = f"{r.ratio:6.2f}x" if r.ratio is not None else ""
        verdict = "" if r.ok is None else ("ok" if r.ok else "MISSED")
        out.write(f"{r.metric:42} {r.value:9.2f} {r.unit:>2} {base:>12} {ratio:>7}  "
                  f"{r.target} {verdict}\n")
    out.flush()


def chosen_placements(names: str | None) -> list[Placement]:
    """The placements named in ``names`` ("one,two,unpinned", a prefix of each will do)."""
    every = placements()
    if not names:
        return every
    chosen = []
    for word in names.split(","):
        found = [p for p in every if p.name.startswith(word.strip())]
        if len(found) != 1:
            raise SystemExit(f"unknown placement {word!r}: one of "
                             + ", ".join(p.name for p in every))
        chosen += found
    return chosen


def register(sub) -> None:
    """Add ``bench`` to the ``pmreplica`` command (cli.COMMAND_MODULES)."""
    p = sub.add_parser("bench", help="persist latency/throughput against raw TCP baselines",
                       description=__doc__.splitlines()[0])
    add_arguments(p)
    p.add_argument("--ssh", metavar="TARGET",
                   help="also time create+close through SSH to this [user@]host[:port] "
                        "(its agent must serve pool sets in a directory writable here)")
    p.set_defaults(func=lambda args: 0 if all(
        r.ok is not False for r in run(args.quick, args.ssh, as_json=args.json,
                                       where=chosen_placements(args.placements))) else 1)


def add_arguments(p) -> None:
    """The options ``pmreplica bench`` and benchmarks/persist.py share."""
    p.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--placements", metavar="LIST",
                   help="comma-separated placements to measure: one (client and agent on "
                        "one CPU), two (on two CPUs), unpinned (left to the scheduler); "
                        "default: all three")

#!/usr/bin/env python3
"""Replicas on other hosts: fan-out cost and time to degrade, on hosts made of network
namespaces (tests/fixtures/hosts.py: own address, own sshd, reached through paramiko).

    sudo .venv/bin/python benchmarks/multihost.py [--quick] [--rounds N] [--cuts N]

Fan-out: persist latency of a pool set with remote replicas on two hosts against the same
pool set with one, both open at once and measured in alternating rounds (so that noise hits
both alike), p50 and p99, with the client and the agents left to the scheduler and then
pinned (client on one CPU, agents on the other). Target: two hosts at most 1.3x one. Beside
it, in the same rounds, the same fan-out of a raw baseline: pmreplica bench's plain Python
ping-pong (the persist's bytes out, a 4-byte word back; over TLS as the lanes are, clear with
``PMREPLICA_TCP_TLS=0``) to a peer on each host, sent to both hosts before either answer is
awaited, as PoolSet does: what the hosts, their links and the machine's CPUs cost a second
host before any pmreplica code runs.

Time to degrade: a writer persists 4 KiB ranges while one of two hosts loses its link; the
time from the cut to the replica's failure report, and the longest persist around it, over
several cuts (each healed and resynced before the next). Target: within the peer timeout.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pmreplica import PoolSet, hookimpl, sync  # noqa: E402
from pmreplica.bench import Peer  # noqa: E402
from pmreplica.header import HDR_SIZE  # noqa: E402
from tests.fixtures.hosts import HostBed, require_hosts  # noqa: E402

SIZE = 64 << 20
SIZES = (64, 4096, 65536)
FANOUT_TARGET = 1.3


def pool_set(bed: HostBed, d: Path, name: str, hosts: tuple[str, ...]) -> Path:
    for h in hosts:
        (bed[h].dir / f"{name}.set").write_text(
            f"PMEMPOOLSET\n{SIZE} {bed[h].dir}/{name}.part0\n")
    lines = [f"{SIZE} {d}/{name}.master"] + [f"REPLICA {h} {name}.set" for h in hosts]
    path = d / f"{name}.set"
    path.write_text("PMEMPOOLSET\n" + "\n".join(lines) + "\n")
    return path


class RawPeers:
    """pmreplica bench's baseline peer (a plain Python ping-pong, over TLS as the lanes are
    by default, unless ``PMREPLICA_TCP_TLS=0``) on each of ``hosts``, placed as the agents
    are, one connection to each."""

    def __init__(self, bed: HostBed, hosts: tuple[str, ...], size: int,
                 cpu: int | None) -> None:
        tls = os.environ.get("PMREPLICA_TCP_TLS", "1") != "0"
        self.peers = [Peer("pp", size, cpu, tls, host=bed[h].address,
                           prefix=("ip", "netns", "exec", bed[h].netns)) for h in hosts]
        self.socks = [p.connect() for p in self.peers]
        self.msg = os.urandom(size)

    def latencies(self, count: int) -> list[float]:
        socks, msg, word = self.socks, self.msg, bytearray(4)
        clock = time.perf_counter
        out = []
        for _ in range(count):
            t0 = clock()
            for s in socks:
                s.sendall(msg)
            for s in socks:
                got = s.recv_into(word)
                while got < 4:  # (a TLS record's word comes whole; a TCP one nearly always)
                    r = s.recv_into(memoryview(word)[got:])
                    if not r:
                        raise ConnectionResetError("the raw peer closed its connection")
                    got += r
            out.append(clock() - t0)
        return out

    def close(self) -> None:
        for s in self.socks:
            s.close()
        for p in self.peers:
            p.close()


def latencies(pool: PoolSet, size: int, count: int) -> list[float]:
    pool.buf[HDR_SIZE:HDR_SIZE + size] = os.urandom(size)
    clock = time.perf_counter
    out = []
    for _ in range(count):
        t0 = clock()
        pool.persist(HDR_SIZE, size)
        out.append(clock() - t0)
    return out


def pct(samples: list[float], q: float) -> float:
    return sorted(samples)[min(len(samples) - 1, int(q * len(samples)))]


def _alternating(one: Callable[[int], list[float]], two: Callable[[int], list[float]],
                 rounds: int, count: int) -> tuple[list[float], list[float]]:
    """Samples of ``one`` and ``two`` over ``rounds`` rounds, taking turns which goes first."""
    one(count // 10)  # warm up both
    two(count // 10)
    a: list[float] = []
    b: list[float] = []
    for r in range(rounds):
        if r % 2 == 0:
            a += one(count)
            b += two(count)
        else:
            b += two(count)
            a += one(count)
    return a, b


def fanout(bed: HostBed, d: Path, rounds: int, count: int, placement: str,
           cpu: int | None) -> bool:
    one = PoolSet.create(pool_set(bed, d, f"one{placement}", ("h1",)))
    two = PoolSet.create(pool_set(bed, d, f"two{placement}", ("h1", "h2")))
    ok = True
    try:
        for size in SIZES:
            raw1 = RawPeers(bed, ("h1",), size, cpu)
            raw2 = RawPeers(bed, ("h1", "h2"), size, cpu)
            try:
                # pmreplica's and the raw baseline's rounds interleaved: one noise for all
                samples: list[list[float]] = [[], [], [], []]
                for _ in range(rounds):
                    for i, pair in enumerate(_alternating(
                            lambda n: latencies(one, size, n),
                            lambda n: latencies(two, size, n), 1, count)
                            + _alternating(raw1.latencies, raw2.latencies, 1, count)):
                        samples[i] += pair
            finally:
                raw1.close()
                raw2.close()
            a, b, ra, rb = samples
            p50 = pct(b, 0.5) / pct(a, 0.5)
            p99 = pct(b, 0.99) / pct(a, 0.99)
            raw50 = pct(rb, 0.5) / pct(ra, 0.5)
            good = p50 <= FANOUT_TARGET
            ok &= good
            print(f"  fan-out {size:>6} B  {placement:<9} 1 host p50 {pct(a, .5) * 1e6:6.1f} us"
                  f" p99 {pct(a, .99) * 1e6:7.1f} us | 2 hosts p50 {pct(b, .5) * 1e6:6.1f} us"
                  f" p99 {pct(b, .99) * 1e6:7.1f} us | ratio p50 {p50:.2f}x p99 {p99:.2f}x"
                  f"  (target p50 <= {FANOUT_TARGET}x) {'ok' if good else 'MISSED'}",
                  flush=True)
            print(f"  {'':>17} {'raw':<9} 1 host p50 {pct(ra, .5) * 1e6:6.1f} us"
                  f" p99 {pct(ra, .99) * 1e6:7.1f} us | 2 hosts p50 {pct(rb, .5) * 1e6:6.1f} us"
                  f" p99 {pct(rb, .99) * 1e6:7.1f} us | ratio p50 {raw50:.2f}x"
                  f" p99 {pct(rb, .99) / pct(ra, .99):.2f}x;"
                  f" pmreplica's fan-out / raw's {p50 / raw50:.2f}x", flush=True)
    finally:
        one.close()
        two.close()
    return ok


class Failures:
    def __init__(self) -> None:
        self.at: float | None = None

    @hookimpl
    def pmreplica_replica_failed(self, replica, error):
        self.at = time.monotonic()


def time_to_degrade(bed: HostBed, d: Path, cuts: int, timeout: float) -> bool:
    path = pool_set(bed, d, "cut", ("h1", "h2"))
    PoolSet.create(path).close()
    detect: list[float] = []
    longest: list[float] = []
    for i in range(cuts):
        failures = Failures()
        with PoolSet.open(path, plugins=[failures]) as pool:
            stop = threading.Event()
            worst = [0.0]

            def writer() -> None:
                rng = random.Random(i)
                while not stop.is_set():
                    off = rng.randrange(HDR_SIZE, SIZE - 4096)
                    t0 = time.monotonic()
                    pool.persist(off, 4096)
                    worst[0] = max(worst[0], time.monotonic() - t0)

            t = threading.Thread(target=writer)
            t.start()
            time.sleep(0.3 + random.random() * 0.25)  # a cut at any phase of the pings
            cut = time.monotonic()
            bed["h2"].cut()
            while failures.at is None and time.monotonic() - cut < 30:
                time.sleep(0.005)
            time.sleep(0.2)
            stop.set()
            t.join()
        bed["h2"].heal()
        if failures.at is None:
            print(f"  cut {i}: the replica was never failed")
            return False
        detect.append(failures.at - cut)
        longest.append(worst[0])
        bed["h2"].wait_agents_gone()
        sync.sync(path)
    ok = max(detect) <= timeout * 1.1 and max(longest) <= timeout * 1.1
    print(f"  time to degrade over {cuts} cuts (peer timeout {timeout:g} s): "
          f"median {statistics.median(detect):.3f} s, max {max(detect):.3f} s; "
          f"longest persist median {statistics.median(longest):.3f} s, "
          f"max {max(longest):.3f} s  {'ok' if ok else 'MISSED'}", flush=True)
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    p.add_argument("--rounds", type=int, default=6, help="alternating rounds per size")
    p.add_argument("--cuts", type=int, default=5, help="cuts timed")
    args = p.parse_args()
    count = 300 if args.quick else 2000
    require_hosts()
    timeout = float(os.environ.setdefault("PMREPLICA_PEER_TIMEOUT", "1"))
    d = Path(tempfile.mkdtemp(prefix="pmreplica-bench-hosts-", dir="/dev/shm"))
    (d / "bed").mkdir()
    bed = HostBed(d / "bed", 2)
    try:
        os.environ.update({k: v for k, v in bed.env().items()
                           if k in ("PMREPLICA_SSH_CONFIG", "PATH")})
        for k in ("RPMEM_CMD", "PMREPLICA_LAUNCHER", "RPMEM_SSH"):
            os.environ.pop(k, None)
        print(f"replicas on other hosts ({os.cpu_count()} CPUs, {count} persists a round)")
        ok = fanout(bed, d, 2 if args.quick else args.rounds, count, "unpinned", None)
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) >= 2 and shutil.which("taskset"):
            os.sched_setaffinity(0, {cpus[0]})
            os.environ["RPMEM_CMD"] = f"taskset -c {cpus[1]} pmreplica-agent"
            try:
                ok &= fanout(bed, d, 2 if args.quick else args.rounds, count, "pinned",
                             cpus[1])
            finally:
                os.environ.pop("RPMEM_CMD")
                os.sched_setaffinity(0, set(cpus))
        ok &= time_to_degrade(bed, d, 2 if args.quick else args.cuts, timeout)
    finally:
        bed.close()
        shutil.rmtree(d, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

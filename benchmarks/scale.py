#!/usr/bin/env python3
"""Pools of many GiB: what a resync copies, how fast verify and repair run, in what memory.

    .venv/bin/python benchmarks/scale.py [SIZE] [--dir DIR] [--rounds N] [--baseline SRC]
                                         [--skip resync,verify,repair] [--sparse]

SIZE (default 4G) is the pool size; parts go to DIR (default /dev/shm). Each measurement
runs in a process of its own (so that peak memory is its own), several rounds, reported as
the median and the spread (min-max): the machine is shared.

* resync: a set of a master and a local replica; the replica is missing while the pool is
  open (it fails at open: stale), 1% of the pool is written as scattered 4 KiB writes,
  the replica comes back; then ``replica-sync`` (after a clean close), ``PoolSet.resync``
  online, and ``replica-sync`` after the writer was killed (SIGKILL: no close, the map as
  the last batch saved it). Reported: bytes copied / bytes written (target: at most 4x).
* persist: the latency of those degraded persists (p50, p99), beside ``--baseline``'s.
* verify: ``replica-sync --verify`` of a healthy set (master and a local replica): GB/s
  of pool and peak private memory, with the default digest (xxh3-128) and with sha256,
  beside ``--baseline SRC`` (another checkout, e.g. /work/main: today's code) when given.
* repair: the replica's part deleted, ``replica-sync`` against Debian's ``pmempool sync``
  on a set ``pmempool create`` made, same size, same directory, alternating rounds:
  GB/s and peak resident memory of each.

``--sparse`` makes the parts sparse (for sizes beyond the machine's memory; only resync).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

# -- child programs (each run as `python -c`, with the code base on sys.path) --------------

_WRITER = r"""
import os, random, sys, time
from pmreplica import PoolSet
from pmreplica.header import HDR_SIZE
path, rnd, share, mode = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
pool = PoolSet.open(path)
rng = random.Random(rnd)
n = int(pool.size * share) // 4096
data = os.urandom(4096)
lat = []
clock = time.perf_counter
for _ in range(n):
    off = rng.randrange(HDR_SIZE // 4096, pool.size // 4096) * 4096
    pool.buf[off:off + 4096] = data
    t = clock()
    pool.persist(off, 4096)
    lat.append(clock() - t)
lat.sort()
print(n * 4096, lat[len(lat) // 2], lat[len(lat) * 99 // 100], flush=True)
if mode == "kill":
    os.kill(os.getpid(), 9)
pool.close()
"""

_CREATE = r"""
import os, sys
import pmreplica
assert pmreplica.__file__.startswith(sys.argv[3]), pmreplica.__file__
from pmreplica import PoolSet
d, size = sys.argv[1], int(sys.argv[2])
path = os.path.join(d, "s.set")
with open(path, "w") as f:
    f.write(f"PMEMPOOLSET\n{size} {d}/m\nREPLICA\n{size} {d}/r\n")
PoolSet.create(path).close()
"""

_RESYNC_ONLINE = r"""
import sys
from pmreplica import PoolSet
with PoolSet.open(sys.argv[1]) as pool:
    print(pool.resync(1))
"""

_SYNC = r"""
import json, sys
from pmreplica import sync
algo = int(sys.argv[3]) or None
rep = sync.sync(sys.argv[1], verify=sys.argv[2] == "verify", algorithm=algo)
print(json.dumps({"status": rep.status, "copied": rep.copied}))
"""

_BASELINE_VERIFY = r"""
import json, sys
import pmreplica
assert pmreplica.__file__.startswith(sys.argv[2]), pmreplica.__file__
from pmreplica import sync
rep = sync.sync(sys.argv[1], verify=True)
print(json.dumps({"status": rep.status, "copied": rep.copied}))
"""


def _env(src: Path = ROOT) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(src), PMREPLICA_PROGRESS_INTERVAL="3600")


def _smaps(pid: int) -> tuple[int, int]:
    """(resident, private) bytes of process ``pid`` now."""
    rss = private = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key == "Rss":
                    rss = int(rest.split()[0]) * 1024
                elif key in ("Private_Clean", "Private_Dirty"):
                    private += int(rest.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return rss, private


def run(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, int, int, str]:
    """Run ``argv``; (seconds, peak resident, peak private bytes, stdout)."""
    peak = [0, 0]
    t0 = time.perf_counter()
    # run from / : `python -c` puts the working directory first on sys.path, which would
    # shadow PYTHONPATH's code base with the one in a checkout the benchmark is run from
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env or _env(), cwd="/")
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            rss, private = _smaps(proc.pid)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], private)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, err = proc.communicate()
    took = time.perf_counter() - t0
    done.set()
    t.join()
    if proc.returncode not in (0, 1, -signal.SIGKILL):
        raise RuntimeError(f"{argv[:3]} failed ({proc.returncode}): {err[-2000:]}")
    return took, peak[0], peak[1], out


def _py(code: str, *args: object) -> list[str]:
    return [PY, "-c", code, *map(str, args)]


def make_set(d: Path, size: int, sparse: bool) -> Path:
    from pmreplica import PoolSet
    path = d / "s.set"
    path.write_text(f"PMEMPOOLSET\n{size} {d}/m\nREPLICA\n{size} {d}/r\n")
    PoolSet.create(path, sparse=sparse).close()
    return path


def fill(path: Path, size: int) -> None:
    """Write every data byte once (a verify that hashes zero pages from a sparse file
    measures nothing)."""
    from pmreplica import PoolSet
    from pmreplica.header import HDR_SIZE
    chunk = os.urandom(64 << 20)
    with PoolSet.open(path) as pool:
        for off in range(HDR_SIZE, pool.size, len(chunk)):
            n = min(len(chunk), pool.size - off)
            pool.buf[off:off + n] = chunk[:n]
            pool.persist(off, n)


def _q(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3g} ({min(xs):.3g}-{max(xs):.3g})"


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB"


# -- the measurements ----------------------------------------------------------------------
def bench_resync(d: Path, size: int, rounds: int, sparse: bool) -> dict:
    path = make_set(d, size, sparse)
    out: dict[str, list[float]] = {"replica-sync": [], "online": [], "after SIGKILL": []}
    hidden = d / "r.away"
    for k in range(rounds):
        for mode in out:
            os.rename(d / "r", hidden)  # the replica fails at open: stale, writes tracked
            _, _, _, got = run(_py(_WRITER, path, k, 0.01, "kill" if mode == "after SIGKILL"
                                   else "close"))
            written = int(got.split()[0])
            os.rename(hidden, d / "r")
            if mode == "online":
                _, _, _, got = run(_py(_RESYNC_ONLINE, path))
                copied = int(got)
            else:
                _, _, _, got = run(_py(_SYNC, path, "sync", 0))
                rep = json.loads(got)
                assert rep["status"] == "repaired", rep
                copied = rep["copied"]
            out[mode].append(copied / written)
    return {m: xs for m, xs in out.items()}


def bench_persist(d: Path, size: int, rounds: int, baseline: Path | None) -> dict:
    """Persist latency of scattered 4 KiB writes while the replica is stale (degraded:
    every write also lands in the dirty maps), with this code and the baseline's."""
    bases = {"this": ROOT, **({"baseline": baseline.resolve()} if baseline else {})}
    res: dict[str, dict[str, list[float]]] = {k: {"p50": [], "p99": []} for k in bases}
    for k in range(rounds):
        for kind, src in bases.items():
            sub = d / f"{kind}{k}"
            sub.mkdir()
            run(_py(_CREATE, sub, size, src), _env(src))
            os.rename(sub / "r", sub / "r.away")
            _, _, _, got = run(_py(_WRITER, sub / "s.set", k, 0.01, "close"), _env(src))
            _, p50, p99 = got.split()
            res[kind]["p50"].append(float(p50) * 1e6)
            res[kind]["p99"].append(float(p99) * 1e6)
            shutil.rmtree(sub)
    return res


def bench_verify(d: Path, size: int, rounds: int, baseline: Path | None) -> dict:
    from rpmem_common import checksum
    path = make_set(d, size, False)
    fill(path, size)
    kinds = {"xxh3-128": _py(_SYNC, path, "verify", checksum.ALGO_XXH3_128),
             "sha256": _py(_SYNC, path, "verify", checksum.ALGO_SHA256)}
    if baseline is not None:
        kinds["baseline"] = _py(_BASELINE_VERIFY, path, baseline.resolve())
    res: dict[str, dict[str, list[float]]] = {k: {"gbps": [], "private": [], "rss": []}
                                              for k in kinds}
    for _ in range(rounds):
        for kind, argv in kinds.items():  # alternating: noise hits each alike
            took, rss, private, got = run(argv, _env(baseline) if kind == "baseline"
                                          else None)
            assert json.loads(got)["status"] == "healthy", got
            res[kind]["gbps"].append(size / took / 1e9)
            res[kind]["private"].append(private / (1 << 20))
            res[kind]["rss"].append(rss / (1 << 20))
    return res


def bench_repair(d: Path, size: int, rounds: int) -> dict:
    pmempool = shutil.which("pmempool")
    res: dict[str, dict[str, list[float]]] = {"replica-sync": {"gbps": [], "rss": []}}
    if pmempool:
        res["pmempool sync"] = {"gbps": [], "rss": []}
    for _ in range(rounds):  # each set made anew: the two are never in memory at once
        ours = d / "ours"
        ours.mkdir()
        path = make_set(ours, size, False)
        fill(path, size)
        os.unlink(ours / "r")
        took, rss, _, got = run(_py(_SYNC, path, "sync", 0))
        assert json.loads(got)["status"] == "repaired", got
        res["replica-sync"]["gbps"].append(size / took / 1e9)
        res["replica-sync"]["rss"].append(rss / (1 << 20))
        shutil.rmtree(ours)
        if not pmempool:
            continue
        theirs = d / "theirs"
        theirs.mkdir(exist_ok=True)
        pset = theirs / "p.set"
        pset.write_text(f"PMEMPOOLSET\n{size} {theirs}/m\nREPLICA\n{size} {theirs}/r\n")
        subprocess.run([pmempool, "create", "obj", str(pset)], check=True)
        os.unlink(theirs / "r")
        took, rss, _, _ = run([pmempool, "sync", str(pset)])
        res["pmempool sync"]["gbps"].append(size / took / 1e9)
        res["pmempool sync"]["rss"].append(rss / (1 << 20))
        for f in ("m", "r"):
            (theirs / f).unlink()
    return res


def main() -> int:
    sys.path.insert(0, str(ROOT))
    from pmreplica.setfile import parse_size
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("size", nargs="?", default="4G", help="pool size (default 4G)")
    ap.add_argument("--dir", default="/dev/shm", help="where the parts go (default /dev/shm)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline", type=Path, help="a checkout to compare verify with")
    ap.add_argument("--skip", default="", help="comma-separated: resync,persist,verify,repair")
    ap.add_argument("--sparse", action="store_true", help="sparse parts (resync only)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    size = parse_size(args.size)
    skip = set(filter(None, args.skip.split(",")))
    if args.sparse:
        skip |= {"persist", "verify", "repair"}
    results: dict[str, object] = {"size": size}
    for name, fn in (("resync", lambda d: bench_resync(d, size, args.rounds, args.sparse)),
                     ("persist", lambda d: bench_persist(d, size, args.rounds, args.baseline)),
                     ("verify", lambda d: bench_verify(d, size, args.rounds, args.baseline)),
                     ("repair", lambda d: bench_repair(d, size, args.rounds))):
        if name in skip:
            continue
        d = Path(tempfile.mkdtemp(prefix="pmreplica-scale-", dir=args.dir))
        try:
            results[name] = fn(d)
        finally:
            shutil.rmtree(d, ignore_errors=True)
        if not args.json:
            _print(name, results[name], size)
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        print()
    return 0


def _print(name: str, res: dict, size: int) -> None:
    print(f"== {name} ({_gib(size)} pool; median (min-max))")
    if name == "resync":
        for mode, xs in res.items():
            print(f"  {mode:<14} copied/written {_q(xs)}  (target <= 4)")
        return
    if name == "persist":
        for kind, m in res.items():
            line = f"  {kind:<14} degraded persist p50 {_q(m['p50'])} us, p99 {_q(m['p99'])} us"
            if kind != "baseline" and "baseline" in res:
                ratio = [a / b for a, b in zip(m["p50"], res["baseline"]["p50"])]
                line += f"  p50 x{_q(ratio)} of baseline"
            print(line)
        return
    base = res.get("baseline") or res.get("pmempool sync")
    for kind, m in res.items():
        line = f"  {kind:<14} {_q(m['gbps'])} GB/s"
        if base is not None and m is not base:
            ratios = [a / b for a, b in zip(m["gbps"], base["gbps"])]
            line += f"  x{_q(ratios)} of {'baseline' if 'baseline' in res else 'pmempool'}"
        if "private" in m:
            line += f"  peak private {_q(m['private'])} MiB"
        line += f"  peak resident {_q(m['rss'])} MiB"
        print(line)


if __name__ == "__main__":
    sys.exit(main())

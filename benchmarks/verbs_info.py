#!/usr/bin/env python3
"""Persist latency and throughput of a remote pool over TCP, verbs GPSPM and verbs APM,
measured back to back in one run against local agents (informational only).

    tools/rxevm/run -- .venv/bin/python benchmarks/verbs_info.py [--target IP] [--json]

Meant for the rxe guest (``--target`` defaults to ``$RXE_IP``) or a host with an RDMA
device; under QEMU's emulation the figures say how the paths compare, not what hardware
does. Pools live on /dev/shm; the agents run through the ``local`` launcher.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pmreplica.header import HDR_SIZE, PoolAttr  # noqa: E402
from pmreplica.rpmem.client import RemotePool  # noqa: E402
from pmreplica.rpmem.environ import RpmemConfig  # noqa: E402

POOL = 16 << 20
SIZES = (64, 4096, 65536)
AGENT = str(Path(sys.executable).parent / "pmreplica-agent")
PATHS = {  # name: (client environment, agent arguments)
    "tcp": ({"RPMEM_ENABLE_VERBS": "0"}, ""),
    "verbs GPSPM": ({"RPMEM_ENABLE_SOCKETS": "0"}, ""),
    "verbs APM": ({"RPMEM_ENABLE_SOCKETS": "0"}, " --persist-apm"),
}


def measure(target: str, sets: Path, env: dict[str, str], agent_args: str,
            samples: int) -> dict[str, float]:
    config = RpmemConfig.from_env({"PMREPLICA_LAUNCHER": "local",
                                   "RPMEM_CMD": f"{AGENT} --poolset-dir {sets}{agent_args}",
                                   **env})
    (sets / "b.set").write_text(f"PMEMPOOLSET\n{POOL} {sets / 'b.part0'}\n")
    pool = mmap.mmap(-1, POOL)
    pool[:] = os.urandom(POOL)
    row: dict[str, float] = {}
    t0 = time.perf_counter()
    rp = RemotePool.create(target, "b.set", pool, attr=PoolAttr(signature=b"BENCH\0\0\0"),
                           config=config)
    row["create s"] = time.perf_counter() - t0
    try:
        row["provider"] = rp.provider  # type: ignore[assignment]
        for size in SIZES:
            times = []
            for i in range(samples):
                off = HDR_SIZE + (i * size) % (POOL - HDR_SIZE - size)
                t0 = time.perf_counter()
                rp.persist(off, size)
                times.append(time.perf_counter() - t0)
            row[f"persist {size} B us"] = statistics.median(times) * 1e6
        big = 8 << 20
        t0 = time.perf_counter()
        rp.persist(HDR_SIZE, big)
        row["persist 8 MiB MB/s"] = big / (time.perf_counter() - t0) / 1e6
        back = bytearray(big)
        t0 = time.perf_counter()
        rp.read(back, HDR_SIZE, big)
        row["read 8 MiB MB/s"] = big / (time.perf_counter() - t0) / 1e6
    finally:
        rp.close()
        (sets / "b.part0").unlink(missing_ok=True)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default=os.environ.get("RXE_IP", ""),
                   help="the address an RDMA device carries (default $RXE_IP)")
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if not args.target:
        p.error("--target is required outside the rxe guest")
    sets = Path(tempfile.mkdtemp(prefix="pmreplica-bench-", dir="/dev/shm"))
    try:
        rows = {name: measure(args.target, sets, env, extra, args.samples)
                for name, (env, extra) in PATHS.items()}
    finally:
        shutil.rmtree(sets, ignore_errors=True)
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
        return 0
    keys = list(next(iter(rows.values())))
    print(f"{'':22}" + "".join(f"{name:>14}" for name in rows))
    for key in keys:
        cells = (rows[name][key] for name in rows)
        print(f"{key:22}" + "".join(f"{c:>14.1f}" if isinstance(c, float) else f"{c:>14}"
                                    for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())

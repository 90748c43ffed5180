#!/usr/bin/env python3
"""Where a stream of persists stands between a raw stream and a raw stream answered per step.

    .venv/bin/python benchmarks/streams.py [--rounds N] [--mib M] [--placements one,two,unpinned]

A persist returns once the agent answered it, so a stream of persists waits for an answer per
step, where ``benchmarks/persist.py``'s baseline, a raw stream (plain Python sockets into an
mmap'd file), is answered once at its end. This prints, in alternating rounds of the same run,
for clear-text lanes: that raw stream; the same raw stream answered after every step (each
step's length sent ahead of it, as a persist's header); pmreplica's persists; and pmreplica's
flushes with one drain at the end (no answer awaited per step). GB/s, median over rounds, and
each figure's ratio to the raw stream.
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pmreplica import bench  # noqa: E402
from pmreplica.header import PoolAttr  # noqa: E402
from pmreplica.rpmem import RemotePool  # noqa: E402
from pmreplica.rpmem.environ import RpmemConfig  # noqa: E402

CASES = ((1 << 20, 1), (16 << 20, 1), (1 << 20, 4), (16 << 20, 4))


def measure(remote: RemotePool, view: memoryview, size: int, nlanes: int, steps: int,
            rounds: int, cpu: int | None) -> dict[str, float]:
    """GB/s of each arm, the median over ``rounds`` alternating rounds."""
    chunk = size // nlanes
    peer = bench.Peer("stream", chunk, cpu)
    socks = [peer.connect() for _ in range(nlanes)]

    def raw(lane: int, answered_per_step: bool = False) -> None:
        bench.raw_stream(socks[lane], view[4096 + lane * chunk:4096 + (lane + 1) * chunk],
                         steps, answered_per_step)

    def persists(lane: int) -> None:
        for _ in range(steps):
            remote.persist(4096 + lane * chunk, chunk, lane)

    def flushes(lane: int) -> None:
        for _ in range(steps):
            remote.flush(4096 + lane * chunk, chunk, lane)
        remote.drain(lane)

    arms = {"raw stream": raw, "raw, answered per step": lambda i: raw(i, True),
            "persist": persists, "flush + drain": flushes}
    found: dict[str, list[float]] = {name: [] for name in arms}
    try:
        for _ in range(rounds):
            for name, work in arms.items():
                found[name].append(steps * size / bench.parallel(nlanes, work) / 1e9)
    finally:
        for s in socks:
            s.close()
        peer.close()
    return {name: statistics.median(v) for name, v in found.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--mib", type=int, default=800, help="MiB per arm and round")
    p.add_argument("--placements", metavar="LIST", help="as benchmarks/persist.py's")
    args = p.parse_args()
    print(bench.machine())
    with tempfile.TemporaryDirectory(prefix="pmreplica-streams-", dir="/dev/shm") as d:
        with open(os.path.join(d, "s.set"), "w") as f:
            f.write(f"PMEMPOOLSET\n{bench.POOL_SIZE >> 20}M {d}/s.part\n")
        os.environ["PMREPLICA_LAUNCHER"] = "local"
        pool = mmap.mmap(-1, bench.POOL_SIZE)
        pool.write(os.urandom(1 << 20) * (bench.POOL_SIZE >> 20))
        view = memoryview(pool)
        for place in bench.chosen_placements(args.placements):
            print(f"\n{place.name}\n{'stream':22} {'arm':24} {'GB/s':>6} {'vs raw':>7}")
            with bench.running_on(place.client):
                os.environ["RPMEM_CMD"] = bench.agent_cmd(d, place.server)
                config = RpmemConfig.from_env({**os.environ, "PMREPLICA_TCP_TLS": "0"})
                with RemotePool.create("localhost", "s.set", pool, nlanes=4,
                                       attr=PoolAttr(b"BENCH", 1), config=config) as remote:
                    for size, nlanes in CASES:
                        steps = max(2, (args.mib << 20) // size)
                        found = measure(remote, view, size, nlanes, steps, args.rounds,
                                        place.server)
                        what = bench.stream_label(size, nlanes)
                        for name, gbs in found.items():
                            print(f"{what:22} {name:24} {gbs:6.2f} "
                                  f"{gbs / found['raw stream']:6.2f}x", flush=True)
                os.unlink(f"{d}/s.part")
        view.release()
        pool.close()
    print(bench.machine())
    return 0


if __name__ == "__main__":
    sys.exit(main())

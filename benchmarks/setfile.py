#!/usr/bin/env python3
"""How long parsing a pool set and `pmreplica info` take as the part count grows, printed
beside a baseline measured in the same run: reading the file, splitting each line into its
two fields and looking the part path up (the least any parser that checks its parts does).

    .venv/bin/python benchmarks/setfile.py [--parts 1000,10000,20000] [--rounds N] [--json]

Each size runs ``--rounds`` times (interleaved: parse, info, baseline); p50 and p99 are
over the rounds. ``scale`` is the p50 divided by the p50 of the first size, per part: 1.0
means the cost grows linearly with the parts. The parts do not exist (as before a pool is
created): `info` reports each as missing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pmreplica import info, setfile  # noqa: E402


def baseline(path: str) -> None:
    with open(path, "rb") as f:
        for line in f.read().split(b"\n")[1:]:
            if line:
                os.path.exists(os.fsdecode(line.split(b" ")[1]))


def timed(call, *args) -> float:
    start = time.perf_counter()
    call(*args)
    return time.perf_counter() - start


def p99(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, round(0.99 * (len(values) - 1)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="1000,10000,20000")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    sizes = [int(n) for n in args.parts.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as d:
        for n in sizes:
            path = os.path.join(d, f"{n}.set")
            with open(path, "w") as f:
                f.write("PMEMPOOLSET\n" + "".join(f"2M {d}/p{i}\n" for i in range(n)))
            runs: dict[str, list[float]] = {"parse": [], "info": [], "baseline": []}
            for _ in range(args.rounds):
                runs["parse"].append(timed(setfile.parse, path))
                runs["info"].append(timed(info.gather, path))
                runs["baseline"].append(timed(baseline, path))
            base = statistics.median(runs["baseline"])
            for what in ("parse", "info", "baseline"):
                p50 = statistics.median(runs[what])
                rows.append({"parts": n, "what": what, "p50_ms": p50 * 1e3,
                             "p99_ms": p99(runs[what]) * 1e3, "ratio": p50 / base})
    first = {r["what"]: r["p50_ms"] / r["parts"] for r in rows if r["parts"] == sizes[0]}
    for r in rows:
        r["scale"] = r["p50_ms"] / r["parts"] / first[r["what"]]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'parts':>6} {'what':<9} {'p50 ms':>9} {'p99 ms':>9} {'/baseline':>9} {'scale':>6}")
    for r in rows:
        print(f"{r['parts']:>6} {r['what']:<9} {r['p50_ms']:>9.1f} {r['p99_ms']:>9.1f} "
              f"{r['ratio']:>9.2f} {r['scale']:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

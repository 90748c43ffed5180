#!/usr/bin/env python3
"""Explore power-loss crash images at length: every scenario of tests/powerloss/scenarios.py
with many seeds (each varying the workload, the checkpoint knobs, the replica layout), more
durability points and more images per point than the CI test takes.

    .venv/bin/python tools/powerloss_stress.py [--seeds N] [--seed S] [--scenario NAME ...]
                                               [--images-per-point K] [--sample P]
                                               [--workers W] [--keep DIR]

Each exploration runs in a fresh directory on /dev/shm. A failing image is written to
``--keep`` (default: a directory printed at the end), with its stream, and the command
that checks it alone again is printed. Exit status 0 when every image passed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pmreplica.powerloss import explore  # noqa: E402


def variants(name: str, seed: int) -> dict[str, Any]:
    """The parameters of scenario ``name`` for ``seed``."""
    if name == "Objects":
        return {"seed": seed, "transactions": 80, "knobs": seed % 3, "cuts": 5,
                "replica": seed % 2 == 1}
    if name == "FullPool":
        return {"seed": seed, "batch": 4 + seed % 29, "rounds": 2}
    if name == "RecordWrites":
        return {"seed": seed, "writes": 36}
    if name == "SyncRepair":
        return {"seed": seed, "relink": seed % 2 == 0}
    if name in ("UncleanReopen", "EpochReopen"):
        return {"seed": seed, "writes": 24}
    raise SystemExit(f"unknown scenario {name}")


#: the share of durability points recorded (FullPool passes thousands)
SAMPLE = {"Objects": 1.0, "FullPool": 0.1, "RecordWrites": 1.0, "SyncRepair": 1.0,
          "UncleanReopen": 1.0, "EpochReopen": 1.0}
SCENARIOS = tuple(SAMPLE)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=4, help="explorations per scenario")
    p.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    p.add_argument("--scenario", action="append", choices=SCENARIOS)
    p.add_argument("--images-per-point", type=int, default=16)
    p.add_argument("--sample", type=float, help="share of durability points recorded")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    p.add_argument("--keep", help="where failing images and their streams go")
    args = p.parse_args()
    keep = Path(args.keep or tempfile.mkdtemp(prefix="pmreplica-powerloss-failed-"))
    total = failed = 0
    start = time.monotonic()
    for name in args.scenario or SCENARIOS:
        for seed in range(args.seed, args.seed + args.seeds):
            params = variants(name, seed)
            base = Path(tempfile.mkdtemp(prefix="pmreplica-powerloss-", dir="/dev/shm"))
            try:
                try:
                    report = explore(f"tests.powerloss.scenarios:{name}", params, base,
                                     sample=args.sample or SAMPLE[name],
                                     images_per_point=args.images_per_point,
                                     workers=args.workers, seed=seed, cwd=str(ROOT),
                                     keep_failures=str(keep / f"{name}-{seed}"))
                except RuntimeError as e:  # the workload itself failed (after a power cut)
                    print(f"{name} {params}: FAILED while recording: {e}", flush=True)
                    failed += 1
                    continue
                print(report.summary(), flush=True)
                total += report.images
                failed += report.failed
                if report.failed:
                    stream = keep / f"{name}-{seed}" / "stream"
                    shutil.copyfile(report.stream, stream)
                    for f in report.result.failures:
                        print(f"  FAILED point {f.point} ({f.kind}) image {f.image} "
                              f"({f.kept} of {f.pending} pending words kept), "
                              f"context {f.context}:\n    {f.error}\n    kept in {f.saved}; "
                              f"again: python -m pmreplica.powerloss check {stream} "
                              f"--scratch /dev/shm/scratch --seed {seed} --images-per-point "
                              f"{args.images_per_point} --only {f.point}:{f.image}")
            finally:
                shutil.rmtree(base, ignore_errors=True)
    print(f"{total} images in {time.monotonic() - start:.0f} s, {failed} failed"
          + (f" (kept in {keep})" if failed else ""))
    if not failed and not args.keep:
        shutil.rmtree(keep, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

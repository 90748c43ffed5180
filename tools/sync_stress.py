#!/usr/bin/env python3
"""Stress replica-sync's crash safety: many rounds of a real fault, new data, a replica-sync
SIGKILLed while it runs, a check that every replica reported healthy holds the newest data,
and a full sync that must leave every replica byte-identical. The kill times are drawn over
an undisturbed sync of the same fault, timed first. The loop is the one
tests/test_sync_crash.py runs 24 times (tests/sync_harness.py).

    .venv/bin/python tools/sync_stress.py --runs 500 [--seed N]

Pools live in a fresh directory on /dev/shm with a local agent (PMREPLICA_LAUNCHER=local).
Exit status 0 when every round passed; the failing round is printed otherwise.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import logging  # noqa: E402

from tests.sync_harness import crash_layout, crash_loop, fill  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--seed", type=int, default=int(time.time()))
    p.add_argument("-q", "--quiet", action="store_true", help="print only the summary")
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the writer's replica failures are expected
    d = Path(tempfile.mkdtemp(prefix="pmreplica-sync-stress-", dir="/dev/shm"))
    start = time.monotonic()
    try:
        layout = crash_layout(d)
        fill(layout.path, layout.env(), seed=args.seed)
        result = crash_loop(layout, args.runs, args.seed,
                            log=(lambda msg: None) if args.quiet else print)
    except AssertionError as e:
        print(f"FAILED (seed {args.seed}): {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(d, ignore_errors=True)
    print(f"{result.runs} rounds passed in {time.monotonic() - start:.0f} s (seed {args.seed}); "
          f"kills: {result.kills}; healthy replicas checked after a kill: "
          f"{result.checked_healthy}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

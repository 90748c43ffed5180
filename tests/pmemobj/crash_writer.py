"""The writer the crash tests kill: runs the workload's transactions on a pool.

    python -m tests.pmemobj.crash_writer POOL PROGRESS MODE PARAM

After each transaction returns, its number is written to PROGRESS (8 bytes). MODE:
``loop``   run transactions until killed from outside (the test sends SIGKILL);
``flush``  SIGKILL itself at the PARAM-th flush/drain/persist call into the pool set
           (counted from opening the pool), so the kill lands between two steps of a
           commit, or of the recovery and gc that opening runs (``openflush``: the same,
           named for runs aimed at the open);
``step``   SIGKILL itself at the PARAM-th flush/drain of the next transaction's commit
           and the checkpoint that follows it; exit with status 3 if they take fewer.

PARAM % 3 also picks when checkpoints happen (see ``tune_checkpoints``).
``body``   SIGKILL itself inside a transaction body (before one of its operations or
           just before its commit), in a transaction drawn at random (seeded by PARAM).
"""

from __future__ import annotations

import os
import random
import signal
import struct
import sys

from pmreplica import pmemobj
from pmreplica.pmemobj import txn
from pmreplica.poolset import PoolSet
from tests.pmemobj import workload


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def count_flushes_and_die_at(n: int) -> list[int]:
    """SIGKILL this process at the n-th flush/drain/persist call into any pool set;
    return the counter (a one-item list the caller may reset)."""
    calls = [0]

    def counting(fn):
        def wrapper(*a, **kw):
            calls[0] += 1
            if calls[0] == n:
                die()
            return fn(*a, **kw)
        return wrapper
    for name in ("flush", "drain", "persist"):
        setattr(PoolSet, name, counting(getattr(PoolSet, name)))
    return calls


def tune_checkpoints(pool: pmemobj.PersistentObjectPool, param: int) -> None:
    """Vary when checkpoints happen (by PARAM), so that kills land in all three kinds:
    the default thresholds; checkpoints every few commits; a log window of 8 KiB that fills
    after a few records (and makes bigger transactions spill)."""
    if param % 3 == 1:
        txn.RELEASE_BATCH, txn.DIRTY_BATCH = 4, 16
    elif param % 3 == 2:
        pool._eng.log_end = min(pool._eng.log_end, pool._geo.log + 8192)


def main() -> None:
    pool_path, progress_path, mode, param = sys.argv[1], sys.argv[2], sys.argv[3], \
        int(sys.argv[4])
    fd = os.open(progress_path, os.O_RDWR | os.O_CREAT, 0o644)
    if mode in ("flush", "openflush"):
        count_flushes_and_die_at(param)
    calls = count_flushes_and_die_at(param) if mode == "step" else [0]
    calls[0] = -10 ** 9                # not counting yet
    pool = pmemobj.open(pool_path)
    tune_checkpoints(pool, param)
    n = pool.root["n"]
    model = workload.model_after(n)
    i = n
    # transactions whose number was recorded but aborted on purpose: continue after them
    recorded = struct.unpack("<q", os.pread(fd, 8, 0).ljust(8, b"\0"))[0]
    while i < recorded:
        i += 1
        workload.apply_model(model, i)

    target = i + random.Random(param).randrange(1, 6) if mode == "body" else -1
    os.pwrite(fd, struct.pack("<q", i), 0)
    os.write(2, b"ready\n")
    if mode == "step":
        calls[0] = 0
        workload.apply_pool(pool, i + 1, model)
        os.pwrite(fd, struct.pack("<q", i + 1), 0)
        pool.checkpoint()
        os._exit(3)                    # commit and checkpoint took fewer steps than PARAM
    while i < 100000:
        i += 1
        hook = None
        if i == target:
            at = param % (len(workload.ops_for(i, model)[0]) + 1)

            def hook(j: int) -> None:
                if j == at:
                    die()
        workload.apply_pool(pool, i, model, hook)
        os.pwrite(fd, struct.pack("<q", i), 0)


if __name__ == "__main__":
    main()

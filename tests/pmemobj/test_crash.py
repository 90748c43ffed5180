"""Crash consistency: a writer process is SIGKILLed at random points inside transactions
(between the steps of a commit, inside transaction bodies, or at arbitrary times); reopening
must give exactly the state after the last committed transaction (or the one in flight,
if its commit had got that far), leak nothing, and leave every local replica consistent.

Each test runs a series of kills on one pool, each run continuing where the last died.
"""

from __future__ import annotations

import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path


from pmreplica import pmemobj
from pmreplica.pmemobj import layout
from tests.helpers import ROOT, promoted, write_set
from tests.pmemobj import workload

POOL_SIZE = 32 << 20
HDR = 4096


def allowed_states(rec: int) -> set[int]:
    """Values ``root['n']`` may have after a kill when transaction ``rec`` was the last
    one known to have returned: the last committed one, or the next if it commits."""
    model = workload.new_model()
    last = 0
    for i in range(1, rec + 1):
        if workload.committed(i, model):
            last = i
        workload.apply_model(model, i)
    out = {last}
    if workload.committed(rec + 1, model):
        out.add(rec + 1)
    return out


def read_progress(path: Path) -> int:
    return struct.unpack("<q", path.read_bytes()[:8])[0]


def start_writer(pool: Path, progress: Path, mode: str, param: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.pmemobj.crash_writer", str(pool), str(progress), mode,
         str(param)], cwd=ROOT, stderr=subprocess.PIPE)


def run_writer(pool: Path, progress: Path, mode: str, param: int, rng: random.Random) -> int:
    """Run the writer until it is killed; assert it died of SIGKILL, not of an error
    (status 3 is the ``step`` mode's "commit finished"); return the status."""
    proc = start_writer(pool, progress, mode, param)
    try:
        if mode == "loop":
            assert proc.stderr is not None
            line = proc.stderr.readline()
            assert line == b"ready\n", line + proc.stderr.read()
            time.sleep(rng.uniform(0.02, 0.4))
            proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode in (-signal.SIGKILL, 3), err.decode(errors="replace")
    return proc.returncode


def check_pool(path: Path, rec: int) -> int:
    """Open (recovering), compare with the model, check for leaks; return ``root['n']``."""
    with pmemobj.open(str(path)) as pool:
        n = pool.root["n"]
        assert n in allowed_states(rec), (n, rec)
        assert workload.snapshot(pool) == workload.model_after(n)
        workload.assert_no_leaks(pool)
    return n


def new_pool(path: Path) -> None:
    with pmemobj.create(str(path), pool_size=POOL_SIZE) as pool:
        workload.init_pool(pool)


def crash_series(pool: Path, progress: Path, runs: list[tuple[str, int]], seed: int,
                 check_extra=None) -> list[tuple[int, int]]:
    """Run the kills; return ``(root['n'], last recorded transaction)`` of each."""
    rng = random.Random(seed)
    out = []
    for mode, param in runs:
        run_writer(pool, progress, mode, param, rng)
        rec = read_progress(progress)
        if check_extra is not None:
            check_extra(rec)
        out.append((check_pool(pool, rec), rec))
    return out


def test_sigkill_between_commit_steps(pool_dir: Path) -> None:
    """24 kills at the k-th flush/drain of the pool set: every step of the commit path
    (new objects, log, in-place data, drain, spilled logs) gets interrupted."""
    pool, progress = pool_dir / "objs.pool", pool_dir / "progress"
    new_pool(pool)
    rng = random.Random(6)
    runs = [("flush", rng.randrange(2, 160)) for _ in range(24)]
    states = crash_series(pool, progress, runs, seed=1)
    assert states[-1][0] > 50                              # the runs made progress
    # both outcomes happened: the transaction in flight was rolled back, and it was
    # found committed (its log complete: replayed on open)
    assert any(n == rec + 1 for n, rec in states)
    assert any(n <= rec for n, rec in states)


def test_sigkill_during_recovery(pool_dir: Path) -> None:
    """8 kills while opening after a kill: during log replay, gc of orphans, or the
    first commits; then 8 more ordinary kills in between so there is something to
    recover."""
    pool, progress = pool_dir / "objs.pool", pool_dir / "progress"
    new_pool(pool)
    rng = random.Random(8)
    runs = []
    for _ in range(8):
        runs += [("flush", rng.randrange(2, 60)), ("openflush", rng.randrange(1, 12))]
    states = crash_series(pool, progress, runs, seed=5)
    assert states[-1][0] > states[0][0]  # commits went on between the kills: each recovered


def test_sigkill_inside_transaction_bodies(pool_dir: Path) -> None:
    """12 kills before an operation of a transaction body or just before its commit."""
    pool, progress = pool_dir / "objs.pool", pool_dir / "progress"
    new_pool(pool)
    runs = [("body", p) for p in random.Random(7).sample(range(10000), 12)]
    states = crash_series(pool, progress, runs, seed=2)
    assert states[-1][0] > states[0][0]  # transactions committed between the kills


def test_sigkill_at_random_times(pool_dir: Path) -> None:
    """10 kills from outside at random times while the writer commits continuously."""
    pool, progress = pool_dir / "objs.pool", pool_dir / "progress"
    new_pool(pool)
    states = crash_series(pool, progress, [("loop", 0)] * 10, seed=3)
    assert states[-1][0] > states[0][0]  # transactions committed between the kills


def replica_set(pool_dir: Path) -> tuple[Path, Path, Path]:
    master, replica = pool_dir / "master.part", pool_dir / "replica.part"
    set_file = write_set(pool_dir / "objs.set", f"{POOL_SIZE} {master}", "REPLICA",
                         f"{POOL_SIZE} {replica}")
    return set_file, master, replica


def test_sigkill_at_every_step_of_commits_with_a_replica(pool_dir: Path) -> None:
    """For 3 transactions: kill at the 1st flush of its commit and the checkpoint after
    it, then (after checking and recovering) rerun it and kill at the 2nd, ... until both
    are done. Each time both the master and the replica (opened on its own) must hold a
    consistent state."""
    set_file, _master, replica = replica_set(pool_dir)
    progress, copy = pool_dir / "progress", pool_dir / "replica-copy.pool"
    new_pool(set_file)
    rng = random.Random(12)
    steps = 0
    for _ in range(3):
        step = 1
        while True:
            status = run_writer(set_file, progress, "step", step, rng)
            rec = read_progress(progress)
            shutil.copyfile(replica, copy)
            check_pool(promoted(copy), rec)
            check_pool(set_file, rec)
            if status == 3:
                break
            step += 1
        steps += step
    assert steps > 12


def test_sigkill_with_a_local_replica(pool_dir: Path) -> None:
    """10 kills of a writer on a pool set with a local replica. After each kill the
    replica, opened on its own (as replica-sync would promote it), must also hold a
    consistent state of the same history; after the master's clean close the replica's
    data is byte-identical to the master's."""
    set_file, master, replica = replica_set(pool_dir)
    progress = pool_dir / "progress"
    new_pool(set_file)
    copy = pool_dir / "replica-copy.pool"

    def check_replica(rec: int) -> None:
        # the replica as it was left by the killed writer, before the master's recovery
        shutil.copyfile(replica, copy)
        check_pool(promoted(copy), rec)
        copy.unlink()

    rng = random.Random(11)
    runs = [("flush", rng.randrange(2, 120)) for _ in range(6)] + [("loop", 0)] * 4
    crash_series(set_file, progress, runs, seed=4, check_extra=check_replica)
    with pmemobj.open(str(set_file)) as pool:          # clean open and close
        pool.root["d"]["last"] = "clean"
        ranges = used_ranges(pool)
        expected = workload.snapshot(pool)
    # Free space may still differ (bytes of killed transactions that never reached the
    # replica); everything in use must not.
    m, r = master.read_bytes(), replica.read_bytes()
    assert [m[a:b] for a, b in ranges] == [r[a:b] for a, b in ranges]
    shutil.copyfile(replica, copy)
    with pmemobj.open(str(promoted(copy))) as pool:
        assert workload.snapshot(pool) == expected


def used_ranges(pool: pmemobj.PersistentObjectPool) -> list[tuple[int, int]]:
    """Byte ranges (file offsets of a one-part replica) of metadata and allocations."""
    geo = pool._geo
    q = pool._eng.q
    inline = 8 * q[(geo.log >> 3) + 2] if q[(geo.log >> 3) + 3] == 0 else 0
    out = [(geo.sb, geo.log), (geo.log, geo.log + 64 + inline)]
    for oid, size, _tn, _code in pool._heap.allocations():
        out.append((oid - layout.ALLOC_HDR, oid + size))
    for ch, run in pool._heap.runs.items():
        out.append((run.base, run.base + run.first))
    return out

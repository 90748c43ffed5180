"""The activity log (pmreplica.activity): a pool set whose process died while it was open
is brought in line on every replica when it is opened again, from the areas its last
session handed to persist, flush or deep persist; replica-sync does the same when it runs
first. The deaths are real (SIGKILL of the process that has the pool open, agents killed
with the data they had not applied); only the power-loss version lives in
tests/powerloss."""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pmreplica import activity, cli, info, sync
from pmreplica.hookspecs import hookimpl
from pmreplica.poolset import PoolSet
from pmreplica.status import FAILED, OK, STALE
from pmreplica.sync.command import render

from .helpers import HDR, run_python, small_tmpfs, start_python, write_set
from .rpmem_helpers import M, local_node, remote_bytes, transport  # noqa: F401

pytestmark = pytest.mark.timeout(90)

#: the session that dies: a persist, a store into the same chunk whose persist never
#: comes, a store into a chunk no call named; then the process is killed
KILLED = """
import os, signal, sys
from pmreplica import PoolSet
ps = PoolSet.open(sys.argv[1])
off, far = int(sys.argv[2]), int(sys.argv[3])
ps.buf[off:off + 5] = b"first"
ps.persist(off, 5)
ps.buf[off:off + 5] = b"AFTER"
ps.buf[far:far + 5] = b"NEVER"
os.kill(os.getpid(), signal.SIGKILL)
"""
OFF, FAR = 2 * M + 100, 12 * M + 100


class Resyncs:
    """A host application's hooks: the bytes each replica's resync copied."""

    def __init__(self) -> None:
        self.totals: dict[int, int] = {}

    @hookimpl
    def pmreplica_sync_progress(self, replica, phase, done, total):
        if phase == "resync":
            self.totals[replica.index] = total


def three_replicas(d: Path, size: str = "16M") -> Path:
    path = write_set(d / "p.set", f"{size} {d}/m", "REPLICA", f"{size} {d}/r1", "REPLICA",
                     f"{size} {d}/r2")
    PoolSet.create(path).close()
    return path


def kill_a_session(path: Path) -> None:
    done = run_python(KILLED, str(path), str(OFF), str(FAR))
    assert done.returncode == -signal.SIGKILL, done.stderr


def marker(d: Path) -> activity.Marker | None:
    with open(d / "m", "rb") as f:
        return activity.read_marker(f.read(HDR))


def data(path: Path) -> bytes:
    return path.read_bytes()[HDR:]


def test_a_killed_sessions_persisted_areas_reach_every_replica_on_reopen(pool_dir, caplog):
    """The replicas lack the store whose persist never came; the reopen copies the chunk
    it lies in (1 MiB, not the pool) to both before it returns, every replica in step."""
    d = pool_dir
    path = three_replicas(d)
    kill_a_session(path)
    assert marker(d) is not None and (d / "m.pmractive").exists()
    for r in ("r1", "r2"):
        assert (d / r).read_bytes()[OFF:OFF + 5] == b"first"  # what the kill left
    assert (d / "m").read_bytes()[OFF:OFF + 5] == b"AFTER"
    hook = Resyncs()
    with PoolSet.open(path, plugins=[hook]) as ps:
        assert [s.state for s in ps.replicas] == [OK, OK, OK]
        assert ps.stale_replicas == []
    assert "was not closed cleanly: the 1 MiB it was writing to" in caplog.text
    assert hook.totals == {1: M, 2: M}  # the chunk at 2 MiB
    for r in ("r1", "r2"):
        assert (d / r).read_bytes()[OFF:OFF + 5] == b"AFTER"
    # a chunk no call named is outside the log: as in PMDK, its bytes are undefined
    assert (d / "r1").read_bytes()[FAR:FAR + 5] == bytes(5)
    assert marker(d) is None and not (d / "m.pmractive").exists()
    caplog.clear()
    with PoolSet.open(path, plugins=[hook := Resyncs()]):  # closed cleanly: nothing to do
        pass
    assert hook.totals == {} and "not closed cleanly" not in caplog.text


def test_a_clean_close_leaves_no_marker_and_no_log(pool_dir):
    d = pool_dir
    path = three_replicas(d)
    with PoolSet.open(path) as ps:
        assert marker(d) is not None
        log = activity.read_log(str(d / "m.pmractive"), marker(d).session, ps.size)
        assert log == []  # nothing written yet
        ps.buf[OFF:OFF + 3] = b"abc"
        ps.persist(OFF, 3)
        ps.buf[5 * M - 2:5 * M + 2] = b"wxyz"
        ps.flush(5 * M - 2, 4, lane=1)
        ps.drain(lane=1)
        log = activity.read_log(str(d / "m.pmractive"), marker(d).session, ps.size)
        assert log == [(2 * M, M), (4 * M, 2 * M)]
    assert marker(d) is None and not (d / "m.pmractive").exists()


def test_a_flush_never_drained_makes_the_close_unclean(pool_dir):
    """A range flushed and not drained when the pool is closed may not be on a replica:
    the session does not count as closed, and the next open brings the range in line."""
    d = pool_dir
    path = three_replicas(d)
    with PoolSet.open(path) as ps:
        ps.buf[OFF:OFF + 3] = b"abc"
        ps.flush(OFF, 3, lane=2)
    assert marker(d) is not None
    hook = Resyncs()
    with PoolSet.open(path, plugins=[hook]) as ps:
        assert [s.state for s in ps.replicas] == [OK, OK, OK]
    assert hook.totals == {1: M, 2: M}
    assert marker(d) is None


def test_a_persist_that_never_returned_reaches_a_remote_replica_on_reopen(local_node, pool_dir,
                                                                           monkeypatch):
    """The process dies inside a persist while the remote agent is stopped: the master and
    the local replica hold the range, the agent is killed with it unapplied. The reopen
    brings it to the remote replica too."""
    node, d = local_node, pool_dir
    node.use_env(monkeypatch)
    rparts = node.make_set("r.set")
    path = write_set(d / "p.set", f"8M {d}/m", "REPLICA", f"8M {d}/l",
                     f"REPLICA {node.target} r.set")
    PoolSet.create(path).close()
    off = 3 * M + 4096
    code = """
import sys
from pmreplica import PoolSet
ps = PoolSet.open(sys.argv[1])
off = int(sys.argv[2])
print("open", flush=True)
sys.stdin.readline()
ps.buf[off:off + 4096] = b"S" * 4096
ps.persist(off, 4096)
print("returned", flush=True)
"""
    proc = start_python(code, str(path), str(off))
    pids: list[int] = []
    try:
        assert proc.stdout.readline().strip() == "open", proc.stderr.read()
        pids = node.kill_agents(signal.SIGSTOP)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 10
        while (d / "l").read_bytes()[off:off + 4096] != b"S" * 4096:
            assert time.monotonic() < deadline, "the local replica never got the range"
            time.sleep(0.02)
        time.sleep(0.2)  # the remote flush goes out after the local one
        assert proc.poll() is None  # still waiting for the stopped agent
    finally:
        proc.kill()
        proc.wait()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        node.wait_agents_gone()
    assert remote_bytes(rparts)[off:off + 4096] != b"S" * 4096
    with PoolSet.open(path) as ps:
        assert [s.state for s in ps.replicas] == [OK, OK, OK]
    assert remote_bytes(rparts)[off:off + 4096] == b"S" * 4096
    assert remote_bytes(rparts)[HDR:] == data(d / "m")


def test_a_lost_log_brings_the_whole_pool_in_line(pool_dir, caplog):
    """Without its log (deleted, on a disk that failed), an unclean session may have
    written anywhere: the reopen copies the whole pool, the store no call named included."""
    d = pool_dir
    path = three_replicas(d)
    kill_a_session(path)
    (d / "m.pmractive").unlink()
    hook = Resyncs()
    with PoolSet.open(path, plugins=[hook]) as ps:
        assert [s.state for s in ps.replicas] == [OK, OK, OK]
        size = ps.size
    assert "activity log is missing or damaged" in caplog.text
    assert hook.totals == {1: size - HDR, 2: size - HDR}
    assert data(d / "r1") == data(d / "r2") == data(d / "m")


def test_a_replica_missing_at_the_reopen_keeps_what_it_lacks_for_replica_sync(pool_dir):
    """A replica that cannot be opened when the unclean session is recovered stays stale
    with the session's areas in the record; replica-sync brings them once it is back."""
    d = pool_dir
    path = three_replicas(d)
    kill_a_session(path)
    os.rename(d / "r2", d / "r2.away")
    with PoolSet.open(path) as ps:
        assert [s.state for s in ps.replicas] == [OK, OK, FAILED]
        assert [s.index for s in ps.stale_replicas] == [2]
    os.rename(d / "r2.away", d / "r2")
    assert (d / "r2").read_bytes()[OFF:OFF + 5] == b"first"
    rep = sync.sync(path)
    assert rep.status == sync.OK_REPAIRED, rep
    assert (d / "r2").read_bytes()[OFF:OFF + 5] == b"AFTER"
    with PoolSet.open(path) as ps:
        assert [s.state for s in ps.replicas] == [OK, OK, OK]


def test_a_recovery_cut_short_by_a_kill_is_finished_by_the_next_open(pool_dir):
    """The process recovering the pool dies while it resyncs replica 1: both replicas are
    still named in the marker, and the next open brings both in line."""
    d = pool_dir
    path = three_replicas(d)
    kill_a_session(path)
    code = """
import os, signal, sys
from pmreplica import PoolSet, hookimpl
class Die:
    @hookimpl
    def pmreplica_sync_progress(self, replica, phase, done, total):
        if phase == "resync" and done:
            os.kill(os.getpid(), signal.SIGKILL)
PoolSet.open(sys.argv[1], plugins=[Die()])
"""
    done = run_python(code, str(path))
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert marker(d) is not None
    with PoolSet.open(path) as ps:
        assert [s.state for s in ps.replicas] == [OK, OK, OK]
    for r in ("r1", "r2"):
        assert (d / r).read_bytes()[OFF:OFF + 5] == b"AFTER"
    assert marker(d) is None


def test_replica_sync_brings_an_unclean_session_in_line(pool_dir):
    """Run before any reopen: check reports the unclean session without touching it; sync
    copies what the session was writing, and the next open has nothing left to do."""
    d = pool_dir
    path = three_replicas(d)
    kill_a_session(path)
    shown = "\n".join(info.render(info.gather(str(path))))
    assert "Open session             : open, or not closed cleanly: 1048576 bytes" in shown
    rep = sync.check(path)
    assert rep.unclean and rep.status == sync.NEEDS_REPAIR, rep
    assert [r.health for r in rep.replicas][1:] == [STALE, STALE]
    assert "not closed cleanly" in "\n".join(render(rep))
    assert marker(d) is not None and marker(d).session  # a check writes nothing
    rep = sync.sync(path)
    assert rep.unclean and rep.status == sync.OK_REPAIRED, rep
    for r in ("r1", "r2"):
        assert (d / r).read_bytes()[OFF:OFF + 5] == b"AFTER"
    assert marker(d) is None  # every replica in line: the session is over
    assert "Open session" not in "\n".join(info.render(info.gather(str(path))))
    hook = Resyncs()
    with PoolSet.open(path, plugins=[hook]) as ps:
        assert [s.state for s in ps.replicas] == [OK, OK, OK]
    assert hook.totals == {}
    assert sync.check(path).status == sync.OK_HEALTHY


@pytest.fixture
def full_fs(pool_dir: Path) -> Iterator[Path]:
    """A 6 MiB tmpfs, to be filled up."""
    with small_tmpfs(pool_dir / "small", "6m") as mnt:
        yield mnt


def test_a_log_that_cannot_be_made_on_a_full_disk_makes_a_crash_recover_the_whole_pool(
        pool_dir, full_fs):
    """The master's file system is full: the session keeps no log, the pool works on, and
    the marker says so, so that a crash is recovered over the whole pool."""
    mnt = full_fs
    path = write_set(pool_dir / "p.set", f"4M {mnt}/m", "REPLICA", f"4M {pool_dir}/r1")
    PoolSet.create(path).close()
    st = os.statvfs(mnt)
    with open(mnt / "filler", "wb") as f:
        os.posix_fallocate(f.fileno(), 0, st.f_bavail * st.f_frsize)
    with pytest.raises(OSError) as full:
        (mnt / "probe").write_bytes(b"x" * 4096)
    assert full.value.errno == errno.ENOSPC
    code = """
import logging, os, signal, sys
from pmreplica import PoolSet
logging.basicConfig()
ps = PoolSet.open(sys.argv[1])
ps.buf[3 * 2**20:3 * 2**20 + 4] = b"LAST"
ps.persist(3 * 2**20, 4)
ps.buf[3 * 2**20:3 * 2**20 + 4] = b"lost"
os.kill(os.getpid(), signal.SIGKILL)
"""
    done = run_python(code, str(path))
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert "cannot keep an activity log" in done.stderr
    assert not (mnt / "m.pmractive").exists()
    with open(mnt / "m", "rb") as f:
        assert activity.read_marker(f.read(HDR)) == activity.Marker(0, logged=False)
    hook = Resyncs()
    with PoolSet.open(path, plugins=[hook]) as ps:
        assert [s.state for s in ps.replicas] == [OK, OK]
        size = ps.size
    assert hook.totals == {1: size - HDR}
    assert data(pool_dir / "r1") == data(mnt / "m")


def test_rm_removes_an_unclean_sessions_log(pool_dir):
    d = pool_dir
    path = three_replicas(d)
    kill_a_session(path)
    assert (d / "m.pmractive").exists()
    assert cli.main(["rm", str(path)]) == 0
    assert sorted(p.name for p in d.iterdir()) == ["p.set"]


class InterruptedPlugin:
    """A plugin whose open hook is interrupted (Ctrl-C): the open stops there (a bug of
    the plugin's would only fail its replica)."""

    @hookimpl(tryfirst=True)
    def pmreplica_open_replica(self, spec, index, poolset, create):
        raise KeyboardInterrupt


def test_an_open_that_fails_after_the_recovery_leaves_it_to_the_next(pool_dir):
    """The open that folded an unclean session in fails before its own session began
    (interrupted): its close leaves the recovery's marker, and the next open finishes."""
    d = pool_dir
    path = three_replicas(d)
    kill_a_session(path)
    with pytest.raises(KeyboardInterrupt):
        PoolSet.open(path, plugins=[InterruptedPlugin()])
    assert marker(d) == activity.Marker(0)  # a session of nothing: the areas are recorded
    with PoolSet.open(path) as ps:
        assert [s.state for s in ps.replicas] == [OK, OK, OK]
    for r in ("r1", "r2"):
        assert (d / r).read_bytes()[OFF:OFF + 5] == b"AFTER"


def test_replica_sync_repairs_a_broken_master_after_an_unclean_session(pool_dir):
    """The master's header is damaged after the session died: replica-sync repairs the
    master from a replica as it would after a clean close (the session is not folded into
    a record that is not sound), and the next open brings the replicas in line with it."""
    d = pool_dir
    path = three_replicas(d)
    kill_a_session(path)
    with open(d / "m", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    rep = sync.sync(path)
    assert rep.status == sync.OK_REPAIRED, (rep.reason, [r.health for r in rep.replicas])
    assert marker(d) is not None  # kept with the records of part 0's page
    with PoolSet.open(path) as ps:
        assert [s.state for s in ps.replicas] == [OK, OK, OK]
    assert data(d / "r1") == data(d / "r2") == data(d / "m")


def test_a_log_path_that_is_a_link_is_not_followed(pool_dir):
    """Something else stands where the log goes (a link to another file): it is left as it
    is, and the session keeps no log (a crash would bring the whole pool in line)."""
    d = pool_dir
    path = three_replicas(d)
    victim = d / "victim"
    victim.write_bytes(b"v" * 15000)
    (d / "m.pmractive").symlink_to(victim)
    with PoolSet.open(path) as ps:
        assert marker(d) == activity.Marker(0, logged=False)
        ps.buf[OFF:OFF + 3] = b"abc"
        ps.persist(OFF, 3)
    assert victim.read_bytes() == b"v" * 15000
    assert (d / "m.pmractive").is_symlink() and marker(d) is None


def test_a_flush_drained_by_a_later_persist_on_its_lane_closes_cleanly(pool_dir):
    d = pool_dir
    path = three_replicas(d)
    with PoolSet.open(path) as ps:
        ps.buf[OFF:OFF + 3] = b"abc"
        ps.flush(OFF, 3, lane=1)
        ps.buf[5 * M:5 * M + 3] = b"def"
        ps.persist(5 * M, 3, lane=1)
    assert marker(d) is None


def test_empty_ranges_at_the_pools_end_while_healthy(pool_dir):
    """persist, flush and deep persist of no bytes at the very end of a pool whose size is
    a whole number of log chunks (16 MiB)."""
    path = three_replicas(pool_dir)
    with PoolSet.open(path) as ps:
        assert ps.size == 16 * M
        ps.persist(ps.size, 0)
        ps.flush(ps.size, 0)
        ps.drain()
        ps.deep_persist(ps.size, 0)
        assert [s.state for s in ps.replicas] == [OK, OK, OK]


# -- epochs: the log holds what the session named lately, not all it ever touched --------------
#: a session that persists into every chunk of a 64 MiB pool in turn (one epoch = 2 chunks
#: new to the log, PMREPLICA_ACTIVITY_MIB=4), keeps persisting into a hot chunk (1) as it
#: goes, flushes chunk 60 on lane 3 without draining it, names chunks 20-25 again, stores
#: into chunk 62 and is killed before the persist of that store
LONG_SESSION = """
import os, signal, sys
from pmreplica import PoolSet
M = 1 << 20
ps = PoolSet.open(sys.argv[1])
for k in range(2, 60):
    ps.buf[k * M + 7:k * M + 12] = b"chunk"
    ps.persist(k * M + 7, 5, lane=k % 2)
    ps.buf[M + 8 * k:M + 8 * k + 8] = k.to_bytes(8, "little")
    ps.persist(M + 8 * k, 8, lane=2)
ps.buf[60 * M:60 * M + 7] = b"flushed"
ps.flush(60 * M, 7, lane=3)
for k in range(20, 26):  # more epochs go by while the flush is not drained
    ps.persist(k * M + 7, 5)
    ps.persist(M + 8 * k, 8, lane=2)
ps.buf[62 * M:62 * M + 5] = b"store"
os.kill(os.getpid(), signal.SIGKILL)
"""


def small_epochs(monkeypatch) -> dict[str, str]:
    monkeypatch.setenv("PMREPLICA_ACTIVITY_MIB", "4")
    return {**os.environ, "PMREPLICA_ACTIVITY_MIB": "4"}


def test_a_long_sessions_log_holds_only_its_recent_chunks(pool_dir, monkeypatch):
    """After 58 chunks, the log of a killed session holds the last epochs' chunks, the hot
    one and the one flushed without a drain; the reopen copies those (a few MiB, not the
    58 written) and leaves every replica equal to the master, but for the store whose
    persist never came (outside the log, undefined as in PMDK)."""
    d = pool_dir
    path = three_replicas(d, "64M")
    done = run_python(LONG_SESSION, str(path), env=small_epochs(monkeypatch))
    assert done.returncode == -signal.SIGKILL, done.stderr
    mark = marker(d)
    assert mark is not None and mark.logged
    chunks = {off // M for off, n in activity.read_log(str(d / "m.pmractive"), mark.session,
                                                        64 * M) for off in range(off, off + n, M)}
    assert {1, 25, 60} <= chunks, chunks  # hot, last named, flushed and not drained
    assert len(chunks) <= 8, chunks  # not the 58 chunks the session wrote
    assert not chunks & (set(range(2, 20)) | set(range(26, 60))), chunks  # let go of
    assert (d / "r1").read_bytes()[60 * M:60 * M + 7] == b"flushed"  # this test's replicas
    hook = Resyncs()
    with PoolSet.open(path, plugins=[hook]) as ps:
        assert [s.state for s in ps.replicas] == [OK, OK, OK]
        master = bytes(ps.buf[HDR:])
    assert hook.totals == {1: len(chunks) * M, 2: len(chunks) * M}
    for r in ("r1", "r2"):
        replica = data(d / r)
        assert replica[62 * M - HDR:62 * M - HDR + 5] == bytes(5)  # the store never persisted
        assert replica[:62 * M - HDR] == master[:62 * M - HDR]
        assert replica[63 * M - HDR:] == master[63 * M - HDR:]
    for k in range(2, 60):
        assert master[k * M + 7 - HDR:k * M + 12 - HDR] == b"chunk"


class HeldFlush:
    """Replica 1's flush on lane 0 held until ``release`` is set (forced, by a wrapper of
    its target: a replica slow to take a write, while other lanes go on)."""

    def __init__(self, pool: PoolSet) -> None:
        import threading
        self.entered, self.release = threading.Event(), threading.Event()
        _, target = pool._active[0]
        flush = target.flush

        def held(off, n, lane=0, flags=0):
            if lane == 0:
                self.entered.set()
                assert self.release.wait(30)
            return flush(off, n, lane, flags)

        target.flush = held


def test_an_epoch_keeps_the_chunk_of_a_call_still_in_flight(pool_dir, monkeypatch):
    """A persist on lane 0 held inside replica 1 while lane 1 names chunk after chunk: the
    held persist's chunk stays in the log (a crash then would leave it on the master and
    not on replica 1), since no epoch ends while a call of the one before is in flight.
    Once it returns, the next epochs let it go, with the rest."""
    import threading

    d = pool_dir
    path = three_replicas(d, "64M")
    small_epochs(monkeypatch)

    def logged(ps: PoolSet) -> set[int]:
        mark = marker(d)
        assert mark is not None
        return {off // M for off, n in activity.read_log(str(d / "m.pmractive"), mark.session,
                                                          ps.size) for off in range(off, off + n, M)}

    with PoolSet.open(path) as ps:
        held = HeldFlush(ps)
        ps.buf[30 * M:30 * M + 4] = b"held"
        thread = threading.Thread(target=ps.persist, args=(30 * M, 4, 0))
        thread.start()
        assert held.entered.wait(10)
        for k in range(2, 20):
            ps.persist(k * M, 8, lane=1)
        assert 30 in logged(ps), logged(ps)
        held.release.set()
        thread.join(10)
        for k in range(40, 50):
            ps.persist(k * M, 8, lane=1)
        assert not {2, 3, 4, 5, 30} & logged(ps), logged(ps)
    assert data(d / "r1")[30 * M - HDR:30 * M - HDR + 4] == b"held"


def test_a_bad_activity_size_is_refused_at_open(pool_dir, monkeypatch):
    path = three_replicas(pool_dir)
    monkeypatch.setenv("PMREPLICA_ACTIVITY_MIB", "lots")
    with pytest.raises(OSError) as e:
        PoolSet.open(path)
    assert e.value.errno == errno.EINVAL
    assert "PMREPLICA_ACTIVITY_MIB='lots': a number of MiB (1 or more) is wanted" in str(e.value)
    monkeypatch.setenv("PMREPLICA_ACTIVITY_MIB", "2")
    PoolSet.open(path).close()  # nothing was left behind


def test_a_large_pools_unclean_reopen_copies_the_logs_chunks(pool_dir):
    """A 64 GiB pool (sparse): the record's coarse chunks are 16 MiB there, the log's 1
    MiB; the reopen after a kill copies the log's chunk (the fine map is saved beside the
    record it folds into), not the coarse one around it."""
    d = pool_dir
    path = write_set(d / "p.set", f"64G {d}/m", "REPLICA", f"64G {d}/r1")
    PoolSet.create(path, sparse=True).close()
    off = 40 * (1 << 30) + 100
    done = run_python(KILLED, str(path), str(off), str(off + (2 << 30)))
    assert done.returncode == -signal.SIGKILL, done.stderr
    hook = Resyncs()
    with PoolSet.open(path, plugins=[hook]) as ps:
        assert [s.state for s in ps.replicas] == [OK, OK]
        assert ps.state.chunk == 16 * M  # the coarse maps' chunk
    assert hook.totals == {1: M}
    with open(d / "r1", "rb") as f:
        f.seek(off)
        assert f.read(5) == b"AFTER"
    assert not (d / "m.pmrdirty").exists()  # nothing stale: the side file is gone

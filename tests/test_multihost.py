"""Remote replicas on other hosts (network namespaces with their own sshd: tests/fixtures/
hosts.py), failing as networks and hosts fail: a link that goes silent, a host whose
processes all die, a host that freezes. A replica that stops answering is failed within
the peer timeout, the application's persists never wait on it longer, the other hosts keep
byte-exact copies, and once the host is back replica-sync copies only what it missed."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pmreplica import generation, sync
from pmreplica.header import HDR_SIZE
from pmreplica.hookspecs import hookimpl
from pmreplica.poolset import PoolSet
from pmreplica.rpmem.address import parse_target
from pmreplica.rpmem.environ import RpmemConfig
from pmreplica.rpmem.ssh.connections import ConnectionPool
from pmreplica.rpmem.ssh.launcher import ParamikoLauncher
from pmreplica.rpmem.ssh.settings import resolve
from pmreplica.status import FAILED, OK, STALE

from .fixtures.hosts import HostBed
from .helpers import write_set
from .rpmem_helpers import M, remote_bytes

pytestmark = pytest.mark.timeout(120)

SIZE = 32 * M
PEER_TIMEOUT = 1.0
#: what the tests allow a verdict beyond the peer timeout (a loaded 2-CPU machine)
MARGIN = 1.5


class Events:
    """A host application's hooks: each failure and restore, with when it was reported."""

    def __init__(self) -> None:
        self.failed: list[tuple[float, int, BaseException]] = []
        self.restored: list[int] = []

    @hookimpl
    def pmreplica_replica_failed(self, replica, error):
        self.failed.append((time.monotonic(), replica.index, error))

    @hookimpl
    def pmreplica_replica_restored(self, replica):
        self.restored.append(replica.index)


class Writer(threading.Thread):
    """Persists random ranges on its lane until stopped; the longest a persist took. Each
    lane writes its own eighth of the pool: lanes are independent paths, so writers that
    overlap would race (as with librpmem, the last store is not the last one applied)."""

    def __init__(self, pool: PoolSet, lane: int = 0, length: int = 64 << 10,
                 seed: int = 0) -> None:
        super().__init__(name=f"writer {lane}")
        self.pool, self.lane, self.length = pool, lane, length
        self.lo = HDR_SIZE + lane * (SIZE // 8)
        self.hi = self.lo + SIZE // 8 - HDR_SIZE
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.longest = 0.0
        self.count = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                n = self.rng.randrange(1, self.length)
                off = self.rng.randrange(self.lo, self.hi - n)
                self.pool.buf[off:off + n] = self.rng.randbytes(n)
                t0 = time.monotonic()
                self.pool.persist(off, n, self.lane)
                self.longest = max(self.longest, time.monotonic() - t0)
                self.count += 1
        except BaseException as e:  # the test reports it
            self.error = e

    def finish(self) -> None:
        self.stop.set()
        self.join(30)
        assert not self.is_alive(), "a writer hangs"
        assert self.error is None, self.error


def make_set(bed: HostBed, d: Path, names: tuple[str, ...]) -> Path:
    """A master on tmpfs and a remote replica ``r.set`` on each host of ``names``."""
    for name in names:
        host = bed[name]
        (host.dir / "r.set").write_text(f"PMEMPOOLSET\n{SIZE} {host.dir}/r.part0\n")
    return write_set(d / "p.set", f"{SIZE} {d}/m",
                     *(f"REPLICA {name} r.set" for name in names))


def replica_sync(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The replica-sync command, as another process."""
    return subprocess.run([str(Path(sys.executable).parent / "replica-sync"), *args,
                           str(path)], capture_output=True, text=True, timeout=60)


@contextlib.contextmanager
def created(bed: HostBed, d: Path, names: tuple[str, ...]) -> Iterator[tuple[Path, PoolSet,
                                                                             Events]]:
    """:func:`make_set`, created, then opened with an :class:`Events` recorder."""
    path = make_set(bed, d, names)
    PoolSet.create(path).close()
    events = Events()
    with PoolSet.open(path, plugins=[events]) as pool:
        yield path, pool, events


def data(path: Path) -> bytes:
    """The pool's data range as a part file holds it (read by another process)."""
    return remote_bytes([(SIZE, path)])[HDR_SIZE:]


@pytest.fixture
def bed(hosts: HostBed, monkeypatch: pytest.MonkeyPatch) -> HostBed:
    for key, value in hosts.env(PMREPLICA_PEER_TIMEOUT=str(PEER_TIMEOUT)).items():
        monkeypatch.setenv(key, value)
    for key in set(os.environ) - set(hosts.env()):
        monkeypatch.delenv(key)
    return hosts


def test_a_silent_cut_degrades_within_the_peer_timeout_and_the_others_stay_exact(
        bed, pool_dir):
    with created(bed, pool_dir, ("h1", "h2", "h3")) as (path, pool, events):
        writers = [Writer(pool, lane, seed=lane) for lane in range(2)]
        for w in writers:
            w.start()
        time.sleep(0.5)
        cut = time.monotonic()
        bed["h3"].cut()
        time.sleep(PEER_TIMEOUT + MARGIN + 0.5)
        counts = [w.count for w in writers]
        time.sleep(0.3)
        for w in writers:
            w.finish()
        assert all(w.count > c for w, c in zip(writers, counts)), "persists stopped"
        assert [(i, e.errno) for _, i, e in events.failed] == [(3, errno.ETIMEDOUT)]
        when = events.failed[0][0] - cut
        assert when < PEER_TIMEOUT + MARGIN, f"failed {when:.2f} s after the cut"
        longest = max(w.longest for w in writers)
        assert longest < PEER_TIMEOUT + MARGIN, f"a persist waited {longest:.2f} s"
        assert [r.state for r in pool.replicas] == [OK, OK, OK, FAILED]
        # the hosts still in step recorded a generation the cut one missed, before any
        # persist that skipped it returned: h3 can never be promoted over them
        gens = [generation.load(str(bed[h].dir / "r.part0")) for h in ("h1", "h2", "h3")]
        assert gens[0] == gens[1] == pool.generation
        assert gens[0].relation(gens[2]) == generation.AHEAD
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 2, "closing waited on the cut host"
    master = data(pool_dir / "m")
    assert data(bed["h1"].dir / "r.part0") == master
    assert data(bed["h2"].dir / "r.part0") == master
    with PoolSet.open(path) as pool:  # the cut host is still away: degraded, marked stale
        assert pool.replicas[3].state == FAILED
        assert [s.index for s in pool.stale_replicas] == [3]


def test_heal_then_replica_sync_copies_only_what_was_missed(bed, pool_dir):
    path = make_set(bed, pool_dir, ("h1", "h2"))
    PoolSet.create(path).close()
    with PoolSet.open(path) as pool:
        pool.buf[HDR_SIZE:] = random.Random(1).randbytes(SIZE - HDR_SIZE)
        pool.persist(HDR_SIZE, SIZE - HDR_SIZE)
        bed["h2"].cut()
        rng = random.Random(2)
        written = 0
        for _ in range(40):  # scattered small writes while h2 is away
            off = rng.randrange(HDR_SIZE, SIZE - 4096)
            pool.buf[off:off + 4096] = rng.randbytes(4096)
            pool.persist(off, 4096)
            written += 4096
        assert pool.replicas[2].state == FAILED
    bed["h2"].heal()
    assert not bed["h2"].wait_agents_gone(), "the cut-off agent did not give its client up"
    done = replica_sync(path, "--json")
    report = json.loads(done.stdout)
    assert done.returncode == 1, report
    r2 = report["replicas"][2]
    assert (r2["health"], r2["action"], r2["result"]) == ("stale", "resync dirty chunks",
                                                          "repaired")
    # only the chunks written while it was away, never the whole pool
    chunk = report["record"]["chunk_size"]
    assert report["copied"] <= 40 * (4096 + chunk), report["copied"]
    assert report["copied"] < SIZE // 4
    master = data(pool_dir / "m")
    assert data(bed["h2"].dir / "r.part0") == master
    with PoolSet.open(path) as pool:
        assert [r.state for r in pool.replicas] == [OK, OK, OK]


def test_heal_then_online_resync_copies_only_what_was_missed(bed, pool_dir):
    with created(bed, pool_dir, ("h1", "h2")) as (path, pool, events):
        bed["h2"].cut()
        rng = random.Random(4)
        for _ in range(40):  # the first persist finds h2 gone; the rest go on without it
            off = rng.randrange(HDR_SIZE, SIZE - 4096)
            pool.buf[off:off + 4096] = rng.randbytes(4096)
            pool.persist(off, 4096)
        assert pool.replicas[2].state == FAILED
        bed["h2"].heal()
        assert not bed["h2"].wait_agents_gone()
        copied = pool.resync(2)  # the application goes on meanwhile, online
        assert 0 < copied <= 40 * (4096 + pool.state.chunk) and copied < SIZE // 4
        assert [r.state for r in pool.replicas] == [OK, OK, OK] and events.restored == [2]
        pool.buf[HDR_SIZE:HDR_SIZE + 5] = b"again"
        pool.persist(HDR_SIZE, 5)
    assert data(bed["h2"].dir / "r.part0") == data(pool_dir / "m")


def test_a_crashed_host_fails_at_once_and_comes_back(bed, pool_dir):
    with created(bed, pool_dir, ("h1", "h2")) as (path, pool, events):
        w = Writer(pool)
        w.start()
        time.sleep(0.3)
        bed["h2"].crash()  # its kernel still answers: the connections are reset
        time.sleep(1.0)
        w.finish()
        assert [i for _, i, _ in events.failed] == [2]
        assert w.longest < 1.0, w.longest
    bed["h2"].restart()
    done = replica_sync(path)
    assert done.returncode == 1, done.stderr
    assert data(bed["h2"].dir / "r.part0") == data(pool_dir / "m")


def test_a_frozen_host_fails_and_a_short_stall_does_not(bed, pool_dir):
    with created(bed, pool_dir, ("h1", "h2")) as (path, pool, events):
        w = Writer(pool)
        w.start()
        for _ in range(3):  # sshd and agent stop for 0.3 s: slower persists, no failure
            time.sleep(0.3)
            with bed["h1"].frozen(0.3):
                pass
        time.sleep(PEER_TIMEOUT + 0.2)
        assert not events.failed
        t0 = time.monotonic()
        bed["h2"].freeze()  # frozen for good: failed within the timeout
        try:
            time.sleep(PEER_TIMEOUT + MARGIN)
            w.finish()
        finally:
            bed["h2"].thaw()
        assert [(i, e.errno) for _, i, e in events.failed] == [(2, errno.ETIMEDOUT)]
        assert events.failed[0][0] - t0 < PEER_TIMEOUT + MARGIN
        assert w.longest < PEER_TIMEOUT + MARGIN
        assert [r.state for r in pool.replicas] == [OK, OK, FAILED]
    assert data(bed["h1"].dir / "r.part0") == data(pool_dir / "m")


def test_a_large_persist_over_four_lanes_returns_when_a_host_is_cut(bed, pool_dir):
    with created(bed, pool_dir, ("h1", "h2")) as (path, pool, events):
        assert pool.nlanes == 4
        quarter = (SIZE - HDR_SIZE) // 4 // 4096 * 4096
        pool.buf[HDR_SIZE:] = random.Random(3).randbytes(SIZE - HDR_SIZE)
        took: list[float] = []
        stop = threading.Event()

        def lane_writer(lane: int) -> None:
            off = HDR_SIZE + lane * quarter
            while not stop.is_set():
                t0 = time.monotonic()
                pool.persist(off, quarter, lane)
                took.append(time.monotonic() - t0)

        threads = [threading.Thread(target=lane_writer, args=(lane,)) for lane in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        bed["h2"].cut()
        time.sleep(PEER_TIMEOUT + MARGIN)
        stop.set()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads)
        assert [(i, e.errno) for _, i, e in events.failed] == [(2, errno.ETIMEDOUT)]
        assert max(took) < PEER_TIMEOUT + MARGIN, max(took)
    persisted = 4 * quarter
    assert data(bed["h1"].dir / "r.part0")[:persisted] == data(pool_dir / "m")[:persisted]


def test_a_cut_host_at_create_and_at_open(bed, pool_dir):
    path = make_set(bed, pool_dir, ("h1", "h2"))
    bed["h2"].cut()
    t0 = time.monotonic()
    with pytest.raises(OSError) as e:
        PoolSet.create(path)
    assert time.monotonic() - t0 < 10
    assert e.value.errno in (errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ECONNABORTED), e.value
    assert "h2" in str(e.value)
    # nothing is left half-made: not the master, not the pool on the reachable host
    assert not (pool_dir / "m").exists()
    assert not (bed["h1"].dir / "r.part0").exists()
    bed["h2"].heal()
    PoolSet.create(path).close()
    bed["h2"].cut()
    events = Events()
    t0 = time.monotonic()
    with PoolSet.open(path, plugins=[events]) as pool:  # opens degraded
        assert time.monotonic() - t0 < 10
        assert [r.state for r in pool.replicas] == [OK, OK, FAILED]
        pool.buf[HDR_SIZE:HDR_SIZE + 5] = b"hello"
        pool.persist(HDR_SIZE, 5)
    assert data(bed["h1"].dir / "r.part0")[:5] == b"hello"


class CutAfterSession(ConnectionPool):
    """Kept SSH connections whose host's link is cut (for real) the moment a session
    channel has opened, before the agent's command is asked for: the one step paramiko
    waits on without a time limit of its own."""

    def __init__(self, host) -> None:
        super().__init__()
        self.host = host

    def open_session(self, s, accept_new, reuse_timeout):
        t, chan = super().open_session(s, accept_new, reuse_timeout)
        self.host.cut()
        return t, chan


def test_a_cut_between_session_and_command_fails_the_launch_within_connect_timeout(bed):
    config = RpmemConfig.from_env(os.environ)
    target = parse_target("h1")
    pool = CutAfterSession(bed["h1"])
    t0 = time.monotonic()
    with pytest.raises(OSError) as e:
        ParamikoLauncher(config, pool).launch(target, "cat")
    took = time.monotonic() - t0
    assert e.value.errno == errno.ETIMEDOUT, e.value
    assert "h1" in str(e.value) and "did not answer" in str(e.value)
    assert took < 3 + 3 * MARGIN, took  # the bed's ConnectTimeout is 3 s
    assert pool.transports(resolve(target, config)) == []  # dropped, not kept for reuse
    bed["h1"].heal()
    fresh = ConnectionPool()
    try:
        chan = ParamikoLauncher(config, fresh).launch(target, "cat")
        chan.close()
    finally:
        fresh.close_all()


class CutDuringCopy:
    """Cuts ``host`` once the copy into replica ``index`` is under way."""

    def __init__(self, host, index: int) -> None:
        self.host, self.index, self.at = host, index, 0.0

    @hookimpl
    def pmreplica_sync_progress(self, replica, phase, done, total):
        if phase == "copy" and replica.index == self.index and done and not self.at:
            self.host.cut()
            self.at = time.monotonic()


def test_a_cut_during_replica_sync_fails_that_replica_quickly(bed, pool_dir):
    path = make_set(bed, pool_dir, ("h1", "h2"))
    PoolSet.create(path).close()
    part = bed["h2"].dir / "r.part0"
    part.unlink()  # h2 needs a full copy
    cutter = CutDuringCopy(bed["h2"], 2)
    report = sync.sync(path, plugins=[cutter])
    assert cutter.at and time.monotonic() - cutter.at < PEER_TIMEOUT + MARGIN
    r2 = report.replicas[2]
    assert report.exit_code == 4 and r2.result == "failed" and "h2" in r2.error, report
    assert report.replicas[1].health == "healthy"
    bed["h2"].heal()
    assert not bed["h2"].wait_agents_gone()
    again = sync.sync(path)
    assert again.exit_code == 1, again
    assert data(part) == data(pool_dir / "m")
    with PoolSet.open(path) as pool:
        assert STALE not in [r.state for r in pool.replicas]


#: the application: writes numbered records into slots, printing each number once its
#: persist returned (acknowledged); argv: pool set, first number, how many (0: forever)
APP = r"""
import struct, sys
from pmreplica import PoolSet
path, first, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
SLOTS, REC = 512, struct.Struct("<Q56s")
with PoolSet.open(path) as pool:
    i = first
    while count == 0 or i < first + count:
        off = 4096 + (i % SLOTS) * REC.size
        REC.pack_into(pool.buf, off, i, (b"%d" % i) * (56 // len(b"%d" % i)))
        pool.persist(off, REC.size)
        print(i, flush=True)
        i += 1
print("closed", flush=True)
"""


def records(path: Path) -> dict[int, int]:
    """Slot -> the record number a part file holds there (the records APP writes)."""
    import struct
    raw = data(path)
    rec = struct.Struct("<Q56s")
    out = {}
    for slot in range(512):
        number, body = rec.unpack_from(raw, slot * rec.size)
        if number or body.strip(b"\0"):
            text = b"%d" % number
            assert body == (text * (56 // len(text))).ljust(56, b"\0"), "a torn record"
            out[slot] = number
    return out


def test_master_host_lost_promote_go_on_then_the_old_master_rejoins(bed, pool_dir):
    h1, h2, h3 = bed["h1"], bed["h2"], bed["h3"]
    env = dict(os.environ)
    py, cli = sys.executable, Path(sys.executable).parent
    for h in (h2, h3):
        (h.dir / "r.set").write_text(f"PMEMPOOLSET\n{SIZE} {h.dir}/r.part0\n")
    old = write_set(h1.dir / "m.set", f"{SIZE} {h1.dir}/m.part0", "REPLICA h2 r.set",
                    "REPLICA h3 r.set")
    done = h1.run([str(cli / "pmreplica"), "create", str(old)], env)
    assert done.returncode == 0, done.stderr
    app = h1.start([py, "-c", APP, str(old), "1", "0"], env)
    acked = [int(app.stdout.readline()) for _ in range(300)]
    h1.crash()  # the master's host is lost, the application with it
    app.wait(10)
    acked += [int(line) for line in app.stdout.read().split() if line.isdigit()]
    app.stdout.close(), app.stderr.close(), app.stdin.close()
    assert h2.wait_agents_gone() == [] and h3.wait_agents_gone() == []

    new = write_set(h2.dir / "new.set", f"{SIZE} {h2.dir}/r.part0", "REPLICA h3 r.set")
    done = h2.run([str(cli / "pmreplica"), "promote", str(new)], env)
    assert done.returncode == 0 and "replica 1 (h3:r.set): in step" in done.stdout, done
    done = h2.run([str(cli / "replica-sync"), str(new)], env)
    assert done.returncode == 1, done.stdout + done.stderr
    # every persist the application saw return is on the promoted pool
    held = records(h2.dir / "r.part0")
    for number in acked:
        assert held.get(number % 512, 0) >= number, number
    assert records(h3.dir / "r.part0") == held
    # the application goes on there
    last = max(acked)
    done = h2.run([py, "-c", APP, str(new), str(last + 1), "200"], env)
    assert done.returncode == 0 and done.stdout.split()[-1] == "closed", done.stderr
    assert records(h3.dir / "r.part0") == records(h2.dir / "r.part0")

    h1.restart()  # the old master's host is back: its pool opens no more as a master
    done = h1.run([py, "-c", f"from pmreplica import PoolSet; PoolSet.open({str(old)!r})"], env)
    assert done.returncode != 0 and "superseded" in done.stderr, done.stderr
    # ... and rejoins as a replica of the promoted one
    (h1.dir / "old.set").write_text(f"PMEMPOOLSET\n{SIZE} {h1.dir}/m.part0\n")
    write_set(new, f"{SIZE} {h2.dir}/r.part0", "REPLICA h3 r.set", "REPLICA h1 old.set")
    done = h2.run([str(cli / "replica-sync"), "--json", str(new)], env)
    report = json.loads(done.stdout)
    assert done.returncode == 1, done.stdout
    assert report["replicas"][2]["action"] == "copy differing ranges"
    assert 0 < report["copied"] < SIZE // 4  # what was written since, not the whole pool
    assert data(h1.dir / "m.part0") == data(h2.dir / "r.part0") == data(h3.dir / "r.part0")

"""Losing the master: promote a replica, never two masters. Generations on every replica
(pmreplica/generation.py) tell a replica that missed writes from one in step, and two sides
that both took writes (split brain) from a master that was merely superseded. These tests
use local replicas (a failing file system cuts one off for real); tests/test_multihost.py
loses a whole host."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pmreplica import PoolSet, generation, sync
from pmreplica.header import HDR_SIZE
from pmreplica.promote import promote
from pmreplica.status import OK

from .helpers import write_set
from .sync_harness import PoolLayout, environ, fill, kill_sync_as_its_copy_begins

pytestmark = pytest.mark.timeout(120)

M = 1 << 20
SIZE = 8 * M
BIN = Path(sys.executable).parent


def write(path: Path, off: int, data: bytes) -> None:
    with PoolSet.open(path) as pool:
        pool.buf[off:off + len(data)] = data
        pool.persist(off, len(data))


def read(path: Path, off: int, n: int) -> bytes:
    with PoolSet.open(path) as pool:
        return bytes(pool.buf[off:off + n])


def pmreplica(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "pmreplica"), *map(str, args)], capture_output=True,
                          text=True, timeout=60)


def data(path: Path) -> bytes:
    return path.read_bytes()[HDR_SIZE:]


@pytest.fixture
def three(pool_dir: Path) -> Path:
    """A master and two local replicas, created, with some data."""
    d = pool_dir
    path = write_set(d / "p.set", f"{SIZE} {d}/m", "REPLICA", f"{SIZE} {d}/r1", "REPLICA",
                     f"{SIZE} {d}/r2")
    with PoolSet.create(path) as pool:
        pool.buf[HDR_SIZE:] = os.urandom(SIZE - HDR_SIZE)
        pool.persist(HDR_SIZE, SIZE - HDR_SIZE)
    return path


def test_a_replica_is_not_opened_as_a_master_until_promoted(three, pool_dir):
    d = pool_dir
    alone = write_set(d / "r1.set", f"{SIZE} {d}/r1")
    with pytest.raises(OSError) as e:
        PoolSet.open(alone)
    assert e.value.errno == errno.EPERM and "pmreplica promote" in str(e.value)
    # nothing else to ask: promote cannot tell, and says so
    done = pmreplica("promote", alone)
    assert done.returncode == 1 and "cannot tell whether this replica missed writes" in \
        done.stderr and "--force" in done.stderr
    with pytest.raises(OSError) as e:  # nothing changed
        PoolSet.open(alone)
    assert e.value.errno == errno.EPERM
    out = promote(write_set(d / "r1+r2.set", f"{SIZE} {d}/r1", "REPLICA", f"{SIZE} {d}/r2"))
    assert [(c.index, c.relation) for c in out.compared] == [(1, "same")]
    assert out.generation.epoch == out.previous.epoch + 1
    with PoolSet.open(d / "r1+r2.set") as pool:  # a master now; r2 is to be brought in line
        assert [r.state for r in pool.replicas] == ["ok", "stale"]
    report = sync.sync(d / "r1+r2.set")
    assert report.exit_code == 1 and report.replicas[1].action == "copy differing ranges"
    assert report.copied == 0  # it was in step: compared, nothing differed
    with PoolSet.open(d / "r1+r2.set") as pool:
        assert [r.state for r in pool.replicas] == ["ok", "ok"]
    # the old master, back: superseded, refused; and it is never a sync source either
    with pytest.raises(OSError) as e:
        PoolSet.open(three)
    assert e.value.errno == errno.ESTALE and "superseded" in str(e.value)
    before = data(d / "m")
    report = sync.sync(three)
    assert report.exit_code == 4 and "superseded" in report.reason
    assert e.value.strerror == f"{three}: {report.reason}"  # one judge, one wording
    assert data(d / "m") == before
    assert promote(d / "r1+r2.set").already


def test_promote_refuses_a_replica_that_missed_writes_and_names_the_current_one(
        pool_dir, failing_fs):
    d, fs = pool_dir, failing_fs.mountpoint
    path = write_set(d / "p.set", f"{SIZE} {d}/m", "REPLICA", f"{SIZE} {d}/r1", "REPLICA",
                     f"{SIZE} {fs}/r2")
    PoolSet.create(path).close()
    failing_fs.shut_down()
    write(path, HDR_SIZE, b"r2 misses this")  # r2 fails: a new generation without it
    failing_fs.remount()
    stale = write_set(d / "r2.set", f"{SIZE} {fs}/r2", "REPLICA", f"{SIZE} {d}/r1")
    done = pmreplica("promote", stale)
    assert done.returncode == 1, done.stderr
    assert f"replica 1 ({d}/r1) holds newer acknowledged writes" in done.stderr
    assert f"promote replica 1 ({d}/r1) instead" in done.stderr
    assert generation.load(str(fs / "r2")).master == generation.load(str(d / "m")).master
    current = write_set(d / "r1.set", f"{SIZE} {d}/r1", "REPLICA", f"{SIZE} {fs}/r2")
    done = pmreplica("promote", "--json", current)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["compared"][0]["relation"] == "behind"
    assert sync.sync(current).exit_code == 1
    assert read(current, HDR_SIZE, 14) == b"r2 misses this"
    assert data(fs / "r2") == data(d / "r1")


def test_promote_wants_every_listed_replica_to_answer(pool_dir, failing_fs):
    """r2 and r3 miss a write that r1 took; the master is lost and r1 cannot be reached.
    r2, in step with r3, says nothing of r1: promoting r3 would lose the write, so promote
    cannot tell and names r1; with r1 back it names r1 as the one to promote."""
    d, fs = pool_dir, failing_fs.mountpoint
    path = write_set(d / "p.set", f"{SIZE} {d}/m", "REPLICA", f"{SIZE} {d}/r1", "REPLICA",
                     f"{SIZE} {fs}/r2", "REPLICA", f"{SIZE} {fs}/r3")
    PoolSet.create(path).close()
    failing_fs.shut_down()
    write(path, HDR_SIZE, b"r2 and r3 miss this")  # a new generation: master and r1
    failing_fs.remount()
    os.rename(d / "r1", d / "r1.away")  # its host is down too
    r3 = write_set(d / "r3.set", f"{SIZE} {fs}/r3", "REPLICA", f"{SIZE} {fs}/r2", "REPLICA",
                   f"{SIZE} {d}/r1")
    before = generation.load(str(fs / "r3"))
    done = pmreplica("promote", r3)
    assert done.returncode == 1, done.stdout
    assert "cannot tell whether this replica missed writes: replica 2 " \
           f"({d}/r1) could not be asked" in done.stderr, done.stderr
    assert "--force" in done.stderr
    assert generation.load(str(fs / "r3")) == before  # nothing changed
    os.rename(d / "r1.away", d / "r1")
    with pytest.raises(OSError) as e:
        promote(r3)
    assert e.value.errno == errno.ESTALE
    assert f"replica 2 ({d}/r1) holds newer acknowledged writes" in str(e.value)


def test_promote_does_not_take_the_replica_itself_listed_again_for_an_answer(pool_dir):
    """r1 missed a write that r2 took. A set that lists, as its only other replica, r1
    itself under another name (a link: an operator's slip) asks no one: promote cannot
    tell, and says why; listing r2 names r2 as the one to promote."""
    d = pool_dir
    path = write_set(d / "p.set", f"{SIZE} {d}/m", "REPLICA", f"{SIZE} {d}/r1", "REPLICA",
                     f"{SIZE} {d}/r2")
    PoolSet.create(path).close()
    os.rename(d / "r1", d / "r1.away")
    write(path, HDR_SIZE, b"only r2 has this")  # r1 fails at open: a generation without it
    os.rename(d / "r1.away", d / "r1")
    os.symlink(d / "r1", d / "r1-again")
    again = write_set(d / "again.set", f"{SIZE} {d}/r1", "REPLICA", f"{SIZE} {d}/r1-again")
    with pytest.raises(OSError) as e:
        promote(again)
    assert e.value.errno == errno.EAGAIN
    assert f"replica 1 ({d}/r1-again) could not be asked (it is this replica itself, " \
           "listed again)" in str(e.value)
    with pytest.raises(OSError) as e:
        promote(write_set(d / "r1.set", f"{SIZE} {d}/r1", "REPLICA", f"{SIZE} {d}/r2"))
    assert e.value.errno == errno.ESTALE and f"promote replica 1 ({d}/r2) instead" in \
        str(e.value)


def test_promote_refuses_a_replica_whose_repair_was_cut_off(pool_dir):
    """replica-sync recreated a remote replica (its pool made, its header written) and was
    killed before it copied any data; then the master's host is lost. Promoting the
    half-made replica is refused, --force or not: the other replica it lists records a
    generation and it none, so that one holds acknowledged writes it lacks."""
    layout = PoolLayout(pool_dir, master=[SIZE], replicas=["remote", "remote"],
                        remote_size=SIZE)
    env = layout.env(PMREPLICA_TCP_TLS="0")
    fill(layout.path, env, seed=7)
    good = layout.data(2)
    layout.parts[1][0][1].unlink()  # replica 1's storage replaced: replica-sync recreates it
    kill_sync_as_its_copy_begins(layout, env)
    half = layout.parts[1][0][1]
    assert generation.load(str(half)) is None and generation.load(str(layout.parts[2][0][1]))
    layout.parts[0][0][1].unlink()  # the master's host is lost
    # on replica 1's host: its part, then the pool's other replica
    new = write_set(layout.agent_dir / "new.set", f"{SIZE} {half}", "REPLICA localhost r2.set")
    with environ(env):
        for force in (False, True):
            with pytest.raises(OSError) as info:
                promote(new, force=force)
            assert info.value.errno == errno.ESTALE, info.value
            message = str(info.value)
            assert "replica 1 (localhost:r2.set) holds newer acknowledged writes" in message
            assert "this replica: none); promote replica 1 (localhost:r2.set) instead" in message
    assert generation.load(str(half)) is None and layout.data(2) == good


def test_split_brain_is_refused_until_a_side_is_discarded(pool_dir, failing_fs):
    """The master loses r1 (its disk fails for a while) and goes on writing; r1, thought
    lost with the master, is promoted and written too: both sides took writes after they
    parted. Neither is overwritten until the operator discards one."""
    d, fs = pool_dir, failing_fs.mountpoint
    path = write_set(d / "p.set", f"{SIZE} {d}/m", "REPLICA", f"{SIZE} {fs}/r1")
    PoolSet.create(path).close()
    failing_fs.shut_down()
    write(path, HDR_SIZE, b"master side")
    failing_fs.remount()
    r1 = write_set(d / "r1.set", f"{SIZE} {fs}/r1")
    promote(r1, force=True)
    write(r1, HDR_SIZE + 100, b"promoted side")  # a master now: it opens and takes writes
    m_before, r1_before = data(d / "m"), data(fs / "r1")
    with pytest.raises(OSError) as e:
        PoolSet.open(path)
    assert e.value.errno == errno.ESTALE and "split brain" in str(e.value)
    assert "--discard 1" in str(e.value) and "--discard 0" in str(e.value)
    report = sync.sync(path)  # one judge, one wording
    assert report.exit_code == 4 and e.value.strerror == f"{path}: {report.reason}"
    done = subprocess.run([str(BIN / "replica-sync"), str(path)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 4 and "split brain" in done.stdout, done.stdout
    assert (data(d / "m"), data(fs / "r1")) == (m_before, r1_before)  # both kept
    # keep the master's side: r1 is compared with it and brought in line
    done = subprocess.run([str(BIN / "replica-sync"), "--discard", "1", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    assert data(fs / "r1") == m_before
    with PoolSet.open(path) as pool:
        assert [r.state for r in pool.replicas] == [OK, OK]
        assert bytes(pool.buf[HDR_SIZE:HDR_SIZE + 11]) == b"master side"
    with pytest.raises(OSError) as e:  # r1 is a replica again, not a second master
        PoolSet.open(r1)
    assert e.value.errno == errno.EPERM


# -- crashes in the middle -----------------------------------------------------------------------
def _killed_at(argv: list[str], syscall: str, n: int) -> bool:
    """Run ``argv`` with SIGKILL delivered as it enters its ``n``-th ``syscall`` (strace's
    fault injection: a real signal at an exact point); False if it finished first."""
    done = subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "-e", f"trace={syscall}",
                           "-e", f"inject={syscall}:signal=KILL:when={n}", *argv],
                          capture_output=True, text=True, timeout=120)
    return done.returncode in (-9, 137)  # strace exits as its tracee did


def _masters(*sets: Path) -> list[Path]:
    """The pool sets of ``sets`` that open as a master now."""
    out = []
    for path in sets:
        try:
            PoolSet.open(path).close()
        except OSError as e:
            assert e.errno in (errno.EPERM, errno.ESTALE, errno.EINVAL), e
            continue
        out.append(path)
    return out


def _every_kill_point(argv: list[str], files: list[Path], check) -> int:
    """Kill ``argv`` at each of its page writes and durability points in turn (restoring
    ``files`` before each run), calling ``check()`` after each kill; returns the runs."""
    saved = {f: f.read_bytes() for f in files}
    runs = 0
    for syscall in ("pwrite64", "fdatasync"):
        n = 1
        while True:
            for f, content in saved.items():
                f.write_bytes(content)
            if not _killed_at(argv, syscall, n):
                break
            check()
            runs += 1
            n += 1
    for f, content in saved.items():
        f.write_bytes(content)
    return runs


def test_crash_anywhere_in_promote_or_rejoin_never_makes_two_masters(three, pool_dir):
    if not os.access("/usr/bin/strace", os.X_OK):
        from .helpers import unavailable
        unavailable("strace is missing: install Debian's strace (tools/bootstrap --tests)")
    d = pool_dir
    expected = data(d / "m")
    new = write_set(d / "new.set", f"{SIZE} {d}/r1", "REPLICA", f"{SIZE} {d}/r2")
    files = [d / "m", d / "r1", d / "r2"]

    def after_promote_killed() -> None:
        opened = _masters(three, new)
        assert len(opened) == 1, opened  # either the promotion happened or not at all
        assert pmreplica("promote", new).returncode == 0  # running it again completes it
        assert _masters(three, new) == [new]
        assert data(d / "r1") == expected

    runs = _every_kill_point([str(BIN / "pmreplica"), "promote", str(new)], files,
                             after_promote_killed)
    assert pmreplica("promote", new).returncode == 0
    # the old master rejoins as a replica of the promoted one, by comparison
    rejoin = write_set(d / "rejoin.set", f"{SIZE} {d}/r1", "REPLICA", f"{SIZE} {d}/r2",
                       "REPLICA", f"{SIZE} {d}/m")

    def after_rejoin_killed() -> None:
        # the old master never opens as one again (r1 is the master of both new sets)
        assert _masters(three, rejoin) == [rejoin], "the old master came back"
        done = subprocess.run([str(BIN / "replica-sync"), str(rejoin)], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode in (0, 1), done.stdout + done.stderr
        assert data(d / "m") == data(d / "r2") == data(d / "r1") == expected

    runs += _every_kill_point([str(BIN / "replica-sync"), str(rejoin)], files,
                              after_rejoin_killed)
    assert runs >= 20, runs
    done = subprocess.run([str(BIN / "replica-sync"), "--json", str(rejoin)],
                          capture_output=True, text=True, timeout=60)
    report = json.loads(done.stdout)
    assert done.returncode == 1 and report["replicas"][2]["action"] == "copy differing ranges"
    assert report["copied"] == 0  # the old master held the same bytes: nothing was copied
    assert _masters(three, rejoin) == [rejoin]


def test_info_shows_generations_and_a_superseded_master(three, pool_dir, pmreplica_cmd):
    d = pool_dir
    new = write_set(d / "new.set", f"{SIZE} {d}/r1", "REPLICA", f"{SIZE} {d}/r2")
    promote(new)
    info = json.loads(pmreplica("info", "--json", three).stdout)
    master, r1 = info["replicas"][0], info["replicas"][1]
    assert master["health"] == "superseded (replica 1 holds a newer generation)"
    assert master["generation"]["is_master"] and r1["generation"]["is_master"]
    assert r1["generation"]["epoch"] == master["generation"]["epoch"] + 1
    text = pmreplica("info", new).stdout
    assert "its master" in text and "a replica (master" in text

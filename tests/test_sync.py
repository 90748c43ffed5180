"""replica-sync on local replicas: real faults (deleted, truncated and corrupted parts, a file
system that fails under the open pool), each repaired to byte-identical replicas read back
by this process after `replica-sync` ran in another; the source choice (never a stale or
broken replica; none, nothing changes); the stale record read by a reopened pool; verify;
the CLI, its exit codes, JSON and progress; pmempool's pool sets; online resync."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pty
import subprocess
import threading
from pathlib import Path

import pytest

from pmreplica import HeaderError, PoolSet, hookimpl, sync
from pmreplica.header import HDR_SIZE, PoolHeader
from pmreplica.state import ReplicaState, store_copy

from .helpers import RaisingProgress, replica_bytes, write_set
from .sync_harness import BIN, M, PoolLayout, check, fill, report, replica_sync


def _local(d: Path, replicas=([4 * M], [2 * M, 2 * M])) -> PoolLayout:
    layout = PoolLayout(d, replicas=list(replicas))
    fill(layout.path, layout.env(), seed=1)
    return layout


def _files_digest(d: Path) -> dict[str, str]:
    """Every file under ``d`` (not the set file) by content: to show nothing was touched."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def _assert_identical(layout: PoolLayout, expected: bytes | None = None) -> None:
    """Every replica's data range equals ``expected`` (default: the master's), and every
    local replica's headers check out as PMDK requires."""
    expected = layout.data(0) if expected is None else expected
    for i in range(len(layout.parts)):
        assert layout.data(i) == expected, f"replica {i} differs"
    status, rep = check(layout.path, layout.env())
    assert status == 0 and rep["status"] == "healthy", rep


def _by_index(rep: dict) -> dict[int, dict]:
    return {r["index"]: r for r in rep["replicas"]}


# -- nothing to do -------------------------------------------------------------------------

def test_healthy_set_is_left_alone(pool_dir):
    layout = _local(pool_dir)
    before = _files_digest(pool_dir)
    status, rep = check(layout.path, layout.env())
    assert status == 0 and rep["status"] == "healthy" and rep["source"] == 0
    assert [r["health"] for r in rep["replicas"]] == ["healthy"] * 3
    res = replica_sync(layout.path, env=layout.env())
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1] == "result: all replicas healthy"
    assert res.stderr == ""  # no bar, no noise when stderr is not a terminal
    assert _files_digest(pool_dir) == before


# -- local faults, repaired ----------------------------------------------------------------

@pytest.mark.parametrize("which", ["replica part", "master part 1", "master part 0"])
def test_deleted_part_is_recreated_and_copied(pool_dir, which):
    layout = _local(pool_dir)
    expected = layout.data(0)
    victim = {"replica part": layout.parts[2][1][1], "master part 1": layout.parts[0][1][1],
              "master part 0": layout.parts[0][0][1]}[which]
    victim.unlink()
    # a dry run reports and plans, and changes nothing
    before = _files_digest(pool_dir)
    status, rep = report("--dry-run", layout.path, env=layout.env())
    assert status == 4 and rep["status"] == "needs repair", rep
    broken = next(r for r in rep["replicas"] if r["health"] == "broken")
    assert broken["problems"] == [f"{victim}: part file is missing"]
    assert broken["action"] == "recreate and copy" and broken["result"] is None
    assert _files_digest(pool_dir) == before and not victim.exists()

    status, rep = report(layout.path, env=layout.env())
    assert status == 1 and rep["status"] == "repaired", rep
    if which == "master part 0":
        # the master's record went with part 0: the copies in replicas 1 and 2 vouch for
        # each other (a copy never vouches for its own holder)
        assert rep["source"] == 1 and rep["record"]["holders"] == [1, 2]
        assert _by_index(rep)[2]["health"] == "healthy" and _by_index(rep)[2]["action"] is None
    else:
        assert rep["source"] == (1 if which.startswith("master") else 0)
    assert broken["index"] in [r["index"] for r in rep["replicas"] if r["result"] == "repaired"]
    _assert_identical(layout, expected)


def test_truncated_part_is_extended_and_copied(pool_dir):
    layout = _local(pool_dir)
    expected = layout.data(0)
    part = layout.parts[1][0][1]
    os.truncate(part, 3 * M)
    status, rep = report(layout.path, env=layout.env())
    assert status == 1, rep
    r1 = _by_index(rep)[1]
    assert r1["health"] == "broken" and r1["result"] == "repaired"
    assert r1["problems"] == [f"{part}: size {3 * M} is smaller than {4 * M}"]
    assert part.stat().st_size == 4 * M
    _assert_identical(layout, expected)


@pytest.mark.parametrize("where", ["replica", "master"])
def test_flipped_header_byte(pool_dir, where):
    layout = _local(pool_dir)
    expected = layout.data(0)
    part = layout.parts[0 if where == "master" else 2][0][1]
    with open(part, "r+b") as f:
        f.seek(40)  # inside the pool set uuid
        byte = f.read(1)
        f.seek(40)
        f.write(bytes([byte[0] ^ 0x10]))
    status, rep = report(layout.path, env=layout.env())
    assert status == 1, rep
    index = 0 if where == "master" else 2
    assert _by_index(rep)[index]["problems"] == [f"{part}: invalid header checksum"]
    # the master is repaired from the lowest-numbered healthy replica
    assert rep["source"] == (1 if where == "master" else 0)
    _assert_identical(layout, expected)
    with PoolSet.open(layout.path) as pool:
        assert [r.state for r in pool.replicas] == ["ok"] * 3


def test_flipped_data_byte_is_found_only_by_verify(pool_dir):
    layout = _local(pool_dir)
    expected = layout.data(0)
    off = 5 * M // 2 + 12345  # pool offset: in part r2_1 of replica 2
    part, file_off = layout.parts[2][1][1], off - 2 * M + HDR_SIZE
    with open(part, "r+b") as f:
        f.seek(file_off)
        byte = f.read(1)
        f.seek(file_off)
        f.write(bytes([byte[0] ^ 1]))
    assert layout.data(2) != expected
    status, rep = check(layout.path, layout.env())
    assert status == 0 and rep["status"] == "healthy"  # headers are all fine
    status, rep = check(layout.path, layout.env(), "--verify")
    assert status == 4 and rep["status"] == "needs repair" and rep["verified"]
    block = 64 << 10
    assert _by_index(rep)[1]["differing"] == []
    assert _by_index(rep)[2]["differing"] == [[off // block * block, block]]
    res = replica_sync("--verify", layout.path, env=layout.env())
    assert res.returncode == 4 and f"[{off // block * block:#x}, " in res.stdout
    assert layout.data(2) != expected  # --verify alone does not repair
    status, rep = report("--verify", "--repair", layout.path, env=layout.env())
    assert status == 1 and rep["copied"] == block, rep
    assert _by_index(rep)[2]["action"] == "copy differing ranges"
    _assert_identical(layout, expected)
    status, rep = check(layout.path, layout.env(), "--verify")
    assert status == 0 and all(r["differing"] == [] for r in rep["replicas"][1:])


def test_stale_replica_resyncs_only_what_it_missed(pool_dir, failing_fs, caplog):
    d, fs = pool_dir, failing_fs.mountpoint
    path = write_set(d / "p.set", f"8M {d}/m", "REPLICA", f"8M {fs}/r1", "REPLICA", f"8M {d}/r2")
    with PoolSet.create(path) as pool:
        pool.buf[HDR_SIZE:] = os.urandom(pool.size - HDR_SIZE)
        pool.persist(HDR_SIZE, pool.size - HDR_SIZE)
        failing_fs.shut_down()
        for off in (1 * M + 100, 5 * M + 7):  # replica 1 fails on the first of these
            pool.buf[off:off + 3000] = os.urandom(3000)
            pool.persist(off, 3000)
        assert [r.state for r in pool.replicas] == ["ok", "failed", "ok"]
    failing_fs.remount()  # the replica is back, holding what it had before it failed
    caplog.set_level(logging.WARNING, "pmreplica.poolset")
    with PoolSet.open(path) as pool:  # a reopened pool is told which replicas are stale
        assert [r.index for r in pool.stale_replicas] == [1]
        assert [r.state for r in pool.replicas] == ["ok", "stale", "ok"]
    assert f"replica 1 ({fs}/r1) is stale" in caplog.text and "replica-sync" in caplog.text
    status, rep = report(path)
    assert status == 1, rep
    r1 = _by_index(rep)[1]
    assert r1["health"] == "stale" and r1["action"] == "resync dirty chunks"
    chunk = 4096  # the fine map's: each 3000-byte write within one chunk
    assert rep["record"]["fine_chunk_size"] == chunk
    assert r1["copy_bytes"] == rep["copied"] == 2 * chunk == rep["record"]["dirty_bytes"]
    data = [Path(p).read_bytes()[HDR_SIZE:] for p in (d / "m", fs / "r1", d / "r2")]
    assert data[0] == data[1] == data[2]
    with PoolSet.open(path) as pool:
        assert pool.stale_replicas == [] and [r.state for r in pool.replicas] == ["ok"] * 3


# -- source choice -------------------------------------------------------------------------

def test_source_is_never_a_stale_replica(pool_dir, failing_fs):
    """Master broken, replica 1 stale: replica 2 is the source, though 1 is lower."""
    d, fs = pool_dir, failing_fs.mountpoint
    path = write_set(d / "p.set", f"2M {d}/m0", f"2M {d}/m1", "REPLICA", f"4M {fs}/r1",
                     "REPLICA", f"4M {d}/r2")
    with PoolSet.create(path) as pool:
        pool.buf[HDR_SIZE:] = b"old!" * ((pool.size - HDR_SIZE) // 4)
        pool.persist(HDR_SIZE, pool.size - HDR_SIZE)
        failing_fs.shut_down()
        pool.buf[HDR_SIZE:] = b"NEW!" * ((pool.size - HDR_SIZE) // 4)
        pool.persist(HDR_SIZE, pool.size - HDR_SIZE)
        assert [r.state for r in pool.replicas] == ["ok", "failed", "ok"]
    failing_fs.remount()
    os.unlink(d / "m1")  # the master breaks; its record (in part 0) says replica 1 is stale
    status, rep = report(path)
    assert status == 1, rep
    assert rep["source"] == 2 and [r["health"] for r in rep["replicas"]] == [
        "broken", "stale", "healthy"]
    size = 4 * M - HDR_SIZE
    new = b"NEW!" * ((size - HDR_SIZE) // 4)
    for parts in ([(2 * M, d / "m0"), (2 * M, d / "m1")], [(4 * M, fs / "r1")],
                  [(4 * M, d / "r2")]):
        assert replica_bytes(parts)[HDR_SIZE:size] == new, parts


def test_no_healthy_replica_refuses_and_changes_nothing(pool_dir):
    layout = _local(pool_dir, replicas=([4 * M],))
    for part in (layout.parts[0][0][1], layout.parts[1][0][1]):
        with open(part, "r+b") as f:
            f.seek(8)
            f.write(b"\x07")  # major version: both headers fail their checksum
    before = _files_digest(pool_dir)
    status, rep = report(layout.path, env=layout.env())
    assert status == 4 and rep["status"] == "failed" and rep["source"] is None
    assert rep["reason"] == "no healthy replica is left to repair from"
    assert _files_digest(pool_dir) == before
    res = replica_sync(layout.path, env=layout.env())
    assert res.returncode == 4
    assert "cannot repair: no healthy replica is left to repair from" in res.stdout


def test_lost_record_refuses_until_the_operator_names_a_source(pool_dir):
    """Master and one local replica; master part 0 (and the record) deleted: replica 1's
    own copy cannot vouch for itself, so sync refuses until told --source 1."""
    layout = _local(pool_dir, replicas=([4 * M],))
    expected = layout.data(1)
    layout.parts[0][0][1].unlink()
    before = _files_digest(pool_dir)
    status, rep = report(layout.path, env=layout.env())
    assert status == 4 and rep["source"] is None
    assert "no replica is known to be up to date" in rep["reason"] and "--source" in rep["reason"]
    assert _by_index(rep)[1]["health"] == "unknown"
    assert _files_digest(pool_dir) == before
    status, rep = report("--source", "0", layout.path, env=layout.env())
    assert status == 4 and "replica 0" in rep["reason"] and "broken" in rep["reason"]
    status, rep = report("--source", "1", layout.path, env=layout.env())
    assert status == 1 and rep["source"] == 1, rep
    _assert_identical(layout, expected)


def test_a_stale_replica_cannot_be_named_source(pool_dir):
    layout = _local(pool_dir, replicas=([4 * M],))
    with PoolSet.open(layout.path) as pool:  # what a failure records
        pool.state.mark_stale(1)
        pool._store_state()
    status, rep = report("--source", "1", "--dry-run", layout.path, env=layout.env())
    assert status == 4 and rep["reason"].endswith("is marked stale (it missed writes)")


# -- locking, the stale master, errors -----------------------------------------------------

def test_open_pool_set_is_refused_with_ebusy(pool_dir):
    layout = _local(pool_dir, replicas=([4 * M],))
    with PoolSet.open(layout.path):
        res = replica_sync(layout.path, env=layout.env())
        assert res.returncode == 8 and res.stdout == ""
        assert res.stderr.strip() == (f"replica-sync: {layout.path}: the pool set is open in "
                                      "another process; close it before replica-sync (EBUSY)")
        status, rep = report(layout.path, env=layout.env())
        assert (status, rep["status"], rep["errno"], rep["exit_code"]) == (8, "error", "EBUSY", 8)
        with pytest.raises(OSError) as e:
            sync.check(layout.path)
        assert e.value.errno == errno.EBUSY


def test_a_pool_set_open_while_its_master_file_is_deleted_is_still_refused(pool_dir):
    """The master's first part is deleted (by mistake) under an open pool: the pool is found
    open by its local replicas' locks (as PMDK locks every part), and replica-sync refuses
    instead of rebuilding a master the application is not writing to. So do pmreplica rm
    and promote (of a local replica of the open pool)."""
    layout = _local(pool_dir, replicas=([4 * M], [4 * M]))
    with PoolSet.open(layout.path) as pool:
        layout.parts[0][0][1].unlink()
        res = replica_sync(layout.path, env=layout.env())
        assert res.returncode == 8 and "the pool set is open in another process" in res.stderr
        r1 = layout.parts[1][0][1]
        alone = write_set(pool_dir / "r1.set", f"{r1.stat().st_size} {r1}")
        for command in (["rm", layout.path], ["promote", "--force", alone]):
            run = subprocess.run([str(BIN / "pmreplica"), *map(str, command)],
                                 capture_output=True, text=True, timeout=60)
            assert run.returncode != 0 and "EBUSY" in run.stderr, (command, run.stderr)
        assert all(parts[0][1].exists() for parts in layout.parts[1:])
        assert [s.state for s in pool.replicas] == ["ok", "ok", "ok"]


def test_master_marked_stale_does_not_open(pool_dir):
    """The state an interrupted sync of the master would leave if its header were sound."""
    layout = _local(pool_dir, replicas=([4 * M],))
    state = ReplicaState.load(layout.parts[0][0][1].read_bytes(), layout.size, 2)
    state.mark_stale(0, full=True)
    store_copy(str(layout.parts[0][0][1]), state.pack())
    with pytest.raises(HeaderError) as e:
        PoolSet.open(layout.path)
    assert e.value.errno == errno.EINVAL and "master replica" in str(e.value)
    assert "is stale" in str(e.value) and "replica-sync" in str(e.value)
    status, rep = report(layout.path, env=layout.env())
    assert status == 1 and rep["source"] == 1 and _by_index(rep)[0]["health"] == "stale"
    PoolSet.open(layout.path).close()


def test_invalid_pool_set_is_an_operational_error(pool_dir):
    bad = pool_dir / "bad.set"
    bad.write_text("PMEMPOOLSET\n1K /x\n")
    res = replica_sync(bad)
    assert res.returncode == 8 and "Traceback" not in res.stderr
    assert "smaller than the minimum part size" in res.stderr
    res = replica_sync("--repair", bad)
    assert res.returncode == 2 and "--repair needs --verify" in res.stderr


# -- the API, the hook, the CLI ------------------------------------------------------------

def _on_pty(argv: list[str], env: dict[str, str]) -> str:
    """Run ``argv`` with its stderr on a new pseudo-terminal (which reports 0 columns and
    0 rows until someone sets them); what it drew there."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=slave, env=env)
        os.close(slave)
        out = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not chunk:
                break
            out += chunk
        proc.wait(timeout=120)
    finally:
        os.close(master)
    return out.decode(errors="replace")


class ProgressRecorder:
    def __init__(self) -> None:
        self.events: list[tuple[int, str, int, int]] = []

    @hookimpl
    def pmreplica_sync_progress(self, replica, phase, done, total):
        self.events.append((replica.index, phase, done, total))


def test_api_report_and_progress_hook(pool_dir):
    layout = _local(pool_dir)
    expected = layout.data(0)
    layout.parts[1][0][1].unlink()
    rec = ProgressRecorder()
    result = sync.sync(layout.path, verify=True, plugins=[rec])
    assert result.status == "repaired" and result.exit_code == 1 and result.source == 0
    r1 = result.replicas[1]
    assert (r1.health, r1.action, r1.result, r1.differing) == (
        "broken", "recreate and copy", "repaired", [])
    total = layout.size - HDR_SIZE
    copy = [e for e in rec.events if e[1] == "copy"]
    assert copy[0] == (1, "copy", 0, total) and copy[-1] == (1, "copy", total, total)
    assert [e[2] for e in copy] == sorted(e[2] for e in copy)
    # the source and both replicas compared in one pass, reported as the source's
    verify = [e for e in rec.events if e[1] != "copy"]
    assert {e[:2] for e in verify} == {(0, "verify")}
    assert verify[0] == (0, "verify", 0, total) and verify[-1] == (0, "verify", total, total)
    assert layout.data(1) == expected
    assert sync.check(layout.path).status == "healthy"


def test_a_raising_progress_hook_does_not_stop_a_repair(pool_dir, caplog):
    layout = _local(pool_dir)
    expected = layout.data(0)
    layout.parts[1][0][1].unlink()
    hook = RaisingProgress()
    with caplog.at_level(logging.ERROR, "pmreplica"):
        result = sync.sync(layout.path, verify=True, plugins=[hook])
    assert result.status == "repaired" and result.replicas[1].result == "repaired"
    assert layout.data(1) == expected
    assert len(hook.calls) >= 4  # a start and an end of the copy and of the verify pass
    assert caplog.text.count("pmreplica_sync_progress hook raised") == len(hook.calls)
    assert sync.check(layout.path).status == "healthy"


def test_progress_lines_json_and_a_bar_on_a_terminal_without_columns(pool_dir):
    layout = _local(pool_dir)
    layout.parts[1][0][1].unlink()
    # not a terminal: plain lines (one per interval: here every step), no carriage returns
    env = dict(layout.env(), PMREPLICA_PROGRESS_INTERVAL="0")
    res = replica_sync("--verify", layout.path, env=env)
    assert res.returncode == 1 and "\r" not in res.stderr
    lines = res.stderr.splitlines()
    copy = f"copy replica 1 ({layout.parts[1][0][1]}): "
    assert copy + "4.0 MiB of 4.0 MiB (100%)" in [ln[:len(copy) + 25] for ln in lines]
    assert any(ln.startswith("verify replica 0 (") and "(100%)" in ln for ln in lines)
    # --json: events as JSON lines on stderr, the report on stdout
    layout.parts[1][0][1].unlink()
    res = replica_sync("--json", layout.path, env=layout.env())
    events = [json.loads(ln) for ln in res.stderr.splitlines()]
    copy = [e for e in events if e["phase"] == "copy"]
    assert [e["event"] for e in copy][0] == "start" and copy[-1]["event"] == "end"
    assert copy[-1]["done"] == copy[-1]["total"] == layout.size - HDR_SIZE
    assert copy[-1]["replica"] == 1 and json.loads(res.stdout)["status"] == "repaired"
    # a terminal that reports 0 columns (a fresh pty, as many CI and remote terminals): a bar
    layout.parts[1][0][1].unlink()
    out = _on_pty([str(BIN / "replica-sync"), str(layout.path)], layout.env())
    assert "copy replica 1" in out and "%|" in out, out  # tqdm's bar, 80 columns
    status, rep = check(layout.path, layout.env())
    assert status == 0 and rep["exit_code"] == 0 and rep["pool_size"] == layout.size


def test_pmreplica_check_and_sync_subcommands(pool_dir):
    layout = _local(pool_dir)
    layout.parts[2][0][1].unlink()
    pm = [str(BIN / "pmreplica")]
    res = subprocess.run(pm + ["check", str(layout.path)], capture_output=True, text=True,
                         env=layout.env())
    assert res.returncode == 4 and "broken" in res.stdout and res.stdout.endswith(
        "result: needs repair (4.0 MiB to copy)\n")
    res = subprocess.run(pm + ["sync", "--dry-run", str(layout.path)], capture_output=True,
                         text=True, env=layout.env())
    assert res.returncode == 4 and "not done (dry run)" in res.stdout
    res = subprocess.run(pm + ["sync", str(layout.path)], capture_output=True, text=True,
                         env=layout.env())
    assert res.returncode == 1 and res.stdout.endswith("result: repaired (4.0 MiB copied)\n")
    _assert_identical(layout)


# -- pmempool's pool sets --------------------------------------------------------------------

def test_pmempool_pool_set_repaired_passes_pmempool_check(pool_dir, pmempool):
    d = pool_dir
    path = write_set(d / "p.set", f"8M {d}/m0", f"8M {d}/m1", "REPLICA", f"16M {d}/r0",
                     "REPLICA", f"8M {d}/s0", f"8M {d}/s1")
    subprocess.run([pmempool, "create", "obj", "--layout", "sync-test", str(path)], check=True)
    with open(d / "m0", "r+b") as f:  # the master's header, and a part of replica 2
        f.seek(100)
        f.write(b"\x55")
    os.unlink(d / "s1")
    assert subprocess.run([pmempool, "check", str(path)], capture_output=True).returncode != 0
    status, rep = report(path)
    assert status == 1 and rep["source"] == 1, rep
    res = subprocess.run([pmempool, "check", "-v", str(path)], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip().endswith("consistent"), res.stdout
    data = [Path(p).read_bytes()[HDR_SIZE:] for p in (d / "r0",)]
    m = (d / "m0").read_bytes()[HDR_SIZE:] + (d / "m1").read_bytes()[HDR_SIZE:]
    s = (d / "s0").read_bytes()[HDR_SIZE:] + (d / "s1").read_bytes()[HDR_SIZE:]
    assert m == data[0][:len(m)] and s == data[0][:len(s)]


# -- online resync ---------------------------------------------------------------------------

def test_online_resync_while_the_application_writes(pool_dir, failing_fs):
    d, fs = pool_dir, failing_fs.mountpoint
    path = write_set(d / "p.set", f"8M {d}/m", "REPLICA", f"8M {fs}/r1")
    pool = PoolSet.create(path)
    try:
        pool.buf[HDR_SIZE:] = os.urandom(pool.size - HDR_SIZE)
        pool.persist(HDR_SIZE, pool.size - HDR_SIZE)
        failing_fs.shut_down()
        pool.buf[3 * M:3 * M + 10] = b"while gone"
        pool.persist(3 * M, 10)
        assert pool.replicas[1].state == "failed"
        failing_fs.remount()
        stop = threading.Event()

        def writer() -> None:
            import random
            rng = random.Random(5)
            while not stop.is_set():
                off = rng.randrange(HDR_SIZE, 2 * M - 512)  # not where the checks look
                pool.buf[off:off + 512] = rng.randbytes(512)
                pool.persist(off, 512)

        t = threading.Thread(target=writer)
        t.start()
        try:
            rec = ProgressRecorder()
            pool.plugin_manager.register(rec)
            copied = pool.resync(1)
        finally:
            stop.set()
            t.join()
        assert copied >= 64 << 10 and rec.events[-1][1] == "resync"
        assert pool.replicas[1].state == "ok" and pool.stale_replicas == []
        pool.buf[7 * M:7 * M + 5] = b"after"
        pool.persist(7 * M, 5)  # back on the write path
        assert pool.resync(1) == 0
        with pytest.raises(OSError) as e:
            pool.resync(0)
        assert e.value.errno == errno.EINVAL
    finally:
        pool.close()
    master, r1 = (d / "m").read_bytes(), (fs / "r1").read_bytes()
    assert master[HDR_SIZE:] == r1[HDR_SIZE:]
    assert r1[3 * M:3 * M + 10] == b"while gone" and r1[7 * M:7 * M + 5] == b"after"
    assert PoolHeader.checksum_ok(r1[:HDR_SIZE])

"""Hostile and careless local input, as a new user (or an attacker with a shell) tries it: a
FIFO where a pool set or part file belongs, sizes past what a file can hold, NUL bytes,
signatures with something glued on, sets of 20,000 parts, a 512 MiB pool set file, a
trailing slash in a name given to ``--remove``, two clients racing to create and open one
remote pool. Every one ends in a one-line error with an errno, never in a hang or a
traceback, and deletes or leaves behind nothing."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pmreplica import PoolSet, setfile
from pmreplica.header import PoolHeader
from pmreplica.replica import LocalReplicaFiles, lock_pool
from rpmem_common import proto
from rpmem_common.wire import HEARTBEAT, HEARTBEAT_HELLO
from pmreplica.state import store_copy

from .rpmem_helpers import (AGENT, M, RawSession, attr, local_node,  # noqa: F401
                            recv_status, transport)
from .test_agent_pooldb import errno_of

pytestmark = pytest.mark.timeout(120)

BIN = Path(sys.executable).parent
#: every way to hand a file to pmreplica on the command line
COMMANDS = {"info": ["pmreplica", "info"], "check": ["pmreplica", "check"],
            "create": ["pmreplica", "create"], "replica-sync": ["replica-sync"],
            "rm": ["pmreplica", "rm"]}

# (id, what to write at {d}/bad.set (None: a FIFO), the error's words and errno name)
BAD_SETS = [
    ("fifo-set-file", None, "bad.set: not a regular file (a FIFO)", "EINVAL"),
    ("fifo-part", "8M {d}/fifo", "bad.set:2: {d}/fifo: not a regular file (a FIFO)", "EINVAL"),
    ("part-below-a-fifo", "8M {d}/fifo/x", "bad.set:2: {d}/fifo/x: Not a directory", "ENOTDIR"),
    ("size-2^64-1", "18446744073709551615 {d}/p",
     "bad.set:2: invalid size (18446744073709551615) for a file", "EFBIG"),
    ("size-8192P", "8192P {d}/p", "bad.set:2: invalid size (9223372036854775808)", "EFBIG"),
    ("sum-past-mappable", "4096P {d}/p\n4096P {d}/q\n4096P {d}/r",
     "bad.set: pool size 13835058055282155520 is larger than can be mapped", "EFBIG"),
    ("size-past-2^64", "16385P {d}/p", "bad.set:2: incorrect format of size", "EINVAL"),
    ("nul-in-path", "8M {d}/p\0q", "bad.set:2: a NUL byte in the line", "EINVAL"),
    ("signature-glued", None, "bad.set:1: the first line must be exactly 'PMEMPOOLSET'",
     "EINVAL"),
]


def _make(d: Path, case: str, body: str | None) -> Path:
    os.mkfifo(d / "fifo")
    path = d / "bad.set"
    if case == "fifo-set-file":
        os.mkfifo(path)
    elif case == "signature-glued":
        path.write_text(f"PMEMPOOLSET2\n8M {d}/p\n")
    else:
        path.write_text("PMEMPOOLSET\n" + body.format(d=d) + "\n")
    return path


def _snapshot(d: Path) -> dict[str, bytes | None]:
    return {p.name: p.read_bytes() if p.is_file() else None for p in d.iterdir()}


# (rm reads no sizes: it removes what exists of such a set as of any other)
CLI_CASES = [(*c, cmd) for c in BAD_SETS for cmd in COMMANDS if (cmd, c[3]) != ("rm", "EFBIG")]


@pytest.mark.parametrize("case,body,words,code,command", CLI_CASES,
                         ids=[f"{c[0]}-{c[4]}" for c in CLI_CASES])
def test_cli_refuses_in_one_line_without_hanging(pool_dir, case, body, words, code, command):
    d = pool_dir
    path = _make(d, case, body)
    before = _snapshot(d)
    argv = [str(BIN / COMMANDS[command][0]), *COMMANDS[command][1:], "bad.set"]
    res = subprocess.run(argv, cwd=d, capture_output=True, text=True, timeout=30)
    if command == "info" and res.returncode == 0:  # sizes: info shows the set as it is
        assert code == "EFBIG" and "type                     : missing" in res.stdout
        return
    assert res.returncode == (8 if command in ("check", "replica-sync") else 1), res
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    prog = "replica-sync" if command == "replica-sync" else "pmreplica"
    prog += " check" if command == "check" else ""
    assert lines[0].startswith(f"{prog}: {words.format(d=d)}"), lines[0]
    assert lines[0].endswith(f" ({code})"), lines[0]
    assert _snapshot(d) == before and path.exists()


@pytest.mark.parametrize("case,body,words,code", BAD_SETS, ids=[c[0] for c in BAD_SETS])
def test_api_refuses_with_errno(pool_dir, case, body, words, code):
    d = pool_dir
    path = _make(d, case, body)
    before = _snapshot(d)
    for call in (PoolSet.open, PoolSet.create):
        with pytest.raises(OSError) as e:
            call(path)
        assert e.value.errno == getattr(errno, code)
        assert str(e.value).startswith(f"{d}/{words.format(d=d)}"), str(e.value)
    assert _snapshot(d) == before


def test_a_nul_byte_in_a_pool_name_is_einval(pool_dir):
    path = f"{pool_dir}/a\0b"
    for call in (PoolSet.open, PoolSet.create, lambda p: PoolSet.create(p, size=8 * M)):
        with pytest.raises(OSError) as e:
            call(path)
        assert e.value.errno == errno.EINVAL and "a NUL byte in the file name" in str(e.value)
    assert list(pool_dir.iterdir()) == []


def test_parts_that_turn_into_fifos_after_parsing_are_refused_not_waited_on(pool_dir):
    """The parser refuses a FIFO part; one that appears later meets the same check wherever
    a part file is opened (reading headers, locking, mapping, writing, repairing)."""
    d = pool_dir
    path = d / "p.set"
    path.write_text(f"PMEMPOOLSET\n8M {d}/a\n")
    PoolSet.create(path).close()
    set_file = setfile.parse(path)
    hdr = PoolHeader.unpack((d / "a").read_bytes()[:4096])
    (d / "a").unlink()
    os.mkfifo(d / "a")
    files = LocalReplicaFiles(set_file, set_file.master, set_file.pool_size)
    headers, problems = files.check()
    assert problems == [f"{d}/a: not a regular file (a FIFO)",
                        f"{d}/a: cannot read: not a regular file (a FIFO)"]
    for call in (files.open, lambda: lock_pool(f"{d}/a", "busy"),
                 files.restore_parts, lambda: store_copy(f"{d}/a", b"x"),
                 lambda: files.write_headers(hdr, [hdr.uuid], hdr.uuid, hdr.uuid)):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.EINVAL and "not a regular file (a FIFO)" in str(e.value)


def test_twenty_thousand_parts(pool_dir, pmreplica_cmd):
    """Parsing is linear (benchmarks/setfile.py measures it): 20,000 parts parse and
    `pmreplica info` shows them (a quadratic parser or report takes minutes here)."""
    d = pool_dir
    path = d / "many.set"
    path.write_text("PMEMPOOLSET\n" + "".join(f"2M {d}/p{i}\n" for i in range(20000)))
    s = setfile.parse(path)
    assert len(s.master.parts) == 20000 and s.master.parts[-1].line == 20001
    res = subprocess.run(pmreplica_cmd + ["info", "--json", str(path)], capture_output=True,
                         text=True, timeout=100)
    info = json.loads(res.stdout)
    parts = info["replicas"][0]["parts"]
    assert len(parts) == 20000 and parts[-1]["type"] == "missing"
    assert len(info["replicas"][0]["problems"]) == 20000


# -- the agent --------------------------------------------------------------------------------

def _remove(node, name, *flags):
    return subprocess.run([AGENT, "--poolset-dir", str(node.dir), "--remove", name, *flags],
                          capture_output=True, stdin=subprocess.DEVNULL, timeout=30)


def test_agent_refuses_fifos_and_huge_sizes_without_hanging(local_node):
    node = local_node
    os.mkfifo(node.dir / "fifo.set")
    os.mkfifo(node.dir / "fifo")
    node.write_set("fp.set", f"8M {node.dir}/fifo")
    node.write_set("big.set", f"18446744073709551615 {node.dir}/p")
    session = RawSession(node)
    for name, words in (("fifo.set", "pool set file fifo.set: not a regular file (a FIFO)"),
                        ("fp.set", f"fp.set:2: {node.dir}/fifo: not a regular file (a FIFO)"),
                        ("big.set", "big.set:2: invalid size (18446744073709551615) for a file")):
        for resp in (session.request(proto.Request(proto.STAT, pool_desc=name)),
                     session.open(name, 8 * M), session.create(name, 8 * M, attr())):
            assert errno_of(resp) == errno.EINVAL and words in resp.message, resp
        done = _remove(node, name, "--force", "--pool-set")
        assert done.returncode == errno.EINVAL, done
        assert words.encode() in done.stderr and done.stderr.count(b"\n") == 1
    session.close()
    assert sorted(p.name for p in node.dir.iterdir()) == ["big.set", "fifo", "fifo.set", "fp.set"]


def test_agent_remove_refuses_a_name_with_a_trailing_slash_up_front(local_node):
    node = local_node
    parts = node.make_set("ok.set", (4 * M, 4 * M))
    session = RawSession(node)
    assert session.create("ok.set", 8 * M - 4096, attr()).status == proto.OK
    session.close()
    done = _remove(node, "ok.set/", "--force", "--pool-set")
    assert done.returncode == errno.EINVAL, done
    assert b"pool set file ok.set/: Not a directory" in done.stderr
    assert all(p.exists() for _, p in parts) and (node.dir / "ok.set").exists()
    assert _remove(node, "ok.set", "--force", "--pool-set").returncode == 0
    assert not any(p.exists() for _, p in parts) and not (node.dir / "ok.set").exists()


def test_agent_reads_a_huge_pool_set_file_only_so_far(local_node):
    node = local_node
    big = node.dir / "big.set"
    with open(big, "wb") as f:
        f.write(f"PMEMPOOLSET\n8M {node.dir}/p\n".encode())
        f.truncate(512 << 20)  # sparse: no memory or disk spent by the test itself
    session = RawSession(node)
    resp = session.request(proto.Request(proto.STAT, pool_desc="big.set"))
    assert errno_of(resp) == errno.EINVAL
    assert "pool set file big.set: larger than 4194304 bytes" in resp.message
    session.close()
    # the agent's peak memory while refusing it (--remove: a process of its own to measure)
    code = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], "
            "capture_output=True, stdin=subprocess.DEVNULL); "
            "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, AGENT, "--poolset-dir", str(node.dir),
                          "--remove", "big.set"], capture_output=True, text=True, timeout=60)
    status, maxrss_kib = map(int, out.stdout.split())
    assert status == errno.EINVAL
    assert maxrss_kib < 100 << 10, f"the agent grew to {maxrss_kib} KiB"
    assert big.stat().st_size == 512 << 20


def test_create_racing_open_makes_the_loser_ebusy_never_einval(local_node):
    """Clients keep opening a pool while another creates it (large parts: the creation takes
    a while): they see it missing, busy (being created, then open), open once it is closed;
    never half-made ("inconsistent", EINVAL)."""
    node = local_node
    size = 4 * 32 * M - 3 * 4096

    def try_open(name: str) -> int:
        session = RawSession(node)
        try:
            resp = session.open(name, size)
            if resp.status != proto.OK:
                return proto.STATUS_ERRNO[resp.status]
            assert session.request(proto.Request(proto.CLOSE)).status == proto.OK
            return 0
        finally:
            session.close()

    seen: list[int] = []
    for round_ in range(3):
        name = f"r{round_}.set"
        node.make_set(name, (32 * M,) * 4)
        stop = threading.Event()
        openers = [threading.Thread(target=lambda: [seen.append(try_open(name)) for _ in
                                                    iter(stop.is_set, True)])
                   for _ in range(3)]
        for t in openers:
            t.start()
        creator = RawSession(node)
        assert creator.create(name, size, attr()).status == proto.OK
        time.sleep(0.3)  # open: the others are to find it busy
        assert creator.request(proto.Request(proto.CLOSE)).status == proto.OK
        creator.close()
        time.sleep(0.3)
        stop.set()
        for t in openers:
            t.join(30)
        assert _remove(node, name).returncode == 0
    assert set(seen) <= {0, errno.ENOENT, errno.EBUSY}, sorted(seen)
    assert {0, errno.EBUSY} <= set(seen), sorted(seen)


_OPENER = """
import errno, json, sys
from remote_agent.pooldb import PoolDB
db, name, size = PoolDB(sys.argv[1]), sys.argv[2], int(sys.argv[3])
seen = {}
print("ready", flush=True)
while True:
    try:
        pool = db.open(name, size)
    except OSError as e:
        seen.setdefault(e.errno, e.strerror)
    else:
        pool.close()
        break
print(json.dumps(seen))
"""


def test_pool_db_create_racing_tight_open_loops(local_node):
    """The same race without the protocol around it, so that the openers try thousands of
    times while the parts are made and their headers written."""
    node = local_node
    sizes = (2 * M,) * 16
    size = sum(sizes) - 15 * 4096
    from remote_agent.pooldb import PoolDB
    db = PoolDB(str(node.dir))
    for round_ in range(3):
        name = f"t{round_}.set"
        node.make_set(name, sizes)
        openers = [subprocess.Popen([sys.executable, "-c", _OPENER, str(node.dir), name,
                                     str(size)], stdout=subprocess.PIPE, text=True)
                   for _ in range(2)]
        for proc in openers:
            assert proc.stdout.readline() == "ready\n"
        time.sleep(0.05)
        pool = db.create(name, size, attr())
        time.sleep(0.1)
        pool.close()
        for proc in openers:
            out, _ = proc.communicate(timeout=30)
            seen = {int(k): v for k, v in json.loads(out).items()}
            assert set(seen) <= {errno.ENOENT, errno.EBUSY}, seen


def test_agent_answers_about_a_part_path_that_is_not_utf8(local_node):
    """A part path with bytes that are not UTF-8 is quoted in the agent's answer (escaped),
    and the session goes on: the agent used to die encoding its error message."""
    node = local_node
    with open(node.dir / "b.set", "wb") as f:
        f.write(b"PMEMPOOLSET\n8M " + bytes(node.dir) + b"/part\xff0\n")
    node.make_set("ok.set")
    session = RawSession(node)
    stat = session.request(proto.Request(proto.STAT, pool_desc="b.set"))
    assert not stat.healthy and "part\\udcff0: cannot read" in stat.message, stat
    opened = session.open("b.set", 8 * M)
    assert opened.status != proto.OK and "part\\udcff0" in opened.message, opened
    assert session.create("ok.set", 8 * M, attr()).status == proto.OK  # still serving
    session.close()


def test_agent_refuses_a_pool_set_name_longer_than_a_path_at_once(local_node):
    """A name past PATH_MAX is refused (EINVAL) before any resolving, which took the agent
    7 s for 512 KiB of ``a/a/...``."""
    session = RawSession(local_node)
    t0 = time.monotonic()
    resp = session.request(proto.Request(proto.STAT, pool_desc="a/" * (256 << 10) + "x.set"))
    assert errno_of(resp) == errno.EINVAL and "at most 4095" in resp.message, resp
    assert time.monotonic() - t0 < 2
    session.close()


def test_connections_that_say_nothing_do_not_hold_up_the_heartbeat(local_node):
    """Connections to an agent's heartbeat port that say nothing, or a byte now and then,
    do not keep the client's own from being answered at once (its connect waits 4 s)."""
    session = RawSession(local_node)
    port, secret = HEARTBEAT.unpack(session.announced)
    host = session.chan.peer_address
    idle = [socket.create_connection((host, port), timeout=5) for _ in range(3)]
    idle[0].sendall(b"x")  # a hello begun and never finished
    try:
        t0 = time.monotonic()
        with socket.create_connection((host, port), timeout=5) as beat:
            beat.sendall(HEARTBEAT_HELLO.pack(secret, 1000))
            assert recv_status(beat) == 0
            assert time.monotonic() - t0 < 2
    finally:
        for sock in idle:
            sock.close()
        session.close()

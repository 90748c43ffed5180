"""What the replica-sync tests (and tools/sync_stress.py) share: a pool set with local and
remote replicas on tmpfs, served by a real agent (local launcher or the test sshd), every
replica's bytes read straight from its files, the console scripts run as other processes,
and the SIGKILL crash loop."""

from __future__ import annotations

import contextlib
import json
import os
import random
import selectors
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .helpers import HDR, ROOT, replica_bytes, write_set

M = 1 << 20
BIN = Path(sys.executable).parent
AGENT = BIN / "pmreplica-agent"


@dataclass
class PoolLayout:
    """A pool set file ``d/p.set``: master parts, then replicas, local (a list of part
    sizes) or remote (``"remote"``: one part in the agent's directory ``d/agent``)."""

    d: Path
    master: list[int] = field(default_factory=lambda: [2 * M, 2 * M])
    replicas: list[list[int] | str] = field(default_factory=lambda: [[4 * M], "remote"])
    node: str = "localhost"
    remote_size: int = 4 * M
    #: where the remote parts go (default: the agent's directory)
    remote_dir: Path | None = None

    def __post_init__(self) -> None:
        self.agent_dir = self.d / "agent"
        self.agent_dir.mkdir(exist_ok=True)
        remote_dir = self.remote_dir or self.agent_dir
        self.parts: list[list[tuple[int, Path]]] = [
            [(s, self.d / f"m{i}") for i, s in enumerate(self.master)]]
        lines = [f"{s >> 20}M {p}" for s, p in self.parts[0]]
        for k, rep in enumerate(self.replicas, start=1):
            if rep == "remote":
                name = f"r{k}.set"
                part = remote_dir / f"r{k}.part"
                write_set(self.agent_dir / name, f"{self.remote_size >> 20}M {part}")
                self.parts.append([(self.remote_size, part)])
                lines.append(f"REPLICA {self.node} {name}")
            else:
                parts = [(s, self.d / f"r{k}_{i}") for i, s in enumerate(rep)]
                self.parts.append(parts)
                lines += ["REPLICA"] + [f"{s >> 20}M {p}" for s, p in parts]
        self.path = write_set(self.d / "p.set", *lines)

    @property
    def size(self) -> int:
        return sum(s for s in self.master) - HDR * (len(self.master) - 1)

    def image(self, index: int) -> bytes:
        """Replica ``index``'s pool bytes, read from its part files (the pool's size)."""
        return replica_bytes(self.parts[index])[:self.size]

    def data(self, index: int) -> bytes:
        """The data range (after the header page) of replica ``index``."""
        return self.image(index)[HDR:]

    @property
    def agent_command(self) -> str:
        return shlex.join([str(AGENT), "--poolset-dir", str(self.agent_dir)])

    def kill_agents(self) -> int:
        """SIGKILL every agent serving this layout (and the shells that started them);
        returns how many processes were killed."""
        needle = self.agent_command.encode()
        killed = 0
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read().replace(b"\0", b" ")
            except OSError:
                continue
            if needle in cmdline:
                try:
                    os.kill(int(entry), signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass
        return killed

    def env(self, **extra: str) -> dict[str, str]:
        """The environment that reaches this layout's agent through the local launcher."""
        env = dict(os.environ, PMREPLICA_LAUNCHER="local", RPMEM_CMD=self.agent_command)
        env.pop("PMREPLICA_SSH_CONFIG", None)
        env.update(extra)
        return env


@contextlib.contextmanager
def environ(env: dict[str, str]) -> Iterator[None]:
    """Run the body with ``env`` as this process's environment (how pmreplica finds agents)."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def write_random(path: Path, env: dict[str, str], seed: int, count: int = 16,
                 max_len: int = 256 << 10) -> list[str]:
    """Open the pool set, write ``count`` random ranges and persist them, close; returns the
    replicas' states (the writer is this process; replica-sync runs in others)."""
    from pmreplica import PoolSet

    rng = random.Random(seed)
    with environ(env), PoolSet.open(path) as pool:
        for _ in range(count):
            n = rng.randrange(1, max_len)
            off = rng.randrange(HDR, pool.size - n)
            pool.buf[off:off + n] = rng.randbytes(n)
            pool.persist(off, n)
        return [r.state for r in pool.replicas]


def fill(path: Path, env: dict[str, str], seed: int) -> None:
    """Create the pool set and give its whole data range random bytes."""
    from pmreplica import PoolSet

    with environ(env), PoolSet.create(path) as pool:
        pool.buf[HDR:] = random.Random(seed).randbytes(pool.size - HDR)
        pool.persist(HDR, pool.size - HDR)


def replica_sync(*args: object, env: dict[str, str] | None = None,
                 timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The ``replica-sync`` console script, run as another process."""
    return subprocess.run([str(BIN / "replica-sync"), *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=timeout)


def report(*args: object, env: dict[str, str] | None = None) -> tuple[int, dict]:
    """``replica-sync --json ARGS``: exit status and the report."""
    res = replica_sync("--json", *args, env=env)
    assert res.stdout, res.stderr
    return res.returncode, json.loads(res.stdout)


def check(path: Path, env: dict[str, str], *extra: str) -> tuple[int, dict]:
    """``pmreplica check --json``: exit status and the report."""
    res = subprocess.run([str(BIN / "pmreplica"), "check", "--json", *extra, str(path)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.stdout, res.stderr
    return res.returncode, json.loads(res.stdout)


# ---------------------------------------------------------------------------------------
# Crash loop: a fault, new data, a replica-sync SIGKILLed at a random moment, then a check
# that no replica reported healthy holds anything but the newest data, then a full sync.

SYNC_CHILD = r"""
import sys
from pmreplica import hookimpl, sync

class Events:
    @hookimpl
    def pmreplica_sync_progress(self, replica, phase, done, total):
        if done == 0:
            print(f"{phase} {replica.index}", flush=True)

print("ready", flush=True)
sys.stdin.readline()
sync.sync(sys.argv[1], plugins=[Events()])
print("done", flush=True)
"""


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        return proc.stdout.readline() if sel.select(timeout) else ""
    finally:
        sel.close()


def _kill_sync_at_random(path: Path, env: dict[str, str], delay: float,
                         after_copy_starts: bool) -> str:
    """Start a sync in its own process group and SIGKILL the group (the sync and the agents
    it started) ``delay`` seconds after it began or, with ``after_copy_starts``, after its
    first copy began. Returns when it died: "before copying", "while repairing" or
    "after finishing"."""
    proc = subprocess.Popen([sys.executable, "-c", SYNC_CHILD, str(path)], cwd=ROOT, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline() == "ready\n", proc.stderr.read()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        copying = False
        if after_copy_starts:
            line = _readline(proc, 30)
            assert line, f"sync printed nothing: {proc.stderr.read()}"
            copying = line.startswith("copy")
        time.sleep(delay)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # finished, and its agents with it
            pass
        proc.wait(timeout=10)
        rest = proc.stdout.read()
        if "done" in rest.split():
            return "after finishing"
        return "while repairing" if copying or "copy" in rest else "before copying"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()


FAULTS = ("replica part deleted", "master part deleted", "remote pool removed",
          "remote replica stale", "local replica truncated", "master record lost")


def apply_fault(layout: PoolLayout, fault: str, env: dict[str, str], seed: int) -> int:
    """Cause ``fault`` for real and write new data; returns the index of a replica that is
    known to hold the newest data (the expected source)."""
    write_random(layout.path, env, seed)
    if fault == "replica part deleted":
        layout.parts[1][0][1].unlink()
        return 0
    if fault == "local replica truncated":
        os.truncate(layout.parts[1][-1][1], 3 * M // 2)
        return 0
    if fault == "master part deleted":
        layout.parts[0][1][1].unlink()  # part 0 (and the record in it) stays
        return 1
    if fault == "master record lost":
        # part 0 goes, and the master's record with it: the copy in replica 1 vouches for
        # replica 2 (not for itself), so the remote replica is the source
        layout.parts[0][0][1].unlink()
        return 2
    if fault == "remote pool removed":
        for _, part in layout.parts[2]:
            part.unlink()
        return 0
    if fault == "remote replica stale":
        # the agent cannot be started while the pool is written: the remote replica fails
        # at open, misses these writes, and the master records it stale
        bad = dict(env, RPMEM_CMD="/nonexistent/pmreplica-agent")
        states = write_random(layout.path, bad, seed + 1)
        assert states[2] == "failed", states
        return 0
    raise ValueError(fault)


@dataclass
class CrashResult:
    runs: int = 0
    #: when the SIGKILL landed: "before copying", "while repairing", "after finishing"
    kills: dict[str, int] = field(default_factory=dict)
    #: replicas a check after the kill reported healthy (and that held the newest data)
    checked_healthy: int = 0


def crash_loop(layout: PoolLayout, runs: int, seed: int, max_delay: float = 0.2,
               log=print) -> CrashResult:
    """``runs`` rounds of fault, SIGKILLed sync, check, full sync; asserts as it goes."""
    env = layout.env()
    rng = random.Random(seed)
    out = CrashResult()
    for run in range(runs):
        fault = FAULTS[run % len(FAULTS)]
        fresh = apply_fault(layout, fault, env, rng.randrange(1 << 30))
        expected = layout.data(fresh)
        # every other run the kill lands shortly after the first copy began (in the copy,
        # the header rewrite or the record updates); the others anywhere in the run
        after_copy = run % 2 == 1
        delay = rng.uniform(0, 0.01 if after_copy else max_delay)
        when = _kill_sync_at_random(layout.path, env, delay, after_copy)
        out.kills[when] = out.kills.get(when, 0) + 1
        status, rep = check(layout.path, env)
        assert status in (0, 1, 4), rep
        for r in rep["replicas"]:
            if r["health"] == "healthy":
                got = layout.data(r["index"])
                assert got == expected, (f"run {run} ({fault}, killed {when}): {r['name']} "
                                         "is reported healthy but holds older data")
                out.checked_healthy += 1
        status, rep = report(layout.path, env=env)
        assert status in (0, 1), (run, fault, rep)
        for i in range(len(layout.parts)):
            assert layout.data(i) == expected, f"run {run} ({fault}): replica {i} differs"
        out.runs += 1
        log(f"run {run}: {fault}, killed {when}: ok")
    return out

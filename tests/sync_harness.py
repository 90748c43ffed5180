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

from remote_agent.processes import running_agents

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
        """SIGKILL every agent serving this layout; returns how many were killed."""
        killed = 0
        for pid in running_agents(self.agent_dir):
            try:
                os.kill(pid, signal.SIGKILL)
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
# Crash loop: a fault, new data, a replica-sync SIGKILLed while it runs, then a check that
# no replica reported healthy holds anything but the newest data, then a full sync. The
# kill times come from an undisturbed sync of the same fault, timed first.

SYNC_CHILD = r"""
import sys, time
from pmreplica import hookimpl, sync

class Events:
    handshake = sys.argv[2] == "handshake"
    resumed = 0.0

    @hookimpl
    def pmreplica_sync_progress(self, replica, phase, done, total):
        if done == 0:
            print(f"{phase} {replica.index}", flush=True)
            if self.handshake and phase == "copy":
                self.handshake = False
                sys.stdin.readline()
                self.resumed = time.monotonic()

events = Events()
print("ready", flush=True)
sys.stdin.readline()
started = time.monotonic()
sync.sync(sys.argv[1], plugins=[events])
# when it started, resumed after the handshake, and finished, on the system's monotonic clock
print("done", started, events.resumed, time.monotonic(), flush=True)
"""


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        return proc.stdout.readline() if sel.select(timeout) else ""
    finally:
        sel.close()


@contextlib.contextmanager
def _sync_process(path: Path, env: dict[str, str],
                  handshake: bool) -> Iterator[subprocess.Popen]:
    """A sync in its own process group (with the agents it starts), imported and waiting:
    :func:`_go` starts it. With ``handshake`` it waits again when its first copy begins,
    until :func:`_go` is called once more: the caller's clock then starts where the copy
    does, whatever the pipe's latency. Killed and reaped on the way out."""
    proc = subprocess.Popen([sys.executable, "-c", SYNC_CHILD, str(path),
                             "handshake" if handshake else "free"], cwd=ROOT, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline() == "ready\n", proc.stderr.read()
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()


def _go(proc: subprocess.Popen) -> None:
    """Let the waiting sync go on."""
    proc.stdin.write("go\n")
    proc.stdin.flush()


def _first_copy(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Wait for the sync's first line, which must say that its first copy began."""
    line = _readline(proc, timeout)
    assert line.startswith("copy"), f"the sync printed {line!r}: {proc.stderr.read()}"


@dataclass(frozen=True)
class SyncTiming:
    """An undisturbed sync of one fault, in seconds: from its start to its first copy, and
    from there (the handshake of :func:`_sync_process`) to its end."""

    copy: float
    repair: float

    @property
    def done(self) -> float:
        return self.copy + self.repair


def time_sync(path: Path, env: dict[str, str], timeout: float = 60) -> SyncTiming:
    """Run a sync to its end, timing it as :func:`_kill_sync` sees one. The times are the
    sync's own (CLOCK_MONOTONIC is one clock for all processes): the pipe's latency in
    telling its end would make the window look longer than it is."""
    with _sync_process(path, env, handshake=True) as proc:
        _go(proc)
        _first_copy(proc, timeout)
        _go(proc)
        for line in proc.stdout:
            if line.startswith("done "):
                started, resumed, finished = map(float, line.split()[1:])
                assert proc.wait(timeout) == 0, proc.stderr.read()
                return SyncTiming(resumed - started, finished - resumed)
        raise AssertionError(f"the sync did not finish: {proc.stderr.read()}")


def _kill_sync(path: Path, env: dict[str, str], delay: float, after_copy_starts: bool) -> str:
    """Start a sync and SIGKILL its process group (the sync and the agents it started)
    ``delay`` seconds after it began or, with ``after_copy_starts``, after its first copy
    began. Returns when it died: "before copying", "while repairing" or "after finishing"."""
    with _sync_process(path, env, handshake=after_copy_starts) as proc:
        _go(proc)
        if after_copy_starts:
            _first_copy(proc)
            _go(proc)
        time.sleep(delay)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # finished, and its agents with it
            pass
        proc.wait(timeout=10)
        rest = proc.stdout.read()
        if "done" in rest.split():
            return "after finishing"
        return "while repairing" if after_copy_starts or "copy" in rest else "before copying"


def kill_sync_as_its_copy_begins(layout: PoolLayout, env: dict[str, str]) -> None:
    """Start a sync and SIGKILL its process group (with the agents it started) as its first
    copy begins: the replica it repairs holds what its repair made so far and no data.
    Returns once the agents are gone too (their pools' locks with them)."""
    with _sync_process(layout.path, env, handshake=True) as proc:
        _go(proc)
        _first_copy(proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while running_agents(layout.agent_dir) and time.monotonic() < deadline:
        time.sleep(0.01)


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
        # at open, misses these writes, and the master records it stale; enough of them
        # (several MiB) that the copy of the missed ranges takes a few milliseconds
        bad = dict(env, RPMEM_CMD="/nonexistent/pmreplica-agent")
        states = write_random(layout.path, bad, seed + 1, count=64)
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
    #: the undisturbed sync of each fault that the kill times were drawn from
    timings: dict[str, SyncTiming] = field(default_factory=dict)


#: one run in this many is killed while the sync probes the replicas; the others while it
#: repairs (prime to the number of faults, so that a long loop probes each of them)
PROBE_EVERY = 7
#: the repair window is cut into this many equal strata, and a fault's successive runs
#: draw their kill delays from successive strata: a spread that chance cannot bunch up
STRATA = 4


def crash_layout(d: Path) -> PoolLayout:
    """The pool set of the crash loop: 16 MiB replicas, so that a repair lasts a few
    milliseconds a kill can aim at, and a run still takes well under a second."""
    return PoolLayout(d, master=[8 * M, 8 * M], replicas=[[16 * M], "remote"],
                      remote_size=16 * M)


def _assert_all_hold(layout: PoolLayout, expected: bytes, what: str) -> None:
    for i in range(len(layout.parts)):
        assert layout.data(i) == expected, f"{what}: replica {i} differs"


def crash_loop(layout: PoolLayout, runs: int, seed: int, log=print) -> CrashResult:
    """``runs`` rounds of fault, SIGKILLed sync, check, full sync; asserts as it goes.

    First each fault is caused once and synced undisturbed, timed: a sync of a small pool
    spends most of its time probing, and repairs for a few milliseconds only, so a delay
    drawn over its whole length would mostly kill it before or after the repair. A run
    kills the sync after a delay drawn from the repair window, counted from its first copy
    (one run in :data:`PROBE_EVERY`: drawn from the probing time, counted from its start)."""
    env = layout.env()
    rng = random.Random(seed)
    out = CrashResult()
    for fault in FAULTS:
        timings = []
        for _ in range(2):  # the shorter of two: a load spike must not stretch the window
            fresh = apply_fault(layout, fault, env, rng.randrange(1 << 30))
            expected = layout.data(fresh)
            timings.append(time_sync(layout.path, env))
            _assert_all_hold(layout, expected, f"undisturbed sync of {fault}")
        timing = out.timings[fault] = min(timings, key=lambda t: t.repair)
        log(f"{fault}: probes for {timing.copy * 1e3:.1f} ms, "
            f"repairs for {timing.repair * 1e3:.1f} ms")
    repairs_killed = dict.fromkeys(FAULTS, 0)
    for run in range(runs):
        fault = FAULTS[run % len(FAULTS)]
        fresh = apply_fault(layout, fault, env, rng.randrange(1 << 30))
        expected = layout.data(fresh)
        timing = out.timings[fault]
        if run % PROBE_EVERY == 0:
            when = _kill_sync(layout.path, env, rng.uniform(0, timing.copy), False)
        else:
            stratum = repairs_killed[fault] % STRATA
            repairs_killed[fault] += 1
            delay = (stratum + rng.random()) / STRATA * timing.repair
            when = _kill_sync(layout.path, env, delay, True)
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
        _assert_all_hold(layout, expected, f"run {run} ({fault})")
        out.runs += 1
        log(f"run {run}: {fault}, killed {when}: ok")
    return out

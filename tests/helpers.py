"""Helpers the tests share: writing pool set files and reading a replica's bytes the way
PMDK lays parts out, computed here independently of pmreplica's own layout code; running
fresh interpreters and threads; the environment a test's clients start from."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pmreplica import hookimpl

HDR = 4096
PAGE = os.sysconf("SC_PAGE_SIZE")
ROOT = Path(__file__).resolve().parent.parent
#: client settings (librpmem's and pmreplica's variables) that must not leak from the test
#: runner's own environment into the clients a test starts
CLIENT_VARS = ("RPMEM_SSH", "RPMEM_CMD", "RPMEM_ENABLE_SOCKETS", "RPMEM_ENABLE_VERBS",
               "RPMEM_MAX_NLANES", "RPMEM_WORK_QUEUE_SIZE", "PMREPLICA_LAUNCHER",
               "PMREPLICA_SSH_CONFIG", "PMREPLICA_SSH_ACCEPT_NEW", "PMREPLICA_OP_TIMEOUT",
               "PMREPLICA_TCP_TLS", "PMREPLICA_SPIN_US")
#: (PMREPLICA_PEER_TIMEOUT is the machine's: a slow one, the RDMA tests' emulated guest,
#: sets it for every client it runs; tests that need their own set it themselves)


def write_set(path: Path, *lines: str) -> Path:
    """Write a pool set file: the PMEMPOOLSET line, then ``lines``."""
    path.write_text("\n".join(("PMEMPOOLSET",) + lines) + "\n")
    return path


def replica_bytes(parts: list[tuple[int, Path | str]], singlehdr: bool = False) -> bytes:
    """The pool as one replica holds it: part 0 whole, each later part without its 4 KiB
    header (with SINGLEHDR, whole); part sizes rounded down to the page size."""
    out = bytearray()
    for i, (size, path) in enumerate(parts):
        with open(path, "rb") as f:
            data = f.read(size & ~(PAGE - 1))
        out += data[HDR if i and not singlehdr else 0:]
    return bytes(out)


def run_python(code: str, *args: str, env: dict[str, str] | None = None,
               timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (the tests' own), from the repository root."""
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def start_python(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``code`` in a fresh interpreter with line-buffered text pipes."""
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, bufsize=1)


def read_json_line(proc: subprocess.Popen, timeout: float = 30) -> dict:
    """The next line the child prints, as JSON; the child's stderr if it died instead."""
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout):
        proc.kill()
        raise AssertionError(f"child printed nothing in {timeout} s")
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        raise AssertionError(f"child exited {proc.returncode}: {proc.stderr.read()}")
    return json.loads(line)


def environ_without_client_vars() -> dict[str, str]:
    """This process's environment without any inherited :data:`CLIENT_VARS`."""
    return {k: v for k, v in os.environ.items() if k not in CLIENT_VARS}


def apply_overrides(env: dict[str, str], overrides: dict[str, str | None]) -> dict[str, str]:
    """``env`` with ``overrides`` applied (a value sets a variable, None removes it)."""
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run_threads(work: Callable[[int], None], n: int) -> list[BaseException]:
    """Run ``work(0)`` .. ``work(n - 1)`` on ``n`` threads at once and wait for them; the
    exceptions they raised (for the caller to assert on)."""
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            work(i)
        except BaseException as e:  # reported to the caller
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def wake_ups() -> dict[str, int]:
    """How often each thread of this process went to sleep and was woken so far (voluntary
    context switches), by ``name (native id)``: a thread that polls shows up here."""
    ids = {t.native_id: t.name for t in threading.enumerate()}
    counts = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/status") as f:
                n = next(int(line.split()[1]) for line in f
                         if line.startswith("voluntary_ctxt_switches"))
        except FileNotFoundError:
            continue  # ended meanwhile
        counts[f"{ids.get(int(tid), '?')} ({tid})"] = n
    return counts


def woken_since(before: dict[str, int]) -> dict[str, int]:
    """The threads woken since ``before`` (:func:`wake_ups`), and how often."""
    return {k: n - before.get(k, 0) for k, n in wake_ups().items() if n > before.get(k, 0)}


def pip_install(dist: Path, base: Path) -> Path:
    """Install the distribution in folder ``dist`` with pip, offline, into a folder of its
    own under ``base`` (put on PYTHONPATH to use it), as a user installs a plugin."""
    src = base / "src"
    shutil.copytree(dist, src)  # pip builds in the source tree
    site = base / "site"
    run = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                          "--no-build-isolation", "--no-index", "--target", str(site), str(src)],
                         capture_output=True, text=True)
    if run.returncode:
        unavailable(f"cannot install {dist.name} (the test extra needs setuptools>=70.1 in "
                    f"the venv): {run.stderr.strip()[-500:]}")
    return site


class RaisingProgress:
    """A host application whose progress hook fails (a bug of its own); ``calls`` records
    each call's (phase, done, total)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []

    @hookimpl
    def pmreplica_sync_progress(self, replica, phase, done, total):
        self.calls.append((phase, done, total))
        raise RuntimeError("the application's progress bar broke")


def unavailable(reason: str) -> None:
    """A real part a test needs is missing: under CI (CI=true) the test fails, saying what is
    missing; elsewhere it skips with that reason."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def promoted(path: Path) -> Path:
    """``path`` (a replica's part file or set, or a copy of one) promoted to master on its
    own, as after losing the master (``pmreplica promote --force``): it opens as a pool."""
    from pmreplica.promote import promote

    promote(path, force=True)
    return path


def wait_stopped(pids: list[int], timeout: float = 5.0) -> None:
    """Wait until every thread of ``pids`` is stopped: SIGSTOP takes effect asynchronously
    (a thread running on another CPU stops at its next entry to the kernel)."""
    import time

    deadline = time.monotonic() + timeout
    for pid in pids:
        while True:
            try:
                states = [Path(f"/proc/{pid}/task/{t}/stat").read_text().rsplit(")", 1)[1]
                          .split()[0] for t in os.listdir(f"/proc/{pid}/task")]
            except (FileNotFoundError, ProcessLookupError, IndexError):
                break  # gone
            if all(st in "tTZX" for st in states) or time.monotonic() > deadline:
                break
            time.sleep(0.001)


class Interrupt(BaseException):
    """What a host application's signal handler raises: not an Exception, as KeyboardInterrupt
    is not (a replica's target raising an Exception is that replica's failure)."""


@contextlib.contextmanager
def interrupted(delay: float = 0.2) -> Iterator[None]:
    """The block must end by :class:`Interrupt`, raised once by a SIGALRM handler from
    ``delay`` seconds on. The timer repeats until it lands: a TLS lane's send takes a signal
    only while no byte of it goes out (OpenSSL finishes a record a signal cut short)."""
    raised = False

    def handler(*_args) -> None:
        nonlocal raised
        if not raised:
            raised = True
            raise Interrupt()

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, delay, delay)
    try:
        with pytest.raises(Interrupt):
            yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (mount's words: "5m") mounted at ``where`` (made here), to be
    filled up; unmounted after."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        unavailable("mounting a tmpfs needs root and mount(8)")
    where.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                         capture_output=True, text=True)
    if res.returncode:
        unavailable(f"cannot mount a tmpfs: {res.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)

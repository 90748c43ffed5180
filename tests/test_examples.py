"""The examples run as they are, from a fresh shell, and do what they print."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str) -> str:
    r = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, f"{name} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def test_manpage_example_persists_the_whole_pool():
    out = run_example("manpage.py")
    assert "created localhost:manpage.set (4 lanes, tcp, GPSPM)" in out
    assert f"persisted {32 * 1024 * 1024 - 4096} bytes and closed the remote pool" in out


def test_replicated_poolset_example_reads_back_after_reopen():
    out = run_example("replicated_poolset.py")
    assert "replica 2 (localhost:remote.set): ok" in out
    assert "reopened: hello, replicated persistent memory" in out


def _scratch() -> set[Path]:
    return {p for p in Path("/dev/shm").iterdir()
            if p.name.startswith(("pmreplica-manpage-", "pmreplica-example-"))}


@pytest.mark.parametrize("name", ["manpage.py", "replicated_poolset.py", "replicated_objects.py"])
def test_examples_leave_no_files_behind(name):
    before = _scratch()
    run_example(name)
    assert _scratch() - before == set()


def test_replicated_objects_example_repairs_the_killed_replica():
    out = run_example("replicated_objects.py")
    assert "300 more committed with the remote replica gone: ['ok', 'ok', 'failed']" in out
    assert "replica-sync: repaired" in out
    assert "replicas identical: True" in out


def test_demo_tells_the_whole_story(pmreplica_cmd):
    r = subprocess.run([*pmreplica_cmd, "demo", "--transactions", "300"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert re.search(r"healthy +300 commits +\d+ commits/s  commit latency p50 +\d+ us", out)
    assert "replica 2 (localhost:remote.set) failed:" in out
    assert "replicas: replica 0: ok, replica 1: ok, replica 2: failed" in out
    assert "replica-sync: repaired" in out
    digests = [line.split("sha256 ")[1] for line in out.splitlines() if "sha256 " in line]
    assert len(digests) == 3 and len(set(digests)) == 1
    assert "identical: yes" in out and "as committed: yes" in out
    assert "all replicas ok: yes" in out

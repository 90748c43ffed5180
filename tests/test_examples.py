"""The examples run as they are, from a fresh shell, and do what they print."""

from __future__ import annotations

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


@pytest.mark.parametrize("name", ["manpage.py", "replicated_poolset.py"])
def test_examples_leave_no_files_behind(name):
    before = _scratch()
    run_example(name)
    assert _scratch() - before == set()

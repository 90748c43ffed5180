"""The example third-party plugin (examples/filestore), installed with pip as a user would,
serves a replica through the whole lifecycle from the command line, each step in a process
of its own: written by a pool, checked, recreated and copied by replica-sync after its
storage is deleted, a flipped byte found by --verify and repaired."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from .helpers import HDR, ROOT, pip_install, run_python, write_set

M = 1 << 20
SIZE = 8 * M


@pytest.fixture(scope="session")
def filestore_site(tmp_path_factory) -> Path:
    return pip_install(ROOT / "examples" / "filestore", tmp_path_factory.mktemp("filestore"))


WRITE = r"""
import sys
from pmreplica import PoolSet
with PoolSet.open(sys.argv[1]) as pool:
    assert pool.plugin_manager.get_plugin("filestore") is not None
    pool.buf[4096:4096 + 3 * 65536] = bytes(range(256)) * (3 * 65536 // 256)
    pool.buf[5 << 20:(5 << 20) + 11] = b"far and end"
    pool.persist(4096, (5 << 20) + 11 - 4096)
    print(" ".join(r.state for r in pool.replicas))
"""


def _run(cmd: list[str], env: dict[str, str]) -> tuple[int, dict]:
    r = subprocess.run(cmd + ["--json", "--no-progress"], env=env, capture_output=True,
                       text=True, timeout=120)
    return r.returncode, json.loads(r.stdout)


def test_example_plugin_replica_is_written_checked_repaired_and_verified(
        pool_dir, filestore_site, pmreplica_cmd):
    d = pool_dir
    store = d / "store"
    path = write_set(d / "p.set", f"8M {d}/m", "REPLICA filestore objects/r1")
    env = dict(os.environ, PYTHONPATH=str(filestore_site), PMREPLICA_FILESTORE=str(store))
    sync = [str(Path(pmreplica_cmd[0]).parent / "replica-sync"), str(path)]
    check = pmreplica_cmd + ["check", str(path)]
    replica = store / "objects" / "r1"

    create = subprocess.run(pmreplica_cmd + ["create", str(path)], env=env,
                            capture_output=True, text=True)
    assert create.returncode == 0, create.stderr
    wrote = run_python(WRITE, str(path), env=env)
    assert wrote.returncode == 0, wrote.stderr
    assert wrote.stdout.split() == ["ok", "ok"]

    def same_data() -> bool:
        return replica.read_bytes()[HDR:SIZE] == (d / "m").read_bytes()[HDR:SIZE]

    assert same_data() and replica.read_bytes()[5 * M:5 * M + 11] == b"far and end"
    code, report = _run(check, env)
    assert code == 0 and [r["health"] for r in report["replicas"]] == ["healthy", "healthy"]
    assert report["replicas"][1]["name"] == "replica 1 (filestore:objects/r1)"
    info = subprocess.run(pmreplica_cmd + ["info", str(path)], env=env, capture_output=True,
                          text=True)
    assert info.returncode == 0, info.stderr
    assert f"storage                  : {replica}\n" in info.stdout
    assert "launcher" not in info.stdout  # no SSH for what is not an rpmem replica

    # its storage is lost: check says so, replica-sync recreates it through the plugin
    replica.unlink()
    code, report = _run(check, env)
    assert code == 4
    lost = report["replicas"][1]
    assert lost["health"] == "broken" and lost["action"] == "recreate and copy"
    assert lost["problems"] == [f"{replica}: part file is missing"], lost
    code, report = _run(sync, env)
    assert code == 1, report
    assert report["replicas"][1]["result"] == "repaired"
    assert same_data()
    assert _run(check, env)[0] == 0

    # a flipped byte: found by --verify where it is, repaired with --repair
    at = 3 * M + 12345
    with open(replica, "r+b") as f:
        f.seek(at)
        old = f.read(1)
        f.seek(at)
        f.write(bytes([old[0] ^ 0x40]))
    assert not same_data()
    code, report = _run(check + ["--verify"], env)
    assert code == 4
    (off, n), = report["replicas"][1]["differing"]
    assert off <= at < off + n and n <= 64 << 10
    code, report = _run(sync + ["--verify", "--repair"], env)
    assert code == 1 and report["replicas"][1]["result"] == "repaired"
    assert same_data()
    code, report = _run(check + ["--verify"], env)
    assert code == 0 and report["replicas"][1]["differing"] == []

    # the pool opens with its replica in step, and rm removes its storage through the plugin
    again = run_python(WRITE, str(path), env=env)
    assert again.returncode == 0 and again.stdout.split() == ["ok", "ok"], again.stderr
    rm = subprocess.run(pmreplica_cmd + ["rm", str(path)], env=env, capture_output=True,
                        text=True)
    assert rm.returncode == 0, rm.stderr
    assert not replica.exists() and not (d / "m").exists()

"""The `pmreplica` console script: create, info and rm on real pool sets (pmreplica's and
pmempool's), one-line errors with the right exit status, --help everywhere, and the place
where later commands plug in."""

from __future__ import annotations

import json
import os
import re
import subprocess
import textwrap

import pytest

from pmreplica import PoolSet, cli
from pmreplica.header import HDR_SIZE, PoolHeader

from .helpers import write_set

M = 1 << 20


@pytest.fixture
def run(pmreplica_cmd):
    def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(pmreplica_cmd + [str(a) for a in args], capture_output=True,
                              text=True, env=env, timeout=60)
    return run


def _one_error(res: subprocess.CompletedProcess[str], status: int = 1) -> str:
    """The single stderr line of a failed command (and no traceback, no stdout)."""
    assert res.returncode == status, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    return lines[0]


def _fields(text: str, key: str) -> list[str]:
    """Values of every `key : value` line of pmempool-style output."""
    return [m.group(1) for m in re.finditer(rf"^{re.escape(key)}\s*: (.*)$", text, re.M)]


# -- help and usage ------------------------------------------------------------------------

@pytest.mark.parametrize("command", [None, "create", "info", "rm"])
def test_help(run, command):
    res = run(*([command] if command else []), "--help")
    assert res.returncode == 0 and res.stderr == ""
    assert res.stdout.startswith(f"usage: pmreplica{' ' + command if command else ''}")
    if command is None:
        assert all(c in res.stdout for c in ("create", "info", "rm", "--verbose"))


@pytest.mark.parametrize("args,words", [
    ([], "the following arguments are required: COMMAND"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["create"], "the following arguments are required: POOLSET"),
    (["create", "--size", "12Q", "x"], "invalid size '12Q'"),
    (["create", "--size", "1M", "x"], "1M is smaller than the minimum pool size 2M"),
    (["create", "--signature", "TOOLONGSIG", "x"], "invalid signature 'TOOLONGSIG'"),
    (["info"], "the following arguments are required: POOLSET|PART"),
    (["rm"], "the following arguments are required: POOLSET"),
])
def test_usage_errors_exit_2(run, args, words):
    res = run(*args)
    assert res.returncode == 2 and words in res.stderr and "Traceback" not in res.stderr


def test_create_usage_errors_that_need_the_file_system(run, pool_dir):
    res = run("create", pool_dir / "nothing")
    assert res.returncode == 2
    assert f"{pool_dir}/nothing does not exist: give --size" in res.stderr
    path = write_set(pool_dir / "p.set", f"4M {pool_dir}/m")
    res = run("create", "--size", "8M", path)
    assert res.returncode == 2 and "--size is for a single pool file" in res.stderr
    assert sorted(p.name for p in pool_dir.iterdir()) == ["p.set"]


# -- create and info -------------------------------------------------------------------------

def test_create_then_info_shows_replicas_headers_and_health(run, pool_dir):
    d = pool_dir
    path = write_set(d / "p.set", f"8M {d}/m0", f"4M {d}/m1", "REPLICA", f"12M {d}/r0")
    res = run("create", path)
    assert res.returncode == 0 and res.stderr == "" and res.stdout == ""
    assert all((d / n).exists() for n in ("m0", "m1", "r0"))
    res = run("info", path)
    assert res.returncode == 0 and res.stderr == ""
    out = res.stdout
    assert _fields(out, "Pool set") == [str(path)]
    assert _fields(out, "Pool size") == [str(12 * M - HDR_SIZE)]
    assert _fields(out, "Number of replicas") == ["2"]
    assert _fields(out, "Replica state") == ["no stale replicas"]
    assert "Replica 0 (master) - local, 2 part(s):" in out
    assert "Replica 1 - local, 1 part(s):" in out
    assert _fields(out, "health") == ["healthy", "healthy"]
    assert _fields(out, "path") == [f"{d}/m0", f"{d}/m1", f"{d}/r0"]
    assert _fields(out, "size") == [str(8 * M), str(4 * M), str(12 * M)]
    assert _fields(out, "type") == ["regular file"] * 3
    assert _fields(out, "Signature") == ["PMREPLIC"] * 3
    checksums = _fields(out, "Checksum")
    assert len(checksums) == 3 and all(v.endswith("[OK]") for v in checksums)
    assert _fields(out, "Links") == ["consistent"] * 3
    uuids = [str(PoolHeader.unpack((d / n).read_bytes()[:HDR_SIZE]).uuid)
             for n in ("m0", "m1", "r0")]
    assert _fields(out, "UUID") == uuids
    assert _fields(out, "Next part UUID") == [uuids[1], uuids[0], uuids[2]]
    assert _fields(out, "Next replica UUID") == [uuids[2], uuids[2], uuids[0]]
    assert "problem" not in out

    info = json.loads(run("info", "--json", path).stdout)
    assert info["healthy"] is True and info["pool_size"] == 12 * M - HDR_SIZE
    assert [r["health"] for r in info["replicas"]] == ["healthy", "healthy"]
    assert [p["header"]["uuid"] for r in info["replicas"] for p in r["parts"]] == uuids
    assert info["replica_state"]["stale"] == [] and info["replica_state"]["intact"] is True


def test_create_single_file_pool_with_signature(run, pool_dir, pmempool):
    path = pool_dir / "pool"
    res = run("create", "--size", "8M", "--signature", "PMEMOBJ", path)
    assert res.returncode == 0, res.stderr
    assert path.stat().st_size == 8 * M
    res = run("info", path)
    assert _fields(res.stdout, "Pool file") == [str(path)]
    assert _fields(res.stdout, "Signature") == ["PMEMOBJ"]
    assert _fields(res.stdout, "health") == ["healthy"]
    # pmempool reads the same header and finds its checksum right
    pm = subprocess.run([pmempool, "info", str(path)], capture_output=True, text=True)
    assert _fields(pm.stdout, "Checksum")[0] == _fields(res.stdout, "Checksum")[0]
    assert _fields(pm.stdout, "UUID") == _fields(res.stdout, "UUID")


def test_info_on_a_pmempool_made_set(run, pool_dir, pmempool):
    d = pool_dir
    path = write_set(d / "pmdk.set", f"8M {d}/a", f"4M {d}/b", "REPLICA", f"6M {d}/c",
                     f"6M {d}/e")
    mk = subprocess.run([pmempool, "create", "obj", str(path)], capture_output=True, text=True)
    assert mk.returncode == 0, mk.stderr
    res = run("info", path)
    assert res.returncode == 0 and res.stderr == ""
    out = res.stdout
    assert _fields(out, "Number of replicas") == ["2"]
    assert "Replica 0 (master) - local, 2 part(s):" in out
    assert "Replica 1 - local, 2 part(s):" in out
    assert _fields(out, "health") == ["healthy", "healthy"]
    assert _fields(out, "Signature") == ["PMEMOBJ"] * 4
    assert _fields(out, "Links") == ["consistent"] * 4
    assert _fields(out, "Mandatory features") == ["0x6 [CKSUM_2K, SHUTDOWN_STATE]"] * 4
    # the same uuids and checksums pmempool shows for each part
    for i, part in enumerate("abce"):
        pm = subprocess.run([pmempool, "info", str(d / part)], capture_output=True, text=True)
        for key in ("Pool set UUID", "UUID", "Previous part UUID", "Next part UUID",
                    "Previous replica UUID", "Next replica UUID", "Creation Time",
                    "Alignment Descriptor", "Machine", "Data", "Class"):
            assert _fields(out, key)[i] == _fields(pm.stdout, key)[0], key
        ours = int(_fields(out, "Checksum")[i].split()[0], 16)
        theirs = int(_fields(pm.stdout, "Checksum")[0].split()[0], 16)
        assert ours == theirs and _fields(out, "Checksum")[i].endswith("[OK]")


def test_info_on_part_files(run, pool_dir, pmempool):
    d = pool_dir
    path = write_set(d / "pmdk.set", f"8M {d}/a", f"4M {d}/b")
    assert subprocess.run([pmempool, "create", "obj", str(path)]).returncode == 0
    res = run("info", d / "b")
    assert res.returncode == 0
    assert res.stdout.startswith("Part file:\n")
    assert _fields(res.stdout, "Signature") == ["PMEMOBJ [part file]"]
    assert _fields(res.stdout, "Checksum")[0].endswith("[OK]")
    path = write_set(d / "single.set", "OPTION SINGLEHDR", f"8M {d}/h0", f"4M {d}/h1")
    assert subprocess.run([pmempool, "create", "obj", str(path)]).returncode == 0
    err = _one_error(run("info", d / "h1"))
    assert err == (f"pmreplica: {d}/h1: no pool header (all zeros): not a pool, or a later "
                   "part of a SINGLEHDR pool set (EINVAL)")
    (d / "tiny").write_bytes(b"x" * 100)
    assert _one_error(run("info", d / "tiny")) == (
        f"pmreplica: {d}/tiny: not a pool: shorter than a pool header (100 bytes) (EINVAL)")


def test_info_reports_a_corrupted_header(run, pool_dir):
    d = pool_dir
    path = write_set(d / "p.set", f"4M {d}/m", "REPLICA", f"2M {d}/r0", f"3M {d}/r1")
    assert run("create", path).returncode == 0
    with open(d / "r1", "r+b") as f:
        f.seek(50)
        f.write(b"\x01")
    res = run("info", path)
    assert res.returncode == 0
    out = res.stdout
    assert _fields(out, "health") == ["healthy", "broken"]
    checks = _fields(out, "Checksum")
    assert [c.endswith("[OK]") for c in checks] == [True, True, False]
    assert checks[2].endswith("[wrong]")
    assert _fields(out, "Links")[1:] == ["not checked (a header of this replica is invalid)"] * 2
    assert _fields(out, "problem") == ["invalid header checksum"]
    info = json.loads(run("info", "--json", path).stdout)
    assert info["healthy"] is False
    assert info["replicas"][1]["problems"] == [f"{d}/r1: invalid header checksum"]


def test_info_shows_failed_and_stale_replicas(run, pool_dir, failing_fs):
    d, fs = pool_dir, failing_fs.mountpoint
    path = write_set(d / "p.set", f"4M {d}/m", "REPLICA", f"4M {fs}/r1", "REPLICA", f"4M {d}/r2")
    with PoolSet.create(path) as pool:
        os.unlink(d / "r2")
        failing_fs.shut_down()
        pool.persist(HDR_SIZE, 10)
        assert [r.state for r in pool.replicas] == ["ok", "failed", "failed"]
    failing_fs.remount()  # replica 1's storage is back, with what it held before the failure
    res = run("info", path)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert _fields(out, "Replica state") == [
        "stale replicas 1, 2 (written since: 4096 bytes in 1 ranges)"]
    assert _fields(out, "health") == ["healthy", "stale", "broken"]
    assert _fields(out, "type") == ["regular file", "regular file", "missing"]
    assert _fields(out, "problem") == ["part file is missing"]
    info = json.loads(run("info", "--json", path).stdout)
    assert info["replica_state"]["stale"] == [1, 2] and info["healthy"] is False


def test_info_lists_remote_replicas_without_contacting_them(run, pool_dir):
    d = pool_dir
    path = write_set(d / "p.set", f"4M {d}/m")
    assert run("create", path).returncode == 0
    write_set(d / "p.set", f"4M {d}/m", "REPLICA user@node.invalid:2222 sub/r.set")
    res = run("info", path)
    assert res.returncode == 0, res.stderr
    assert "Replica 1 - remote: node user@node.invalid:2222, pool set sub/r.set" in res.stdout
    assert _fields(res.stdout, "health") == ["healthy", "remote (not contacted)"]
    # the data path this client would take, TLS included (on unless turned off)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RPMEM_", "PMREPLICA_"))}
    assert [t.split(", ")[-1] for t in _fields(run("info", path, env=env).stdout,
                                               "transport")] == ["TLS 1.3"]
    clear = run("info", path, env={**env, "PMREPLICA_TCP_TLS": "0"})
    assert _fields(clear.stdout, "transport")[0].endswith(", clear text (PMREPLICA_TCP_TLS=0)")
    info = json.loads(run("info", "--json", path).stdout)
    assert info["replicas"][1] == {"index": 1, "kind": "remote", "node": "user@node.invalid:2222",
                                   "pool_set": "sub/r.set", "problems": [],
                                   "health": "remote (not contacted)",
                                   "described": [["launcher", "paramiko"], [
                                       "transport",
                                       "tcp (the target's address is unknown), TLS 1.3"]]}


# -- errors ----------------------------------------------------------------------------------

def test_create_errors_are_one_line_and_lose_nothing(run, pool_dir):
    d = pool_dir
    (d / "r").write_bytes(b"keep me")
    path = write_set(d / "p.set", f"4M {d}/m", "REPLICA", f"4M {d}/r")
    assert _one_error(run("create", path)) == f"pmreplica: file {d}/r already exists (EEXIST)"
    assert (d / "r").read_bytes() == b"keep me" and not (d / "m").exists()
    bad = write_set(d / "bad.set", f"4M {d}/m", "REPLICA", f"4X {d}/x")
    assert _one_error(run("create", bad)) == (
        f"pmreplica: {bad}:4: incorrect format of size (EINVAL)")
    small = write_set(d / "small.set", f"4M {d}/m", "REPLICA", f"1M {d}/x")
    assert _one_error(run("create", small)) == (
        f"pmreplica: {small}:4: part size {M} smaller than the minimum part size {2 * M} (2M) "
        "(EINVAL)")
    assert sorted(p.name for p in d.iterdir()) == ["bad.set", "p.set", "r", "small.set"]


def test_info_errors_are_one_line(run, pool_dir):
    d = pool_dir
    assert _one_error(run("info", d / "missing")) == (
        f"pmreplica: {d}/missing: No such file or directory")
    assert _one_error(run("info", d)) == (
        f"pmreplica: {d}: not a regular file (a directory) (EISDIR)")
    bad = d / "bad.set"
    bad.write_text("PMEMPOOLSET\nREPLICA\n")
    assert _one_error(run("info", bad)) == f"pmreplica: {bad}:2: no pool set parts (EINVAL)"


# -- rm ----------------------------------------------------------------------------------------

def test_rm_removes_parts_and_with_l_the_set(run, pool_dir):
    d = pool_dir
    path = write_set(d / "p.set", f"4M {d}/m0", f"4M {d}/m1", "REPLICA", f"8M {d}/r")
    assert run("create", path).returncode == 0
    res = run("rm", path)
    assert res.returncode == 0 and res.stdout == "" and res.stderr == ""
    assert sorted(p.name for p in d.iterdir()) == ["p.set"]
    assert run("create", path).returncode == 0
    res = run("rm", "-v", "-l", path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [f"removed '{d}/{n}'" for n in ("m0", "m1", "r", "p.set")]
    assert list(d.iterdir()) == []


def test_rm_missing_files_fail_unless_forced(run, pool_dir):
    d = pool_dir
    path = write_set(d / "p.set", f"4M {d}/m", "REPLICA", f"4M {d}/r0", f"4M {d}/r1")
    assert run("create", path).returncode == 0
    os.unlink(d / "r0")
    res = run("rm", path)
    assert _one_error(res) == f"pmreplica: {d}/r0: No such file or directory"
    assert sorted(p.name for p in d.iterdir()) == ["p.set"]  # the others went all the same
    assert run("create", path).returncode == 0
    os.unlink(d / "m")
    res = run("rm", "-f", "-l", path)
    assert res.returncode == 0 and res.stderr == ""
    assert list(d.iterdir()) == []
    assert _one_error(run("rm", path)) == f"pmreplica: {path}: No such file or directory"
    assert run("rm", "-f", path).returncode == 0


def test_rm_single_file_pool(run, pool_dir):
    pool = pool_dir / "pool"
    assert run("create", "--size", "4M", pool).returncode == 0
    assert run("rm", pool).returncode == 0 and not pool.exists()


def test_verbose_logs_to_stderr(run, pool_dir):
    path = write_set(pool_dir / "p.set", f"4M {pool_dir}/m")
    res = run("-v", "create", path)
    assert res.returncode == 0 and res.stderr == f"pmreplica: created {path}\n"
    res = run("rm", path)
    res = run("create", path, "-v")
    assert res.stderr == f"pmreplica: created {path}\n"


# -- where later commands join -------------------------------------------------------------

def test_a_command_module_is_one_line_away(tmp_path, monkeypatch, capsys):
    (tmp_path / "hello_cmd.py").write_text(textwrap.dedent('''
        def cmd_hello(args):
            print(f"hello {args.name} v={args.verbose}")
            return 3

        def register(sub):
            p = sub.add_parser("hello", help="say hello")
            p.add_argument("name")
            p.set_defaults(func=cmd_hello)
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "COMMAND_MODULES", cli.COMMAND_MODULES + ("hello_cmd",))
    assert cli.main(["hello", "world"]) == 3
    assert cli.main(["hello", "-v", "you"]) == 3
    assert capsys.readouterr().out == "hello world v=0\nhello you v=1\n"
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0 and "say hello" in capsys.readouterr().out


def test_main_turns_oserrors_into_exit_1(capsys, pool_dir):
    assert cli.main(["info", str(pool_dir / "nope")]) == 1
    assert capsys.readouterr().err == f"pmreplica: {pool_dir}/nope: No such file or directory\n"


def test_rm_refuses_a_pool_set_that_is_open(pool_dir, pmreplica_cmd):
    """pmreplica rm must not pull the parts away from a pool another process has open."""
    from pmreplica import PoolSet

    path = pool_dir / "open.set"
    path.write_text(f"PMEMPOOLSET\n4M {pool_dir}/m0\nREPLICA\n4M {pool_dir}/r0\n")
    with PoolSet.create(path):
        r = subprocess.run([*pmreplica_cmd, "rm", str(path)], capture_output=True, text=True)
        assert r.returncode == 1
        assert r.stderr.strip() == (f"pmreplica: {path}: the pool set is open in another "
                                    "process; not removed (EBUSY)")
        assert (pool_dir / "m0").exists() and (pool_dir / "r0").exists()
    r = subprocess.run([*pmreplica_cmd, "rm", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not (pool_dir / "m0").exists() and not (pool_dir / "r0").exists()


def test_info_shows_a_corrupted_creation_time_instead_of_failing(pool_dir, pmreplica_cmd):
    path = pool_dir / "p.set"
    path.write_text(f"PMEMPOOLSET\n4M {pool_dir}/m0\n")
    subprocess.run([*pmreplica_cmd, "create", str(path)], check=True)
    with open(pool_dir / "m0", "r+b") as f:  # crtime's top byte: a year no clock can show
        f.seek(127)
        f.write(b"\x7f")
    r = subprocess.run([*pmreplica_cmd, "info", str(path)], capture_output=True, text=True)
    assert "(not a valid time)" in r.stdout
    assert "[wrong]" in r.stdout  # and the checksum says the header is corrupted
    assert "Traceback" not in r.stderr


def test_create_reports_progress_as_json_lines_and_lines(run, pool_dir):
    """Allocation is shown while it goes: every replica, as JSON events with --json, as
    plain lines off a terminal (every step here: the interval is 0)."""
    d, M = pool_dir, 1 << 20
    path = write_set(d / "p.set", f"600M {d}/m", "REPLICA", f"300M {d}/r1", f"300M {d}/r2")
    res = run("create", "--json", path)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["replicas"] == 2
    events = [json.loads(line) for line in res.stderr.splitlines()]
    assert {(e["replica"], e["phase"]) for e in events} == {(0, "create"), (1, "create")}
    master = [e for e in events if e["replica"] == 0]
    assert master[0]["event"] == "start" and master[-1]["event"] == "end"
    assert master[-1]["done"] == master[-1]["total"] == 600 * M
    run("rm", path)
    res = run("create", path, env=dict(os.environ, PMREPLICA_PROGRESS_INTERVAL="0"))
    assert res.returncode == 0 and f"create replica 0 ({d}/m): 256.0 MiB of 600.0 MiB" in \
        res.stderr, res.stderr

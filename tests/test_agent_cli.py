"""pmreplica-agent's command line: ``--remove`` mode and its exit codes, and the settings
from config files (``--config``, ~/.pmreplica-agent.conf) under the command line."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from pmreplica.header import HDR_SIZE
from rpmem_common import proto
from pmreplica.rpmem.client import RemotePool

from .rpmem_helpers import (AGENT, M, agent_command, attr, local_node, local_pool,  # noqa: F401
                            transport)

pytestmark = pytest.mark.timeout(60)


def agent(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([AGENT, *args], capture_output=True, stdin=subprocess.DEVNULL,
                          timeout=30, **kw)


def make_pool(node, name, sizes=(8 * M,)):
    parts = node.make_set(name, sizes)
    size = sum(sizes) - (len(sizes) - 1) * HDR_SIZE
    RemotePool.create(node.target, name, local_pool(size, None), attr=attr(),
                      config=node.config()).close()
    return parts


def remove(node, name, *flags):
    done = agent("--poolset-dir", str(node.dir), "--remove", name, *flags)
    # the status word on stdout (what the client reads) says what the exit code says
    assert done.stdout == proto.encode_ready(done.returncode), done
    return done


# -- --remove --------------------------------------------------------------------------------------
def test_remove_mode_exit_codes(local_node):
    node = local_node
    parts = make_pool(node, "a.set", (4 * M, 4 * M))
    assert remove(node, "a.set").returncode == 0
    assert not any(p.exists() for _, p in parts) and (node.dir / "a.set").exists()

    done = remove(node, "a.set")  # no parts left: not a consistent pool any more
    assert done.returncode in (errno.EINVAL, errno.ENOENT)
    assert remove(node, "a.set", "--force").returncode == 0
    assert remove(node, "a.set", "--force", "--pool-set").returncode == 0
    assert not (node.dir / "a.set").exists()

    done = remove(node, "a.set")
    assert done.returncode == errno.ENOENT and b"a.set" in done.stderr
    for name in ("/etc/passwd", "../a.set", "x/../../a.set"):
        assert remove(node, name).returncode == errno.EINVAL, name
    done = agent("--poolset-dir", str(node.dir / "none"), "--remove", "a.set")
    assert done.returncode == errno.ENOENT and done.stdout == proto.encode_ready(errno.ENOENT)


def test_remove_mode_refuses_an_inconsistent_pool_without_force(local_node):
    parts = make_pool(local_node, "c.set")
    with open(parts[0][1], "r+b") as f:
        f.seek(HDR_SIZE - 8)
        f.write(b"\1" * 8)  # the header checksum
    done = remove(local_node, "c.set")
    assert done.returncode == errno.EINVAL and b"inconsistent" in done.stderr
    assert parts[0][1].exists()
    assert remove(local_node, "c.set", "--force").returncode == 0
    assert not parts[0][1].exists()


def test_remove_mode_refuses_an_open_pool(local_node):
    parts = make_pool(local_node, "b.set")
    with RemotePool.open(local_node.target, "b.set", local_pool(8 * M, None),
                         config=local_node.config()):
        assert remove(local_node, "b.set", "--force").returncode == errno.EBUSY
    assert parts[0][1].exists()
    assert remove(local_node, "b.set").returncode == 0


def test_remove_pool_set_removes_the_name_given_not_a_symlinks_target(local_node):
    parts = make_pool(local_node, "real/r.set")
    (local_node.dir / "alias.set").symlink_to("real/r.set")
    assert remove(local_node, "alias.set", "--pool-set").returncode == 0
    assert not any(p.exists() for _, p in parts)
    assert not (local_node.dir / "alias.set").is_symlink()
    assert (local_node.dir / "real/r.set").exists()


# -- settings --------------------------------------------------------------------------------------
def test_config_file_sets_directory_and_lane_cap(local_node, pool_dir):
    node = local_node
    node.make_set("r.set")
    conf = pool_dir / "agent.conf"
    conf.write_text(f"# pmreplica-agent\n\npoolset-dir = {node.dir}  # the sets\nmax-lanes=2\n")
    cmd = agent_command(None, "--config", str(conf))
    pool = local_pool(8 * M, None)
    with RemotePool.create(node.target, "r.set", pool, nlanes=8, attr=attr(),
                           config=node.config(RPMEM_CMD=cmd)) as rp:
        assert rp.nlanes == 2
        rp.persist(HDR_SIZE, 100, 1)
    # the command line wins over the file
    with RemotePool.open(node.target, "r.set", pool, nlanes=8,
                         config=node.config(RPMEM_CMD=cmd + " --max-lanes 3")) as rp:
        assert rp.nlanes == 3


def test_user_config_file_is_read_and_config_overrides_it(local_node, pool_dir):
    node = local_node
    home = pool_dir / "home"
    home.mkdir()
    (home / ".pmreplica-agent.conf").write_text(f"poolset-dir = {node.dir}\nmax-lanes = 5\n")
    node.make_set("r.set")
    prefix = f"env HOME={home}"
    pool = local_pool(8 * M, None)
    with RemotePool.create(node.target, "r.set", pool, nlanes=8, attr=attr(),
                           config=node.config(RPMEM_CMD=agent_command(None, prefix=prefix))) as rp:
        assert rp.nlanes == 5
    conf = pool_dir / "agent.conf"
    conf.write_text("max-lanes = 1\n")
    cmd = agent_command(None, "--config", str(conf), prefix=prefix)
    with RemotePool.open(node.target, "r.set", pool, nlanes=8,
                         config=node.config(RPMEM_CMD=cmd)) as rp:
        assert rp.nlanes == 1


def test_log_file_and_level(local_node, pool_dir):
    node = local_node
    node.make_set("r.set")
    log = pool_dir / "agent.log"
    conf = pool_dir / "agent.conf"
    conf.write_text(f"log-file = {log}\nlog-level = info\n")
    cmd = node.command("--config", str(conf))
    RemotePool.create(node.target, "r.set", local_pool(8 * M, None), attr=attr(),
                      config=node.config(RPMEM_CMD=cmd)).close()
    text = log.read_text()
    assert "created r.set" in text and "INFO" in text


@pytest.mark.parametrize("content,why", [
    ("poolset_dirx = /tmp\n", "unknown setting"),
    ("max-lanes = 0\n", "max-lanes must be a positive integer"),
    ("max-lanes = many\n", "max-lanes must be a positive integer"),
    ("persist-apm = maybe\n", "persist-apm must be yes or no"),
    ("require-tls = always\n", "require-tls must be yes or no"),
    ("log-level = loud\n", "log-level must be"),
    ("just words\n", "unknown setting"),
])
def test_bad_config_file_fails_the_start_naming_file_and_line(local_node, pool_dir, content, why):
    node = local_node
    node.make_set("r.set")
    conf = pool_dir / "agent.conf"
    conf.write_text("# fine so far\n" + content)
    with pytest.raises(OSError) as e:
        RemotePool.create(node.target, "r.set", local_pool(8 * M, None), attr=attr(),
                          config=node.config(RPMEM_CMD=node.command("--config", str(conf))))
    assert e.value.errno == errno.EINVAL
    assert f"{conf}:2" in str(e.value) and why in str(e.value)
    assert not (node.dir / "r.part0").exists()


@pytest.mark.parametrize("args,err", [
    (("--config", "/nonexistent/agent.conf"), errno.ENOENT),
    (("--max-lanes", "0"), errno.EINVAL),
    (("--max-lanes", "-2"), errno.EINVAL),
])
def test_bad_command_line_settings_fail_the_start(local_node, args, err):
    node = local_node
    node.make_set("r.set")
    with pytest.raises(OSError) as e:
        RemotePool.create(node.target, "r.set", local_pool(8 * M, None), attr=attr(),
                          config=node.config(RPMEM_CMD=node.command(*args)))
    assert e.value.errno == err, e.value
    assert not (node.dir / "r.part0").exists()


def test_unreadable_config_file_is_named(local_node, pool_dir):
    node = local_node
    node.make_set("r.set")
    conf = pool_dir / "agent.conf"
    conf.write_text("max-lanes = 2\n")
    conf.chmod(0o000)
    if os.geteuid() == 0:  # root reads any file: let the agent run as nobody
        prefix = "env HOME=/nonexistent setpriv --reuid=65534 --regid=65534 --clear-groups"
        pool_dir.chmod(0o755)
    else:
        prefix = ""
    with pytest.raises(OSError) as e:
        RemotePool.create(node.target, "r.set", local_pool(8 * M, None), attr=attr(),
                          config=node.config(RPMEM_CMD=node.command("--config", str(conf),
                                                                    prefix=prefix)))
    assert e.value.errno == errno.EACCES and str(conf) in str(e.value)


def test_agent_start_imports_stay_lean():
    """Every pool's create or open starts an agent, and a further pool on a reused SSH
    connection is to take <= 50 ms: the agent's start must not pull in the heavy modules
    (dataclasses and typing import inspect and more; pluggy, paramiko and hashlib are
    for the client, replica-sync and verify only), nor anything of the client package."""
    code = ("import sys, remote_agent.main, remote_agent.session, remote_agent.pooldb, "
            "remote_agent.tcp_server; print(' '.join(sorted(sys.modules)))")
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                check=True).stdout.split())
    heavy = {"typing", "dataclasses", "inspect", "pluggy", "paramiko", "hashlib", "secrets",
             "pyverbs"} & loaded
    assert not heavy, f"agent start imports {sorted(heavy)}"
    # what the agent shares with the client is rpmem_common: nothing of the client package
    assert "rpmem_common.proto" in loaded
    assert not [m for m in loaded if m.startswith("pmreplica.rpmem")]

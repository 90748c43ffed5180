"""Include in the ssh config read by the paramiko launcher: included host entries reach a
real sshd, scopes after and inside an Include mean what OpenSSH makes of them, what cannot
be followed is refused naming the file and line, and what paramiko cannot read goes to
the OpenSSH client."""

from __future__ import annotations

import errno
import os
import shlex
import subprocess
import sys

import pytest

from pmreplica.rpmem.address import Target
from pmreplica.rpmem.environ import RpmemConfig
from pmreplica.rpmem.launch import OpenSSHChannel, close_connections, describe, launch
from pmreplica.rpmem.ssh.includes import NeedsOpenSSH
from pmreplica.rpmem.ssh.settings import resolve


@pytest.fixture(autouse=True)
def _fresh_connections():
    close_connections()
    yield
    close_connections()


def settings(conf, host: str = "node"):
    return resolve(Target(host), RpmemConfig.from_env({"PMREPLICA_SSH_CONFIG": str(conf)}))


def test_a_host_entry_from_an_included_file_reaches_the_server(sshd, tmp_path):
    (tmp_path / "conf.d").mkdir()
    sshd.write_ssh_config(tmp_path / "conf.d" / "50-test.conf")
    main = tmp_path / "config"
    main.write_text(f"Include {tmp_path}/conf.d/*.conf\nServerAliveInterval 7\n")
    env = sshd.env(RPMEM_CMD=f"{shlex.quote(sys.executable)} -c 'print(\"in\")'",
                   PMREPLICA_SSH_CONFIG=str(main))
    chan = launch(sshd.alias, [], config=RpmemConfig.from_env(env))
    assert chan.recv_exact(3) == b"in\n"
    assert chan.close() == 0
    # the line after the Include is global again, not part of the included Host block
    assert settings(main, "elsewhere").server_alive_interval == 7


def test_relative_names_are_under_dot_ssh_and_globs_read_in_order(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ssh" / "conf.d").mkdir(parents=True)
    (tmp_path / ".ssh" / "conf.d" / "20-b").write_text("Host node\n    Port 2202\n")
    (tmp_path / ".ssh" / "conf.d" / "10-a").write_text("Host node\n    Port 2201\n")
    main = tmp_path / "config"
    main.write_text("Include conf.d/* missing-is-skipped\nHost node\n    Port 2203\n")
    assert settings(main).port == 2201  # the first obtained value wins, 10-a before 20-b


def test_an_include_inside_a_block_adds_options_under_its_condition(tmp_path):
    (tmp_path / "opts").write_text("User alice\nPort 2222\n")
    main = tmp_path / "config"
    main.write_text(f"Host node\n    Include {tmp_path}/opts\nHost *\n    User bob\n")
    assert (settings(main).user, settings(main).port) == ("alice", 2222)
    assert (settings(main, "other").user, settings(main, "other").port) == ("bob", 22)


def test_blocks_included_inside_a_block_hand_the_target_to_openssh(sshd, tmp_path, caplog):
    (tmp_path / "blocks").write_text("Host *\n    ServerAliveInterval 5\n")
    main = sshd.write_ssh_config(tmp_path / "config")
    lines = main.read_text().count("\n")
    main.write_text(main.read_text() + f"    Include {tmp_path}/blocks\n")
    with pytest.raises(NeedsOpenSSH) as info:  # paramiko's config cannot say it
        settings(main, sshd.alias)
    assert info.value.errno == errno.EOPNOTSUPP and f"{main}, line {lines + 1}" in str(info.value)
    env = sshd.env(RPMEM_CMD="cat", PMREPLICA_SSH_CONFIG=str(main))
    chan = launch(sshd.alias, [], config=RpmemConfig.from_env(env))  # OpenSSH reads it
    assert isinstance(chan, OpenSSHChannel)
    chan.sendall(b"ok")
    assert chan.recv_exact(2) == b"ok" and chan.close() == 0
    assert "using the OpenSSH client" in caplog.text and f"{main}, line" in caplog.text
    assert describe(sshd.alias, RpmemConfig.from_env(env)).startswith("openssh (the paramiko")


def test_an_include_loop_is_eloop(tmp_path):
    main = tmp_path / "config"
    main.write_text(f"Include {main}\n")
    with pytest.raises(OSError) as info:
        settings(main)
    assert info.value.errno == errno.ELOOP and str(main) in str(info.value)


def test_an_unreadable_included_file_is_named(tmp_path):
    if os.geteuid() == 0:
        secret = tmp_path / "dir-not-file"
        secret.mkdir()  # root reads any file: a directory fails to open for everyone
    else:
        secret = tmp_path / "secret"
        secret.write_text("Port 1\n")
        secret.chmod(0)
    main = tmp_path / "config"
    main.write_text(f"Include {secret}\n")
    with pytest.raises(OSError) as info:
        settings(main)
    assert str(secret) in str(info.value) and f"{main}, line 1" in str(info.value)


def test_a_file_added_where_a_pattern_looks_is_read_at_the_next_launch(tmp_path):
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "50-late").write_text("Host node\n    Port 2250\n")
    main = tmp_path / "config"
    main.write_text(f"Include {tmp_path}/conf.d/*\n")
    assert settings(main).port == 2250
    (tmp_path / "conf.d" / "10-early").write_text("Host node\n    Port 2210\n")
    assert settings(main).port == 2210
    (tmp_path / "conf.d" / "10-early").write_text("Host node\n    Port 22100\n")  # edited
    assert settings(main).port == 22100


def test_tokens_expand_as_ssh_expands_them(tmp_path, monkeypatch):
    monkeypatch.setenv("PMR_TEST_DIR", str(tmp_path))
    conf = tmp_path / "config"
    conf.write_text("Host alias\n    HostName real-%h.example\n    Port 2222\n    User bob\n"
                    "    HostKeyAlias keyname\n"
                    "    UserKnownHostsFile ~/kh_%h_%p_%r_%n_%k_%%_%C"
                    " ${PMR_TEST_DIR}/%L_%l_%i_%u_%d\n"
                    "    IdentityAgent ~/agent_%C\n")
    ours = settings(conf, "alias")
    done = subprocess.run(["ssh", "-G", "-F", str(conf), "alias"], capture_output=True,
                          text=True, check=True, stdin=subprocess.DEVNULL)
    theirs = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert ours.hostname == theirs["hostname"] == "real-alias.example"
    assert " ".join(ours.known_hosts) == theirs["userknownhostsfile"]
    assert ours.identity_agent == theirs["identityagent"]
    assert "%" in ours.known_hosts[0] and str(tmp_path) in ours.known_hosts[1]

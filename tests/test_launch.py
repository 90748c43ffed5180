"""Starting commands on a target through a real sshd (paramiko and OpenSSH) and locally:
the byte pipe, SSH_CONNECTION, host key checking, connection reuse, RPMEM_CMD round robin,
and the errors a user sees."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pwd
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pmreplica.rpmem.address import Target, parse_target
from pmreplica.rpmem.environ import RpmemConfig
from pmreplica.rpmem.launch import AgentChannel, close_connections, launch

from .helpers import run_threads, wake_ups, woken_since

PY = shlex.quote(sys.executable)
LAUNCHERS = ["paramiko", "openssh", "local"]


@pytest.fixture(autouse=True)
def _fresh_connections():
    """Each test starts without cached SSH connections and leaves none behind."""
    close_connections()
    yield
    close_connections()


def config(sshd, **env: str | None) -> RpmemConfig:
    return RpmemConfig.from_env(sshd.env(**env))


def read_line(chan: AgentChannel, limit: int = 65536) -> bytes:
    line = bytearray()
    while not line.endswith(b"\n"):
        line += chan.recv_exact(1)
        assert len(line) < limit
    return bytes(line)


def python_cmd(code: str) -> str:
    return f"{PY} -c {shlex.quote(code)}"


# -- the byte pipe ------------------------------------------------------------------------
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_cat_round_trip_is_byte_exact(sshd, launcher):
    data = os.urandom(1 << 20) + bytes(range(256)) * 16
    chan = launch(sshd.alias, [], config=config(sshd, RPMEM_CMD="cat", PMREPLICA_LAUNCHER=launcher))
    sender = threading.Thread(target=chan.sendall, args=(data,))
    sender.start()
    back = chan.recv_exact(len(data))
    sender.join()
    assert back == data
    assert chan.close() == 0  # cat saw the end of its stdin and exited cleanly


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_close_waiting_for_the_agent_to_exit_ends_when_it_is_given_up(sshd, launcher):
    """close() waits up to 5 s for the agent to exit once its input ended. When the
    heartbeat gives its host up meanwhile (abort(), from another thread; here after 0.3 s)
    the wait ends at once. The command never exits, as a frozen host's agent never does."""
    chan = launch(sshd.alias, [], config=config(
        sshd, RPMEM_CMD=python_cmd("import os, time; print(os.getpid(), flush=True); "
                                   "time.sleep(10)"),
        PMREPLICA_LAUNCHER=launcher))
    pid = int(read_line(chan))
    try:
        threading.Timer(0.3, chan.abort).start()
        t0 = time.monotonic()
        assert chan.close() is None  # no exit status: given up
        assert 0.25 < time.monotonic() - t0 < 2
    finally:
        with contextlib.suppress(ProcessLookupError):  # the host here is this machine
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_arguments_reach_the_command_verbatim(sshd, launcher):
    argv = ["plain", "two words", "it's", '"dq"', "$HOME", "a;b|c&&d", "*", "", "--remove"]
    chan = launch(sshd.alias, argv, config=config(
        sshd, RPMEM_CMD=python_cmd("import json, sys; print(json.dumps(sys.argv[1:]))"),
        PMREPLICA_LAUNCHER=launcher))
    assert json.loads(read_line(chan)) == argv
    assert chan.close() == 0


@pytest.mark.parametrize("launcher", ["paramiko", "openssh"])
def test_ssh_connection_names_the_address_the_client_reached(sshd, launcher):
    chan = launch(sshd.target, [], config=config(
        sshd, RPMEM_CMD=python_cmd("import os; print(os.environ['SSH_CONNECTION'])"),
        PMREPLICA_LAUNCHER=launcher))
    client_ip, _, server_ip, server_port = read_line(chan).decode().split()
    assert (client_ip, server_ip, int(server_port)) == ("127.0.0.1", "127.0.0.1", sshd.port)
    assert chan.peer_address == server_ip
    chan.close()


def test_local_agent_sees_loopback_ssh_connection(sshd):
    chan = launch("somehost", [], config=config(
        sshd, RPMEM_CMD=python_cmd("import os; print(os.environ['SSH_CONNECTION'])"),
        PMREPLICA_LAUNCHER="local"))
    assert read_line(chan) == b"127.0.0.1 0 127.0.0.1 0\n"
    assert chan.peer_address == "127.0.0.1"
    chan.close()


def test_local_launcher_finds_this_interpreters_console_scripts(sshd, monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # as under `.venv/bin/python app.py`
    chan = launch("localhost", [], config=config(sshd, RPMEM_CMD="command -v pmreplica-agent"),
                  launcher="local")
    assert read_line(chan).decode().strip() == os.path.join(os.path.dirname(sys.executable),
                                                            "pmreplica-agent")
    assert chan.close() == 0


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_exit_status_and_stderr_explain_a_lost_agent(sshd, launcher):
    code = "import sys; sys.stderr.write('agent: pool set dir missing\\n'); sys.exit(3)"
    chan = launch(sshd.alias, [], config=config(sshd, RPMEM_CMD=python_cmd(code),
                                                PMREPLICA_LAUNCHER=launcher))
    with pytest.raises(ConnectionResetError) as info:
        chan.recv_exact(4)
    assert info.value.errno == errno.ECONNRESET
    assert "exited with status 3" in str(info.value)
    assert "agent: pool set dir missing" in str(info.value)
    assert chan.target.host == sshd.alias and sshd.alias in str(info.value)
    assert chan.stderr_tail() == "agent: pool set dir missing"
    assert chan.close() == 3


@pytest.mark.parametrize("launcher", ["paramiko", "local"])
def test_heavy_stderr_does_not_stall_stdout(sshd, launcher):
    code = ("import sys\nfor i in range(40000): sys.stderr.write(f'noise {i:07d}\\n')\n"
            "sys.stderr.flush(); print('done', flush=True)")
    chan = launch(sshd.alias, [], config=config(sshd, RPMEM_CMD=python_cmd(code),
                                                PMREPLICA_LAUNCHER=launcher))
    chan.settimeout(30)
    assert read_line(chan) == b"done\n"
    assert chan.close() == 0
    assert chan.stderr_tail().splitlines()[-1] == "noise 0039999"


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_timeout_is_etimedout(sshd, launcher):
    chan = launch(sshd.alias, [], config=config(sshd, RPMEM_CMD="cat", PMREPLICA_LAUNCHER=launcher))
    chan.settimeout(0.2)
    with pytest.raises(TimeoutError) as info:
        chan.recv_exact(1)
    assert info.value.errno == errno.ETIMEDOUT
    chan.settimeout(5)
    chan.sendall(b"x")  # still usable after a timeout
    assert chan.recv_exact(1) == b"x"
    assert chan.close() == 0


def test_closed_channel_refuses_io(sshd):
    chan = launch(sshd.alias, [], config=config(sshd, RPMEM_CMD="cat", PMREPLICA_LAUNCHER="local"))
    assert chan.close() == 0
    with pytest.raises(OSError) as info:
        chan.sendall(b"x")
    assert info.value.errno == errno.EBADF


# -- command not found, RPMEM_CMD -----------------------------------------------------------
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_missing_command_is_enoent_naming_target_and_command(sshd, launcher):
    chan = launch(sshd.target, ["--arg"], config=config(
        sshd, RPMEM_CMD="/nonexistent/pmreplica-agent", PMREPLICA_LAUNCHER=launcher))
    with pytest.raises(OSError) as info:
        chan.recv_exact(4)  # the agent's ready word never comes
    assert info.value.errno == errno.ENOENT
    message = str(info.value)
    assert "command not found: /nonexistent/pmreplica-agent" in message
    assert sshd.target in message and "\n" not in message
    assert chan.close() == 127


@pytest.mark.parametrize("launcher", ["paramiko", "local"])
def test_rpmem_cmd_commands_are_used_round_robin(sshd, launcher):
    cfg = config(sshd, RPMEM_CMD="echo first | echo second|echo third", PMREPLICA_LAUNCHER=launcher)
    seen = []
    for _ in range(6):
        chan = launch(sshd.alias, ["arg"], config=cfg)
        seen.append(read_line(chan).decode().strip())
        chan.close()
    start = ["first arg", "second arg", "third arg"].index(seen[0])
    expected = (["first arg", "second arg", "third arg"] * 3)[start:start + 6]
    assert seen == expected


# -- SSH connections --------------------------------------------------------------------------
def test_second_launch_reuses_the_ssh_connection(sshd):
    cfg = config(sshd, RPMEM_CMD="cat")
    first = launch(sshd.alias, [], config=cfg)
    second = launch(sshd.target, [], config=cfg)  # the same host through the same settings
    assert second.transport is first.transport
    first.close()
    third = launch(sshd.alias, [], config=cfg)
    assert third.transport is first.transport
    for chan in (second, third):
        chan.sendall(b"ping")
        assert chan.recv_exact(4) == b"ping"
        assert chan.close() == 0


def test_a_kept_connection_sleeps_until_used_and_ends_when_closed(sshd):
    """The connection kept for the next launch costs nothing meanwhile: its reading thread
    sleeps (paramiko's own wakes ten times a second to look for a close), and a close ends
    that thread at once."""
    chan = launch(sshd.alias, [], config=config(sshd, RPMEM_CMD="cat"))
    assert chan.close() == 0
    transport = chan.transport
    assert transport.is_active()
    time.sleep(0.2)
    before = wake_ups()
    time.sleep(2)
    woken = woken_since(before)
    assert woken.get(f"{transport.name} ({transport.native_id})", 0) <= 2, woken
    close_connections()
    transport.join(1.0)
    assert not transport.is_alive()


def test_concurrent_launches_share_one_connection(sshd):
    cfg = config(sshd, RPMEM_CMD="cat")
    channels: list[AgentChannel] = []
    lock = threading.Lock()

    def one(_: int) -> None:
        chan = launch(sshd.alias, [], config=cfg)
        with lock:
            channels.append(chan)

    errors = run_threads(one, 8)
    assert not errors and len(channels) == 8
    assert len({id(c.transport) for c in channels}) == 1
    for i, chan in enumerate(channels):
        chan.sendall(bytes([i]))
        assert chan.recv_exact(1) == bytes([i])
        assert chan.close() == 0


def test_more_sessions_than_maxsessions_open_another_connection(sshd):
    # Debian's sshd allows 10 sessions per connection (MaxSessions); the 11th needs a new one.
    cfg = config(sshd, RPMEM_CMD="cat")
    channels = [launch(sshd.alias, [], config=cfg) for _ in range(11)]
    transports = {id(c.transport) for c in channels}
    assert len(transports) == 2
    for i, chan in enumerate(channels):
        chan.sendall(b"%d\n" % i)
        assert read_line(chan) == b"%d\n" % i
        assert chan.close() == 0


def test_dead_connection_is_replaced(sshd):
    cfg = config(sshd, RPMEM_CMD=python_cmd("import os; print(os.getppid(), flush=True); input()"))
    first = launch(sshd.alias, [], config=cfg)
    session_pid = int(read_line(first))  # sshd's process serving this connection
    os.kill(session_pid, signal.SIGKILL)
    with pytest.raises(ConnectionResetError):
        first.recv_exact(1)
    first.close()
    deadline = time.monotonic() + 10
    while first.transport.is_active() and time.monotonic() < deadline:
        time.sleep(0.01)
    second = launch(sshd.alias, [], config=cfg)
    assert second.transport is not first.transport
    assert int(read_line(second)) != session_pid
    second.sendall(b"\n")
    assert second.close() == 0


@pytest.mark.parametrize("launcher", ["paramiko", "openssh"])
def test_stopped_sshd_is_econnrefused_naming_target(sshd, launcher):
    cfg = config(sshd, RPMEM_CMD="cat", PMREPLICA_LAUNCHER=launcher)
    with sshd.stopped():
        with pytest.raises(OSError) as info:
            chan = launch(sshd.target, [], config=cfg)
            chan.recv_exact(1)  # OpenSSH reports its failure through its exit
    assert info.value.errno == errno.ECONNREFUSED
    assert sshd.target in str(info.value)
    assert "refused" in str(info.value).lower()


@pytest.mark.parametrize("launcher", ["paramiko", "openssh"])
def test_key_not_authorized_is_eacces(sshd, tmp_path, launcher):
    other = tmp_path / "id_other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    conf = sshd.write_ssh_config(tmp_path / "ssh_config")
    conf.write_text(conf.read_text().replace(str(sshd.client_key), str(other)))
    with pytest.raises(OSError) as info:
        chan = launch(sshd.alias, [], config=config(sshd, RPMEM_CMD="cat",
                                                    PMREPLICA_LAUNCHER=launcher,
                                                    PMREPLICA_SSH_CONFIG=str(conf)))
        chan.recv_exact(1)
    assert info.value.errno == errno.EACCES
    assert "permission denied" in str(info.value).lower()
    assert sshd.alias in str(info.value)


def test_proxy_command_is_honoured(sshd, tmp_path):
    relay = tmp_path / "relay.py"
    relay.write_text(
        "import socket, sys, threading\n"
        "s = socket.create_connection((sys.argv[1], int(sys.argv[2])))\n"
        "def up():\n"
        "    while data := sys.stdin.buffer.raw.read(65536):\n"
        "        s.sendall(data)\n"
        "    s.shutdown(socket.SHUT_WR)\n"
        "threading.Thread(target=up, daemon=True).start()\n"
        "while data := s.recv(65536):\n"
        "    sys.stdout.buffer.write(data); sys.stdout.buffer.flush()\n")
    conf = sshd.write_ssh_config(tmp_path / "ssh_config")
    conf.write_text(conf.read_text() + f"    ProxyCommand {sys.executable} {relay} %h %p\n")
    chan = launch(sshd.alias, [], config=config(sshd, RPMEM_CMD="cat",
                                                PMREPLICA_SSH_CONFIG=str(conf)))
    chan.sendall(b"through the proxy\n")
    assert read_line(chan) == b"through the proxy\n"
    assert chan.peer_address == "127.0.0.1"
    assert chan.close() == 0


# -- host keys ----------------------------------------------------------------------------------
def known_hosts_config(sshd, tmp_path: Path, content: str) -> tuple[Path, Path]:
    known = tmp_path / "known_hosts"
    known.write_text(content)
    return sshd.write_ssh_config(tmp_path / "ssh_config", known_hosts=known), known


def test_unknown_host_key_is_refused_by_default(sshd, tmp_path):
    conf, known = known_hosts_config(sshd, tmp_path, "")
    with pytest.raises(OSError) as info:
        launch(sshd.alias, [], config=config(sshd, RPMEM_CMD="cat", PMREPLICA_SSH_CONFIG=str(conf)))
    message = str(info.value)
    assert info.value.errno == errno.EACCES
    assert f"[127.0.0.1]:{sshd.port} is not known" in message
    assert "PMREPLICA_SSH_ACCEPT_NEW=1" in message and str(known) in message
    assert known.read_text() == ""  # nothing recorded


def test_unknown_host_key_is_refused_by_openssh_too(sshd, tmp_path):
    conf, known = known_hosts_config(sshd, tmp_path, "")
    chan = launch(sshd.alias, [], config=config(sshd, RPMEM_CMD="cat", PMREPLICA_LAUNCHER="openssh",
                                                PMREPLICA_SSH_CONFIG=str(conf)))
    with pytest.raises(OSError) as info:
        chan.recv_exact(1)
    assert info.value.errno == errno.EACCES
    assert "Host key verification failed" in str(info.value)
    assert known.read_text() == ""


def test_accept_new_records_the_key(sshd, tmp_path):
    conf, known = known_hosts_config(sshd, tmp_path, "# my hosts\n")
    chan = launch(sshd.alias, [], config=config(sshd, RPMEM_CMD="cat",
                                                PMREPLICA_SSH_CONFIG=str(conf),
                                                PMREPLICA_SSH_ACCEPT_NEW="1"))
    chan.close()
    assert known.read_text() == f"# my hosts\n[127.0.0.1]:{sshd.port} {sshd.host_public_key}\n"
    # The recorded key now lets a fresh connection in without the opt-in, and OpenSSH agrees.
    close_connections()
    chan = launch(sshd.alias, [], config=config(sshd, RPMEM_CMD="cat",
                                                PMREPLICA_SSH_CONFIG=str(conf)))
    chan.sendall(b"ok")
    assert chan.recv_exact(2) == b"ok"
    chan.close()
    done = subprocess.run(["ssh", "-F", str(conf), sshd.alias, "true"], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr


def test_accept_new_reaches_openssh(sshd, tmp_path):
    conf, known = known_hosts_config(sshd, tmp_path, "")
    chan = launch(sshd.alias, [], config=config(sshd, RPMEM_CMD="cat", PMREPLICA_LAUNCHER="openssh",
                                                PMREPLICA_SSH_CONFIG=str(conf),
                                                PMREPLICA_SSH_ACCEPT_NEW="1"))
    chan.sendall(b"ok")
    assert chan.recv_exact(2) == b"ok"
    assert chan.close() == 0
    assert sshd.host_public_key in known.read_text()


def test_mismatching_host_key_is_refused_even_with_accept_new(sshd, tmp_path):
    other = tmp_path / "other_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    wrong = " ".join(other.with_suffix(".pub").read_text().split()[:2])
    content = f"[127.0.0.1]:{sshd.port} {wrong}\n"
    conf, known = known_hosts_config(sshd, tmp_path, content)
    with pytest.raises(OSError) as info:
        launch(sshd.alias, [], config=config(sshd, RPMEM_CMD="cat", PMREPLICA_SSH_CONFIG=str(conf),
                                             PMREPLICA_SSH_ACCEPT_NEW="1"))
    assert info.value.errno == errno.EACCES
    assert "HOST KEY MISMATCH" in str(info.value) and f"{known}:1" in str(info.value)
    assert known.read_text() == content


def test_revoked_host_key_is_refused(sshd, tmp_path):
    conf, _ = known_hosts_config(sshd, tmp_path,
                                 sshd.host_key_line + f"@revoked * {sshd.host_public_key}\n")
    with pytest.raises(OSError) as info:
        launch(sshd.alias, [], config=config(sshd, RPMEM_CMD="cat", PMREPLICA_SSH_CONFIG=str(conf)))
    assert info.value.errno == errno.EACCES and "revoked" in str(info.value)


def test_hashed_and_wildcard_known_hosts_entries_match(sshd, tmp_path):
    conf, known = known_hosts_config(sshd, tmp_path, sshd.host_key_line)
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(known)], check=True, capture_output=True)
    assert known.read_text().startswith("|1|")  # hashed by OpenSSH's own tool
    chan = launch(sshd.alias, [], config=config(sshd, RPMEM_CMD="cat",
                                                PMREPLICA_SSH_CONFIG=str(conf)))
    chan.close()
    known.write_text(f"otherhost,[127.0.0.?]:{sshd.port},!10.* {sshd.host_public_key}\n")
    close_connections()
    chan = launch(sshd.alias, [], config=config(sshd, RPMEM_CMD="cat",
                                                PMREPLICA_SSH_CONFIG=str(conf)))
    chan.close()


# -- configuration and targets -------------------------------------------------------------------
def test_config_defaults():
    cfg = RpmemConfig.from_env({})
    assert cfg.commands == ("pmreplica-agent",)
    assert (cfg.launcher, cfg.ssh_command, cfg.ssh_accept_new) == ("paramiko", None, False)
    assert (cfg.enable_sockets, cfg.enable_verbs, cfg.sockets_allowed) == (None, True, True)
    assert (cfg.max_nlanes, cfg.work_queue_size) == (None, None)
    assert cfg.ssh_config_path == os.path.join(pwd.getpwuid(os.getuid()).pw_dir, ".ssh/config")
    assert cfg.tcp_tls and cfg.tcp_security == "TLS 1.3"  # TCP lanes are encrypted by default
    assert cfg.spin_us == 50


def test_config_reads_every_variable():
    cfg = RpmemConfig.from_env({
        "RPMEM_SSH": "ssh -v", "RPMEM_CMD": "a --x|cd /d && b", "RPMEM_ENABLE_SOCKETS": "1",
        "RPMEM_ENABLE_VERBS": "0", "RPMEM_MAX_NLANES": "8", "RPMEM_WORK_QUEUE_SIZE": "99999999999",
        "PMREPLICA_SSH_CONFIG": "/etc/x", "PMREPLICA_SSH_ACCEPT_NEW": "1",
        "PMREPLICA_TCP_TLS": "0", "PMREPLICA_SPIN_US": "10000"})
    assert cfg.ssh_command == ("ssh", "-v") and cfg.launcher == "openssh"
    assert cfg.commands == ("a --x", "cd /d && b")
    assert (cfg.enable_sockets, cfg.enable_verbs, cfg.max_nlanes) == (True, False, 8)
    assert not RpmemConfig.from_env({"RPMEM_ENABLE_SOCKETS": "0"}).sockets_allowed
    assert cfg.work_queue_size == 2**32 - 1  # capped at UINT_MAX as librpmem did
    assert (cfg.ssh_config_path, cfg.ssh_accept_new) == ("/etc/x", True)
    assert not cfg.tcp_tls and cfg.tcp_security == "clear text (PMREPLICA_TCP_TLS=0)"
    assert cfg.spin_us == 10_000
    assert RpmemConfig.from_env({"PMREPLICA_SPIN_US": "0"}).spin_us == 0  # no polling


@pytest.mark.parametrize("name,value", [
    ("RPMEM_MAX_NLANES", "0"), ("RPMEM_MAX_NLANES", "-3"), ("RPMEM_MAX_NLANES", "4x"),
    ("RPMEM_WORK_QUEUE_SIZE", "many"), ("RPMEM_ENABLE_SOCKETS", "yes"),
    ("RPMEM_ENABLE_VERBS", "1.5"), ("RPMEM_CMD", "agent||other"), ("RPMEM_CMD", "agent 'open"),
    ("RPMEM_SSH", "ssh \"-v"), ("PMREPLICA_LAUNCHER", "rsh"), ("PMREPLICA_SSH_ACCEPT_NEW", "yes"),
    ("PMREPLICA_TCP_TLS", "off"), ("PMREPLICA_TCP_TLS", "2"), ("PMREPLICA_SPIN_US", "-1"),
    ("PMREPLICA_SPIN_US", "10001"), ("PMREPLICA_SPIN_US", "50us"),
])
def test_config_errors_are_einval_naming_the_variable(name, value):
    with pytest.raises(OSError) as info:
        RpmemConfig.from_env({name: value})
    assert info.value.errno == errno.EINVAL
    assert f"{name}={value!r}" in str(info.value)


def test_rpmem_ssh_conflicts_with_another_launcher():
    with pytest.raises(OSError) as info:
        RpmemConfig.from_env({"RPMEM_SSH": "ssh", "PMREPLICA_LAUNCHER": "paramiko"})
    assert info.value.errno == errno.EINVAL and "RPMEM_SSH" in str(info.value)


def test_missing_explicit_ssh_config_is_enoent(sshd, tmp_path):
    with pytest.raises(OSError) as info:
        launch(sshd.alias, [], config=config(sshd, PMREPLICA_SSH_CONFIG=str(tmp_path / "nope")))
    assert info.value.errno == errno.ENOENT and "PMREPLICA_SSH_CONFIG" in str(info.value)


@pytest.mark.parametrize("text,expected", [
    ("node", Target("node")),
    ("user@node", Target("node", "user")),
    ("user@node:2222", Target("node", "user", 2222)),
    ("10.0.0.1:22", Target("10.0.0.1", None, 22)),
    ("[::1]", Target("::1")),
    ("admin@[fe80::1%eth0]:2222", Target("fe80::1%eth0", "admin", 2222)),
    ("::1", Target("::1")),
    ("my_host.example-1.org", Target("my_host.example-1.org")),
])
def test_target_parse(text, expected):
    assert parse_target(text) == expected
    assert parse_target(str(expected)) == expected


@pytest.mark.parametrize("text,why", [
    ("", "empty"), ("user@", "empty host"), ("@node", "empty user"), ("node:", "port"),
    ("node:0", "out of range"), ("node:65536", "out of range"), ("node:ssh", "not a number"),
    ("-oProxyCommand=x", "bad host"), ("-l@node", "bad user"), ("no de", "white space"),
    ("[::1", "missing ']'"), ("[::1]x", "unexpected"), ("[node]:22", "not an IPv6"),
    ("a:b:c", "not an IPv6"), ("node\n", "white space"),
])
def test_bad_targets_are_einval(text, why):
    with pytest.raises(OSError) as info:
        parse_target(text)
    assert info.value.errno == errno.EINVAL
    assert why in str(info.value) and repr(text) in str(info.value)

"""SSH as users have it: each setup logs in with plain ``ssh`` and with the default (paramiko)
launcher, or both refuse with the same meaning. Every test runs the client as a fresh
non-root user whose passwd home holds its ~/.ssh (OpenSSH ignores $HOME), against a real
sshd, with a real ssh-agent where the setup has one."""

from __future__ import annotations

import base64
import errno
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pmreplica.rpmem.ssh import cert as ssh_cert

from .fixtures.client_user import ClientUser
from .fixtures.sshd import Sshd, start_sshd
from .rpmem_helpers import M, agent_command

pytestmark = pytest.mark.timeout(120)

ALIAS = "node"

#: the client, run as the test user: launch ``cat`` on the target, echo a line through it
CLIENT = r"""
import json, logging, sys
logging.basicConfig(level=logging.WARNING, format="log: %(message)s")
from pmreplica.rpmem.launch import launch
try:
    chan = launch(sys.argv[1], [])
    chan.settimeout(20)
    chan.sendall(b"ping\n")
    line = b""
    while not line.endswith(b"\n"):
        line += chan.recv_exact(1)
    out = {"echo": line.decode(), "channel": type(chan).__name__, "peer": chan.peer_address,
           "status": chan.close()}
except OSError as e:
    out = {"errno": e.errno, "error": str(e)}
print(json.dumps(out))
"""

#: a remote pool made, written and closed through the agent (run as the user on the target)
POOL_CLIENT = r"""
import json, mmap, sys
from pmreplica.header import PoolAttr
from pmreplica.rpmem.client import RemotePool
buf = mmap.mmap(-1, int(sys.argv[2]))
buf[4096:] = bytes(range(256)) * ((len(buf) - 4096) // 256)
rp = RemotePool.create(sys.argv[1], "r.set", buf, nlanes=2, attr=PoolAttr(b"SETUPTST"))
rp.persist(4096, len(buf) - 4096)
rp.close()
print(json.dumps({"ok": True}))
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """An sshd with a CA-signed host certificate, on 127.0.0.1 and ::1, that forwards."""
    with start_sshd(tmp_path_factory.mktemp("sshd-setups"), host_ca=True, ipv6=True,
                    forwarding=True) as sshd:
        yield sshd


def host_block(server: Sshd, alias: str = ALIAS, hostname: str = "127.0.0.1",
               extra: str = "") -> str:
    return f"Host {alias}\n    HostName {hostname}\n    Port {server.port}\n{extra}"


def setup(user: ClientUser, server: Sshd, extra: str = "", known: bool = True) -> None:
    """The user's ~/.ssh/config (a Host entry for the server) and known_hosts."""
    user.write(".ssh/config", host_block(server, extra=extra))
    if known:
        user.write(".ssh/known_hosts", server.host_key_line)


def client(user: ClientUser, target: str = ALIAS, **env: str | None) -> tuple[dict, str]:
    """Launch ``cat`` on ``target`` as the user with the default launcher; (result, stderr)."""
    done = user.python(CLIENT, target, env=user.env(RPMEM_CMD="cat", **env))
    assert done.returncode == 0 and done.stdout, done.stderr
    return json.loads(done.stdout.splitlines()[-1]), done.stderr


def remote_pool(user: ClientUser, **env: str | None) -> Path:
    """Create, write and close a remote pool as the user through the real agent (run as the
    user on the target); the part file, checked to hold what was written."""
    sets = user.mkdir("sets")
    user.write("sets/r.set", f"PMEMPOOLSET\n{8 * M} {sets}/r.part0\n")
    done = user.python(POOL_CLIENT, ALIAS, str(8 * M), env=user.env(
        RPMEM_CMD=agent_command(sets), RPMEM_ENABLE_VERBS="0", **env))
    assert done.returncode == 0, done.stderr
    part = sets / "r.part0"
    assert part.read_bytes()[4096:] == bytes(range(256)) * ((8 * M - 4096) // 256)
    return part


def plain_ssh(user: ClientUser, target: str = ALIAS,
              **env: str | None) -> subprocess.CompletedProcess:
    """The reference: OpenSSH's own client, as the user, in BatchMode."""
    return user.run(["ssh", "-o", "BatchMode=yes", target, "echo", "in"], env=user.env(**env))


def assert_both_log_in(user: ClientUser, target: str = ALIAS, **env: str | None) -> dict:
    ref = plain_ssh(user, target, **env)
    assert ref.returncode == 0 and ref.stdout == "in\n", ref.stderr
    result, stderr = client(user, target, **env)
    assert result.get("echo") == "ping\n", result
    assert result["status"] == 0
    return {**result, "stderr": stderr}


def assert_both_refuse(user: ClientUser, target: str = ALIAS, **env: str | None) -> str:
    """Plain ssh fails to log in, and so does the launcher, with one EACCES line."""
    ref = plain_ssh(user, target, **env)
    assert ref.returncode == 255, ref.stdout
    result, _ = client(user, target, **env)
    assert result.get("errno") == errno.EACCES, result
    assert "\n" not in result["error"]
    return result["error"]


# -- passphrase keys and the agent -------------------------------------------------------------
def test_passphrase_key_in_the_agent_without_its_pub(client_user, server):
    key = client_user.authorized_key(passphrase="correct horse", keep_pub=False)
    agent = client_user.agent_holding(key, "correct horse")
    setup(client_user, server)
    assert assert_both_log_in(client_user, SSH_AUTH_SOCK=agent)["channel"] == "ParamikoChannel"
    # IdentitiesOnly offers only the file's key: the agent's copy is found through the public
    # key in the encrypted file's header, as ssh finds it
    setup(client_user, server, "    IdentitiesOnly yes\n    IdentityFile ~/.ssh/id_ed25519\n")
    assert_both_log_in(client_user, SSH_AUTH_SOCK=agent)


def test_encrypted_default_key_not_loaded_and_another_key_in_the_agent(client_user, server):
    client_user.authorized_key(passphrase="unknown to the agent")
    agent = client_user.agent_holding(client_user.authorized_key(".ssh/work_key"))
    setup(client_user, server)
    assert_both_log_in(client_user, SSH_AUTH_SOCK=agent)


def test_nothing_usable_is_one_eacces_line_saying_why_for_each_key(client_user, server):
    encrypted = client_user.authorized_key(passphrase="no agent here")
    too_open = client_user.authorized_key(".ssh/id_ecdsa", keytype="ecdsa")
    too_open.chmod(0o644)
    client_user.keygen(".ssh/id_rsa", keytype="rsa")  # a key the server does not know
    setup(client_user, server)
    message = assert_both_refuse(client_user)
    assert "Permission denied (publickey)" in message and client_user.name in message
    assert f"{encrypted}: encrypted" in message and "ssh-add" in message
    assert f"permissions 0644 for '{too_open}' are too open" in message
    assert f"{client_user.home}/.ssh/id_rsa RSA SHA256:" in message
    assert "offered, not accepted by the server" in message


def test_a_key_the_agent_will_not_sign_with_is_named_as_ssh_names_it(client_user, server):
    key = client_user.authorized_key()
    agent = client_user.start_agent(deny_confirmation=True)
    client_user.ssh_add(agent, key, "", "-c")  # each use needs a confirmation, denied
    (client_user.ssh_dir / "id_ed25519").unlink()  # only the agent has it
    setup(client_user, server)
    message = assert_both_refuse(client_user, SSH_AUTH_SOCK=agent)
    assert "agent key ED25519" in message and "agent refused operation" in message
    # ssh goes on with the agent's next key; so does the launcher (on a new connection)
    client_user.ssh_add(agent, client_user.authorized_key(".ssh/second"))
    assert_both_log_in(client_user, SSH_AUTH_SOCK=agent)


def test_identity_agent_in_the_config_with_tokens(client_user, server):
    key = client_user.authorized_key()
    agent = client_user.start_agent("agents/for-127.0.0.1.sock")
    client_user.ssh_add(agent, key)
    (client_user.ssh_dir / "id_ed25519").unlink()  # only the agent has it now
    setup(client_user, server, "    IdentityAgent %d/agents/for-%h.sock\n")
    assert_both_log_in(client_user, SSH_AUTH_SOCK=None)


# -- files found as OpenSSH finds them ----------------------------------------------------------
def test_known_hosts_and_identity_file_names_with_tokens(client_user, server):
    client_user.authorized_key(f".ssh/key_{client_user.name}")
    setup(client_user, server, "    UserKnownHostsFile ~/.ssh/kh_%h\n"
                               "    IdentityFile ~/.ssh/key_%u\n", known=False)
    client_user.write(".ssh/kh_127.0.0.1", server.host_key_line)
    assert_both_log_in(client_user)
    # accept-new records under the expanded name, never in a file called kh_%h
    (client_user.ssh_dir / "kh_127.0.0.1").unlink()
    result, stderr = client(client_user, PMREPLICA_SSH_ACCEPT_NEW="1")
    assert result.get("echo") == "ping\n", result
    assert (client_user.ssh_dir / "kh_127.0.0.1").read_text().split()[1:] == \
        server.host_public_key.split()
    assert not (client_user.ssh_dir / "kh_%h").exists()


def test_passwd_home_not_home_variable(client_user, server, tmp_path):
    client_user.authorized_key()
    setup(client_user, server)
    # $HOME points elsewhere, at a key the server refuses and no known host: both ignore it
    elsewhere = client_user.mkdir("elsewhere")
    client_user.keygen("elsewhere/.ssh/id_ed25519")
    client_user.write("elsewhere/.ssh/config",
                      f"Host {ALIAS}\n    HostName 127.0.0.1\n    Port 1\n")
    assert_both_log_in(client_user, HOME=str(elsewhere))


# -- host certificates --------------------------------------------------------------------------
def test_host_certificate_signed_by_a_known_ca(client_user, server):
    client_user.authorized_key()
    setup(client_user, server, known=False)
    client_user.write(".ssh/known_hosts",
                      f"@cert-authority [127.0.0.1]:{server.port} {server.ca_public_key}\n")
    assert assert_both_log_in(client_user)["channel"] == "ParamikoChannel"


def test_host_certificate_for_another_name_is_refused(client_user, server):
    client_user.authorized_key()
    setup(client_user, server, "    HostKeyAlias other-host\n", known=False)
    client_user.write(".ssh/known_hosts", f"@cert-authority * {server.ca_public_key}\n")
    message = assert_both_refuse(client_user)
    assert "name is not a listed principal" in message and "other-host" in message


def test_revoked_ca_is_refused(client_user, server):
    client_user.authorized_key()
    setup(client_user, server, known=False)
    client_user.write(".ssh/known_hosts", f"@cert-authority * {server.ca_public_key}\n"
                                          f"@revoked * {server.ca_public_key}\n")
    message = assert_both_refuse(client_user)
    assert "revoked" in message and "CA key" in message


def _certificate(server: Sshd, tmp_path: Path, *options: str,
                 validity: str = "always:forever") -> ssh_cert.Certificate:
    """A certificate for the server's host key made by ssh-keygen with ``options``."""
    pub = tmp_path / "key.pub"
    pub.write_text(server.host_key.with_suffix(".pub").read_text())
    subprocess.run(["ssh-keygen", "-q", "-s", str(server.host_ca), "-I", "t", "-V", validity,
                    *options, str(pub)], check=True, capture_output=True)
    blob = base64.b64decode((tmp_path / "key-cert.pub").read_text().split()[1])
    return ssh_cert.parse(blob)


@pytest.mark.parametrize("options,validity,name,why", [
    (("-h", "-n", "node1"), "always:forever", "node1", None),
    (("-h",), "always:forever", "any-name", None),  # no principals: valid for every host
    (("-h", "-n", "node1"), "always:forever", "node2", "name is not a listed principal"),
    ((), "always:forever", "node1", "not a host certificate"),  # a user certificate
    (("-h",), "-2d:-1d", "node1", "expired"),
    (("-h",), "+1d:+2d", "node1", "not yet valid"),
    (("-h", "-O", "force-command=/bin/true"), "always:forever", "node1",
     "unsupported critical options"),
])
def test_certificates_are_judged_as_openssh_judges_them(server, tmp_path, options, validity,
                                                        name, why):
    cert = _certificate(server, tmp_path, *options, validity=validity)
    assert cert.ca_blob == base64.b64decode(server.ca_public_key.split()[1])
    problem = ssh_cert.problem(cert, name)
    assert problem is None if why is None else why in problem


def test_a_certificate_with_a_forged_signature_is_refused(server, tmp_path):
    cert = _certificate(server, tmp_path, "-h")
    forged = ssh_cert.Certificate(*[getattr(cert, f) for f in cert.__slots__[:-1]],
                                  cert.signed.replace(b"t", b"u", 1))  # key id changed
    assert ssh_cert.problem(cert, "x") is None
    assert "does not verify" in ssh_cert.problem(forged, "x")


# -- what only OpenSSH does ---------------------------------------------------------------------
def test_proxy_jump_goes_to_the_openssh_client_by_itself(client_user, server):
    client_user.authorized_key()
    client_user.write(".ssh/config", host_block(server, extra="    ProxyJump jump\n")
                      + host_block(server, alias="jump"))
    client_user.write(".ssh/known_hosts", server.host_key_line)
    result = assert_both_log_in(client_user)
    assert result["channel"] == "OpenSSHChannel"
    assert "using the OpenSSH client" in result["stderr"] and "ProxyJump jump" in result["stderr"]
    poolset = client_user.write("app.set", f"PMEMPOOLSET\n8M {client_user.home}/part0\n"
                                           f"REPLICA {ALIAS} r.set\n")
    info = client_user.run([str(Path(sys.executable).parent / "pmreplica"), "info", str(poolset)])
    assert "launcher : openssh (the paramiko launcher cannot do ProxyJump jump" in \
        " ".join(info.stdout.split()), info.stdout + info.stderr


def test_openssh_launcher_reaches_an_alias_for_an_ipv6_address(client_user, server):
    client_user.authorized_key()
    client_user.write(".ssh/config", host_block(server, hostname="::1"))
    client_user.write(".ssh/known_hosts", f"[::1]:{server.port} {server.host_public_key}\n")
    for launcher in ("openssh", "paramiko"):
        result, _ = client(client_user, PMREPLICA_LAUNCHER=launcher)
        assert result.get("echo") == "ping\n", result
        assert result["peer"] == "::1"
    remote_pool(client_user, PMREPLICA_LAUNCHER="openssh")  # its data lanes go to ::1 too


# -- the agent as the login user ----------------------------------------------------------------
def test_the_agent_runs_for_the_login_user(client_user, server):
    key = client_user.authorized_key(passphrase="pw", keep_pub=False)
    agent = client_user.agent_holding(key, "pw")
    setup(client_user, server)
    part = remote_pool(client_user, SSH_AUTH_SOCK=agent)
    assert part.stat().st_uid == client_user.uid


def test_a_login_shell_that_prints_a_banner(client_user, tmp_path):
    """Debian's bash runs ~/.bashrc for ssh commands: what it prints on stdout comes before
    the agent's announcement, which the client finds past it (both launchers); when no agent
    announces itself, the error quotes what the login printed."""
    subprocess.run(["usermod", "--shell", "/bin/bash", client_user.name], check=True)
    client_user.write(".bashrc", "echo 'Welcome to node: 4 updates, 1 reboot pending'\n"
                                 "printf '\\000\\001 binary noise\\n'\n")
    client_user.authorized_key()
    with start_sshd(tmp_path, login_rc=True) as server:
        setup(client_user, server)
        ref = plain_ssh(client_user)
        assert ref.stdout.startswith("Welcome to node"), ref  # the login does print it
        for launcher in ("paramiko", "openssh"):
            remote_pool(client_user, PMREPLICA_LAUNCHER=launcher).unlink()
        done = client_user.python(POOL_CLIENT, ALIAS, str(8 * M), env=client_user.env(
            RPMEM_CMD="/nonexistent/pmreplica-agent"))
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "command not found" in last and "the login printed: 'Welcome to node" in last, last

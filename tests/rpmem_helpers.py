"""Helpers and fixtures for the remote-pool tests (tests/test_rpmem_*, test_agent_*,
test_pool_remote), meant to be reused by the RDMA tests in tests/rxe.

A :class:`Node` says where the agents of one test run: a launcher (``local``, ``paramiko``,
``openssh``), a target, the transport (``tcp`` here; the RDMA tests add ``verbs``) and a
fresh pool-set directory on /dev/shm. Tests that do not depend on the transport take the
``transport`` fixture (parametrized over :data:`TRANSPORTS`); a conftest may override it.

:class:`RawSession` speaks the control protocol to a real agent byte by byte, for the cases
the client library never produces (garbage, hostile names, a lane without the secret); its
lanes run over TLS (pinned here, apart from the library's own check) when the agent sent a
certificate.

Use the fixtures by importing them into the test module::

    from tests.rpmem_helpers import local_node, transport  # noqa: F401 (fixtures)
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import random
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pmreplica.header import PoolAttr
from rpmem_common import proto
from pmreplica.rpmem.channel import AgentChannel
from pmreplica.rpmem.client import read_ready
from pmreplica.rpmem.environ import RpmemConfig
from pmreplica.rpmem.launch import launch
from rpmem_common.wire import HELLO, OP, STATUS, split_connection_blob
from remote_agent.processes import running_agents

from .helpers import (CLIENT_VARS, ROOT, apply_overrides, environ_without_client_vars,
                      wait_stopped, write_set)

AGENT = str(Path(sys.executable).parent / "pmreplica-agent")
M = 1 << 20
#: transports of the generic tests; tests/rxe overrides the ``transport`` fixture with "verbs"
TRANSPORTS = ("tcp",)
#: librpmem's variables that pick each transport (RPMEM_ENABLE_VERBS=0 forces TCP)
TRANSPORT_ENV = {
    "tcp": {"RPMEM_ENABLE_SOCKETS": "1", "RPMEM_ENABLE_VERBS": "0"},
    "verbs": {"RPMEM_ENABLE_SOCKETS": "0", "RPMEM_ENABLE_VERBS": "1"},
}


def agent_command(poolset_dir: Path | str | None, *args: str, prefix: str = "") -> str:
    """The RPMEM_CMD line running this venv's agent on ``poolset_dir`` (a remote shell
    command: ``prefix`` goes first, e.g. ``env VAR=x``)."""
    words = [AGENT] + (["--poolset-dir", str(poolset_dir)] if poolset_dir is not None else [])
    line = " ".join(shlex.quote(w) for w in [*words, *args])
    return f"{prefix} {line}" if prefix else line


class Node:
    """Agents for one test: how they are started, where, and what they serve."""

    def __init__(self, transport: str, launcher: str, target: str, poolset_dir: Path,
                 base_env: dict[str, str] | None = None, agent_args: tuple[str, ...] = ()) -> None:
        self.transport = transport
        self.launcher = launcher
        self.target = target
        self.dir = poolset_dir
        self.base_env = dict(base_env if base_env is not None else
                             environ_without_client_vars())
        self.agent_args = agent_args

    def __repr__(self) -> str:
        return f"<Node {self.transport} via {self.launcher} to {self.target}: {self.dir}>"

    # -- client settings -------------------------------------------------------------------
    def command(self, *args: str, prefix: str = "") -> str:
        return agent_command(self.dir, *self.agent_args, *args, prefix=prefix)

    def env(self, **overrides: str | None) -> dict[str, str]:
        """The client environment: transport, launcher and RPMEM_CMD; None removes a key."""
        env = dict(self.base_env)
        env.update(TRANSPORT_ENV[self.transport])
        if self.launcher == "openssh":
            env["RPMEM_SSH"] = "ssh"  # librpmem's variable selects the OpenSSH client
        elif self.launcher != "paramiko":  # paramiko is the default: leave it unset
            env["PMREPLICA_LAUNCHER"] = self.launcher
        env["RPMEM_CMD"] = self.command()
        return apply_overrides(env, overrides)

    def config(self, **overrides: str | None) -> RpmemConfig:
        return RpmemConfig.from_env(self.env(**overrides))

    def use_env(self, monkeypatch: pytest.MonkeyPatch, **overrides: str | None) -> None:
        """Make this node's settings the process environment (for PoolSet, which reads it)."""
        env = self.env(**overrides)
        for key in CLIENT_VARS:
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)

    # -- remote pool sets ------------------------------------------------------------------
    def write_set(self, name: str, *lines: str) -> Path:
        """Write pool set ``name`` (relative to the pool-set directory)."""
        path = self.dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_set(path, *lines)

    def make_set(self, name: str, sizes: tuple[int, ...] = (8 * M,),
                 option: str | None = None) -> list[tuple[int, Path]]:
        """A set of parts ``<name>.partN`` beside the set file; returns ``[(size, path)]``."""
        stem = name.removesuffix(".set")
        parts = [(size, self.dir / f"{stem}.part{i}") for i, size in enumerate(sizes)]
        lines = [f"OPTION {option}"] if option else []
        self.write_set(name, *lines, *(f"{size} {path}" for size, path in parts))
        return parts

    # -- the agent processes ---------------------------------------------------------------
    def agent_pids(self) -> list[int]:
        """Agents running on this node's pool-set directory."""
        return running_agents(self.dir)

    def kill_agents(self, sig: int = signal.SIGKILL) -> list[int]:
        pids = self.agent_pids()
        assert pids, f"no agent is running on {self.dir}"
        for pid in pids:
            os.kill(pid, sig)
        if sig == signal.SIGSTOP:
            wait_stopped(pids)
        return pids

    def data_ports(self, listening: bool = False) -> set[int]:
        """Local ports of the TCP sockets (only listening ones with ``listening``) that this
        node's agents hold on IPv4: their data and heartbeat ports, read from /proc."""
        inodes = set()
        for pid in self.agent_pids():
            fds = f"/proc/{pid}/fd"
            try:
                names = os.listdir(fds)
            except FileNotFoundError:
                continue
            for fd in names:
                try:
                    link = os.readlink(f"{fds}/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inodes.add(link[len("socket:["):-1])
        ports = set()
        with open("/proc/net/tcp") as f:
            for line in list(f)[1:]:  # sl local_address rem_address st ... uid timeout inode
                fields = line.split()
                if fields[9] in inodes and (not listening or fields[3] == "0A"):
                    ports.add(int(fields[1].split(":")[1], 16))
        return ports

    @contextlib.contextmanager
    def stopped_agents(self) -> Iterator[list[int]]:
        """The node's agents stopped for the block (SIGSTOP: alive, and their kernel still
        takes in data), then killed."""
        pids = self.kill_agents(signal.SIGSTOP)
        try:
            yield pids
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            self.wait_agents_gone()

    def wait_agents_gone(self, timeout: float = 5.0) -> list[int]:
        """Wait for this node's agents to exit; the pids still running after ``timeout``."""
        deadline = time.monotonic() + timeout
        while (pids := self.agent_pids()) and time.monotonic() < deadline:
            time.sleep(0.02)
        return pids


def check_no_agents_left(node: Node) -> None:
    """Every agent must end with its session: kill leftovers, then fail the test."""
    left = node.wait_agents_gone()
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"agents still running after the test: {left}"


# -- local pools and their bytes ------------------------------------------------------------
def local_pool(size: int, seed: int | None = 0) -> mmap.mmap:
    """A page-aligned anonymous buffer of ``size`` bytes, filled with :func:`pattern` (or
    zeros with ``seed=None``)."""
    buf = mmap.mmap(-1, size)
    if seed is not None:
        buf[:] = pattern(size, seed)
    return buf


def pattern(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


_READER = r"""
import json, sys
from tests.helpers import replica_bytes
parts, whole = json.loads(sys.argv[1]), sys.argv[2] == "1"
sys.stdout.buffer.write(replica_bytes([(s, p) for s, p in parts], singlehdr=whole))
"""


def remote_bytes(parts: list[tuple[int, Path]], whole: bool = False) -> bytes:
    """The remote pool as its part files hold it, read by a separate process (what survives
    this one). ``whole``: parts carry no headers of their own (SINGLEHDR or NOHDRS)."""
    arg = json.dumps([(size, str(path)) for size, path in parts])
    done = subprocess.run([sys.executable, "-c", _READER, arg, "1" if whole else "0"],
                          cwd=ROOT, capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


def attr(signature: bytes = b"RPMEMTST", seed: int = 1, **fields: object) -> PoolAttr:
    """Pool attributes with every field set (distinct per ``seed``)."""
    rnd = random.Random(seed)
    values: dict[str, object] = dict(
        signature=signature, major=rnd.randrange(1, 100), compat_features=rnd.randrange(1 << 31),
        incompat_features=0, ro_compat_features=rnd.randrange(1 << 31),
        poolset_uuid=rnd.randbytes(16), uuid=rnd.randbytes(16), next_uuid=rnd.randbytes(16),
        prev_uuid=rnd.randbytes(16), user_flags=rnd.randbytes(16))
    values.update(fields)
    return PoolAttr(**values)  # type: ignore[arg-type]


# -- a client written by hand ----------------------------------------------------------------
class RawSession:
    """The control channel of a real agent, driven directly: requests the client library
    would never send, and raw data-lane connections."""

    def __init__(self, node: Node, argv: tuple[str, ...] = (), **env: str | None) -> None:
        self.node = node
        self.chan: AgentChannel = launch(node.target, argv, config=node.config(**env))
        self.chan.settimeout(20)
        self.ready, self.announced = read_ready(self.chan, "raw session")

    def send(self, data: bytes) -> None:
        self.chan.sendall(data)

    def response(self) -> proto.Response:
        status, rtype, size = proto.RESP_HDR.unpack(self.chan.recv_exact(proto.RESP_HDR.size))
        assert proto.RESP_HDR.size <= size <= proto.MAX_MESSAGE, size
        body = self.chan.recv_exact(size - proto.RESP_HDR.size)
        return proto.decode_response(status, rtype, body)

    def request(self, req: proto.Request) -> proto.Response:
        self.send(proto.encode_request(req))
        return self.response()

    def create(self, name: str, pool_size: int, attr: PoolAttr | None, nlanes: int = 2,
               **fields: object) -> proto.Response:
        return self.request(proto.Request(proto.CREATE, pool_size=pool_size, nlanes=nlanes,
                                          pool_desc=name, attr=attr, **fields))

    def open(self, name: str, pool_size: int, nlanes: int = 2, **fields: object) -> proto.Response:
        return self.request(proto.Request(proto.OPEN, pool_size=pool_size, nlanes=nlanes,
                                          pool_desc=name, **fields))

    def lane(self, resp: proto.Response, lane: int = 0,
             secret: bytes | None = None) -> tuple[socket.socket, int]:
        """Connect a data lane to the pool opened by ``resp`` (over TLS if it carries a
        certificate), present ``secret`` (default: the session's); (socket, status word)."""
        own_secret, certificate = split_connection_blob(resp.blob)
        sock = socket.create_connection((self.chan.peer_address, resp.port), timeout=10)
        if certificate is not None:
            sock = tls_connect(sock, certificate)
        sock.sendall(HELLO.pack(own_secret if secret is None else secret, lane))
        return sock, recv_status(sock)

    def exit_status(self, timeout: float = 10.0) -> int | None:
        """Wait for the agent to end on its own (it must, after an error); its status."""
        deadline = time.monotonic() + timeout
        while self.chan.exit_status is None and time.monotonic() < deadline:
            time.sleep(0.01)
        status = self.chan.exit_status
        assert status is not None, "the agent did not exit"
        return status

    def close(self) -> int | None:
        return self.chan.close()


def tls_connect(sock: socket.socket, certificate: bytes) -> ssl.SSLSocket:
    """A TLS 1.3 client connection on ``sock`` that presented exactly ``certificate``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    tls = ctx.wrap_socket(sock)
    assert tls.getpeercert(binary_form=True) == certificate, "not the agent's certificate"
    return tls


def recv_status(sock: socket.socket) -> int:
    """The next status word on a data lane, or -1 if the agent closed it instead."""
    buf = b""
    while len(buf) < STATUS.size:
        try:
            chunk = sock.recv(STATUS.size - len(buf))
        except (ConnectionResetError, ssl.SSLError):  # a TLS lane may end with an alert
            return -1
        if not chunk:
            return -1
        buf += chunk
    return STATUS.unpack(buf)[0]


def write_op(sock: socket.socket, op: int, offset: int, data: bytes, length: int | None = None,
             flags: int = 0) -> int:
    """Send one data-lane operation with ``data`` as its payload; the agent's status word."""
    try:
        sock.sendall(OP.pack(op, flags, offset, len(data) if length is None else length) + data)
    except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
        pass  # the agent closed the lane early: its status (if any) is still to be read
    return recv_status(sock)


def assert_closed(sock: socket.socket, timeout: float = 5.0) -> None:
    """The agent has closed this connection (end of stream or reset)."""
    sock.settimeout(timeout)
    try:
        assert sock.recv(1) == b""
    except (ConnectionResetError, ssl.SSLError):
        pass


def persist_in_thread(pool: Any, offset: int, length: int) -> tuple[threading.Thread, list]:
    """``pool.persist(offset, length)`` on a thread of its own, started; the thread and the
    list of what the call raised (for a caller that blocks it and then ends the wait)."""
    errors: list[BaseException] = []

    def persist() -> None:
        try:
            pool.persist(offset, length)
        except BaseException as e:  # reported to the caller
            errors.append(e)

    waiter = threading.Thread(target=persist)
    waiter.start()
    return waiter, errors


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def local_node(transport: str, pool_dir: Path) -> Iterator[Node]:
    """Agents started as local processes (PMREPLICA_LAUNCHER=local) on ``pool_dir/sets``."""
    sets = pool_dir / "sets"
    sets.mkdir()
    node = Node(transport, "local", "localhost", sets)
    yield node
    check_no_agents_left(node)


def ssh_node(transport: str, launcher: str, sshd: Any, pool_dir: Path) -> Node:
    """Agents started through the test sshd (tests/fixtures/sshd.py) by ``launcher``:
    paramiko reaches it by its ssh_config alias, OpenSSH by ``user@127.0.0.1:port``."""
    sets = pool_dir / "sets"
    sets.mkdir(exist_ok=True)
    target = sshd.alias if launcher == "paramiko" else sshd.target
    return Node(transport, launcher, target, sets, base_env=sshd.env())

"""TLS on the TCP data lanes, against real agents reached through the test sshd: what an
eavesdropper on the network captures, what a man in the middle can do (present its own
certificate, alter a record), the agent that forbids clear text, the certificate itself,
and a TLS lane shut down by another thread while one waits on it."""

from __future__ import annotations

import errno
import os
import socket
import time

import pytest

from pmreplica.errors import PmReplicaError
from pmreplica.header import HDR_SIZE
from pmreplica.poolset import PoolSet
from pmreplica.status import FAILED, OK
from rpmem_common import proto
from pmreplica.rpmem.client import RemotePool
from pmreplica.rpmem.launch import close_connections
from rpmem_common.wire import split_connection_blob

from .fixtures.capture import LoopbackCapture, pieces_seen
from .fixtures.mitm import ALIAS, Mitm
from .helpers import unavailable, write_set
from .rpmem_helpers import (M, RawSession, attr, check_no_agents_left, local_pool,
                            persist_in_thread, remote_bytes, ssh_node)
from .test_pool_remote import Recorder

pytestmark = pytest.mark.timeout(120)

SIZE = 8 * M
TLS = {"tls": "1", "clear": "0"}  # PMREPLICA_TCP_TLS of each case


@pytest.fixture
def node(sshd, pool_dir):
    """Agents started through the test sshd with paramiko, lanes over TCP."""
    node = ssh_node("tcp", "paramiko", sshd, pool_dir)
    yield node
    close_connections()
    check_no_agents_left(node)


# -- an eavesdropper ------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", list(TLS))
def test_a_capture_of_the_lane_shows_the_persisted_bytes_only_in_clear_text(node, mode):
    parts = node.make_set("r.set")
    pool = local_pool(SIZE, seed=None)
    payload = os.urandom(M)
    pool[HDR_SIZE:HDR_SIZE + M] = payload
    rp = RemotePool.create(node.target, "r.set", pool, nlanes=1, attr=attr(),
                           config=node.config(PMREPLICA_TCP_TLS=TLS[mode]))
    try:
        try:  # the agent's connections: the lane's, and the heartbeat's
            capture = LoopbackCapture(node.data_ports())
        except PermissionError:
            unavailable("capturing packets needs root (CAP_NET_RAW)")
        with capture:
            rp.persist(HDR_SIZE, M)
    finally:
        rp.close()
    assert remote_bytes(parts)[HDR_SIZE:HDR_SIZE + M] == payload  # it went over that lane
    assert capture.dropped == 0 and capture.size >= M  # and the capture saw it all
    seen = pieces_seen(payload, capture.streams.values())
    if mode == "tls":
        assert seen == 0, f"{seen} pieces of the payload readable on the wire"
    else:  # the same capture reads every byte of a clear-text lane
        assert seen == M // 16


# -- a man in the middle --------------------------------------------------------------------------
@pytest.fixture
def mitm_node(sshd, pool_dir, tmp_path, monkeypatch):
    """(node, a function making a :class:`Mitm` in the node's path): the client's
    environment reaches the node's agents as :data:`ALIAS`, through the man in the middle."""
    node = ssh_node("tcp", "paramiko", sshd, pool_dir)
    node.target = ALIAS
    made: list[Mitm] = []

    def make(impostor: bool = False, **env: str) -> Mitm:
        mitm = Mitm(sshd, node, tmp_path, impostor)
        made.append(mitm)
        config = mitm.write_ssh_config(tmp_path / f"ssh_config{len(made)}")
        node.use_env(monkeypatch, PMREPLICA_SSH_CONFIG=str(config), **env)
        close_connections()  # a new path: no SSH connection of an earlier one is reused
        return mitm

    yield node, make
    close_connections()
    for mitm in made:
        mitm.close()
    check_no_agents_left(node)


def test_a_man_in_the_middle_with_its_own_certificate_is_refused(mitm_node, pool_dir):
    node, make = mitm_node
    parts = node.make_set("r.set")
    path = write_set(pool_dir / "p.set", f"8M {pool_dir}/m", f"REPLICA {ALIAS} r.set")
    mitm = make(impostor=True)
    with pytest.raises(OSError) as e:
        PoolSet.create(path)
    assert e.value.errno == errno.EACCES
    assert "another TLS certificate than the one the agent sent over SSH" in str(e.value)
    assert mitm.received == b""  # the client told it nothing: not even the session secret
    assert not parts[0][1].exists() and not (pool_dir / "m").exists()  # nothing left behind


@pytest.mark.parametrize("mode", list(TLS))
def test_a_byte_flipped_on_the_way_fails_the_replica_not_the_data(mitm_node, pool_dir, mode):
    node, make = mitm_node
    parts = node.make_set("r.set")
    path = write_set(pool_dir / "p.set", f"8M {pool_dir}/m", f"REPLICA {ALIAS} r.set")
    mitm = make(PMREPLICA_TCP_TLS=TLS[mode])
    rec = Recorder()
    ps = PoolSet.create(path, plugins=[rec])
    try:
        ps.buf[HDR_SIZE:HDR_SIZE + 4] = b"good"
        ps.persist(HDR_SIZE, 4)  # through the man in the middle, untouched
        before = remote_bytes(parts)
        data = os.urandom(4096)
        ps.buf[M:M + 4096] = data
        mitm.flip_next()
        ps.persist(M, 4096)  # the application goes on; a failed replica is reported
        assert mitm.flips == 1
        if mode == "clear":  # nothing notices: the altered byte lands on the replica
            assert [s.state for s in ps.replicas] == [OK, OK] and rec.failed == []
            landed = remote_bytes(parts)[M:M + 4096]
            assert landed != data and sum(a != b for a, b in zip(landed, data)) == 1
            return
        assert [s.state for s in ps.replicas] == [OK, FAILED]
        [(index, _, error)] = rec.failed
        assert index == 1 and error.errno == errno.EBADMSG
        assert "BAD_RECORD_MAC" in str(error)
        assert remote_bytes(parts) == before  # not one byte of the altered record landed
        assert before[HDR_SIZE:HDR_SIZE + 4] == b"good"
    finally:
        ps.close()


def test_a_lane_cut_while_a_range_is_on_its_way_fails_the_replica_and_the_pool_closes(
        mitm_node, pool_dir):
    """A failed lane keeps its error: that error must not hold on to a view of the pool (the
    TLS layer's frames have it at hand), or the pool could not be closed (EBUSY)."""
    node, make = mitm_node
    node.make_set("r.set", (16 * M,))
    path = write_set(pool_dir / "p.set", f"16M {pool_dir}/m", f"REPLICA {ALIAS} r.set")
    mitm = make()
    rec = Recorder()
    ps = PoolSet.create(path, plugins=[rec])
    try:
        mitm.cut_next()
        ps.persist(HDR_SIZE, 16 * M - HDR_SIZE)  # more than the sockets hold: the write fails
        assert [s.state for s in ps.replicas] == [OK, FAILED]
        [(index, _, error)] = rec.failed
        assert index == 1 and error.errno in (errno.ECONNRESET, errno.EPIPE), error
    finally:
        ps.close()


# -- the agent's side of the switch ---------------------------------------------------------------
def test_an_agent_that_requires_tls_refuses_a_clear_text_client(node):
    parts = node.make_set("r.set")
    pool = local_pool(SIZE, seed=1)
    strict = node.config(PMREPLICA_TCP_TLS="0", RPMEM_CMD=node.command("--require-tls"))
    with pytest.raises(PmReplicaError) as e:
        RemotePool.create(node.target, "r.set", pool, attr=attr(), config=strict)
    assert e.value.errno == errno.EACCES
    assert "requires TLS on TCP data lanes (require-tls)" in str(e.value)
    assert "PMREPLICA_TCP_TLS=0" in str(e.value)
    assert not parts[0][1].exists()  # refused before the pool was made
    # a client from before TLS (no flags word in its request) is refused alike
    session = RawSession(node, ("--require-tls",))
    old = proto.encode_request(proto.Request(proto.CREATE, pool_size=SIZE, nlanes=1,
                                             pool_desc="r.set", attr=attr()))[:-4]
    session.send(proto.REQ_HDR.pack(proto.CREATE, len(old)) + old[proto.REQ_HDR.size:])
    assert session.response().status == proto.ERR_NOACCESS
    session.close()
    # the same agent serves a TLS client
    with RemotePool.create(node.target, "r.set", pool, attr=attr(),
                           config=node.config(RPMEM_CMD=node.command("--require-tls"))) as rp:
        rp.persist(HDR_SIZE, 100)
    assert remote_bytes(parts)[HDR_SIZE:HDR_SIZE + 100] == pool[HDR_SIZE:HDR_SIZE + 100]


def test_require_tls_in_the_config_file(node, pool_dir):
    conf = pool_dir / "agent.conf"
    conf.write_text("require-tls = yes\n")
    node.make_set("r.set")
    with pytest.raises(PmReplicaError) as e:
        RemotePool.create(node.target, "r.set", local_pool(SIZE), attr=attr(),
                          config=node.config(PMREPLICA_TCP_TLS="0",
                                             RPMEM_CMD=node.command("--config", str(conf))))
    assert e.value.errno == errno.EACCES


# -- the certificate ------------------------------------------------------------------------------
def test_each_session_has_its_own_self_signed_certificate(node):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    node.make_set("a.set")
    node.make_set("b.set")
    certs = []
    for name in ("a.set", "b.set"):
        session = RawSession(node)
        resp = session.create(name, SIZE, attr())
        assert resp.status == proto.OK
        certs.append(split_connection_blob(resp.blob)[1])
        session.close()
    assert certs[0] != certs[1]
    for der in certs:
        cert = x509.load_der_x509_certificate(der)  # well-formed X.509 v3
        key = cert.public_key()
        assert isinstance(key, Ed25519PublicKey)
        key.verify(cert.signature, cert.tbs_certificate_bytes)  # signed by its own key
    # the clear-text answer carries the secret alone
    session = RawSession(node)
    resp = session.open("a.set", SIZE, flags=proto.TCP_CLEAR)
    assert resp.status == proto.OK and split_connection_blob(resp.blob)[1] is None
    session.close()


# -- a lane monitor's shutdown --------------------------------------------------------------------
def test_a_tls_lane_waiting_for_the_agent_fails_when_another_thread_shuts_it_down(node):
    """What the heartbeat's monitor does to a lane whose agent stopped answering: the waiting
    call ends with an OSError at once, and the lane stays failed. (The heartbeat itself is
    given 30 s here, so that the shutdown is this test's.)"""
    node.make_set("r.set")
    rp = RemotePool.create(node.target, "r.set", local_pool(SIZE), nlanes=1, attr=attr(),
                           config=node.config(PMREPLICA_PEER_TIMEOUT="30"))
    with node.stopped_agents():
        waiter, errors = persist_in_thread(rp, HDR_SIZE, 4096)
        time.sleep(0.5)
        assert waiter.is_alive()  # blocked on the agent's answer
        rp.data_path._lanes[0].sock.shutdown(socket.SHUT_RDWR)
        waiter.join(5)
        assert not waiter.is_alive()
        [error] = errors
        assert isinstance(error, OSError) and error.errno == errno.ECONNRESET, error
        with pytest.raises(OSError) as e:
            rp.persist(HDR_SIZE, 1)
        assert e.value.errno == errno.ECONNRESET
    with pytest.raises(OSError):
        rp.close()

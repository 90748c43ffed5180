"""The agent's pool database as a hostile or careless client meets it: pool set names that
leave the pool-set directory (by path or by symlink), one pool per session, EBUSY for a pool
open elsewhere, CLOSE with REMOVE, and the status codes of the control protocol.

These talk to a real agent byte by byte (RawSession): the client library already refuses
most of these requests before sending them."""

from __future__ import annotations

import errno
import os

import pytest

from pmreplica.header import HDR_SIZE, PoolAttr
from rpmem_common import proto
from pmreplica.rpmem.launch import launch
from pmreplica.rpmem.client import read_ready

from .rpmem_helpers import (M, RawSession, attr, local_node, remote_bytes,  # noqa: F401
                            transport)

pytestmark = pytest.mark.timeout(60)


def errno_of(resp: proto.Response) -> int:
    assert resp.status != proto.OK, "the agent accepted the request"
    return proto.STATUS_ERRNO[resp.status]


@pytest.fixture
def outside(local_node):
    """A valid pool set file next to (outside) the agent's pool-set directory."""
    d = local_node.dir.parent
    part = d / "outside.part0"
    path = d / "outside.set"
    path.write_text(f"PMEMPOOLSET\n8M {part}\n")
    return path, part


@pytest.mark.parametrize("name", [
    "{out}",  # absolute
    "../outside.set",
    "sub/../../outside.set",
    "./../outside.set",
    "",
    ".",
])
def test_names_leaving_the_directory_are_refused(local_node, outside, name):
    path, part = outside
    (local_node.dir / "sub").mkdir()
    name = name.format(out=path)
    session = RawSession(local_node)
    for request in (
            lambda: session.create(name, 8 * M, attr()),
            lambda: session.open(name, 8 * M),
            lambda: session.request(proto.Request(proto.STAT, pool_desc=name))):
        resp = request()
        assert errno_of(resp) == errno.EINVAL, resp
    assert session.request(proto.Request(proto.CLOSE)).status == proto.OK
    assert session.close() == 0
    assert not part.exists()


def test_symlinks_out_of_the_directory_are_refused(local_node, outside):
    path, part = outside
    (local_node.dir / "link.set").symlink_to(path)
    (local_node.dir / "linkdir").symlink_to(path.parent)
    (local_node.dir / "sub").mkdir()
    (local_node.dir / "sub" / "up.set").symlink_to("../../outside.set")
    session = RawSession(local_node)
    for name in ("link.set", "linkdir/outside.set", "sub/up.set", "linkdir/sets/../outside.set"):
        resp = session.create(name, 8 * M, attr())
        assert errno_of(resp) == errno.EINVAL, name
        assert "leaves the pool set directory" in resp.message or "relative" in resp.message
    session.close()
    assert not part.exists()


def test_symlinks_inside_the_directory_are_followed(local_node):
    parts = local_node.make_set("real/r.set")
    (local_node.dir / "alias.set").symlink_to("real/r.set")
    session = RawSession(local_node)
    resp = session.create("alias.set", 8 * M, attr())
    assert resp.status == proto.OK, resp.message
    assert session.request(proto.Request(proto.CLOSE)).status == proto.OK
    session.close()
    assert parts[0][1].exists()


def test_one_pool_per_session(local_node):
    a_parts = local_node.make_set("a.set")
    b_parts = local_node.make_set("b.set")
    session = RawSession(local_node)
    assert session.create("a.set", 8 * M, attr()).status == proto.OK
    resp = session.create("b.set", 8 * M, attr())
    assert errno_of(resp) == errno.EINVAL and "already open" in resp.message
    assert errno_of(session.open("a.set", 8 * M)) == errno.EINVAL
    assert session.request(proto.Request(proto.CLOSE)).status == proto.OK
    session.close()
    assert a_parts[0][1].exists() and not b_parts[0][1].exists()


def test_second_open_is_ebusy_and_create_over_it_eexist(local_node):
    parts = local_node.make_set("r.set")
    first = RawSession(local_node)
    assert first.create("r.set", 8 * M, attr()).status == proto.OK
    second = RawSession(local_node)
    assert errno_of(second.open("r.set", 8 * M)) == errno.EBUSY
    assert errno_of(second.create("r.set", 8 * M, attr())) == errno.EEXIST
    second.close()
    assert first.request(proto.Request(proto.CLOSE)).status == proto.OK
    first.close()
    third = RawSession(local_node)  # the lock went with the first session
    assert third.open("r.set", 8 * M).status == proto.OK
    third.close()
    assert parts[0][1].exists()


def test_close_with_remove_deletes_only_a_pool_created_in_the_session(local_node):
    parts = local_node.make_set("r.set", (4 * M, 4 * M))
    session = RawSession(local_node)
    assert session.create("r.set", 8 * M - HDR_SIZE, attr()).status == proto.OK
    assert all(p.exists() for _, p in parts)
    assert session.request(proto.Request(proto.CLOSE, flags=proto.CLOSE_REMOVE)).status == 0
    assert session.close() == 0
    assert not any(p.exists() for _, p in parts)
    assert (local_node.dir / "r.set").exists()

    session = RawSession(local_node)
    assert session.create("r.set", 8 * M - HDR_SIZE, attr()).status == proto.OK
    session.request(proto.Request(proto.CLOSE))
    session.close()
    before = remote_bytes(parts)
    session = RawSession(local_node)  # opened, not created, here: REMOVE must not delete it
    assert session.open("r.set", 8 * M - HDR_SIZE).status == proto.OK
    assert session.request(proto.Request(proto.CLOSE, flags=proto.CLOSE_REMOVE)).status == 0
    session.close()
    assert remote_bytes(parts) == before


@pytest.mark.parametrize("fields,err", [
    ({"major": proto.PROTO_MAJOR + 1}, errno.EPROTONOSUPPORT),
    ({"nlanes": 0}, errno.EINVAL),
    ({"provider": 99}, errno.EINVAL),
    ({"pool_size": 9 * M}, errno.EFBIG),
])
def test_request_fields_the_agent_refuses(local_node, fields, err):
    parts = local_node.make_set("r.set")
    session = RawSession(local_node)
    req = dict(pool_size=8 * M, nlanes=2)
    req.update(fields)
    resp = session.request(proto.Request(proto.CREATE, pool_desc="r.set", attr=attr(), **req))
    assert errno_of(resp) == err, resp
    assert resp.message  # a reason travels with the status
    # the session goes on: a proper request still works
    assert session.create("r.set", 8 * M, attr()).status == proto.OK
    session.request(proto.Request(proto.CLOSE))
    session.close()
    assert parts[0][1].exists()


def test_requests_that_need_an_open_pool(local_node):
    session = RawSession(local_node)
    assert errno_of(session.request(proto.Request(proto.SET_ATTR, attr=attr()))) == errno.EINVAL
    assert session.request(proto.Request(proto.CLOSE)).status == proto.OK  # nothing to close
    session.close()


def test_create_nohdrs_with_zero_attributes_and_open_returns_zeros(local_node):
    parts = local_node.make_set("raw.set", option="NOHDRS")
    session = RawSession(local_node)
    resp = session.create("raw.set", 8 * M, PoolAttr())
    assert resp.status == proto.OK and resp.nlanes == 2
    session.request(proto.Request(proto.CLOSE))
    session.close()
    assert remote_bytes(parts, whole=True) == bytes(8 * M)  # no header written
    session = RawSession(local_node)
    resp = session.open("raw.set", 8 * M)
    assert resp.status == proto.OK and resp.attr == PoolAttr()
    session.close()


def test_pool_set_directory_must_exist(local_node):
    missing = local_node.dir / "missing"
    cmd = local_node.command().replace(str(local_node.dir), str(missing))
    chan = launch(local_node.target, (), config=local_node.config(RPMEM_CMD=cmd))
    chan.settimeout(10)
    status, _ = read_ready(chan, "agent")  # the ready word says why
    assert status == errno.ENOENT
    assert chan.close() == errno.ENOENT
    assert str(missing) in chan.stderr_tail()


def test_part_files_may_live_anywhere_the_set_names(local_node):
    # the set file must be inside the directory; its parts are wherever it says (as rpmemd)
    elsewhere = local_node.dir.parent / "data"
    elsewhere.mkdir()
    local_node.write_set("r.set", f"8M {elsewhere}/r.part0")
    session = RawSession(local_node)
    assert session.create("r.set", 8 * M, attr()).status == proto.OK
    session.request(proto.Request(proto.CLOSE))
    session.close()
    assert os.path.getsize(elsewhere / "r.part0") == 8 * M

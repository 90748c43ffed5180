"""The Python librpmem against real agents (local launcher): create, persist, read, flush and
drain, set_attr, close, open, remove and stat, and every errno a caller can meet.

Bytes are checked in the remote pool's part files as another process reads them."""

from __future__ import annotations

import array
import errno
import os
import threading

import pytest

from pmreplica.header import FEAT_SINGLEHDR, HDR_SIZE, PoolAttr, PoolHeader
from pmreplica.rpmem import client
from pmreplica.rpmem.client import (FLUSH_RELAXED, PERSIST_RELAXED, REMOVE_FORCE,
                                    REMOVE_POOL_SET, RemotePool, check_version)

from .helpers import run_threads
from .rpmem_helpers import (M, attr, local_node, local_pool, pattern,  # noqa: F401 (fixtures)
                            remote_bytes, transport)

pytestmark = pytest.mark.timeout(60)


def create(node, name, pool, **kw) -> RemotePool:
    return RemotePool.create(node.target, name, pool, config=node.config(), **kw)


def open_(node, name, pool, **kw) -> RemotePool:
    return RemotePool.open(node.target, name, pool, config=node.config(), **kw)


def hdr_of(parts) -> PoolHeader:
    raw = remote_bytes(parts[:1])[:HDR_SIZE]
    assert PoolHeader.checksum_ok(raw)
    return PoolHeader.unpack(raw)


# -- lifecycle --------------------------------------------------------------------------------
def test_create_persist_close_open_read(local_node, transport):
    node = local_node
    parts = node.make_set("r.set")
    size = 8 * M
    pool = local_pool(size, seed=1)
    a = attr()
    rp = create(node, "r.set", pool, nlanes=4, attr=a)
    assert (rp.nlanes, rp.attr, rp.provider, rp.data_offset, rp.size) == (4, a, transport,
                                                                         HDR_SIZE, size)
    rp.persist(HDR_SIZE, size - HDR_SIZE)
    on_disk = remote_bytes(parts)
    assert on_disk[HDR_SIZE:] == pool[HDR_SIZE:]
    hdr = PoolHeader.unpack(on_disk[:HDR_SIZE])
    assert PoolHeader.checksum_ok(on_disk[:HDR_SIZE])
    assert PoolAttr.from_header(hdr)._replace(user_flags=a.user_flags) == a
    rp.close()
    rp.close()  # idempotent
    assert node.wait_agents_gone() == []  # the agent ends with its session

    again = local_pool(size, seed=None)
    rp = open_(node, "r.set", again, nlanes=2)
    assert rp.attr == a and rp.nlanes == 2
    rp.read(again, 0, size)  # header included: read may cover the whole pool
    assert again[HDR_SIZE:] == pool[HDR_SIZE:]
    assert again[:HDR_SIZE] == on_disk[:HDR_SIZE]
    rp.close()
    with pytest.raises(OSError) as e:
        rp.persist(HDR_SIZE, 1)
    assert e.value.errno == errno.EBADF


@pytest.mark.parametrize("option", [None, "SINGLEHDR", "NOHDRS"])
def test_multi_part_sets_place_bytes_like_pmdk(local_node, option):
    node = local_node
    parts = node.make_set("m.set", (2 * M, 3 * M, 4 * M), option)
    nhdrs = {None: 3, "SINGLEHDR": 1, "NOHDRS": 0}[option]
    size = 9 * M - max(nhdrs - 1, 0) * HDR_SIZE
    pool = local_pool(size, seed=7)
    a = None if option == "NOHDRS" else attr(incompat_features=FEAT_SINGLEHDR if option else 0)
    rp = create(node, "m.set", pool, attr=a)
    start = rp.data_offset
    assert start == (0 if option == "NOHDRS" else HDR_SIZE)
    # one persist across both part boundaries, then one range ending exactly at the end
    rp.persist(start, 5 * M)
    rp.persist(5 * M, size - 5 * M)
    rp.close()
    on_disk = remote_bytes(parts, whole=option is not None)
    assert len(on_disk) == size
    assert on_disk[start:] == pool[start:]
    if option == "NOHDRS":
        assert rp.attr == PoolAttr()
    else:
        assert hdr_of(parts).signature == a.signature


def test_persist_relaxed_and_deep_persist(local_node):
    parts = local_node.make_set("r.set")
    pool = local_pool(8 * M, seed=2)
    with create(local_node, "r.set", pool, attr=attr()) as rp:
        rp.persist(HDR_SIZE, 1000, 0, PERSIST_RELAXED)
        rp.deep_persist(M, 12345)
        rp.persist(7 * M, 1)
        rp.persist(7 * M + 1, 0)  # an empty range is fine
    on_disk = remote_bytes(parts)
    assert on_disk[HDR_SIZE:HDR_SIZE + 1000] == pool[HDR_SIZE:HDR_SIZE + 1000]
    assert on_disk[M:M + 12345] == pool[M:M + 12345]
    assert on_disk[7 * M:7 * M + 1] == pool[7 * M:7 * M + 1]
    # nothing else was sent: the rest of the remote pool is still zero
    assert on_disk[HDR_SIZE + 1000:M] == bytes(M - HDR_SIZE - 1000)
    assert on_disk[7 * M + 1:] == bytes(M - 1)


def test_lanes_from_threads_at_once(local_node):
    parts = local_node.make_set("r.set")
    size = 8 * M
    pool = local_pool(size, seed=None)
    nlanes = 8
    rp = create(local_node, "r.set", pool, nlanes=nlanes, attr=attr())
    assert rp.nlanes == nlanes
    region = (size - HDR_SIZE) // nlanes
    start = threading.Barrier(nlanes)

    def writer(lane: int) -> None:
        base = HDR_SIZE + lane * region
        data = pattern(region, lane)
        start.wait()
        step = 4096 + 13 * lane  # each lane its own unaligned rhythm
        for off in range(0, region, step):
            n = min(step, region - off)
            pool[base + off:base + off + n] = data[off:off + n]
            rp.persist(base + off, n, lane)

    errors = run_threads(writer, nlanes)
    assert not errors
    on_disk = remote_bytes(parts)
    for lane in range(nlanes):
        base = HDR_SIZE + lane * region
        assert on_disk[base:base + region] == pattern(region, lane), f"lane {lane}"
    rp.close()


def test_flush_then_drain(local_node):
    parts = local_node.make_set("r.set")
    pool = local_pool(8 * M, seed=3)
    # a small work queue: flushes beyond it must wait for answers, not fail or be lost
    rp = RemotePool.create(local_node.target, "r.set", pool, nlanes=2, attr=attr(),
                           config=local_node.config(RPMEM_WORK_QUEUE_SIZE="4"))
    ranges = [(HDR_SIZE + i * 40_000, 1000 + i) for i in range(50)]
    for i, (off, n) in enumerate(ranges):
        rp.flush(off, n, i % 2, FLUSH_RELAXED if i % 3 else 0)
    rp.drain(0)
    rp.drain(1)
    on_disk = remote_bytes(parts)
    for off, n in ranges:
        assert on_disk[off:off + n] == pool[off:off + n]
    # a read on a lane with flushes outstanding sees them (the lane is ordered)
    pool[2 * M:2 * M + 5] = b"later"
    rp.flush(2 * M, 5, 1)
    back = bytearray(5)
    rp.read(back, 2 * M, 5, 1)
    assert back == b"later"
    rp.drain(1)
    rp.close()


def test_read_checks_its_arguments(local_node):
    local_node.make_set("r.set")
    pool = local_pool(8 * M, seed=4)
    with create(local_node, "r.set", pool, attr=attr()) as rp:
        rp.persist(M, M)
        buf = bytearray(M)
        rp.read(buf, M, M)
        assert buf == pool[M:2 * M]
        for args in [(bytearray(10), 8 * M - 5, 10), (bytearray(10), 0, 11),
                     (bytearray(10), -1, 5), (bytearray(10), 0, 5, 4),
                     (bytes(10), M, 10), (memoryview(bytearray(10)).toreadonly(), M, 10),
                     ("not a buffer", M, 3), (memoryview(bytearray(20))[::2], M, 10)]:
            with pytest.raises(OSError) as e:
                rp.read(*args)
            assert e.value.errno == errno.EINVAL, args
        rp.read(bytearray(0), M, 0)  # nothing asked: no request, and the lane stays in step
        words = array.array("I", bytes(400))  # a buffer of 4-byte items is filled bytewise
        rp.read(words, M + 3, 400)
        assert words.tobytes() == pool[M + 3:M + 403]
        for lane in (0, 1):  # the pool still works after the refusals, on every lane
            rp.read(buf, M + lane, 100, lane)
            assert buf[:100] == pool[M + lane:M + lane + 100]


def test_set_attr_then_open_returns_the_new_attributes(local_node):
    parts = local_node.make_set("r.set", (4 * M, 4 * M))  # two headers to rewrite
    size = 8 * M - HDR_SIZE
    pool = local_pool(size, seed=5)
    old, new = attr(seed=1), attr(signature=b"NEWSIG\0\0", seed=2)
    with create(local_node, "r.set", pool, attr=old) as rp:
        rp.persist(HDR_SIZE, size - HDR_SIZE)
        rp.set_attr(new)
        assert rp.attr == new
        rp.persist(HDR_SIZE, 10)  # the data path is untouched by the header rewrite
    with open_(local_node, "r.set", local_pool(size, None)) as rp:
        assert rp.attr == new
    on_disk = remote_bytes(parts)
    assert on_disk[HDR_SIZE:] == pool[HDR_SIZE:]
    hdr = hdr_of(parts)
    assert hdr.signature.rstrip(b"\0") == b"NEWSIG"


def test_set_attr_none_on_a_pool_with_headers_keeps_it_openable(local_node):
    local_node.make_set("r.set")
    pool = local_pool(8 * M, seed=None)
    with create(local_node, "r.set", pool, attr=attr()) as rp:
        rp.set_attr(None)
        assert rp.attr == PoolAttr()
    with open_(local_node, "r.set", pool) as rp:
        assert rp.attr == PoolAttr()


def test_nohdrs_pool_is_writable_from_byte_zero(local_node):
    parts = local_node.make_set("raw.set", option="NOHDRS")
    pool = local_pool(8 * M, seed=6)
    with create(local_node, "raw.set", pool, attr=None) as rp:
        assert rp.data_offset == 0 and rp.attr == PoolAttr()
        rp.persist(0, 8 * M)
        with pytest.raises(OSError) as e:
            rp.set_attr(attr())  # no header to hold attributes
        assert e.value.errno == errno.EINVAL
        rp.persist(0, 1)  # still working
    assert remote_bytes(parts, whole=True) == pool[:]
    with open_(local_node, "raw.set", local_pool(8 * M, None)) as rp:
        assert rp.attr == PoolAttr() and rp.data_offset == 0


def test_nlanes_is_what_both_sides_allow(local_node):
    local_node.make_set("r.set")
    pool = local_pool(8 * M, seed=None)
    with RemotePool.create(local_node.target, "r.set", pool, nlanes=8, attr=attr(),
                           config=local_node.config(RPMEM_MAX_NLANES="3")) as rp:
        assert rp.nlanes == 3
        rp.persist(HDR_SIZE, 100, 2)
        with pytest.raises(OSError) as e:
            rp.persist(HDR_SIZE, 100, 3)
        assert e.value.errno == errno.EINVAL


def test_stat_reports_size_and_health(local_node):
    parts = local_node.make_set("r.set", (4 * M, 4 * M))
    pool = local_pool(4 * M, seed=None)  # smaller than the remote pool: allowed
    with create(local_node, "r.set", pool, attr=attr()) as rp:
        st = rp.stat()
        assert (st.size, st.healthy) == (8 * M - HDR_SIZE, True)
    st = client.stat(local_node.target, "r.set", config=local_node.config())
    assert (st.size, st.healthy) == (8 * M - HDR_SIZE, True)
    with open(parts[1][1], "r+b") as f:  # damage the second part's header
        f.seek(100)
        f.write(b"\xff" * 8)
    st = client.stat(local_node.target, "r.set", config=local_node.config())
    assert not st.healthy and str(parts[1][1]) in st.message
    with pytest.raises(OSError) as e:
        client.stat(local_node.target, "nope.set", config=local_node.config())
    assert e.value.errno == errno.ENOENT


def test_stat_of_a_set_of_thousands_of_lost_parts_names_a_few(local_node):
    """A wiped disk under a set of 9,000 parts: the answer says the pool is unhealthy and
    names the first problems and how many more (every one of them would not fit in a
    message of the protocol)."""
    n = 9000
    local_node.write_set("big.set", *(f"2M /mnt/pmem0/pools/replica.part{i}" for i in range(n)))
    st = client.stat(local_node.target, "big.set", config=local_node.config())
    assert not st.healthy and st.message.startswith("/mnt/pmem0/pools/replica.part0: ")
    assert st.message.endswith(" more") and len(st.message) < 4096, st.message


# -- remove -------------------------------------------------------------------------------------
def remove(node, name, flags=0):
    client.remove(node.target, name, flags, config=node.config())


def test_remove_with_undefined_flags_is_einval_and_removes_nothing(local_node):
    parts = make_pool(local_node, "a.set")
    for flags in (4, 0x100, -1):
        with pytest.raises(OSError) as e:
            remove(local_node, "a.set", flags)
        assert e.value.errno == errno.EINVAL and "invalid flags" in str(e.value)
    assert all(path.exists() for _, path in parts) and (local_node.dir / "a.set").exists()


def test_nlanes_beyond_an_unsigned_int_is_lowered_as_any_other(local_node):
    local_node.make_set("r.set")
    with create(local_node, "r.set", local_pool(8 * M), nlanes=2 ** 40, attr=attr()) as rp:
        assert 1 <= rp.nlanes < 2 ** 32


def test_attributes_that_do_not_fit_librpmems_struct_are_einval(local_node):
    """Nothing is cut to fit (a signature of 10 bytes was stored as its first 8, and the
    handle kept the 10), and an integer beyond 32 bits is EINVAL before any agent starts."""
    local_node.make_set("r.set")
    pool = local_pool(8 * M)
    for bad in (attr(signature=b"TOOLONGSIG"), attr(user_flags=b"u" * 20),
                attr(major=2 ** 32), attr(uuid=bytes(15))):
        with pytest.raises(OSError) as e:
            create(local_node, "r.set", pool, attr=bad)
        assert e.value.errno == errno.EINVAL and "pool attributes: " in str(e.value)
    assert local_node.agent_pids() == []
    with create(local_node, "r.set", pool, attr=attr()) as rp:
        with pytest.raises(OSError) as e:
            rp.set_attr(attr(signature=b"TOOLONGSIG"))
        assert e.value.errno == errno.EINVAL


def make_pool(node, name, sizes=(8 * M,)):
    parts = node.make_set(name, sizes)
    pool = local_pool(sum(sizes) - (len(sizes) - 1) * HDR_SIZE, seed=None)
    create(node, name, pool, attr=attr()).close()
    return parts


def test_remove_parts_only(local_node):
    parts = make_pool(local_node, "a.set")
    remove(local_node, "a.set")
    assert not any(p.exists() for _, p in parts)
    assert (local_node.dir / "a.set").exists()  # the set file stays without POOL_SET
    # the same set can be created again
    make_pool(local_node, "a.set")


def test_remove_pool_set(local_node):
    parts = make_pool(local_node, "sub/b.set")
    remove(local_node, "sub/b.set", REMOVE_POOL_SET)
    assert not any(p.exists() for _, p in parts)
    assert not (local_node.dir / "sub/b.set").exists()


def test_remove_inconsistent_pool_needs_force(local_node):
    parts = make_pool(local_node, "c.set", (4 * M, 4 * M))
    with open(parts[0][1], "r+b") as f:
        f.write(b"garbage!")  # part 0's header checksum no longer matches
    with pytest.raises(OSError) as e:
        remove(local_node, "c.set")
    assert e.value.errno == errno.EINVAL and "inconsistent" in str(e.value)
    assert all(p.exists() for _, p in parts)  # refused: nothing removed
    remove(local_node, "c.set", REMOVE_FORCE | REMOVE_POOL_SET)
    assert not any(p.exists() for _, p in parts)
    assert not (local_node.dir / "c.set").exists()


def test_remove_with_a_part_missing_needs_force(local_node):
    parts = make_pool(local_node, "d.set", (4 * M, 4 * M))
    parts[1][1].unlink()
    with pytest.raises(OSError) as e:
        remove(local_node, "d.set")
    assert e.value.errno in (errno.EINVAL, errno.ENOENT)
    assert parts[0][1].exists()
    remove(local_node, "d.set", REMOVE_FORCE)
    assert not parts[0][1].exists()


def test_remove_errors(local_node):
    with pytest.raises(OSError) as e:
        remove(local_node, "missing.set")
    assert e.value.errno == errno.ENOENT and "missing.set" in str(e.value)
    parts = make_pool(local_node, "busy.set")
    pool = local_pool(8 * M, None)
    with open_(local_node, "busy.set", pool):
        with pytest.raises(OSError) as e:
            remove(local_node, "busy.set", REMOVE_FORCE)
        assert e.value.errno == errno.EBUSY
    assert parts[0][1].exists()
    for bad in ("/etc/x.set", "../x.set", ""):
        with pytest.raises(OSError) as e:
            remove(local_node, bad)
        assert e.value.errno == errno.EINVAL


# -- errno cases --------------------------------------------------------------------------------
def expect(errno_, fn, *args, **kw) -> OSError:
    with pytest.raises(OSError) as e:
        fn(*args, **kw)
    assert e.value.errno == errno_, f"{errno.errorcode.get(e.value.errno)}: {e.value}"
    assert "\n" not in str(e.value)
    return e.value


def test_eexist_leaves_the_existing_pool_alone(local_node):
    parts = local_node.make_set("r.set")
    pool = local_pool(8 * M, seed=8)
    with create(local_node, "r.set", pool, attr=attr()) as rp:
        rp.persist(HDR_SIZE, 8 * M - HDR_SIZE)
    before = remote_bytes(parts)
    err = expect(errno.EEXIST, create, local_node, "r.set", local_pool(8 * M, seed=9),
                 attr=attr(seed=3))
    assert str(parts[0][1]) in str(err)
    assert remote_bytes(parts) == before


def test_efbig_when_the_remote_pool_is_too_small(local_node):
    parts = local_node.make_set("r.set", (4 * M,))
    expect(errno.EFBIG, create, local_node, "r.set", local_pool(8 * M, None), attr=attr())
    assert not parts[0][1].exists()
    local_node.make_set("s.set", (4 * M,))
    create(local_node, "s.set", local_pool(4 * M, None), attr=attr()).close()
    expect(errno.EFBIG, open_, local_node, "s.set", local_pool(4 * M + 4096, None))


def test_enoent(local_node):
    local_node.make_set("r.set")
    err = expect(errno.ENOENT, open_, local_node, "r.set", local_pool(8 * M, None))
    assert "r.set" in str(err)
    expect(errno.ENOENT, open_, local_node, "nope.set", local_pool(8 * M, None))
    expect(errno.ENOENT, create, local_node, "nope.set", local_pool(8 * M, None), attr=attr())
    # an agent without its pool-set directory says so before the first request
    cfg = local_node.config(RPMEM_CMD=local_node.command().replace(
        str(local_node.dir), str(local_node.dir / "missing")))
    with pytest.raises(OSError) as e:
        RemotePool.create(local_node.target, "r.set", local_pool(8 * M, None), attr=attr(),
                          config=cfg)
    assert e.value.errno == errno.ENOENT and "missing" in str(e.value)


def test_ebusy_for_a_second_open(local_node):
    parts = local_node.make_set("r.set")
    pool = local_pool(8 * M, seed=10)
    first = create(local_node, "r.set", pool, attr=attr())
    expect(errno.EBUSY, open_, local_node, "r.set", local_pool(8 * M, None))
    first.persist(HDR_SIZE, M)  # the first session is unharmed
    first.close()
    with open_(local_node, "r.set", local_pool(8 * M, None)) as second:
        expect(errno.EBUSY, open_, local_node, "r.set", local_pool(8 * M, None))
        second.persist(HDR_SIZE, 1)
    assert remote_bytes(parts)[HDR_SIZE + 1:HDR_SIZE + M] == pool[HDR_SIZE + 1:HDR_SIZE + M]


@pytest.mark.parametrize("lines,why", [
    (["OPTION NOHDRS", "8M {d}/x.part0"], "attributes are required"),  # attr given
    (["8M {d}/x.part0", "REPLICA", "8M {d}/x.r"], "cannot have replicas"),
    (["1M {d}/x.part0"], "minimum part size"),
    (["8Q {d}/x.part0"], "incorrect format of size"),
    (["OPTION SINGLEHDR", "8M {d}/x.part0"], "incompat feature flags"),
    (["8M relative.part"], "absolute"),
])
def test_einval_for_a_remote_set_the_agent_refuses(local_node, lines, why):
    local_node.write_set("x.set", *(line.format(d=local_node.dir) for line in lines))
    err = expect(errno.EINVAL, create, local_node, "x.set", local_pool(8 * M, None), attr=attr())
    assert why in str(err)
    assert not (local_node.dir / "x.part0").exists()


def test_einval_for_missing_attributes_on_a_set_with_headers(local_node):
    local_node.make_set("r.set")
    expect(errno.EINVAL, create, local_node, "r.set", local_pool(8 * M, None), attr=None)
    expect(errno.EINVAL, create, local_node, "r.set", local_pool(8 * M, None), attr=PoolAttr())
    assert not (local_node.dir / "r.part0").exists()


def test_einval_before_any_agent_starts(local_node):
    # an RPMEM_CMD that cannot run: a refusal that is EINVAL was made before launching
    node = local_node
    cfg = node.config(RPMEM_CMD="/nonexistent/agent")
    pool = local_pool(8 * M, None)
    view = memoryview(pool)
    cases = [
        ("/abs.set", pool, {}), ("../up.set", pool, {}), ("a/../../up.set", pool, {}),
        ("", pool, {}),
        ("r.set", pool, {"nlanes": 0}),
        ("r.set", view[1:8193], {}),  # not page aligned
        ("r.set", view[:8192 + 100], {}),  # size not a page multiple
        ("r.set", view[:4096], {}),  # smaller than the minimum remote pool
        ("r.set", bytes(8192), {}),  # read-only
    ]
    for name, buf, kw in cases:
        with pytest.raises(OSError) as e:
            RemotePool.create(node.target, name, buf, attr=attr(), config=cfg, **kw)
        assert e.value.errno == errno.EINVAL, (name, kw, e.value)
    view.release()
    with pytest.raises(OSError) as e:
        RemotePool.open(node.target, "r.set", pool, config=cfg)
    assert e.value.errno == errno.ENOENT  # a valid request did launch (and found no agent)


def test_eacces_when_the_agent_may_not_touch_the_pool(local_node):
    node = local_node
    if os.geteuid() == 0:  # root ignores file modes: run the agent as nobody (whose HOME
        # has no agent config, rather than root's, which nobody may not even look into)
        prefix = "env HOME=/nonexistent setpriv --reuid=65534 --regid=65534 --clear-groups"
    else:
        prefix = ""
    node.dir.parent.chmod(0o755)
    node.dir.chmod(0o755)
    parts = node.make_set("r.set")
    (node.dir / "r.set").chmod(0o644)
    cfg = node.config(RPMEM_CMD=node.command(prefix=prefix))
    pool = local_pool(8 * M, None)
    # create: the agent cannot make a file in the directory
    with pytest.raises(OSError) as e:
        RemotePool.create(node.target, "r.set", pool, attr=attr(), config=cfg)
    assert e.value.errno == errno.EACCES, e.value
    assert str(parts[0][1]) in str(e.value)
    assert not parts[0][1].exists()
    # open: the pool exists but the agent may not read or write it
    create(node, "r.set", pool, attr=attr()).close()
    parts[0][1].chmod(0o600)
    before = remote_bytes(parts)
    with pytest.raises(OSError) as e:
        RemotePool.open(node.target, "r.set", pool, config=cfg)
    assert e.value.errno == errno.EACCES, e.value
    assert str(parts[0][1]) in str(e.value)
    assert remote_bytes(parts) == before


# -- the data path refuses bad ranges (client side) ---------------------------------------------
def test_persist_out_of_range_is_einval_and_writes_nothing(local_node):
    parts = local_node.make_set("r.set")
    pool = local_pool(8 * M, seed=11)
    with create(local_node, "r.set", pool, attr=attr()) as rp:
        before = remote_bytes(parts)
        for args in [(0, 10), (HDR_SIZE - 1, 2), (8 * M - 10, 11), (8 * M, 1), (HDR_SIZE, -1),
                     (-5, 10), (HDR_SIZE, 10, 4)]:
            for call in (rp.persist, rp.flush):
                expect(errno.EINVAL, call, *args)
        expect(errno.EINVAL, rp.deep_persist, 0, 1)
        expect(errno.EINVAL, rp.drain, 4)
        # flags librpmem does not define are refused, not ignored
        expect(errno.EINVAL, rp.persist, HDR_SIZE, 10, 0, 2)
        expect(errno.EINVAL, rp.flush, HDR_SIZE, 10, 0, 0x100)
        expect(errno.EINVAL, rp.drain, 0, 1)
        assert remote_bytes(parts) == before  # header and data unchanged
        rp.persist(HDR_SIZE, 100)  # the lanes are not broken by refused calls
    assert remote_bytes(parts)[HDR_SIZE:HDR_SIZE + 100] == pool[HDR_SIZE:HDR_SIZE + 100]


def test_check_version():
    assert check_version(1, 0) is None
    assert check_version(1, 3) is None
    assert "minor" in check_version(1, 4)
    assert "major" in check_version(2, 0)
    assert "major" in check_version(0, 9)



def test_attributes_with_only_a_signature_round_trip(local_node):
    # librpmem's manual example: a zeroed rpmem_pool_attr with just the signature set
    local_node.make_set("r.set")
    only_sig = PoolAttr(signature=b"MANPAGE\0")
    pool = local_pool(8 * M, seed=12)
    with create(local_node, "r.set", pool, attr=only_sig) as rp:
        rp.persist(HDR_SIZE, 8 * M - HDR_SIZE)
    with open_(local_node, "r.set", local_pool(8 * M, None)) as rp:
        assert rp.attr == only_sig


def test_set_attr_refuses_attributes_that_contradict_the_set(local_node):
    parts = local_node.make_set("s.set", (4 * M, 4 * M), "SINGLEHDR")
    good = attr(incompat_features=FEAT_SINGLEHDR)
    with create(local_node, "s.set", local_pool(8 * M, None), attr=good) as rp:
        before = remote_bytes(parts, whole=True)
        expect(errno.EINVAL, rp.set_attr, attr(seed=5))  # SINGLEHDR flag missing
        assert remote_bytes(parts, whole=True) == before
    with open_(local_node, "s.set", local_pool(8 * M, None)) as rp:
        assert rp.attr == good

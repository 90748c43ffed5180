"""The pool header: PMDK-made headers read, re-encoded and checksummed exactly as PMDK does,
uuids as pmempool prints them, corruption detected where PMDK detects it (and not where it
does not look), pmreplica-made headers accepted by `pmempool check`, librpmem's attributes."""

from __future__ import annotations

import errno
import struct
import subprocess
import uuid
from pathlib import Path

import pytest

from pmreplica import HeaderError, PoolSet
from pmreplica.header import (ATTR_SIZE, FEAT_CKSUM_2K, FEAT_SINGLEHDR, HDR_SIZE, NIL, ArchFlags,
                              PoolAttr, PoolHeader, fletcher64, replica_headers)

from .helpers import write_set

M = 1 << 20


def _pmempool_fields(pmempool: str, part: Path) -> dict[str, str]:
    """`pmempool info PART`'s "key : value" lines."""
    run = subprocess.run([pmempool, "info", str(part)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    fields = {}
    for line in run.stdout.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    return fields


@pytest.fixture
def pmdk_set(pool_dir, pmempool) -> tuple[Path, list[Path]]:
    """A pmempool-made obj pool set: two-part master, two-part local replica."""
    d = pool_dir
    path = write_set(d / "pmdk.set", f"8M {d}/a", f"4M {d}/b", "REPLICA", f"6M {d}/c",
                     f"6M {d}/d")
    run = subprocess.run([pmempool, "create", "obj", str(path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return path, [d / n for n in "abcd"]


def _check(pmempool: str, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([pmempool, "check", "-v", str(path)], capture_output=True, text=True)


def test_pmdk_headers_decode_as_pmempool_shows_them(pmdk_set, pmempool):
    _, parts = pmdk_set
    for part in parts:
        raw = part.read_bytes()[:HDR_SIZE]
        hdr = PoolHeader.unpack(raw)
        shown = _pmempool_fields(pmempool, part)
        assert shown["Signature"].split()[0] == hdr.signature.rstrip(b"\0").decode() == "PMEMOBJ"
        assert int(shown["Major"]) == hdr.major
        assert shown["Pool set UUID"] == str(hdr.poolset_uuid)
        assert shown["UUID"] == str(hdr.uuid)
        assert shown["Previous part UUID"] == str(hdr.prev_part)
        assert shown["Next part UUID"] == str(hdr.next_part)
        assert shown["Previous replica UUID"] == str(hdr.prev_repl)
        assert shown["Next replica UUID"] == str(hdr.next_repl)
        assert shown["Checksum"] == f"0x{hdr.checksum:x} [OK]"
        assert int(shown["Mandatory features"].split()[0], 16) == hdr.incompat
        assert hdr.incompat & FEAT_CKSUM_2K
        # what PMDK wrote, pmreplica computes and re-encodes bit for bit
        assert PoolHeader.checksum_ok(raw)
        assert fletcher64(raw, 2048) == hdr.checksum
        assert hdr.pack() == raw
        assert hdr.arch == ArchFlags.current()
        assert hdr.problems(raw) == []


def test_pmdk_set_links_form_circles(pmdk_set):
    _, parts = pmdk_set
    a, b, c, d = (PoolHeader.unpack(p.read_bytes()[:HDR_SIZE]) for p in parts)
    assert (a.next_part, a.prev_part, b.next_part, b.prev_part) == (b.uuid, b.uuid, a.uuid, a.uuid)
    assert (c.next_part, d.next_part) == (d.uuid, c.uuid)
    assert a.next_repl == a.prev_repl == c.uuid and c.next_repl == c.prev_repl == a.uuid
    assert len({h.poolset_uuid for h in (a, b, c, d)}) == 1


# offset -> what a flipped byte there is: "header" (PMDK and pmreplica see a damaged header),
# "state" (outside the CKSUM_2K checksum, inside pmreplica's replica-state record: PMDK does
# not look, pmreplica reads a damaged record as "every replica stale"), "ignored" (neither looks)
CORRUPTIONS = {0: "header", 8: "header", 16: "header", 24: "header", 40: "header",
               56: "header", 120: "header", 130: "header", 2047: "header", 4088: "header",
               4095: "header", 2048: "state", 3000: "state", 4000: "ignored"}


@pytest.mark.parametrize("offset", list(CORRUPTIONS))
def test_corrupted_header_detected_where_pmdk_detects_it(pmdk_set, pmempool, offset):
    path, parts = pmdk_set
    raw = bytearray(parts[0].read_bytes()[:HDR_SIZE])
    raw[offset] ^= 0x5A
    with open(parts[0], "r+b") as f:
        f.write(raw)
    damaged = CORRUPTIONS[offset] == "header"
    pmdk = _check(pmempool, path)
    assert (pmdk.returncode != 0) == damaged, pmdk.stdout + pmdk.stderr
    assert PoolHeader.checksum_ok(raw) == (not damaged)
    if damaged:
        with pytest.raises(HeaderError) as e:
            PoolSet.open(path, signature=b"PMEMOBJ")
        assert e.value.errno == errno.EINVAL
        msg = str(e.value)
        assert f"master replica of {path} is inconsistent" in msg
        assert f"{parts[0]}: invalid header checksum" in msg
        assert "replica-sync" in msg
    else:
        with PoolSet.open(path, signature=b"PMEMOBJ") as pool:
            stale = "stale" if CORRUPTIONS[offset] == "state" else "ok"
            assert [r.state for r in pool.replicas] == ["ok", stale]
            assert pool.state.intact == (stale == "ok")


def test_replica_header_corruption_degrades_instead_of_failing(pmdk_set):
    path, parts = pmdk_set
    with open(parts[3], "r+b") as f:  # the replica's second part
        f.seek(40)
        f.write(b"\xff")
    with PoolSet.open(path) as pool:
        rep = pool.replicas[1]
        assert rep.state == "failed" and rep.error.errno == errno.EINVAL
        assert f"{parts[3]}: invalid header checksum" in str(rep.error)


def test_pmreplica_headers_pass_pmempool_check(pool_dir, pmempool):
    """pmempool cannot type a PMREPLIC pool, so the pool is made with PMDK's obj signature:
    `pmempool check` then verifies every header's checksum, arch flags and uuid links, and
    every part file's size against its line (a part of an unaligned size is made that size;
    a replica smaller than the master sets the pool's size)."""
    d = pool_dir
    for name, lines in {
        "multi": [f"8M {d}/m0", f"{4 * M + 1} {d}/m1", "REPLICA", f"6M {d}/r0", f"2M {d}/r1",
                  "REPLICA", f"16M {d}/s0"],
        "singlehdr": ["OPTION SINGLEHDR", f"8M {d}/h0", f"4M {d}/h1", "REPLICA",
                      f"12M {d}/hr"],
    }.items():
        path = write_set(d / f"{name}.set", *lines)
        PoolSet.create(path, signature=b"PMEMOBJ", major=6).close()
        run = _check(pmempool, path)
        assert run.returncode == 0, run.stdout + run.stderr
        headers = [ln for ln in run.stdout.splitlines() if "pool header" in ln]
        nparts = 5 if name == "multi" else 2  # SINGLEHDR: one header per replica
        assert sum("pool header correct" in ln for ln in headers) == nparts, run.stdout
        assert run.stdout.strip().endswith(f"{path}: consistent")
    hdr = PoolHeader.unpack((d / "h0").read_bytes()[:HDR_SIZE])
    assert hdr.incompat & FEAT_SINGLEHDR and not any((d / "h1").read_bytes()[:HDR_SIZE])
    assert (d / "m1").stat().st_size == 4 * M + 1
    with PoolSet.open(d / "multi.set", signature=b"PMEMOBJ") as pool:
        assert pool.size == 8 * M - HDR_SIZE  # replica 1's


def test_default_signature_header_is_valid_for_pmdk_but_untyped(pool_dir, pmempool):
    path = write_set(pool_dir / "p.set", f"8M {pool_dir}/a")
    PoolSet.create(path).close()
    raw = (pool_dir / "a").read_bytes()[:HDR_SIZE]
    hdr = PoolHeader.unpack(raw)
    assert hdr.signature == b"PMREPLIC" and PoolHeader.checksum_ok(raw)
    assert hdr.uuid == hdr.next_part == hdr.prev_part == hdr.next_repl == hdr.prev_repl
    run = subprocess.run([pmempool, "info", str(pool_dir / "a")], capture_output=True, text=True)
    assert "unknown pool type -- 'PMREPLIC'" in run.stderr  # its header read, its type unknown
    run = _check(pmempool, path)  # and checked no further
    assert run.returncode != 0 and "invalid signature" in run.stdout, run.stdout + run.stderr


def test_checksum_covers_the_whole_page_without_cksum_2k():
    hdr = PoolHeader(signature=b"TEST", major=1, incompat=0, uuid=uuid.uuid4())
    raw = bytearray(hdr.pack())
    assert PoolHeader.checksum_ok(raw)
    raw[3000] ^= 1
    assert not PoolHeader.checksum_ok(raw)
    hdr2k = PoolHeader(signature=b"TEST", major=1, incompat=FEAT_CKSUM_2K, uuid=hdr.uuid)
    raw = bytearray(hdr2k.pack())
    raw[3000] ^= 1
    assert PoolHeader.checksum_ok(raw)


def test_fletcher64_matches_the_reference_definition():
    data = bytes(range(256)) * 16
    lo = hi = 0
    for i in range(0, HDR_SIZE, 4):
        word = 0 if i in (4088, 4092) else struct.unpack_from("<I", data, i)[0]
        lo = (lo + word) & 0xFFFFFFFF
        hi = (hi + lo) & 0xFFFFFFFF
    assert fletcher64(data) == (hi << 32) | lo


def test_header_problems_name_what_is_wrong():
    hdr = PoolHeader(signature=b"X", major=0, incompat=FEAT_CKSUM_2K | 0x80)
    raw = hdr.pack()
    assert hdr.problems(raw) == ["unknown incompat features 0x80", "invalid major version 0"]
    bad = bytearray(raw)
    bad[0] ^= 1
    assert "invalid header checksum" in PoolHeader.unpack(bad).problems(bad)
    assert PoolHeader.unpack(bytes(HDR_SIZE)).is_zeroed
    with pytest.raises(ValueError):
        PoolHeader.unpack(bytes(100))


def test_replica_headers_link_parts_in_a_circle():
    template = PoolHeader(signature=b"PMREPLIC", major=1, poolset_uuid=uuid.uuid4())
    uuids = [uuid.uuid4() for _ in range(3)]
    prev, nxt = uuid.uuid4(), uuid.uuid4()
    hdrs = replica_headers(template, uuids, prev, nxt)
    assert [h.uuid for h in hdrs] == uuids
    assert [h.next_part for h in hdrs] == uuids[1:] + uuids[:1]
    assert [h.prev_part for h in hdrs] == uuids[-1:] + uuids[:-1]
    assert all((h.prev_repl, h.next_repl, h.poolset_uuid) == (prev, nxt, template.poolset_uuid)
               for h in hdrs)
    one = replica_headers(template, uuids[:1], prev, nxt)[0]
    assert one.next_part == one.prev_part == one.uuid


def test_pool_attr_wire_layout_and_header_round_trip():
    ps, u, n, p = (uuid.uuid4() for _ in range(4))
    arch = ArchFlags.current()
    attr = PoolAttr(signature=b"PMEMOBJ\0", major=6, compat_features=1, incompat_features=2,
                    ro_compat_features=3, poolset_uuid=ps.bytes_le, uuid=u.bytes_le,
                    next_uuid=n.bytes_le, prev_uuid=p.bytes_le, user_flags=arch.pack())
    raw = attr.pack()
    assert len(raw) == ATTR_SIZE == 104
    assert raw[:8] == b"PMEMOBJ\0"
    assert struct.unpack_from(">4I", raw, 8) == (6, 1, 2, 3)  # big-endian on the wire
    assert raw[24:40] == ps.bytes_le and raw[88:104] == arch.pack()
    assert PoolAttr.unpack(raw) == attr
    hdr = attr.to_header()
    assert (hdr.poolset_uuid, hdr.uuid, hdr.next_repl, hdr.prev_repl) == (ps, u, n, p)
    assert hdr.arch == arch and hdr.prev_part == hdr.next_part == NIL
    assert PoolAttr.from_header(hdr) == attr
    assert PoolAttr().is_zeroed and not attr.is_zeroed

"""The 4 KiB PMDK pool header, its checksum and uuid links, and librpmem's pool attributes.

Layout (little-endian, PMDK 1.12 ``struct pool_hdr``): signature[8], major, compat, incompat,
ro_compat, poolset_uuid, uuid, prev_part, next_part, prev_repl, next_repl, crtime,
arch_flags{alignment_desc, class, data, reserved[4], machine}, zeros to 4024, the 64-byte
shutdown-state block, and the checksum at 4088.

Records are namedtuples rather than dataclasses: the agent imports this module on every
start, and dataclasses alone (it imports inspect) costs it several milliseconds.
"""

from __future__ import annotations

import array
import ctypes
import os
import struct
import sys
import time
import uuid as _uuid
from collections import namedtuple

HDR_SIZE = 4096
SIG_LEN = 8
CHECKSUM_OFF = 4088
CHECKSUM_2K = 2048
SDS_OFF = 4024
SDS_SIZE = 64

# feature flags (pool_hdr.h)
FEAT_CHECK_BAD_BLOCKS = 0x1  # compat
FEAT_SINGLEHDR = 0x1  # incompat
FEAT_CKSUM_2K = 0x2  # incompat
FEAT_SDS = 0x4  # incompat
INCOMPAT_VALID = FEAT_SINGLEHDR | FEAT_CKSUM_2K | FEAT_SDS

_HDR = struct.Struct("<8s4I16s16s16s16s16s16sQQBB4sH")
_ARCH = struct.Struct("<QBB4sH")
_ARCH_OFF = 128
NIL = _uuid.UUID(int=0)

_ELF_MACHINES = {"x86_64": 62, "amd64": 62, "aarch64": 183, "arm64": 183, "ppc64le": 21,
                 "ppc64": 21, "riscv64": 243}


def _alignment_desc() -> int:
    """PMDK's ``alignment_desc()``: 4 bits per basic C type, its alignment minus one."""
    types = (ctypes.c_char, ctypes.c_short, ctypes.c_int, ctypes.c_long, ctypes.c_longlong,
             ctypes.c_size_t, ctypes.c_int64, ctypes.c_float, ctypes.c_double,
             ctypes.c_longdouble, ctypes.c_void_p)
    desc = 0
    for i, t in enumerate(types):
        desc |= ((ctypes.alignment(t) - 1) & 0xF) << (4 * i)
    return desc


class ArchFlags(namedtuple("ArchFlags", "alignment_desc machine_class data machine reserved",
                           defaults=(bytes(4),))):
    """Architecture identification of the machine that created the pool. ``reserved`` is
    kept as read: a remote pool stores librpmem's 16 user_flags bytes here, all of them."""

    __slots__ = ()

    @classmethod
    def current(cls) -> "ArchFlags":
        return cls(alignment_desc=_alignment_desc(),
                   machine_class=2 if sys.maxsize > 2**32 else 1,
                   data=1 if sys.byteorder == "little" else 2,
                   machine=_ELF_MACHINES.get(os.uname().machine.lower(), 0))

    def pack(self) -> bytes:
        return _ARCH.pack(self.alignment_desc, self.machine_class, self.data, self.reserved,
                          self.machine)

    @classmethod
    def unpack(cls, raw: bytes) -> "ArchFlags":
        ad, mc, data, reserved, machine = _ARCH.unpack(raw)
        return cls(ad, mc, data, machine, reserved)


CURRENT_ARCH = ArchFlags.current()


def fletcher64(buf: bytes | memoryview, skip_from: int = HDR_SIZE) -> int:
    """PMDK's ``util_checksum``: Fletcher-64 over 32-bit words; the checksum word at 4088
    and every word at or after ``skip_from`` count as zero."""
    words = array.array("I", bytes(buf[:HDR_SIZE]))
    if sys.byteorder != "little":
        words.byteswap()
    words[CHECKSUM_OFF // 4] = words[CHECKSUM_OFF // 4 + 1] = 0
    counted = skip_from // 4
    lo = hi = 0
    for w in words[:counted]:
        lo = (lo + w) & 0xFFFFFFFF
        hi = (hi + lo) & 0xFFFFFFFF
    # each zero word after the counted ones still adds lo to hi
    hi = (hi + lo * (len(words) - counted)) & 0xFFFFFFFF
    return (hi << 32) | lo


_HEADER_FIELDS = ("signature major compat incompat ro_compat poolset_uuid uuid prev_part "
                  "next_part prev_repl next_repl crtime arch sds checksum")


class PoolHeader(namedtuple("PoolHeader", _HEADER_FIELDS,
                            defaults=(0, FEAT_CKSUM_2K, 0, NIL, NIL, NIL, NIL, NIL, NIL, 0,
                                      None, bytes(SDS_SIZE), 0))):
    """A decoded pool header (uuids as :class:`uuid.UUID`, ``arch`` an :class:`ArchFlags`,
    this machine's when not given). ``pack()`` yields the 4096 bytes with a fresh checksum."""

    __slots__ = ()

    def __new__(cls, *args, **kw):  # noqa: D102 - fills in this machine's arch flags
        self = super().__new__(cls, *args, **kw)
        return self if self.arch is not None else self._replace(arch=CURRENT_ARCH)

    @property
    def checksum_limit(self) -> int:
        return CHECKSUM_2K if self.incompat & FEAT_CKSUM_2K else HDR_SIZE

    def pack(self) -> bytes:
        out = bytearray(HDR_SIZE)
        _HDR.pack_into(out, 0, self.signature.ljust(SIG_LEN, b"\0")[:SIG_LEN], self.major,
                       self.compat, self.incompat, self.ro_compat,
                       self.poolset_uuid.bytes_le, self.uuid.bytes_le,
                       self.prev_part.bytes_le, self.next_part.bytes_le,
                       self.prev_repl.bytes_le, self.next_repl.bytes_le, self.crtime,
                       self.arch.alignment_desc, self.arch.machine_class, self.arch.data,
                       self.arch.reserved, self.arch.machine)
        out[SDS_OFF:SDS_OFF + SDS_SIZE] = self.sds
        struct.pack_into("<Q", out, CHECKSUM_OFF, fletcher64(out, self.checksum_limit))
        return bytes(out)

    @classmethod
    def unpack(cls, raw: bytes | memoryview) -> "PoolHeader":
        raw = bytes(raw[:HDR_SIZE])
        if len(raw) < HDR_SIZE:
            raise ValueError(f"pool header needs {HDR_SIZE} bytes, got {len(raw)}")
        (sig, major, compat, incompat, ro, psu, u, pp, np_, pr, nr, crtime,
         ad, mc, data, reserved, machine) = _HDR.unpack_from(raw)
        uu = _uuid.UUID
        return cls(signature=sig, major=major, compat=compat, incompat=incompat, ro_compat=ro,
                   poolset_uuid=uu(bytes_le=psu), uuid=uu(bytes_le=u), prev_part=uu(bytes_le=pp),
                   next_part=uu(bytes_le=np_), prev_repl=uu(bytes_le=pr),
                   next_repl=uu(bytes_le=nr), crtime=crtime,
                   arch=ArchFlags(ad, mc, data, machine, reserved),
                   sds=raw[SDS_OFF:SDS_OFF + SDS_SIZE],
                   checksum=struct.unpack_from("<Q", raw, CHECKSUM_OFF)[0])

    @staticmethod
    def checksum_ok(raw: bytes | memoryview) -> bool:
        """True if the stored checksum matches the bytes (CKSUM_2K honoured)."""
        incompat = struct.unpack_from("<I", raw, 16)[0]
        limit = CHECKSUM_2K if incompat & FEAT_CKSUM_2K else HDR_SIZE
        return struct.unpack_from("<Q", raw, CHECKSUM_OFF)[0] == fletcher64(raw, limit)

    @property
    def is_zeroed(self) -> bool:
        return self.signature == bytes(SIG_LEN) and self.major == 0 and self.uuid == NIL

    def problems(self, raw: bytes | memoryview | None = None, remote: bool = False) -> list[str]:
        """What is wrong with this header on its own (checksum, arch, unknown features).
        ``remote``: a remote pool's header, whose format fields belong to its client (major
        0, as in zeroed librpmem attributes, is valid there)."""
        out = []
        if raw is not None and not self.checksum_ok(raw):
            out.append("invalid header checksum")
        if self.incompat & ~INCOMPAT_VALID:
            out.append(f"unknown incompat features 0x{self.incompat & ~INCOMPAT_VALID:x}")
        if self.major == 0 and not remote:
            out.append("invalid major version 0")
        return out


ATTR_SIZE = 104
_ATTR = struct.Struct(">8s4I16s16s16s16s16s")


_ATTR_FIELDS = ("signature major compat_features incompat_features ro_compat_features "
                "poolset_uuid uuid next_uuid prev_uuid user_flags")


class PoolAttr(namedtuple("PoolAttr", _ATTR_FIELDS,
                          defaults=(bytes(SIG_LEN), 0, 0, 0, 0) + (bytes(16),) * 5)):
    """librpmem's ``struct rpmem_pool_attr`` (104 bytes packed; big-endian on the wire);
    uuids are the raw 16 bytes as PMDK stores them.

    Stored in a remote pool's header: ``user_flags`` occupy the header's arch_flags, as
    PMDK's ``util_set_rpmem_attr`` does."""

    __slots__ = ()

    def pack(self) -> bytes:
        return _ATTR.pack(self.signature.ljust(SIG_LEN, b"\0")[:SIG_LEN], self.major,
                          self.compat_features, self.incompat_features,
                          self.ro_compat_features, self.poolset_uuid, self.uuid,
                          self.next_uuid, self.prev_uuid, self.user_flags.ljust(16, b"\0"))

    @classmethod
    def unpack(cls, raw: bytes | memoryview) -> "PoolAttr":
        return cls(*_ATTR.unpack(bytes(raw[:ATTR_SIZE])))

    @property
    def is_zeroed(self) -> bool:
        return self.pack() == bytes(ATTR_SIZE)

    def to_header(self) -> PoolHeader:
        """The first-part header of a remote pool created with these attributes; the
        agent links further parts with :func:`replica_headers`."""
        uu = _uuid.UUID
        return PoolHeader(signature=self.signature, major=self.major,
                          compat=self.compat_features, incompat=self.incompat_features,
                          ro_compat=self.ro_compat_features,
                          poolset_uuid=uu(bytes_le=self.poolset_uuid),
                          uuid=uu(bytes_le=self.uuid),
                          next_repl=uu(bytes_le=self.next_uuid),
                          prev_repl=uu(bytes_le=self.prev_uuid),
                          crtime=int(time.time()), arch=ArchFlags.unpack(self.user_flags))

    @classmethod
    def from_header(cls, hdr: PoolHeader) -> "PoolAttr":
        """The attributes ``rpmem_open`` returns for a pool with this header."""
        return cls(signature=hdr.signature, major=hdr.major, compat_features=hdr.compat,
                   incompat_features=hdr.incompat, ro_compat_features=hdr.ro_compat,
                   poolset_uuid=hdr.poolset_uuid.bytes_le, uuid=hdr.uuid.bytes_le,
                   next_uuid=hdr.next_repl.bytes_le, prev_uuid=hdr.prev_repl.bytes_le,
                   user_flags=hdr.arch.pack())


def replica_headers(template: PoolHeader, part_uuids: list[_uuid.UUID],
                    prev_repl: _uuid.UUID, next_repl: _uuid.UUID) -> list[PoolHeader]:
    """Headers for the parts of one replica: ``template`` with each part's uuid, the parts
    linked in a circle, and the replica linked to its neighbours in the replica circle."""
    n = len(part_uuids)
    return [template._replace(uuid=u, prev_part=part_uuids[i - 1],
                    next_part=part_uuids[(i + 1) % n], prev_repl=prev_repl, next_repl=next_repl)
            for i, u in enumerate(part_uuids)]

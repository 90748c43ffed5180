"""The object pool's on-media layout: superblock, chunk table, redo log area, heap.

All offsets are byte offsets into the pool mapping (``PoolSet.buf``); every persistent
field is a little-endian u64 at an 8-aligned offset, so the store reads and writes them
through one ``memoryview.cast('Q')``.

::

    [0, data_offset)            pool header (PoolSet's; never written here)
    superblock (4 KiB)          static geometry + checksum, then the logged root words
    chunk table                 one u64 per heap chunk: FREE, RUN|class, HUGE|n, HUGE_CONT
    redo log area               header line + entries (see redolog.py)
    heap                        nchunks chunks of CHUNK bytes
"""

from __future__ import annotations

import errno
import hashlib
import struct
from dataclasses import dataclass

from ..errors import PmReplicaError

#: PoolSet header signature of object pools.
POOL_SIGNATURE = b"PMREPOBJ"
#: Superblock magic and layout version (bumped on an incompatible layout change).
SB_MAGIC = int.from_bytes(b"PMROBJSB", "little")
LAYOUT_VERSION = 1

#: Smallest pool (same as libpmemobj's PMEMOBJ_MIN_POOL).
MIN_POOL_SIZE = 8 << 20

CHUNK_SHIFT = 16
CHUNK = 1 << CHUNK_SHIFT          # heap chunk: a run of equal units, or part of a huge block
SB_SIZE = 4096
PAGE = 4096

# Superblock (offsets from its start): the static words magic, version, pool_size, nchunks,
# ctab, log, log_size, heap (Geometry.static_words), then a blake2b-8 of them at SB_STATIC.
SB_STATIC = 64
# Logged (transactional) words, one cache line further.
SB_W_ROOT = 128
SB_W_TYPES = 136
SB_W_CLEAN = 144

# Chunk table entry kinds (low byte).
CH_FREE = 0
CH_RUN = 1                        # | class << 8
CH_HUGE = 2                       # | nchunks << 32, first chunk of a huge block (the
                                  # entries of its other chunks are not read)

# Allocation header: 16 bytes in front of every payload.
#   word 0: requested payload size
#   word 1: type_num (16 bits) | ALLOC_MAGIC << 16 | type_code << 32
ALLOC_HDR = 16
ALLOC_MAGIC = 0xA11C

# Allocation type numbers (pynvm's numbering: PObjects and their substructures).
POBJECT_TYPE_NUM = 20
LIST_POBJPTR_ARRAY_TYPE_NUM = 30
PDICTKEYSOBJECT_TYPE_NUM = 40
TUPLE_POBJPTR_ARRAY_TYPE_NUM = 50
SET_POBJPTR_ARRAY_TYPE_NUM = 60
RAW_TYPE_NUM = 1                  # MemoryManager.alloc() default for non-PObject memory

# Object ids: payload offsets. 0 is NULL; 1..3 are the singletons (never real payloads).
OID_NULL = 0
OID_NONE = 1
OID_TRUE = 2
OID_FALSE = 3


def _size_classes() -> tuple[int, ...]:
    """Unit sizes (allocation header included): 16-byte steps to 128, then 4 per doubling."""
    out = list(range(32, 129, 16))
    step = 32
    while out[-1] < 8192:
        for _ in range(4):
            out.append(out[-1] + step)
        step *= 2
    return tuple(out)


SIZE_CLASSES = _size_classes()
MAX_RUN_UNIT = SIZE_CLASSES[-1]


def _run_geometry(unit: int) -> tuple[int, int]:
    """(units per run chunk, offset of the first unit): the bitmap sits at the chunk start."""
    n = (CHUNK - 64) // unit
    while True:
        bitmap = ((n + 63) // 64) * 8
        first = (bitmap + 63) & ~63
        if first + n * unit <= CHUNK:
            return n, first
        n -= 1


RUN_GEOMETRY = tuple(_run_geometry(u) for u in SIZE_CLASSES)

# size (header included) -> class index, in 16-byte steps.
_CLASS_OF = bytearray((MAX_RUN_UNIT >> 4) + 1)
_ci = 0
for _i in range(len(_CLASS_OF)):
    while SIZE_CLASSES[_ci] < _i << 4:
        _ci += 1
    _CLASS_OF[_i] = _ci
del _ci, _i


def class_of(total: int) -> int:
    """Size class index for ``total`` bytes (header included), or -1 for a huge block."""
    if total > MAX_RUN_UNIT:
        return -1
    return _CLASS_OF[(total + 15) >> 4]


_SB_STATIC = struct.Struct("<8Q")


@dataclass(frozen=True)
class Geometry:
    """Where the superblock, chunk table, log and heap of one pool are."""

    sb: int
    pool_size: int
    nchunks: int
    ctab: int
    log: int
    log_size: int
    heap: int

    @classmethod
    def plan(cls, data_offset: int, pool_size: int) -> "Geometry":
        """Lay out a new pool of ``pool_size`` bytes whose data starts at ``data_offset``."""
        sb = data_offset
        # Log area: 1/32 of the pool, 64 KiB .. 1 MiB; bigger transactions spill to free chunks.
        log_size = min(max(pool_size // 32, 64 << 10), 1 << 20) & ~(PAGE - 1)
        ctab = sb + SB_SIZE
        nchunks = (pool_size - ctab - log_size) // (CHUNK + 8)
        while nchunks > 0:
            ctab_bytes = (nchunks * 8 + PAGE - 1) & ~(PAGE - 1)
            log = ctab + ctab_bytes
            heap = (log + log_size + PAGE - 1) & ~(PAGE - 1)
            if heap + nchunks * CHUNK <= pool_size:
                return cls(sb, pool_size, nchunks, ctab, log, log_size, heap)
            nchunks -= 1
        raise PmReplicaError(errno.EINVAL, f"pool size {pool_size} is too small for an object pool")

    def static_words(self) -> bytes:
        """The superblock's static part, checksum included."""
        body = _SB_STATIC.pack(SB_MAGIC, LAYOUT_VERSION, self.pool_size, self.nchunks,
                               self.ctab, self.log, self.log_size, self.heap)
        return body + hashlib.blake2b(body, digest_size=8).digest()

    @classmethod
    def load(cls, buf: memoryview, data_offset: int, pool_size: int) -> "Geometry":
        """Read and check the superblock at ``data_offset``; EINVAL if it is not an object pool."""
        raw = bytes(buf[data_offset:data_offset + SB_STATIC + 8])
        words = _SB_STATIC.unpack_from(raw)
        if words[0] != SB_MAGIC:
            raise PmReplicaError(errno.EINVAL, "not an initialized pmreplica object pool "
                                               "(superblock magic missing)")
        if hashlib.blake2b(raw[:SB_STATIC], digest_size=8).digest() != raw[SB_STATIC:]:
            raise PmReplicaError(errno.EINVAL, "object pool superblock checksum mismatch")
        if words[1] != LAYOUT_VERSION:
            raise PmReplicaError(errno.EINVAL, f"object pool layout version {words[1]} is not "
                                               f"supported (this is {LAYOUT_VERSION})")
        geo = cls(data_offset, *words[2:])
        if geo.pool_size > pool_size or geo.heap + geo.nchunks * CHUNK > pool_size:
            raise PmReplicaError(errno.EINVAL, f"object pool superblock describes "
                                               f"{geo.pool_size} bytes but the pool has {pool_size}")
        return geo

    def chunk_off(self, idx: int) -> int:
        return self.heap + (idx << CHUNK_SHIFT)

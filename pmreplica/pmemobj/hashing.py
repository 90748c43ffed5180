"""A hash for persistent dict keys and set members that is the same in every process.

Python's own ``hash`` of str and bytes changes per process (PYTHONHASHSEED), so tables
built by one run would not find keys in the next. Numbers keep Python's hash, which is
deterministic and makes 1, 1.0 and True collide as dict keys do. Tuples and frozensets
are hashed from their members; other hashable types fall back to ``hash()``, stable only
if that type's hash is (numeric types such as Decimal and Fraction are).
"""

from __future__ import annotations

import zlib
from typing import Any

MASK = (1 << 64) - 1
_NONE_HASH = 0x6E6F6E65


def _bytes_hash(b: bytes) -> int:
    return zlib.crc32(b) | (zlib.adler32(b) << 32)


def stable_hash(key: Any) -> int:
    """64-bit hash of ``key``; TypeError if it is unhashable."""
    if isinstance(key, str):
        return _bytes_hash(key.encode("utf-8", "surrogatepass"))
    if isinstance(key, (int, float)):
        return hash(key) & MASK
    if key is None:
        return _NONE_HASH
    if isinstance(key, bytes):
        return _bytes_hash(key)
    from .set import PersistentFrozenSet
    from .tuple import PersistentTuple
    if isinstance(key, (tuple, PersistentTuple)):
        h = 0x345678
        for item in key:
            h = ((h * 1000003) ^ stable_hash(item)) & MASK
        return h ^ len(key)
    if isinstance(key, (frozenset, PersistentFrozenSet)):
        h = 0
        for item in key:
            x = stable_hash(item)
            h = (h + ((x ^ (x << 16) ^ 89869747) * 3644798167)) & MASK
        return h ^ (len(key) * 1927868237) & MASK
    return hash(key) & MASK

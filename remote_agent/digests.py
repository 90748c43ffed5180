"""The agent's side of CHECKSUM: digests of ranges of the pool open in this session.

Computed over the agent's own mapping, so ``replica-sync --verify`` compares a remote
replica without pulling its data over the network; the pages read are let go after
(madvise), so hashing a pool does not make it resident in the agent. Only the pool this
session opened (and so holds locked) is read, and only within the size the client opened
it with.
"""

from __future__ import annotations

import errno

from rpmem_common import checksum

from .pooldb import OpenPool, PoolError


def handle(pool: OpenPool | None, blob: bytes) -> bytes:
    """The CHECKSUM response blob for request ``blob``; PoolError (EINVAL, EPROTONOSUPPORT)
    for a request this pool cannot answer."""
    if pool is None:
        raise PoolError(errno.EINVAL, "no pool is open in this session")
    try:
        offset, length, block, algorithm = checksum.decode_request(blob)
    except checksum.ChecksumError as e:
        raise PoolError(errno.EINVAL, str(e)) from None
    if offset + length > pool.pool_size:
        raise PoolError(errno.EINVAL, f"checksum range {offset}+{length} is outside the "
                                      f"{pool.pool_size}-byte pool")
    try:
        raw = checksum.digests(pool.mapping.buf, offset, length, block, algorithm)
    except checksum.ChecksumError as e:
        raise PoolError(errno.EPROTONOSUPPORT, str(e)) from None
    pool.mapping.release(offset, length)  # read once: the agent's memory stays bounded
    return checksum.encode_response(raw, algorithm)

"""Range checksums for ``replica-sync --verify``: the CHECKSUM request and its digests.

The agent computes the digests over its own mapping of the pool and only they cross the
network, so comparing replicas never moves their data. Client and agent share this module:
the digest of a block must be computed the same way on both sides.

Request blob (big-endian): ``offset:u64 length:u64 block:u32 algorithm:u32``; the range is
split into ``block``-byte blocks, the last one possibly shorter. Response blob:
``algorithm:u32 count:u32`` and ``count`` digests of the algorithm's size (32 bytes for
SHA-256, 16 for XXH3-128). An agent that does not know an algorithm answers
EPROTONOSUPPORT; agents before XXH3 know SHA-256 only.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Callable

from .proto import MAX_MESSAGE, RESP_HDR

#: SHA-256: with the SHA extensions of current CPUs it hashes at 1.5 GB/s per core here,
#: and hashlib lets other threads run meanwhile
ALGO_SHA256 = 1
#: XXH3-128 (the xxhash package): 10 GB/s per core here. Not cryptographic, which a replica
#: comparison does not need: 128 bits make an accidental match of two different blocks
#: (2^-128) far rarer than the media errors it looks for (zlib.crc32's 32 bits are too few
#: to call millions of blocks equal)
ALGO_XXH3_128 = 2
DIGEST_SIZES = {ALGO_SHA256: 32, ALGO_XXH3_128: 16}
ALGORITHM_NAMES = {ALGO_SHA256: "sha256", ALGO_XXH3_128: "xxh3-128"}
DIGEST_SIZE = 32  # the largest: what a response may hold per block
DEFAULT_BLOCK = 64 << 10
MIN_BLOCK = 4096
MAX_BLOCK = 64 << 20

_REQ = struct.Struct(">QQII")
_RESP = struct.Struct(">II")
#: the most blocks one request may cover: the response must fit in one control message
MAX_BLOCKS = (MAX_MESSAGE - RESP_HDR.size - 4 - _RESP.size) // DIGEST_SIZE


class ChecksumError(ValueError):
    """A CHECKSUM request or response that does not parse or asks for too much."""


def nblocks(length: int, block: int) -> int:
    return -(-length // block)


def encode_request(offset: int, length: int, block: int = DEFAULT_BLOCK,
                   algorithm: int = ALGO_SHA256) -> bytes:
    check_request(offset, length, block)
    return _REQ.pack(offset, length, block, algorithm)


def check_request(offset: int, length: int, block: int) -> None:
    if offset < 0 or length <= 0:
        raise ChecksumError(f"invalid checksum range {offset}+{length}")
    if not MIN_BLOCK <= block <= MAX_BLOCK:
        raise ChecksumError(f"checksum block size {block} outside [{MIN_BLOCK}, {MAX_BLOCK}]")
    if nblocks(length, block) > MAX_BLOCKS:
        raise ChecksumError(f"checksum request for {nblocks(length, block)} blocks (at most "
                            f"{MAX_BLOCKS} per request)")


def decode_request(blob: bytes) -> tuple[int, int, int, int]:
    """``(offset, length, block, algorithm)``; ChecksumError if malformed."""
    if len(blob) != _REQ.size:
        raise ChecksumError(f"checksum request of {len(blob)} bytes (expected {_REQ.size})")
    offset, length, block, algorithm = _REQ.unpack(blob)
    check_request(offset, length, block)
    return offset, length, block, algorithm


def encode_response(digest_bytes: bytes, algorithm: int = ALGO_SHA256) -> bytes:
    return _RESP.pack(algorithm, len(digest_bytes) // DIGEST_SIZES[algorithm]) + digest_bytes


def decode_response(blob: bytes, expected: int, algorithm: int = ALGO_SHA256) -> list[bytes]:
    """The ``expected`` digests of a response; ChecksumError if it holds anything else."""
    if len(blob) < _RESP.size:
        raise ChecksumError("truncated checksum response")
    algo, count = _RESP.unpack_from(blob)
    body = blob[_RESP.size:]
    size = DIGEST_SIZES.get(algorithm, 0)
    if algo != algorithm or count != expected or len(body) != count * size:
        raise ChecksumError(f"checksum response holds {count} digests of algorithm {algo}, "
                            f"expected {expected} of algorithm {algorithm}")
    return [body[i:i + size] for i in range(0, len(body), size)]


def digest_function(algorithm: int) -> Callable[[memoryview], bytes]:
    """The function giving a block's digest; ChecksumError if this side cannot compute it."""
    if algorithm == ALGO_SHA256:
        sha = hashlib.sha256
        return lambda block: sha(block).digest()
    if algorithm == ALGO_XXH3_128:
        try:
            import xxhash
        except ImportError:
            raise ChecksumError("checksum algorithm xxh3-128 needs the xxhash package") from None
        return xxhash.xxh3_128_digest
    raise ChecksumError(f"checksum algorithm {algorithm} is not supported")


def best_algorithm() -> int:
    """The fastest algorithm this side computes."""
    try:
        digest_function(ALGO_XXH3_128)
    except ChecksumError:
        return ALGO_SHA256
    return ALGO_XXH3_128


def digests(view: memoryview, offset: int, length: int, block: int = DEFAULT_BLOCK,
            algorithm: int = ALGO_SHA256) -> bytes:
    """The digests of ``view[offset:offset+length]`` block by block, concatenated.
    hashlib's SHA-256 releases the GIL on large buffers, so other threads run meanwhile."""
    fn = digest_function(algorithm)
    end = offset + length
    return b"".join(fn(view[at:min(at + block, end)]) for at in range(offset, end, block))

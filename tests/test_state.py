"""The replica-state record's dirty-chunk bitmap: set in whole bytes, exactly as chunk by chunk."""

from __future__ import annotations

import random

from pmreplica.state import BITMAP_BYTES, ReplicaState


def _chunk_by_chunk(bitmap: bytearray, chunk: int, offset: int, length: int) -> bool:
    first = offset // chunk
    last = min((offset + max(length, 1) - 1) // chunk, BITMAP_BYTES * 8 - 1)
    changed = False
    for c in range(first, last + 1):
        byte, bit = divmod(c, 8)
        if not bitmap[byte] >> bit & 1:
            bitmap[byte] |= 1 << bit
            changed = True
    return changed


def test_mark_dirty_sets_the_same_bits_as_chunk_by_chunk():
    rng = random.Random(20261122)
    for _ in range(2000):
        state, expect = ReplicaState(chunk=64 << 10), bytearray(BITMAP_BYTES)
        for _ in range(6):
            offset = rng.randrange(0, 1 << 30)
            length = rng.choice([0, 1, 4096, 64 << 10, 1 << 20, rng.randrange(1 << 30)])
            assert state.mark_dirty(offset, length) == _chunk_by_chunk(expect, 64 << 10,
                                                                        offset, length)
            assert bytes(state.bitmap) == bytes(expect)


def test_dirty_ranges_merge_neighbouring_chunks():
    state = ReplicaState(chunk=64 << 10)
    state.mark_dirty(100, 1)                  # chunk 0
    state.mark_dirty((64 << 10) + 5, 10)      # chunk 1
    state.mark_dirty(10 * (64 << 10), 1 << 20)  # chunks 10..25
    assert state.dirty_ranges(1 << 30) == [(0, 128 << 10),
                                           (10 * (64 << 10), 16 * (64 << 10))]

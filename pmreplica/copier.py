"""The one chunked copy behind every repair: replica-sync's (into a local replica's files or
through a plugin's target) and ``PoolSet.resync``'s (online, through the target).

Ranges are cut into pieces of at most :data:`CHUNK` bytes and grouped into batches of about
that size; each batch is written piece by piece, then settled once (drained: durable on
the replica, and the source's pages let go), then counted for progress. A batch bounds the
memory a copy holds and the work a failure can lose, whatever the pool's size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

#: bytes per batch: one drain, one release of source pages, one progress step each
CHUNK = 8 << 20
#: pieces per batch at most (scattered small ranges: a drain every so many)
MAX_PIECES = 4096


def batches(ranges: Iterable[tuple[int, int]], size: int = CHUNK
            ) -> Iterator[list[tuple[int, int]]]:
    """``ranges`` cut into pieces of at most ``size`` bytes, grouped into batches of about
    ``size`` bytes (and at most :data:`MAX_PIECES` pieces)."""
    batch: list[tuple[int, int]] = []
    total = 0
    for off, n in ranges:
        end = off + n
        while off < end:
            step = min(size - total, end - off)
            batch.append((off, step))
            total += step
            off += step
            if total >= size or len(batch) >= MAX_PIECES:
                yield batch
                batch, total = [], 0
    if batch:
        yield batch


def copy(ranges: Iterable[tuple[int, int]], write: Callable[[int, int], None],
         settle: Callable[[int, int], None],
         advance: Callable[[int], None] | None = None, size: int = CHUNK) -> int:
    """Copy ``ranges``: ``write(offset, length)`` each piece, ``settle(offset, length)`` each
    batch once written (the span from its first piece to the end of its last), then
    ``advance(bytes)``; returns the bytes copied."""
    done = 0
    for batch in batches(ranges, size):
        for off, n in batch:
            write(off, n)
        lo = batch[0][0]
        settle(lo, batch[-1][0] + batch[-1][1] - lo)
        n = sum(k for _, k in batch)
        done += n
        if advance is not None:
            advance(n)
    return done

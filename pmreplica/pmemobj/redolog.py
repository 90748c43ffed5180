"""The redo log: an append-only run of checksummed transaction records, and a checkpoint.

Log area layout (all u64, little-endian)::

    control line (64 bytes): two 32-byte slots, written alternately by checkpoints
        [CTL_MAGIC, seq, spill, checksum]   seq: the first record to replay;
                                            spill: 0, or the offset of a record kept
                                            outside the log area (replayed first)
    records, back to back from the end of the control line:
        [REC_MAGIC, seq, nwords, checksum][payload: runs of (first word, n, n values)]

Recovery takes the valid slot with the higher ``seq`` and replays records while each is
valid (magic, checksum) and carries the next sequence number; the first one that is not
(torn by a crash, or left over from before the last checkpoint) ends the log. Replay writes
absolute values, so replaying a record twice is harmless.
"""

from __future__ import annotations

import hashlib
import struct
from array import array
from typing import Iterable

CTL_MAGIC = int.from_bytes(b"PMROBJCP", "little")
REC_MAGIC = int.from_bytes(b"PMROBJTX", "little")
CTL_LINE = 64
CTL_SLOT = 32
REC_HDR = 32
_W3 = struct.Struct("<3Q")
_W1 = struct.Struct("<Q")


def _csum(a: int, b: int, c: int, payload: bytes | memoryview = b"") -> int:
    h = hashlib.blake2b(_W3.pack(a, b, c), digest_size=8)
    if payload:
        h.update(payload)
    return _W1.unpack(h.digest())[0]


def encode(words: dict[int, int], out: array | None = None,
           ranges: list[tuple[int, int]] | None = None) -> tuple[array, list[tuple[int, int]]]:
    """Encode ``{word index: value}`` as record payload (appended to ``out``); also return
    its byte ranges (appended to ``ranges``)."""
    idx = sorted(words)
    if out is None:
        out = array("Q")
    if ranges is None:
        ranges = []
    i, n = 0, len(idx)
    get = words.__getitem__
    while i < n:
        start = idx[i]
        j = i + 1
        while j < n and idx[j] == start + (j - i):
            j += 1
        cnt = j - i
        out.append(start)
        out.append(cnt)
        out.extend(map(get, idx[i:j]))
        ranges.append((start << 3, cnt << 3))
        i = j
    return out, ranges


def record(seq: int, payload: array) -> array:
    """Header and payload of one transaction record."""
    n = len(payload)
    rec = array("Q", (REC_MAGIC, seq, n, _csum(REC_MAGIC, seq, n, memoryview(payload).cast("B"))))
    rec.extend(payload)
    return rec


def read_record(q: memoryview, off: int, end: int, seq: int) -> memoryview | None:
    """The payload of the record at byte offset ``off`` if it is valid and numbered ``seq``."""
    if off + REC_HDR > end:
        return None
    w = off >> 3
    magic, rseq, n, csum = q[w:w + 4].tolist()
    if magic != REC_MAGIC or rseq != seq or off + REC_HDR + 8 * n > end:
        return None
    payload = q[w + 4:w + 4 + n]
    if _csum(magic, rseq, n, payload.cast("B")) != csum:
        payload.release()
        return None
    return payload


def control_slot(seq: int, spill: int) -> array:
    return array("Q", (CTL_MAGIC, seq, spill, _csum(CTL_MAGIC, seq, spill)))


def read_control(q: memoryview, log_off: int) -> tuple[int, int, int] | None:
    """``(slot index, seq, spill)`` of the newest valid control slot, or None."""
    best = None
    for slot in (0, 1):
        w = (log_off + slot * CTL_SLOT) >> 3
        magic, seq, spill, csum = q[w:w + 4].tolist()
        if magic == CTL_MAGIC and _csum(magic, seq, spill) == csum:
            if best is None or seq > best[1]:
                best = (slot, seq, spill)
    return best


def replay(q: memoryview, payload: memoryview | array, limit_words: int
           ) -> list[tuple[int, int]]:
    """Write a record's values in place; return the byte ranges written."""
    ranges = []
    i, n = 0, len(payload)
    while i + 2 <= n:
        start, cnt = payload[i], payload[i + 1]
        if start + cnt > limit_words or i + 2 + cnt > n:
            raise ValueError("redo log run outside the pool")
        q[start:start + cnt] = payload[i + 2:i + 2 + cnt]
        ranges.append((start << 3, cnt << 3))
        i += 2 + cnt
    return ranges


def coalesce(ranges: Iterable[tuple[int, int]], gap: int) -> list[tuple[int, int]]:
    """Merge byte ranges whose gap is at most ``gap`` (fewer flushes, a little more data)."""
    out: list[list[int]] = []
    for off, ln in sorted(ranges):
        if out and off <= out[-1][0] + out[-1][1] + gap:
            end = max(out[-1][0] + out[-1][1], off + ln)
            out[-1][1] = end - out[-1][0]
        else:
            out.append([off, ln])
    return [(a, b) for a, b in out]

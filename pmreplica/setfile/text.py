"""poolset(5) text, byte by byte as PMDK 1.12 reads it: lines, fields and sizes.

PMDK's parser (``util_poolset_parse`` in src/common/set.c) works on bytes in the C locale:
lines end at ``\\n`` (a ``\\r`` before it is dropped), ``#`` starts a comment, and fields are
separated by blanks and tabs only. Nothing here knows Python's wider notions of white space
and digits: a no-break space is part of a name, a full-width digit is no digit.
"""

from __future__ import annotations

import re

SIGNATURE = b"PMEMPOOLSET"
BLANKS = b" \t"
MAX_SIZE = 2**64 - 1  # PMDK reads sizes into a size_t

# util_parse_size(): JEDEC and IEC suffixes are binary, SI ones decimal, "B" is bytes.
SUFFIXES = {"": 1, "B": 1}
for _i, _p in enumerate("KMGTP", start=1):
    SUFFIXES[_p] = SUFFIXES[_p + "iB"] = 1 << (10 * _i)
    SUFFIXES[("k" if _p == "K" else _p) + "B"] = 1000 ** _i
_SIZE = re.compile(rb"([0-9]+)(" + b"|".join(s.encode() for s in SUFFIXES if s) + rb")?")

# util_readline() reads a long line in fgets() pieces of 2559, 5119, 10239, ... bytes and
# turns CRLF into LF per piece: a line whose last piece is its "\n" alone keeps its "\r".
_piece, _end, _CR_KEPT = 2559, 0, set()
while _end < 1 << 40:
    _end += _piece
    _CR_KEPT.add(_end + 1)
    _piece = 2 * _piece + 1


def has_signature(data: bytes) -> bool:
    """True if ``data`` starts with a first line that is exactly ``PMEMPOOLSET``."""
    return data.startswith((SIGNATURE + b"\n", SIGNATURE + b"\r\n"))


def lines(data: bytes) -> list[bytes]:
    """The lines of a pool set file as PMDK's reader hands them on: without their ``\\n``,
    CRLF read as LF; a last line without ``\\n`` counts. Line N is ``lines(data)[N - 1]``."""
    out = data.split(b"\n")
    tail = out.pop()  # what follows the last "\n": a last line without one, or nothing
    for i, line in enumerate(out):
        if line.endswith(b"\r") and len(line) + 1 not in _CR_KEPT:
            out[i] = line[:-1]
    if tail:
        out.append(tail)
    return out


def fields(text: bytes) -> list[bytes]:
    """``text`` split at runs of blanks and tabs (``strtok(text, " \\t")``)."""
    return [f for f in text.replace(b"\t", b" ").split(b" ") if f]


def parse_size(field: bytes) -> int | None:
    """The byte count of a size field such as ``2G``, ``512MiB``, ``10kB`` or ``4096``; None
    if it is malformed, zero or larger than 2^64-1. (PMDK's ``sscanf("%zu%8s")`` also takes a
    sign, white space before, inside and after, and sizes that wrap past 2^64: refused here.)"""
    m = _SIZE.fullmatch(field)
    digits = m.group(1).lstrip(b"0") if m else b""
    if m is None or len(digits) > 20:  # more digits than 2^64-1 has (and int() would read)
        return None
    size = int(digits or b"0") * SUFFIXES[(m.group(2) or b"").decode()]
    return size if 0 < size <= MAX_SIZE else None

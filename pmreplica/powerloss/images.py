"""Which crash images a durability point gives, and writing one out.

A point with ``k`` pending words has ``2**k`` possible images. When that is within the
budget all of them are checked; otherwise the durable image alone, the live one (every
word kept), and random subsets drawn in turn by four rules that mimic how caches write
back: each word kept with chance 1/2, 1/10 or 9/10, or whole 64-byte lines kept with
chance 1/2, or the words below a random address kept (a write-back in address order).
"""

from __future__ import annotations

import os
import random
from array import array
from typing import Iterable

from .stream import Pending

Subset = tuple[int, ...]


def choose(offsets: list[tuple[str, int]], rng: random.Random, budget: int) -> list[Subset]:
    """Up to ``budget`` distinct subsets (indexes into ``offsets``, the pending words as
    ``(file, offset)``) to check at one point."""
    k = len(offsets)
    if k < 20 and 1 << k <= budget:
        return [tuple(i for i in range(k) if m >> i & 1) for m in range(1 << k)]
    out: list[Subset] = [(), tuple(range(k))][:budget]
    seen = set(out)
    lines: dict[tuple[str, int], list[int]] = {}
    for i, (rel, off) in enumerate(offsets):
        lines.setdefault((rel, off >> 6), []).append(i)
    groups = list(lines.values())
    rule = 0
    tries = 0
    while len(out) < budget and tries < 8 * budget:
        tries += 1
        rule = (rule + 1) % 5
        if rule == 0:
            cut = rng.randrange(k)
            s = tuple(range(cut))
        elif rule == 4:
            s = tuple(sorted(i for g in groups if rng.random() < 0.5 for i in g))
        else:
            p = (0.5, 0.1, 0.9)[rule - 1]
            s = tuple(i for i in range(k) if rng.random() < p)
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def flatten(pending: Pending) -> tuple[list[tuple[str, int]], list[bytes]]:
    """The pending words of a point as ``(file, offset)`` and their live values."""
    where, values = [], []
    for rel, offs, vals in pending:
        for j, off in enumerate(array("Q", offs)):
            where.append((rel, off))
            values.append(vals[8 * j:8 * j + 8])
    return where, values


def write_image(dest: str, files: dict[str, bytearray], workdir: str,
                words: Iterable[tuple[str, int, bytes]]) -> None:
    """Make the directory ``dest`` hold exactly the durable image ``files`` with ``words``
    (file, offset, value) laid over it. Pool set files name their parts by absolute path:
    ``workdir`` in them becomes ``dest``. Files already there are overwritten in place (on
    tmpfs, cheaper than making them again); anything else in ``dest`` is removed."""
    by_file: dict[str, list[tuple[int, bytes]]] = {}
    for rel, off, val in words:
        by_file.setdefault(rel, []).append((off, val))
    _prune(dest, {os.path.normpath(rel) for rel in files})
    old, new = workdir.encode(), dest.encode()
    for rel, data in files.items():
        path = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            content = bytes(data).replace(old, new) if rel.endswith(".set") else data
            view = memoryview(content)
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:done + (8 << 20)], done)
            view.release()
            os.ftruncate(fd, len(content))
            for off, val in by_file.get(rel, ()):
                os.pwrite(fd, val, off)
        finally:
            os.close(fd)


def _prune(path: str, keep: set[str]) -> None:
    """Remove everything under ``path`` but the regular files ``keep`` (relative paths);
    make ``path`` if missing."""
    os.makedirs(path, exist_ok=True)
    for dirpath, dirs, names in os.walk(path, topdown=False):
        for name in names:
            full = os.path.join(dirpath, name)
            if os.path.relpath(full, path) not in keep or os.path.islink(full):
                os.unlink(full)
        for name in dirs:
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                os.unlink(full)
            elif not os.listdir(full):
                os.rmdir(full)


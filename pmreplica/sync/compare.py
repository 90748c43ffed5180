"""Comparing replicas by digests as they stream, in constant memory.

The pool's data range is walked in windows (64 MiB): for each, the digests of the source and
of every replica compared with it are computed at once, each where its replica lives (a
thread per replica: its target computes its own when it can, as the rpmem target's agent
does, whose hashing overlaps this side's; one mapped here, as a local one, is hashed in
place, its pages let go; any other is read and hashed here), then compared block by
block, and the differing blocks handed to the caller (which may copy them at once) while
the next window's digests are already being computed. Only two windows' digests are held
at any time, whatever the pool's size.
"""

from __future__ import annotations

import errno
import logging
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from rpmem_common import checksum as _checksum

from ..errors import PmReplicaError
from ..pmem import Mapping
from ..target import DigestTarget

log = logging.getLogger(__name__)

#: bytes compared per step (a multiple of every block size allowed)
WINDOW = 64 << 20
#: bytes read at a time from a target hashed here (one without digests of its own)
READ_PIECE = 8 << 20

Digester = Callable[[int, int], bytes]


def local_digester(mapping: Mapping, block: int, algorithm: int) -> Digester:
    """Digests of a replica mapped here (:class:`~pmreplica.target.MappedTarget`), its pages
    let go once hashed."""
    fn = _checksum.digest_function(algorithm)

    def digests(offset: int, length: int) -> bytes:
        mapping.prefetch(offset, length)
        view = mapping.buf[offset:offset + length]
        try:
            out = b"".join(fn(view[at:at + block]) for at in range(0, length, block))
        finally:
            view.release()
        mapping.release(offset, length)
        return out

    return digests


def target_digester(target: Any, block: int, algorithm: int) -> Digester:
    """Digests of a replica reached through its plugin's target: computed where it lives when
    the target offers them (:class:`~pmreplica.target.DigestTarget`), else of its bytes read
    through ``read`` (a block-aligned piece at a time, into one buffer)."""
    if isinstance(target, DigestTarget):
        return lambda offset, length: b"".join(target.digests(offset, length, block, algorithm))
    fn = _checksum.digest_function(algorithm)
    buf = bytearray(max(block, READ_PIECE // block * block))

    def digests(offset: int, length: int) -> bytes:
        out = []
        view = memoryview(buf)
        try:
            for at in range(offset, offset + length, len(buf)):
                n = min(len(buf), offset + length - at)
                target.read(view[:n], at, 0)
                out += [fn(view[k:min(k + block, n)]) for k in range(0, n, block)]
        finally:
            view.release()
        return b"".join(out)

    return digests


def choose_algorithm(targets: Sequence[Any], start: int, block: int) -> int:
    """The fastest algorithm this side and every target in ``targets`` that computes its
    own digests compute (an older agent knows SHA-256 only)."""
    algorithm = _checksum.best_algorithm()
    if algorithm == _checksum.ALGO_SHA256:
        return algorithm
    for target in targets:
        if not isinstance(target, DigestTarget):
            continue  # hashed here
        try:
            target.digests(start, min(block, _checksum.MIN_BLOCK), block, algorithm)
        except OSError as e:
            if e.errno != errno.EPROTONOSUPPORT:
                raise
            log.info("an agent does not compute %s: comparing by sha256",
                     _checksum.ALGORITHM_NAMES[algorithm])
            return _checksum.ALGO_SHA256
    return algorithm


def windows(start: int, end: int, block: int, window: int = WINDOW
            ) -> Iterator[tuple[int, int]]:
    """``[start, end)`` in windows whose blocks are aligned to ``block`` (the first may be
    short), so that differing ranges line up with the dirty maps' chunks."""
    first = min(-(-start // block) * block, end)
    if first > start:
        yield start, first - start
    for off in range(first, end, window):
        yield off, min(window, end - off)


def differing(offset: int, length: int, block: int, size: int, a: bytes, b: bytes
              ) -> list[tuple[int, int]]:
    """The blocks of ``[offset, offset+length)`` whose digests (``size`` bytes each, in
    ``a`` and ``b``) differ, adjacent ones merged."""
    out: list[tuple[int, int]] = []
    if a == b:
        return out
    if len(a) != len(b):
        raise PmReplicaError(errno.EPROTO, "digest lists of different lengths")
    end = offset + length
    for k in range(0, len(a), size):
        if a[k:k + size] == b[k:k + size]:
            continue
        at = offset + k // size * block
        n = min(block, end - at)
        if out and out[-1][0] + out[-1][1] == at:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((at, n))
    return out


class Stream:
    """One comparison: ``source`` and ``others`` (keys to digesters), window by window.
    ``on_window(offset, length, diffs)`` gets the differing ranges of each other still
    compared; ``on_error(key, error)`` is told once of an other whose digests failed, with
    whatever they raised (it is compared no further). A failure of the source's digests
    ends the stream (raised)."""

    def __init__(self, source: Digester, others: dict[Any, Digester], block: int,
                 algorithm: int) -> None:
        self.source = source
        self.others = dict(others)
        self.block = block
        self.size = _checksum.DIGEST_SIZES[algorithm]
        # one thread per replica: its digests in order, and a session used by one at a time
        self._pools = {key: ThreadPoolExecutor(1, thread_name_prefix="pmreplica-digests")
                       for key in [None, *self.others]}

    def run(self, start: int, end: int,
            on_window: Callable[[int, int, dict[Any, list[tuple[int, int]]]], None],
            on_error: Callable[[Any, Exception], None]) -> None:
        pending: deque[tuple[int, int, dict[Any, Future]]] = deque()
        try:
            for off, n in windows(start, end, self.block):
                jobs = {None: self._pools[None].submit(self.source, off, n)}
                for key, digester in self.others.items():
                    jobs[key] = self._pools[key].submit(digester, off, n)
                pending.append((off, n, jobs))
                if len(pending) > 1:  # the next window is being hashed meanwhile
                    self._settle(*pending.popleft(), on_window, on_error)
            while pending:
                self._settle(*pending.popleft(), on_window, on_error)
        finally:
            for job in (j for _, _, jobs in pending for j in jobs.values()):
                job.cancel()
            for pool in self._pools.values():
                pool.shutdown(wait=True)

    def _settle(self, off: int, n: int, jobs: dict[Any, Future],
                on_window: Callable[[int, int, dict[Any, list[tuple[int, int]]]], None],
                on_error: Callable[[Any, Exception], None]) -> None:
        reference = jobs.pop(None).result()
        diffs: dict[Any, list[tuple[int, int]]] = {}
        for key, job in jobs.items():
            if key not in self.others:
                job.cancel()
                continue
            try:
                diffs[key] = differing(off, n, self.block, self.size, reference, job.result())
            except Exception as e:  # noqa: BLE001 - a plugin's bug too ends this other only
                del self.others[key]
                on_error(key, e)
        on_window(off, n, diffs)

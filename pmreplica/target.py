"""What a replica target offers: the methods pmreplica calls on what a plugin returns.

Offsets are into the pool's address space (the same for every replica: the first 4 KiB is
the header, then data), and the bytes to replicate are read from the master's mapping at the
same offset: ``persist(off, n)`` makes the replica's ``[off, off+n)`` equal to the master's and
durable. Ranges flushed on one lane are applied in issue order; lanes are independent and may
be used from different threads at once. Failures raise ``OSError`` with an errno.
"""

from __future__ import annotations

import uuid as _uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar, runtime_checkable

from .generation import Generation
from .header import PoolAttr, PoolHeader

if TYPE_CHECKING:
    from .pmem import Mapping

#: ``persist``/``flush`` flag: the caller does not need ordering with other lanes (librpmem's
#: RPMEM_PERSIST_RELAXED / RPMEM_FLUSH_RELAXED).
RELAXED = 1

_T = TypeVar("_T")


@dataclass(frozen=True)
class TargetStat:
    """``stat()`` of a replica: its usable size, whether its header checks out, and the
    generation it records (None: none, or the target cannot keep one)."""

    size: int
    healthy: bool
    detail: str = ""
    generation: Generation | None = None


@runtime_checkable
class GenerationKeeper(Protocol):
    """What a target offers to keep the pool's generation (:mod:`pmreplica.generation`).
    Optional: a target without it is never known to be ahead of, behind or diverged from
    the others, and promotion and split-brain detection cannot use it."""

    def store_generation(self, record: Generation) -> None:
        """Record ``record`` on the replica, durably; ``stat().generation`` returns it."""


@runtime_checkable
class DigestTarget(Protocol):
    """What a target offers to compute checksums where its replica lives (the rpmem target:
    its agent hashes its own copy), so that ``replica-sync --verify`` moves digests, not
    data. Optional: a target without it is compared by reading its bytes through
    :meth:`ReplicaTarget.read`."""

    def digests(self, offset: int, length: int, block: int, algorithm: int) -> list[bytes]:
        """The digests of ``[offset, offset+length)`` in ``block``-byte blocks (the last may
        be shorter) by ``algorithm`` (:mod:`rpmem_common.checksum`'s ``ALGO_*``);
        EPROTONOSUPPORT for an algorithm the target cannot compute."""


@runtime_checkable
class MappedTarget(Protocol):
    """What a target offers to lend its replica's bytes mapped in this process (the local
    plugin's: its part files), so that a repair copies from a source in place and
    ``verify`` hashes it in place, with no copy into a buffer. Optional: a target without it
    is read through :meth:`ReplicaTarget.read` (or hashes its own: :class:`DigestTarget`)."""

    def map_replica(self) -> Mapping:
        """The replica's pool range mapped shared (:class:`~pmreplica.pmem.Mapping`), whether
        the target is open or not; the caller closes it."""


@dataclass(frozen=True)
class HeaderPages:
    """A replica's header pages as found, whatever state it is in: ``pages`` holds the first
    page of each part that carries a header (None: unreadable; shorter than a page when the
    file is), ``problems`` what is wrong with its parts and headers (missing or short parts,
    checksums, the part links), each naming its part; empty when the replica is consistent."""

    pages: tuple[bytes | None, ...]
    problems: tuple[str, ...]


@runtime_checkable
class HeaderPageKeeper(Protocol):
    """What a target offers to keep its header pages the way a local replica's part files
    do: the first part's page holds, beside the header, the replica-state record's copy and
    the generation (:mod:`pmreplica.state`, :mod:`pmreplica.generation`). With it,
    replica-sync, check and verify read that record even from a broken replica, count the
    replica as a place the record is kept, and repair it in place in the crash-safe order
    :mod:`pmreplica.sync` lists: storage restored, header cleared (record kept), data
    copied with ``write_through`` and made durable by one ``drain``, then header, record
    and generation in one page write. Every method works on a target that is not open and
    on a broken replica; ``restore`` opens it.

    Optional: a target without it is probed with ``open`` (``stat`` when that fails),
    recreated when broken (the remove hook, then ``create``), relinked with ``set_attr``,
    and repaired only while a replica that keeps pages records that it is being repaired."""

    def header_pages(self) -> HeaderPages:
        """The header pages and problems as the storage holds them (never refused for a
        broken replica); OSError when the replica's layout cannot hold the pool at all
        (replica-sync cannot repair it)."""

    def restore(self) -> None:
        """Give the replica its full storage, keeping what is intact (missing parts created,
        short ones extended), and open it for ``flush``/``drain``/``read`` whatever its
        headers say."""

    def clear_header(self, record: bytes) -> None:
        """Zero the first part's header durably, keeping ``record`` (a packed replica-state
        record) in the same page, in one write: the replica is no pool until
        :meth:`write_headers`."""

    def write_headers(self, template: PoolHeader, uuid: _uuid.UUID, prev_repl: _uuid.UUID,
                      next_repl: _uuid.UUID, record: bytes | None = None,
                      gen: bytes | None = None) -> None:
        """Write every part's header from ``template`` (the first part gets ``uuid``, the
        others new ones, all linked), durably; ``record`` (a packed replica-state record) and
        ``gen`` (a packed generation) go into the first part's page in the same page write,
        and what that page holds besides and is not given stays."""

    def store_record(self, record: bytes) -> None:
        """Store ``record`` (a packed replica-state record) in the first part's page,
        durably, leaving the rest of the page as it is."""

    def write_through(self, offset: int, length: int) -> None:
        """Write the source's range into the replica before returning (its bytes may be
        let go then), in order with earlier flushes; durable at the next ``drain``. A
        repair copies with it and drains once, where flush/drain per batch would make
        every batch durable on its own."""


@runtime_checkable
class ReplicaTarget(Protocol):
    """A replica of the master, local or remote."""

    #: how many lanes may be used at once (lane numbers are 0..nlanes-1)
    nlanes: int

    def create(self, attr: PoolAttr) -> None:
        """Create the replica's storage with a header made from ``attr``."""

    def open(self) -> PoolAttr:
        """Open the existing replica and return the attributes from its header."""

    def persist(self, offset: int, length: int, lane: int = 0, flags: int = 0) -> None:
        """Copy the master's range into the replica and return once it is durable there."""

    def deep_persist(self, offset: int, length: int, lane: int = 0) -> None:
        """Like persist, through the target's deepest durability domain."""

    def flush(self, offset: int, length: int, lane: int = 0, flags: int = 0) -> None:
        """Start persisting a range; :meth:`drain` waits for it. May complete early."""

    def drain(self, lane: int = 0) -> None:
        """Wait until every range flushed on ``lane`` is durable on the replica."""

    def read(self, dest: memoryview, offset: int, lane: int = 0) -> None:
        """Fill ``dest`` with the replica's bytes at ``offset`` (for repair and verify)."""

    def set_attr(self, attr: PoolAttr) -> None:
        """Rewrite the attributes in the replica's header."""

    def stat(self) -> TargetStat:
        """Size and header health, without opening the replica for writing (replica-sync
        and check call it on a target that is not open, to learn why ``open`` failed)."""

    def close(self) -> None:
        """Release the replica; its data stays. A pool closes a failed target at once, while
        another lane's thread may still be in one of its calls: that call must then fail
        (or finish) without touching anything the close released."""


def open_checked(target: ReplicaTarget) -> PoolAttr:
    """``target.open()``'s attributes; anything else returned is its plugin's bug (a
    TypeError, which fails the replica with EIO as any bug does: as_replica_failure)."""
    return _expect(target.open(), PoolAttr, target, "open")


def stat_checked(target: ReplicaTarget) -> TargetStat:
    """``target.stat()``, checked as :func:`open_checked` checks ``open``."""
    return _expect(target.stat(), TargetStat, target, "stat")


def _expect(value: object, kind: type[_T], target: object, call: str) -> _T:
    if not isinstance(value, kind):
        raise TypeError(f"{type(target).__name__}.{call}() returned {type(value).__name__}, "
                        f"not a {kind.__name__}")
    return value

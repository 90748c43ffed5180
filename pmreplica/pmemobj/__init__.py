"""Persistent Python objects over replicated pools, with pynvm's ``nvm.pmemobj`` API.

Code written for pynvm runs after changing its import::

    from pmreplica import pmemobj

    with pmemobj.PersistentObjectPool("/dev/shm/app.set", flag="c") as pool:
        if pool.root is None:
            pool.root = pool.new(pmemobj.PersistentDict)
        with pool.transaction():
            pool.root["count"] = pool.root.get("count", 0) + 1

``filename`` is a pool file or a poolset(5) file whose ``REPLICA`` sections (local, or
remote ``REPLICA host set``) receive every commit: a transaction returns only when it is
durable on the master and on every working replica. A replica that fails is reported
through the PoolSet hook ``pmreplica_replica_failed`` and dropped; the pool keeps working
(``pool.replicas`` shows the states), and replica-sync repairs it later.

Layout (layout.py)
    The pool's data area holds a superblock (geometry, root oid, type table oid, clean
    flag), a chunk table, a redo log area and a heap of 64 KiB chunks. An object id is the
    byte offset of the object's payload; None/True/False are the constants 1/2/3.

Transactions and the log (txn.py, redolog.py): a redo log
    Writes inside a transaction go to a volatile overlay that reads consult; the mapping
    keeps the committed state, so a crash in the middle of a transaction leaves nothing
    to undo. Memory the transaction allocated is free space in the committed state, so
    new objects are written straight into the mapping. At commit the overlay's words (and
    the new objects' bytes, up to 8 KiB) become one checksummed record appended to the log
    area; the record is flushed and fenced on the master (durable there before any
    in-place word can reach the media), the overlay is stored in place on the master, and
    the lane is drained once. A small commit is therefore one flush and one drain: one
    message and one round trip per remote replica, one msync on the master.

    The in-place changes reach the replicas at a checkpoint: when the log area fills,
    when enough freed memory waits for reuse, when an allocation finds the pool full, on
    ``close()`` and ``checkpoint()``, and after recovery. It flushes the changed ranges
    (merged when less than 2 KiB apart), fences them on the master, then writes the newer
    of two control slots, which empties the log. Freed memory is reused only after the
    checkpoint that follows its transaction, so no record still in the log refers to memory
    being rewritten.

    Ranges flushed on one lane are applied in issue order on every replica, and the
    master orders its own with those fences, so a replica (or the master) stopped at any
    point, by a crash or a power failure, holds the last checkpoint's state plus a prefix
    of valid records; open replays them in order (replay writes absolute values, so it
    is idempotent) and stops at the first record that is torn (checksum) or stale
    (sequence number). A transaction too big for the log area is written to free chunks
    and checkpointed at once (see Full pools). Between checkpoints a replica is logically
    identical to the master (opened on its own it shows the same objects); after a
    checkpoint and after a clean close it is byte-identical, free space included.

Allocator (heap.py)
    A chunk is free, a run of equal units (31 size classes up to 8 KiB, a bitmap at the
    chunk start), or part of a huge block. Bitmap bits and chunk table entries change
    through the overlay, so allocations and frees commit or vanish with their
    transaction; freed blocks are reused only after the following checkpoint. Empty runs
    go back to the free chunks at open and close, and whenever an allocation finds no
    free chunk: then their chunk table entries are committed on their own, at once, so
    that a long-running application gets the space of freed small objects back for large
    ones without a reopen.

Full pools
    The log words of a block freed by its own transaction are dropped before the record
    is written (that memory is free once the transaction commits), so a transaction that
    frees many objects needs a log entry per bitmap word, not per object, and commits on
    a full pool. A record larger than the log goes to free chunks; when there are none the
    transaction is refused with PoolFullError before anything is written: the pool keeps
    its state and takes the next transaction.

Reference counts and gc (memory.py, gc.py)
    Objects carry refcounts as in pynvm. An object whose count drops to zero is freed
    when the transaction commits, unless it was referenced again by then or Python still
    holds a proxy of it (``x = lst.pop(); other.append(x)`` is safe; pynvm freed ``x`` at
    once). ``gc()`` frees refcount-0 orphans (what a crash between ``new()`` and storing
    the object leaves), traces from the root and frees unreachable cycles, returning
    pynvm's ``(type_counts, gc_counts)``. ``close()`` runs gc and marks the pool clean;
    opening a pool that was not closed cleanly runs gc. After an unclean shutdown the
    replicas may differ from the master in free space (bytes of the transaction that was
    running); the objects are the same once each replays its log.

Threads: one writer at a time, enforced
    A pool is safe to share between threads. Each pool has one re-entrant lock: a
    transaction holds it from its outermost ``begin``/``with`` to its end, and every read
    of a persistent object takes it, so transactions of different threads are serialized
    (never interleaved) and no thread sees another's uncommitted changes. A transaction
    must end in the thread that began it. (pynvm was not thread-safe.) A second process
    opening the same pool gets EBUSY (PoolSet locks the master).

Read-only mode
    pynvm refused ``flag='r'``. Here it opens the pool without changing it: a pending log
    is applied in memory only, gc is not run, and any change raises OSError(EROFS).

Differences from pynvm worth knowing
    The on-media format is this package's own (pool signature ``PMREPOBJ``), not
    libpmemobj's. bytes are stored natively, dicts keep insertion order, lists support
    slices and ``sort``. The MemoryManager's low-level API for custom Persistent types uses
    offsets and ``get_u64``/``set_u64``-style accessors instead of cffi pointers, and
    ``direct()`` returns a copy. Log messages use the logger ``pmreplica.pmemobj``;
    ``log_to("nvm.pmemobj")`` sends them to pynvm's logger instead, for code (and tests)
    that configure or capture that one.
"""

import logging

from .dict import PersistentDict
from .heap import PoolFullError
from .layout import MIN_POOL_SIZE, POOL_SIGNATURE
from .list import PersistentList
from .memory import MemoryManager, Persistent, Transaction
from .object import PersistentObject
from .pool import PersistentObjectPool, create, open
from .set import PersistentFrozenSet, PersistentSet
from .tuple import PersistentTuple
from .txn import PoolClosedError, TransactionAborted

# (Importing list.py, dict.py, set.py, tuple.py and object.py binds those names here to
# the modules, as in pynvm: this file must not use the builtins of those names.)

for _cls in (PersistentList, PersistentDict, PersistentTuple, PersistentSet,
             PersistentFrozenSet, PersistentObject):
    Persistent.register(_cls)
    # A pool's type table names a class by module and name: the public name keeps pools
    # readable whichever module of this package holds the class.
    _cls.__module__ = __name__
del _cls


class _Forward(logging.Handler):
    """Hands every record to another logger (which passes it up its own hierarchy)."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = logging.getLogger(target)

    def emit(self, record: logging.LogRecord) -> None:
        self.target.handle(record)


def log_to(name: str = "nvm.pmemobj") -> None:
    """Send this package's log records (logger ``pmreplica.pmemobj``) to the logger ``name``
    instead, pynvm's by default; ``log_to("pmreplica.pmemobj")`` undoes it."""
    if name.startswith(__name__ + "."):
        raise ValueError(f"log_to({name!r}): records would come back to {__name__}")
    ours = logging.getLogger(__name__)
    for h in [h for h in ours.handlers if isinstance(h, _Forward)]:
        ours.removeHandler(h)
    ours.propagate = name == __name__
    if name != __name__:
        ours.addHandler(_Forward(name))


__all__ = ["open", "create", "MIN_POOL_SIZE", "POOL_SIGNATURE", "PersistentObjectPool",
           "PersistentList", "PersistentDict", "PersistentObject", "PersistentTuple",
           "PersistentSet", "PersistentFrozenSet", "Persistent", "MemoryManager",
           "Transaction", "TransactionAborted", "PoolFullError", "PoolClosedError", "log_to"]

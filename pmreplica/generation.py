"""Generations: which replicas hold the same acknowledged writes, kept on every replica.

A generation is a random id and an epoch number. The master starts the first one when the
pool set is created and a new one whenever the set of replicas in step with it changes (a
replica fails, is repaired, the pool is opened without one of them) or a replica is
promoted to master. Each new generation is written to every replica in step before any
persist that skipped a replica returns, with the generations before it (its history). What
a replica holds is therefore what every acknowledged write of its generation left, and:

* two replicas of the same generation hold the same acknowledged writes;
* a replica whose generation is in another's history missed the writes made since: it is
  *behind* (DRBD's generation identifiers, in short);
* two replicas whose generations are in neither's history both took writes after they
  parted: *diverged* (split brain), and only an explicit choice may overwrite either.

``master`` names (by replica uuid) the replica that was master when the generation began:
a replica that is not the master of its own generation is a replica, and opening it as a
master needs ``pmreplica promote`` first.

The record lives in part 0's header page of every replica at :data:`OFFSET` (PMDK's unused2
area, after the replica-state record, outside the header checksum), with a CRC of its own.
"""

from __future__ import annotations

import os
import struct
import time
import uuid as _uuid
import zlib
from collections import namedtuple

#: where the record lives in part 0's header page (after the replica-state record)
OFFSET = 3640
MAGIC = b"PMRGEN\0\0"
VERSION = 1
#: generations remembered before the current one
HISTORY = 12
# magic, version, history length, epoch, start time (s), id, master replica uuid, members
_HEAD = struct.Struct("<8sIIQQ16s16sQ")
_ENTRY = struct.Struct("<Q16s")  # epoch, id
SIZE = _HEAD.size + HISTORY * _ENTRY.size + 4
assert OFFSET + SIZE <= 4024  # PMDK's shutdown state follows

SAME, AHEAD, BEHIND, DIVERGED = "same", "ahead", "behind", "diverged"


class Generation(namedtuple("Generation", "epoch id master members began history",
                             defaults=(0, 0, ()))):
    """One replica's generation record (see the module docstring): ``epoch`` and ``id``,
    ``master`` (the master's replica uuid, 16 bytes), ``members`` (the replicas in step in
    it: bit i is replica i of the master's pool set), ``began`` (seconds since the epoch)
    and ``history`` (earlier generations, newest first: (epoch, id)). A named tuple, not a
    dataclass: the agent, which keeps it too, starts without the dataclasses machinery."""

    __slots__ = ()

    @classmethod
    def first(cls, master: _uuid.UUID, members: int) -> "Generation":
        """The generation a new pool set starts with."""
        return cls(1, os.urandom(16), master.bytes, members, int(time.time()))

    def next(self, members: int, master: _uuid.UUID | None = None) -> "Generation":
        """A new generation after this one (``master``: a promoted replica's uuid)."""
        return Generation(self.epoch + 1, os.urandom(16),
                          master.bytes if master is not None else self.master, members,
                          int(time.time()),
                          ((self.epoch, self.id),) + self.history[:HISTORY - 1])

    def is_master(self, replica: _uuid.UUID) -> bool:
        return self.master == replica.bytes

    def relation(self, other: "Generation") -> str:
        """SAME, AHEAD (other is behind this one), BEHIND or DIVERGED. Generations of one
        master follow each other in a line (only that master starts them), so two of the
        same master are ordered by their epochs even past the history kept."""
        if other.id == self.id:
            return SAME
        if any(i == other.id for _, i in self.history):
            return AHEAD
        if any(i == self.id for _, i in other.history):
            return BEHIND
        if other.master == self.master and other.epoch != self.epoch:
            return AHEAD if self.epoch > other.epoch else BEHIND
        return DIVERGED

    def parted(self, other: "Generation") -> int | None:
        """The epoch of the last generation both share (None: none remembered)."""
        mine = {i: e for e, i in ((self.epoch, self.id),) + self.history}
        for e, i in ((other.epoch, other.id),) + other.history:
            if i in mine:
                return e
        return None

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.began))
        return f"generation {self.epoch} (begun {when})"

    def pack(self) -> bytes:
        body = _HEAD.pack(MAGIC, VERSION, len(self.history), self.epoch, self.began, self.id,
                          self.master, self.members)
        for epoch, gid in self.history:
            body += _ENTRY.pack(epoch, gid)
        body += bytes(HISTORY * _ENTRY.size - len(self.history) * _ENTRY.size)
        return body + struct.pack("<I", zlib.crc32(body))

    @classmethod
    def unpack(cls, raw: bytes | memoryview) -> "Generation | None":
        """The record in ``raw`` (at least :data:`SIZE` bytes), None if there is none or it
        is damaged (then nothing is known of the replica's generation)."""
        raw = bytes(raw[:SIZE])
        if len(raw) < SIZE or raw[:8] != MAGIC:
            return None
        if struct.unpack_from("<I", raw, SIZE - 4)[0] != zlib.crc32(raw[:SIZE - 4]):
            return None
        magic, version, count, epoch, began, gid, master, members = _HEAD.unpack_from(raw)
        if version != VERSION or count > HISTORY:
            return None
        history = tuple(_ENTRY.unpack_from(raw, _HEAD.size + k * _ENTRY.size)
                        for k in range(count))
        return cls(epoch, gid, master, members, began, history)


def of_page(page: bytes | memoryview) -> Generation | None:
    """The generation recorded in a part-0 header page."""
    return Generation.unpack(page[OFFSET:OFFSET + SIZE]) if len(page) >= OFFSET + SIZE else None


def store(path: str, record: Generation) -> None:
    """Write ``record`` into the header page of the part file ``path``, durably."""
    from .state import store_copy  # the same durable page write as the state record's

    store_copy(path, record.pack(), OFFSET)


def load(path: str) -> Generation | None:
    """The generation recorded in the part file ``path`` (None if none, or unreadable)."""
    from .files import open_regular

    try:
        fd = open_regular(path)
    except OSError:
        return None
    try:
        return Generation.unpack(os.pread(fd, SIZE, OFFSET))
    except OSError:
        return None
    finally:
        os.close(fd)

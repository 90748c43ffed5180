"""The record of a simulated run: how its durable image evolved and its durability points.

A stream is a file of pickled events after a header (a dict: the scenario and where it
ran)::

    ("f", rel, content | size)   a file appears: its durable content (or that many zeros)
    ("r", rel, size)             a file's size changes (cut, or extended with zeros)
    ("g", rel)                   a file is removed
    ("d", rel, offset, bytes)    bytes become durable
    ("p", seq, kind, context, pending)
                                 a durability point: ``pending`` lists, per file, the
                                 offsets (u64 array bytes) and live values (8 bytes each)
                                 of the words a power failure there may or may not keep

Replaying the events in order rebuilds the durable image at every point, so a checker
needs nothing but the stream.
"""

from __future__ import annotations

import pickle
from typing import Any, BinaryIO, Iterator

Pending = list[tuple[str, bytes, bytes]]


class Recorder:
    """Appends events to a stream file."""

    def __init__(self, path: str, header: dict[str, Any]) -> None:
        self._f: BinaryIO = open(path, "wb", buffering=1 << 20)
        self._dump = pickle.Pickler(self._f, protocol=pickle.HIGHEST_PROTOCOL).dump
        self._dump(header)

    def file(self, rel: str, content: bytes | int) -> None:
        self._dump(("f", rel, content))

    def resize(self, rel: str, size: int) -> None:
        self._dump(("r", rel, size))

    def gone(self, rel: str) -> None:
        self._dump(("g", rel))

    def durable(self, rel: str, offset: int, data: bytes) -> None:
        self._dump(("d", rel, offset, data))

    def point(self, seq: int, kind: str, context: Any, pending: Pending) -> None:
        self._dump(("p", seq, kind, context, pending))

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


def read(path: str) -> tuple[dict[str, Any], Iterator[tuple]]:
    """The header of the stream at ``path`` and an iterator over its events."""
    f = open(path, "rb", buffering=1 << 20)
    unpickler = pickle.Unpickler(f)
    header = unpickler.load()

    def events() -> Iterator[tuple]:
        with f:
            while True:
                try:
                    yield unpickler.load()
                except EOFError:
                    return
    return header, events()

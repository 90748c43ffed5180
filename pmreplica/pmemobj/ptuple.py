"""PersistentTuple: an immutable sequence in the pool (hashable, like tuple).

Layout: ``[refcnt][size][size][items oid]`` (the list layout), items of type
TUPLE_POBJPTR_ARRAY_TYPE_NUM written once, fresh, when the tuple is created.
"""

from __future__ import annotations

import operator
from collections import abc
from reprlib import recursive_repr
from typing import Any, Iterable, Iterator

from .layout import TUPLE_POBJPTR_ARRAY_TYPE_NUM


class PersistentTuple(abc.Sequence):
    """Persistent version of the 'tuple' type."""

    __slots__ = ("_p_mm", "_p_oid", "__weakref__")

    def __init__(self, *args: Any) -> None:
        if not args:
            return
        if len(args) != 1:
            raise TypeError(f"{type(self).__name__} takes at most 1 argument, "
                            f"{len(args)} given")
        mm = self._p_mm
        with mm.transaction():
            oids = [mm.persist(v) for v in list(args[0])]
            if not oids:
                return
            for oid in oids:
                mm.incref(oid)
            items = mm.alloc(len(oids) * 8, TUPLE_POBJPTR_ARRAY_TYPE_NUM)
            mm.write_new_words(items, oids)
            mm.set_words(self._p_oid + 8, (len(oids), len(oids), items))

    def _p_new(self, manager: Any) -> None:
        self._p_mm = manager
        self._p_oid = manager.alloc_object(type(self), 32, bytes(32))
        manager.register(self)

    def _p_resurrect(self, manager: Any, oid: int) -> None:
        self._p_mm = manager
        self._p_oid = oid

    def _oids(self) -> list[int]:
        mm = self._p_mm
        size, _alloc, items = mm.get_words(self._p_oid + 8, 3)
        return mm.get_words(items, size) if size else []

    def _p_traverse(self) -> Iterator[int]:
        return iter(self._oids())

    def _p_substructures(self) -> Iterable[tuple[int, int]]:
        return ((self._p_mm.get_u64(self._p_oid + 24), TUPLE_POBJPTR_ARRAY_TYPE_NUM),)

    def _p_deallocate(self) -> None:
        mm = self._p_mm
        for oid in self._oids():
            mm.decref(oid)
        mm.free(mm.get_u64(self._p_oid + 24))

    def __len__(self) -> int:
        mm = self._p_mm
        with mm.lock:
            return mm.get_u64(self._p_oid + 8)

    def __getitem__(self, index: Any) -> Any:
        mm = self._p_mm
        with mm.lock:
            if isinstance(index, slice):
                return tuple(mm.resurrect(o) for o in self._oids()[index])
            size, _alloc, items = mm.get_words(self._p_oid + 8, 3)
            i = operator.index(index)
            if i < 0:
                i += size
            if i < 0 or i >= size:
                raise IndexError(f"{index} out of range")
            return mm.resurrect(mm.get_u64(items + 8 * i))

    def __iter__(self) -> Iterator[Any]:
        mm = self._p_mm
        with mm.lock:
            values = [mm.resurrect(o) for o in self._oids()]
        return iter(values)

    def _refuse(self, what: str) -> None:
        raise TypeError(f"'{type(self).__name__}' object does not support {what}")

    def __setitem__(self, index: Any, value: Any) -> None:
        self._refuse("item assignment")

    def __delitem__(self, index: Any) -> None:
        self._refuse("item deletion")

    def insert(self, index: Any, value: Any) -> None:
        self._refuse("insertion")

    def append(self, value: Any) -> None:
        self._refuse("insertion")

    def extend(self, values: Any) -> None:
        self._refuse("insertion")

    def clear(self) -> None:
        self._refuse("clear")

    def _cmp(self, other: Any) -> tuple[Any, ...] | None:
        if isinstance(other, (PersistentTuple, tuple)):
            return tuple(other)
        return None

    def __eq__(self, other: Any) -> bool:
        o = self._cmp(other)
        return NotImplemented if o is None else tuple(self) == o

    def __ne__(self, other: Any) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    def __lt__(self, other: Any) -> bool:
        o = self._cmp(other)
        return NotImplemented if o is None else tuple(self) < o

    def __le__(self, other: Any) -> bool:
        o = self._cmp(other)
        return NotImplemented if o is None else tuple(self) <= o

    def __gt__(self, other: Any) -> bool:
        o = self._cmp(other)
        return NotImplemented if o is None else tuple(self) > o

    def __ge__(self, other: Any) -> bool:
        o = self._cmp(other)
        return NotImplemented if o is None else tuple(self) >= o

    def __hash__(self) -> int:
        return hash(tuple(self))

    @recursive_repr()
    def __repr__(self) -> str:
        return f"{type(self).__name__}({tuple(self)!r})"

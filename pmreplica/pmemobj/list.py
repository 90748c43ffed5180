"""PersistentList: a list whose items live in the pool.

Layout: ``[refcnt][size][allocated][items oid]``; items is a separate allocation (type
LIST_POBJPTR_ARRAY_TYPE_NUM) of ``allocated`` oids. Growing, and any change that would
shift many items, writes a new array fresh (no log) and frees the old one.
"""

from __future__ import annotations

import operator
from collections import abc
from reprlib import recursive_repr
from typing import Any, Iterable, Iterator

from .collection import PersistentSequence
from .layout import LIST_POBJPTR_ARRAY_TYPE_NUM

#: Shifting more items than this rewrites the array instead of logging each moved slot.
SHIFT_LIMIT = 16


def _grow(n: int) -> int:
    """CPython's list over-allocation."""
    return 0 if n == 0 else n + (n >> 3) + (3 if n < 9 else 6)


class PersistentList(PersistentSequence, abc.MutableSequence):
    """Persistent version of the 'list' type."""

    __slots__ = ()
    _ARRAY_TYPE = LIST_POBJPTR_ARRAY_TYPE_NUM
    _BUILTIN = list

    def __init__(self, *args: Any) -> None:
        self._check_init_args(args)
        if args:
            self.extend(args[0])

    # -- internals -----------------------------------------------------------------------

    def _store(self, oids: list[int], capacity: int | None = None) -> None:
        """Replace the items array with a fresh one holding ``oids`` (no refcount change)."""
        mm = self._p_mm
        n = len(oids)
        cap = _grow(n) if capacity is None else capacity
        old = mm.get_u64(self._p_oid + 24)
        new = 0
        if cap:
            new = mm.alloc(cap * 8, self._ARRAY_TYPE)
            mm.write_new_words(new, oids + [0] * (cap - n))
        mm.set_words(self._p_oid + 8, (n, cap, new))
        mm.free(old)

    # -- sequence API --------------------------------------------------------------------

    def __getitem__(self, index: Any) -> Any:
        mm = self._p_mm
        with mm.lock:
            if isinstance(index, slice):
                return [mm.resurrect(o) for o in self._oids()[index]]
            size, _alloc, items = mm.get_words(self._p_oid + 8, 3)
            return mm.resurrect(mm.get_u64(items + 8 * self._index(index, size)))

    def __setitem__(self, index: Any, value: Any) -> None:
        mm = self._p_mm
        with mm.transaction():
            if isinstance(index, slice):
                self._set_slice(index, value)
                return
            size, _alloc, items = mm.get_words(self._p_oid + 8, 3)
            slot = items + 8 * self._index(index, size)
            oid = mm.persist(value)
            mm.incref(oid)
            old = mm.get_u64(slot)
            mm.set_u64(slot, oid)
            mm.decref(old)

    def _set_slice(self, sl: slice, values: Iterable[Any]) -> None:
        mm = self._p_mm
        new = [mm.persist(v) for v in list(values)]
        for oid in new:
            mm.incref(oid)
        oids = self._oids()
        removed = oids[sl]
        oids[sl] = new
        self._store(oids)
        for oid in removed:
            mm.decref(oid)

    def __delitem__(self, index: Any) -> None:
        mm = self._p_mm
        with mm.transaction():
            if isinstance(index, slice):
                oids = self._oids()
                removed = oids[index]
                del oids[index]
                self._store(oids)
                for oid in removed:
                    mm.decref(oid)
                return
            base = self._p_oid
            size, alloc, items = mm.get_words(base + 8, 3)
            i = self._index(index, size)
            old = mm.get_u64(items + 8 * i)
            tail = size - i - 1
            if tail > SHIFT_LIMIT or (size - 1 < alloc >> 1):
                oids = self._oids()
                del oids[i]
                self._store(oids)
            else:
                if tail:
                    mm.set_words(items + 8 * i, mm.get_words(items + 8 * (i + 1), tail))
                mm.set_u64(base + 8, size - 1)
            mm.decref(old)

    def insert(self, index: Any, value: Any) -> None:
        mm = self._p_mm
        with mm.transaction():
            base = self._p_oid
            size, alloc, items = mm.get_words(base + 8, 3)
            i = operator.index(index)
            if i < 0:
                i = max(0, i + size)
            i = min(i, size)
            oid = mm.persist(value)
            mm.incref(oid)
            tail = size - i
            if size + 1 > alloc or tail > SHIFT_LIMIT:
                oids = self._oids()
                oids.insert(i, oid)
                self._store(oids)
                return
            if tail:
                mm.set_words(items + 8 * (i + 1), mm.get_words(items + 8 * i, tail))
            mm.set_u64(items + 8 * i, oid)
            mm.set_u64(base + 8, size + 1)

    def append(self, value: Any) -> None:
        self.insert(len(self), value)

    def extend(self, values: Iterable[Any]) -> None:
        mm = self._p_mm
        with mm.transaction():
            new = [mm.persist(v) for v in list(values)]
            if not new:
                return
            for oid in new:
                mm.incref(oid)
            size, alloc, items = mm.get_words(self._p_oid + 8, 3)
            if size + len(new) <= alloc:
                mm.set_words(items + 8 * size, new)
                mm.set_u64(self._p_oid + 8, size + len(new))
            else:
                self._store(self._oids() + new)

    def __iadd__(self, values: Iterable[Any]) -> "PersistentList":
        self.extend(values)
        return self

    def pop(self, index: int = -1) -> Any:
        mm = self._p_mm
        with mm.transaction():
            value = self[index]
            del self[index]
            return value

    def remove(self, value: Any) -> None:
        mm = self._p_mm
        with mm.transaction():
            del self[self.index(value)]

    def clear(self) -> None:
        mm = self._p_mm
        with mm.transaction():
            oids = self._oids()
            if not oids and not mm.get_u64(self._p_oid + 24):
                return
            self._store([], 0)
            for oid in oids:
                mm.decref(oid)

    def reverse(self) -> None:
        mm = self._p_mm
        with mm.transaction():
            oids = self._oids()
            if len(oids) > 1:
                oids.reverse()
                self._store(oids, mm.get_u64(self._p_oid + 16))

    def sort(self, *, key: Any = None, reverse: bool = False) -> None:
        mm = self._p_mm
        with mm.transaction():
            oids = self._oids()
            values = [mm.resurrect(o) for o in oids]
            kf = (lambda i: values[i]) if key is None else (lambda i: key(values[i]))
            order = sorted(range(len(oids)), key=kf, reverse=reverse)
            self._store([oids[i] for i in order], mm.get_u64(self._p_oid + 16))

    def __iter__(self) -> Iterator[Any]:
        # By index, like list's iterator, a batch at a time under the lock (never held
        # across a yield): changes made while iterating cannot hand out freed objects.
        i = 0
        while True:
            batch = self[i:i + 256]
            if not batch:
                return
            yield from batch
            i += len(batch)

    def __contains__(self, value: Any) -> bool:
        return any(v is value or v == value for v in self)

    def copy(self) -> list[Any]:
        return list(self)

    __hash__ = None  # type: ignore[assignment]

    @recursive_repr()
    def __repr__(self) -> str:
        return "{}([{}])".format(type(self).__name__, ", ".join(repr(x) for x in self))

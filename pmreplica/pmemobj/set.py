"""PersistentSet and PersistentFrozenSet: sets in the pool; see hashtable.py.

Binary operators (``| & - ^``) take sets only, as set's do; the named methods take any
iterables. Results of set algebra are new persistent sets of the same class, allocated in
the pool (unreferenced until stored somewhere, so gc reclaims them if dropped).
"""

from __future__ import annotations

from collections import abc
from reprlib import recursive_repr
from typing import Any, Iterable, Iterator

from .collection import PersistentCollection
from .hashing import stable_hash
from .hashtable import HashTable
from .layout import SET_POBJPTR_ARRAY_TYPE_NUM


def _is_set(other: Any) -> bool:
    return isinstance(other, (set, frozenset, _SetBase))


def _lookup_key(key: Any) -> Any:
    """A mutable set used as a member to look up is taken as a frozenset (as set does)."""
    if isinstance(key, (set, PersistentSet)):
        return frozenset(key)
    return key


class _SetBase(PersistentCollection, HashTable, abc.Set):
    __slots__ = ()
    _WIDTH = 2
    _TABLE_TYPE = SET_POBJPTR_ARRAY_TYPE_NUM

    def __init__(self, *args: Any) -> None:
        self._check_init_args(args)
        if not args:
            return
        items = list(args[0])
        with self._p_mm.transaction():
            for item in items:
                self._add(item)

    def _p_traverse(self) -> Iterator[int]:
        return iter(list(self._ht_key_oids()))

    def _p_substructures(self) -> Iterable[tuple[int, int]]:
        return ((self._ht_table(), SET_POBJPTR_ARRAY_TYPE_NUM),)

    def _p_deallocate(self) -> None:
        mm = self._p_mm
        for k in list(self._ht_key_oids()):
            mm.decref(k)
        mm.free(self._ht_table())

    # -- internals -----------------------------------------------------------------------

    def _add(self, key: Any) -> None:
        mm = self._p_mm
        h = stable_hash(key)
        with mm.transaction():
            table = self._ht_table()
            e, slot = self._ht_lookup(table, key, h) if table else (-1, 0)
            if e >= 0:
                return
            k = mm.persist(key)
            mm.incref(k)
            self._ht_insert(table, slot, h, [k])

    def _discard(self, key: Any) -> None:
        mm = self._p_mm
        key = _lookup_key(key)
        with mm.transaction():
            table, e, slot = self._ht_find(key)
            if e >= 0:
                (k,) = self._ht_delete(table, e, slot)
                mm.decref(k)

    def _new(self, items: Iterable[Any]) -> Any:
        return self._p_mm.new(type(self), items)

    # -- set API -------------------------------------------------------------------------

    def __contains__(self, key: Any) -> bool:
        with self._p_mm.lock:
            return self._ht_find(_lookup_key(key))[1] >= 0

    def __iter__(self) -> Iterator[Any]:
        mm = self._p_mm
        with mm.lock:
            keys = [mm.resurrect(k) for k in self._ht_key_oids()]
        return iter(keys)

    @classmethod
    def _from_iterable(cls, it: Iterable[Any]) -> set[Any]:
        # Reflected operators (a set | a persistent set) produce a plain set.
        return set(it)

    def union(self, *others: Iterable[Any]) -> Any:
        with self._p_mm.transaction():
            new = self._new(self)
            for other in others:
                for item in other:
                    new._add(item)
            return new

    def intersection(self, *others: Iterable[Any]) -> Any:
        items = list(self)
        for other in others:
            if not isinstance(other, (abc.Set, abc.Mapping)):
                other = set(other)
            items = [x for x in items if x in other]
        return self._new(items)

    def difference(self, *others: Iterable[Any]) -> Any:
        items = list(self)
        for other in others:
            if not isinstance(other, (abc.Set, abc.Mapping)):
                other = set(other)
            items = [x for x in items if x not in other]
        return self._new(items)

    def symmetric_difference(self, other: Iterable[Any]) -> Any:
        theirs = list(dict.fromkeys(other))
        mine = set(self)
        theirs_set = set(theirs)
        return self._new([x for x in mine if x not in theirs_set] +
                         [x for x in theirs if x not in mine])

    def issubset(self, other: Iterable[Any]) -> bool:
        if not isinstance(other, (abc.Set, abc.Mapping)):
            other = set(other)
        return all(x in other for x in self)

    def issuperset(self, other: Iterable[Any]) -> bool:
        return all(x in self for x in other)

    def is_disjoint(self, other: Iterable[Any]) -> bool:
        """pynvm's spelling of :meth:`isdisjoint`."""
        return self.isdisjoint(other)

    def copy(self) -> Any:
        return self._new(self)

    def _check(self, other: Any, op: str) -> None:
        if not _is_set(other):
            raise TypeError(f"unsupported operand type(s) for {op}: "
                            f"'{type(self).__name__}' and '{type(other).__name__}'")

    def __or__(self, other: Any) -> Any:
        self._check(other, "|")
        return self.union(other)

    def __and__(self, other: Any) -> Any:
        self._check(other, "&")
        return self.intersection(other)

    def __sub__(self, other: Any) -> Any:
        self._check(other, "-")
        return self.difference(other)

    def __xor__(self, other: Any) -> Any:
        self._check(other, "^")
        return self.symmetric_difference(other)

    @recursive_repr()
    def __repr__(self) -> str:
        items = list(self)
        body = "{" + ", ".join(repr(x) for x in items) + "}" if items else ""
        return f"{type(self).__name__}({body})"


class PersistentSet(_SetBase, abc.MutableSet):
    """Persistent version of the 'set' type."""

    __slots__ = ()
    __hash__ = None  # type: ignore[assignment]

    def add(self, key: Any) -> None:
        self._add(key)

    def discard(self, key: Any) -> None:
        self._discard(key)

    def remove(self, key: Any) -> None:
        with self._p_mm.transaction():
            if key not in self:
                raise KeyError(key)
            self._discard(key)

    def pop(self) -> Any:
        mm = self._p_mm
        with mm.transaction():
            oids = list(self._ht_key_oids())
            if not oids:
                raise KeyError("pop from an empty set")
            value = mm.resurrect(oids[-1])
            self._discard(value)
            return value

    def clear(self) -> None:
        mm = self._p_mm
        with mm.transaction():
            for _h, k in self._ht_clear():
                mm.decref(k)

    def update(self, *others: Iterable[Any]) -> None:
        with self._p_mm.transaction():
            for other in others:
                for item in other:
                    self._add(item)

    def intersection_update(self, *others: Iterable[Any]) -> None:
        keep = set(self.intersection(*others)) if others else set(self)
        with self._p_mm.transaction():
            for item in list(self):
                if item not in keep:
                    self._discard(item)

    def difference_update(self, *others: Iterable[Any]) -> None:
        with self._p_mm.transaction():
            for other in others:
                for item in list(other):
                    self._discard(item)

    def symmetric_difference_update(self, other: Iterable[Any]) -> None:
        with self._p_mm.transaction():
            for item in list(dict.fromkeys(other)):
                if item in self:
                    self._discard(item)
                else:
                    self._add(item)

    def __ior__(self, other: Any) -> "PersistentSet":
        self._check(other, "|=")
        self.update(other)
        return self

    def __iand__(self, other: Any) -> "PersistentSet":
        self._check(other, "&=")
        self.intersection_update(other)
        return self

    def __isub__(self, other: Any) -> "PersistentSet":
        self._check(other, "-=")
        self.difference_update(other)
        return self

    def __ixor__(self, other: Any) -> "PersistentSet":
        self._check(other, "^=")
        self.symmetric_difference_update(other)
        return self


class PersistentFrozenSet(_SetBase):
    """Persistent version of the 'frozenset' type (hashable)."""

    __slots__ = ()

    def add(self, key: Any) -> None:
        raise AttributeError(f"{type(self).__name__} has no attribute 'add'")

    def discard(self, key: Any) -> None:
        raise AttributeError(f"{type(self).__name__} has no attribute 'discard'")

    def __hash__(self) -> int:
        return hash(frozenset(self))

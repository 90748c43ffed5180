"""PersistentDict: a dict in the pool (insertion-ordered, like dict); see hashtable.py."""

from __future__ import annotations

from collections import abc
from reprlib import recursive_repr
from typing import Any, Iterable, Iterator

from .collection import PersistentCollection
from .hashing import stable_hash
from .hashtable import HashTable
from .layout import PDICTKEYSOBJECT_TYPE_NUM

_MISSING = object()


class PersistentDict(PersistentCollection, HashTable, abc.MutableMapping):
    """Persistent version of the 'dict' type."""

    __slots__ = ()
    _WIDTH = 3
    _TABLE_TYPE = PDICTKEYSOBJECT_TYPE_NUM

    def __init__(self, *args: Any, **kw: Any) -> None:
        if len(args) > 1:
            raise TypeError(f"{type(self).__name__} expected at most 1 argument, "
                            f"got {len(args)}")
        if args or kw:
            self.update(*args, **kw)

    def _p_traverse(self) -> Iterator[int]:
        for _h, k, v in self._ht_entries():
            yield k
            yield v

    def _p_substructures(self) -> Iterable[tuple[int, int]]:
        return ((self._ht_table(), PDICTKEYSOBJECT_TYPE_NUM),)

    def _p_deallocate(self) -> None:
        mm = self._p_mm
        for _h, k, v in self._ht_entries():
            mm.decref(k)
            mm.decref(v)
        mm.free(self._ht_table())

    # -- mapping API ---------------------------------------------------------------------

    def __getitem__(self, key: Any) -> Any:
        mm = self._p_mm
        with mm.lock:
            table, e, _slot = self._ht_find(key)
            if e < 0:
                raise KeyError(key)
            return mm.resurrect(mm.get_u64(self._ht_entry_off(table, e) + 16))

    def __contains__(self, key: Any) -> bool:
        with self._p_mm.lock:
            return self._ht_find(key)[1] >= 0

    def get(self, key: Any, default: Any = None) -> Any:
        mm = self._p_mm
        with mm.lock:
            table, e, _slot = self._ht_find(key)
            if e < 0:
                return default
            return mm.resurrect(mm.get_u64(self._ht_entry_off(table, e) + 16))

    def __setitem__(self, key: Any, value: Any) -> None:
        mm = self._p_mm
        h = stable_hash(key)
        with mm.transaction():
            table = self._ht_table()
            e, slot = self._ht_lookup(table, key, h) if table else (-1, 0)
            v = mm.persist(value)
            mm.incref(v)
            if e >= 0:
                voff = self._ht_entry_off(table, e) + 16
                old = mm.get_u64(voff)
                mm.set_u64(voff, v)
                mm.decref(old)
                return
            k = mm.persist(key)
            mm.incref(k)
            self._ht_insert(table, slot, h, [k, v])

    def __delitem__(self, key: Any) -> None:
        mm = self._p_mm
        with mm.transaction():
            table, e, slot = self._ht_find(key)
            if e < 0:
                raise KeyError(key)
            k, v = self._ht_delete(table, e, slot)
            mm.decref(k)
            mm.decref(v)

    def __iter__(self) -> Iterator[Any]:
        mm = self._p_mm
        with mm.lock:
            keys = [mm.resurrect(k) for _h, k, _v in self._ht_entries()]
        return iter(keys)

    def _pairs(self) -> list[tuple[Any, Any]]:
        mm = self._p_mm
        with mm.lock:
            return [(mm.resurrect(k), mm.resurrect(v)) for _h, k, v in self._ht_entries()]

    def items(self) -> Any:
        return _ItemsView(self)

    def values(self) -> Any:
        return _ValuesView(self)

    def update(self, *args: Any, **kw: Any) -> None:
        if len(args) > 1:
            raise TypeError(f"update expected at most 1 argument, got {len(args)}")
        with self._p_mm.transaction():
            if args:
                arg = args[0]
                if isinstance(arg, abc.Mapping) or hasattr(arg, "keys"):
                    for key in list(arg.keys()):
                        self[key] = arg[key]
                else:
                    for key, value in arg:
                        self[key] = value
            for key, value in kw.items():
                self[key] = value

    def pop(self, key: Any, default: Any = _MISSING) -> Any:
        mm = self._p_mm
        with mm.transaction():
            table, e, slot = self._ht_find(key)
            if e < 0:
                if default is _MISSING:
                    raise KeyError(key)
                return default
            value = mm.resurrect(mm.get_u64(self._ht_entry_off(table, e) + 16))
            k, v = self._ht_delete(table, e, slot)
            mm.decref(k)
            mm.decref(v)
            return value

    def popitem(self) -> tuple[Any, Any]:
        """Remove and return the last inserted pair (LIFO, like dict)."""
        mm = self._p_mm
        with mm.transaction():
            entries = self._ht_entries()
            if not entries:
                raise KeyError("popitem(): dictionary is empty")
            key = mm.resurrect(entries[-1][1])
            return key, self.pop(key)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        with self._p_mm.transaction():
            try:
                return self[key]
            except KeyError:
                self[key] = default
                return self[key]

    def clear(self) -> None:
        mm = self._p_mm
        with mm.transaction():
            for _h, k, v in self._ht_clear():
                mm.decref(k)
                mm.decref(v)

    def copy(self) -> dict[Any, Any]:
        return dict(self._pairs())

    @recursive_repr()
    def __repr__(self) -> str:
        body = ", ".join(f"{k!r}: {v!r}" for k, v in self._pairs())
        return f"{type(self).__name__}({{{body}}})"


class _ItemsView(abc.ItemsView):
    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        return iter(self._mapping._pairs())


class _ValuesView(abc.ValuesView):
    def __iter__(self) -> Iterator[Any]:
        return iter([v for _k, v in self._mapping._pairs()])

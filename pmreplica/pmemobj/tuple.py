"""PersistentTuple: an immutable sequence in the pool (hashable, like tuple).

Layout: ``[refcnt][size][size][items oid]`` (the list layout), items of type
TUPLE_POBJPTR_ARRAY_TYPE_NUM written once, fresh, when the tuple is created.
"""

from __future__ import annotations

from collections import abc
from reprlib import recursive_repr
from typing import Any, Iterator

from .collection import PersistentSequence
from .layout import TUPLE_POBJPTR_ARRAY_TYPE_NUM


class PersistentTuple(PersistentSequence, abc.Sequence):
    """Persistent version of the 'tuple' type."""

    __slots__ = ()
    _ARRAY_TYPE = TUPLE_POBJPTR_ARRAY_TYPE_NUM
    _BUILTIN = tuple

    def __init__(self, *args: Any) -> None:
        self._check_init_args(args)
        if not args:
            return
        mm = self._p_mm
        with mm.transaction():
            oids = [mm.persist(v) for v in list(args[0])]
            if not oids:
                return
            for oid in oids:
                mm.incref(oid)
            items = mm.alloc(len(oids) * 8, self._ARRAY_TYPE)
            mm.write_new_words(items, oids)
            mm.set_words(self._p_oid + 8, (len(oids), len(oids), items))

    def __getitem__(self, index: Any) -> Any:
        mm = self._p_mm
        with mm.lock:
            if isinstance(index, slice):
                return tuple(mm.resurrect(o) for o in self._oids()[index])
            size, _alloc, items = mm.get_words(self._p_oid + 8, 3)
            return mm.resurrect(mm.get_u64(items + 8 * self._index(index, size)))

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

    def __hash__(self) -> int:
        return hash(tuple(self))

    @recursive_repr()
    def __repr__(self) -> str:
        return f"{type(self).__name__}({tuple(self)!r})"

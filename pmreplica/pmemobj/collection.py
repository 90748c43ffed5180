"""What the built-in persistent collections share: the object record and the oid array.

Every collection object is ``[refcnt][size]...`` (``_OBJ_SIZE`` bytes): PersistentDict and
PersistentSet add ``[table oid]`` (hashtable.py), PersistentList and PersistentTuple
``[allocated][items oid]``, an array of ``allocated`` item oids (:class:`PersistentSequence`).
"""

from __future__ import annotations

import operator
from typing import Any, Iterable, Iterator


class PersistentCollection:
    """Base of the built-in collections: the object record (created or attached), len(),
    the constructors' argument check."""

    __slots__ = ("_p_mm", "_p_oid", "__weakref__")
    #: bytes of the object record (refcount, size and the collection's own words)
    _OBJ_SIZE = 24

    def _check_init_args(self, args: tuple[Any, ...]) -> None:
        """A constructor takes at most one iterable, as list(), tuple() and set() do."""
        if len(args) > 1:
            raise TypeError(f"{type(self).__name__} takes at most 1 argument, "
                            f"{len(args)} given")

    def _p_new(self, manager: Any) -> None:
        self._p_mm = manager
        self._p_oid = manager.alloc_object(type(self), self._OBJ_SIZE, bytes(self._OBJ_SIZE))
        manager.register(self)

    def _p_resurrect(self, manager: Any, oid: int) -> None:
        self._p_mm = manager
        self._p_oid = oid

    def __len__(self) -> int:
        mm = self._p_mm
        with mm.lock:
            return mm.get_u64(self._p_oid + 8)


class PersistentSequence(PersistentCollection):
    """PersistentList and PersistentTuple: ``[refcnt][size][allocated][items oid]``, the
    items array of type ``_ARRAY_TYPE``; compared as ``_BUILTIN`` (list or tuple) compares,
    with that type and with persistent sequences of the same kind."""

    __slots__ = ()
    _OBJ_SIZE = 32
    _ARRAY_TYPE = 0
    _BUILTIN: type = tuple

    # -- the items array -----------------------------------------------------------------

    def _oids(self) -> list[int]:
        mm = self._p_mm
        size, _alloc, items = mm.get_words(self._p_oid + 8, 3)
        return mm.get_words(items, size) if size else []

    @staticmethod
    def _index(index: Any, size: int) -> int:
        """``index`` as a position in [0, size); IndexError outside it."""
        i = operator.index(index)
        if i < 0:
            i += size
        if i < 0 or i >= size:
            raise IndexError(f"{index} out of range")
        return i

    def _p_traverse(self) -> Iterator[int]:
        return iter(self._oids())

    def _p_substructures(self) -> Iterable[tuple[int, int]]:
        return ((self._p_mm.get_u64(self._p_oid + 24), self._ARRAY_TYPE),)

    def _p_deallocate(self) -> None:
        mm = self._p_mm
        for oid in self._oids():
            mm.decref(oid)
        mm.free(mm.get_u64(self._p_oid + 24))

    # -- comparisons ---------------------------------------------------------------------

    def _cmp_other(self, other: Any) -> Any:
        """``other`` as ``_BUILTIN``, or None when the comparison is not this type's to make."""
        builtin = self._BUILTIN
        if isinstance(other, builtin) or (isinstance(other, PersistentSequence)
                                          and other._BUILTIN is builtin):
            return builtin(other)
        return None

    def __eq__(self, other: Any) -> bool:
        o = self._cmp_other(other)
        return NotImplemented if o is None else self._BUILTIN(self) == o

    def __ne__(self, other: Any) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    def __lt__(self, other: Any) -> bool:
        o = self._cmp_other(other)
        return NotImplemented if o is None else self._BUILTIN(self) < o

    def __le__(self, other: Any) -> bool:
        o = self._cmp_other(other)
        return NotImplemented if o is None else self._BUILTIN(self) <= o

    def __gt__(self, other: Any) -> bool:
        o = self._cmp_other(other)
        return NotImplemented if o is None else self._BUILTIN(self) > o

    def __ge__(self, other: Any) -> bool:
        o = self._cmp_other(other)
        return NotImplemented if o is None else self._BUILTIN(self) >= o

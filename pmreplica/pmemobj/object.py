"""PersistentObject: base class for user classes whose attributes live in the pool.

Layout: ``[refcnt][dict oid]``; the attributes are a PersistentDict. Names starting with
``_p_`` (the store's own) and ``_v_`` (volatile, per process) stay ordinary attributes.
``__init__`` runs once, when ``pool.new`` creates the object; ``_v__init__`` runs then and
on every resurrection, to (re)build volatile state.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

from .dict import PersistentDict

_VOLATILE = ("_p_", "_v_")


class PersistentObject:
    """Base class for user defined persistent objects."""

    def _p_new(self, manager: Any) -> None:
        object.__setattr__(self, "_p_dict", {})
        self._p_mm = manager
        with manager.transaction():
            self._p_oid = manager.alloc_object(type(self), 16, bytes(16))
            manager.register(self)
            d = manager.new(PersistentDict)
            manager.incref(d._p_oid)
            manager.set_u64(self._p_oid + 8, d._p_oid)
            self._p_dict = d
        self._v__init__()

    def _p_resurrect(self, manager: Any, oid: int) -> None:
        self._p_mm = manager
        self._p_oid = oid
        self._p_dict = manager.resurrect(manager.get_u64(oid + 8))
        self._v__init__()

    def _v__init__(self) -> None:
        """Called on creation (before ``__init__``) and on resurrection."""

    def __getattribute__(self, name: str) -> Any:
        if name[0] != "_" or not (name.startswith(_VOLATILE) or name.startswith("__")):
            d = object.__getattribute__(self, "_p_dict")
            try:
                return d[name]
            except KeyError:
                pass
        return object.__getattribute__(self, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith(_VOLATILE):
            object.__setattr__(self, name, value)
            return
        self._p_dict[name] = value

    def __delattr__(self, name: str) -> None:
        if name.startswith(_VOLATILE):
            object.__delattr__(self, name)
            return
        try:
            del self._p_dict[name]
        except KeyError:
            raise AttributeError(name) from None

    def _p_traverse(self) -> Iterator[int]:
        yield self._p_mm.get_u64(self._p_oid + 8)

    def _p_substructures(self) -> Iterable[tuple[int, int]]:
        return ()

    def _p_deallocate(self) -> None:
        self._p_mm.decref(self._p_mm.get_u64(self._p_oid + 8))

"""MemoryManager: objects in the pool — persisting, resurrecting, refcounts, the type table.

Every persistent object (a "PObject") is an allocation of type_num POBJECT_TYPE_NUM whose
type code (an index into the pool's type table, a PersistentList of "module:qualname"
strings) sits in its allocation header, and whose payload starts with a u64 refcount.
Immutables (str, bytes, int, float, pickled types) are written once and shared: the same
value persisted twice in a session is one object with two references. None, True and False
are the constant oids 1, 2 and 3.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import logging
import pickle
import struct
import sys
import weakref
from pickle import whichmodule
from typing import Any, Callable, Iterable, Iterator

from ..errors import PmReplicaError
from . import layout as L
from .heap import Heap
from .txn import CONTEXT_LEVEL, FREE_LEVEL, Engine

log = logging.getLogger("pmreplica.pmemobj")

_F64 = struct.Struct("<d")
_VALUE_CACHE_LIMIT = 1 << 16


class PICKLE_SENTINEL:
    """Type-table marker of values stored with :mod:`pickle` (``persist_via_pickle``)."""


class Persistent(abc.ABC):
    """The interface of a type whose instances live in a pool (see the package docstring)."""

    _p_mm: "MemoryManager"
    _p_oid: int

    @abc.abstractmethod
    def _p_new(self, manager: "MemoryManager") -> None:
        """Allocate this object's persistent structures; set ``_p_mm`` and ``_p_oid``."""

    @abc.abstractmethod
    def _p_resurrect(self, manager: "MemoryManager", oid: int) -> None:
        """Attach to the existing object at ``oid``."""

    @abc.abstractmethod
    def _p_traverse(self) -> Iterable[int]:
        """The oids this object references."""

    def _p_substructures(self) -> Iterable[tuple[int, int]]:
        """``(oid, type_num)`` of non-PObject allocations this object owns."""
        return ()

    def _p_deallocate(self) -> None:
        """Drop references to other objects and free substructures (not ``_p_oid``)."""


class Transaction:
    """pynvm's transaction object: a nestable context manager plus begin/commit/abort.

    Levels nest: only the outermost commit makes changes durable; an abort at any level
    rolls back the whole transaction. Leaving a context with an exception aborts and lets
    the exception propagate; leaving it after ``abort()`` raises OSError(ECANCELED)."""

    __slots__ = ("_eng",)

    def __init__(self, eng: Engine) -> None:
        self._eng = eng

    def __enter__(self) -> "Transaction":
        self._eng.begin(CONTEXT_LEVEL)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        self._eng.end_context(exc_type)
        return False

    def begin(self) -> None:
        """Open a (nested) level without a context manager; end it with commit or abort."""
        self._eng.begin(FREE_LEVEL)

    def commit(self) -> None:
        self._eng.commit_level()

    def abort(self, errno: int = errno.ECANCELED) -> None:
        self._eng.abort_level(errno)

    @property
    def depth(self) -> int:
        """Nesting depth of the calling thread's transaction (0: none)."""
        return self._eng.depth


_class_string_cache: dict[type, str] = {}
_class_from_string_cache: dict[str, type] = {}


def class_string(cls: type) -> str:
    """``module:qualname`` of ``cls``, checked to import back to ``cls``; else TypeError."""
    try:
        return _class_string_cache[cls]
    except KeyError:
        pass
    name = getattr(cls, "__qualname__", cls.__name__)
    module_name = whichmodule(cls, name)
    try:
        __import__(module_name, level=0)
        obj: Any = sys.modules[module_name]
        for part in name.split("."):
            if part == "<locals>":
                raise AttributeError(f"<locals> in class name {name}")
            obj = getattr(obj, part)
    except (ImportError, KeyError, AttributeError):
        raise TypeError(f"Can't persist {cls!r} instance, class not found as "
                        f"{module_name}.{name}") from None
    if obj is not cls:
        raise TypeError(f"Can't persist {cls!r} instance, class is not the same object as "
                        f"{module_name}.{name}")
    res = _class_string_cache[cls] = f"{module_name}:{name}"
    return res


#: The names pools made before the built-in persistent types took their public path give
#: them (each was named by a module of its own): read as the public names. Old pools keep
#: their table as it is, so code of either age opens them; what is added is named the new
#: way, which the older code reads too (its package exports every one of these classes).
FORMER_NAMES = {f"pmreplica.pmemobj.{module}:{cls}": f"pmreplica.pmemobj:{cls}"
                for module, cls in (("plist", "PersistentList"), ("pdict", "PersistentDict"),
                                    ("pset", "PersistentSet"), ("pset", "PersistentFrozenSet"),
                                    ("ptuple", "PersistentTuple"),
                                    ("pobject", "PersistentObject"))}


def find_class(cls_string: str) -> type:
    try:
        return _class_from_string_cache[cls_string]
    except KeyError:
        pass
    module_name, name = cls_string.split(":")
    __import__(module_name, level=0)
    obj: Any = sys.modules[module_name]
    for part in name.split("."):
        obj = getattr(obj, part)
    _class_from_string_cache[cls_string] = obj
    return obj


def _value_key(obj: Any) -> Any:
    """Dedupe key: equal values of different types (1, 1.0) or -0.0/0.0 must not merge."""
    t = type(obj)
    if t is float:
        return (t, _F64.pack(obj))
    return (t, obj)


class _Undone:
    """The pool of a proxy whose object was created in a transaction that aborted: every
    use of the proxy fails (ValueError), as every use of a closed file does."""

    def fail(self) -> None:
        raise ValueError("the object was created in a transaction that aborted: it does "
                         "not exist in the pool")

    def __getattr__(self, name: str) -> Any:
        self.fail()


UNDONE = _Undone()


class MemoryManager:
    """Manages one pool's objects. Reach it as ``pool.mm`` or ``obj._p_mm``.

    Low-level access for Persistent types (all offsets are byte offsets in the pool):
    ``get_u64(off)``, ``set_u64(off, v)`` (logged, inside a transaction), ``get_words(off,
    n)``, ``set_words(off, values)``, ``read(off, n)``, ``write_new(off, data)`` /
    ``write_new_words(off, values)`` (only into memory allocated by the current transaction)."""

    OID_NULL = L.OID_NULL

    def __init__(self, eng: Engine, heap: Heap, geo: L.Geometry) -> None:
        from .list import PersistentList  # the type table's own type (code 0)
        self._eng = eng
        self.heap = heap
        self.geo = geo
        self.lock = eng.lock
        self._transaction = Transaction(eng)
        self.get_u64: Callable[[int], int] = eng.get
        self.set_u64: Callable[[int, int], None] = eng.set
        self.get_words = eng.get_words
        self.set_words = eng.set_words
        self.read = eng.read
        self.write_new = eng.write_fresh
        self.write_new_words = eng.write_fresh_words
        self._PersistentList = PersistentList
        self._objs: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
        self._values: dict[int, Any] = {}
        self._oids: dict[Any, int] = {}
        self._pickleable: set[str] = set()
        self._type_names: list[str] = []
        self._type_codes: dict[type, int] = {}
        self._decoders: dict[int, Callable[[int], Any]] = {}
        self._type_table: Any = None
        self._zct: set[int] = set()
        #: refcount-0 objects a commit kept because Python held a proxy of them: freed at a
        #: later commit once the proxy is gone, unless they were stored again by then
        self._held: set[int] = set()
        eng.pre_commit = self._free_zero_counts
        self._track_free: set[int] | None = None
        # Bound once, so that decoders can be told apart with ``is``.
        for name in ("_resurrect_persistent", "_resurrect_pickle", "_resurrect_str",
                     "_resurrect_int", "_resurrect_float", "_resurrect_bytes"):
            setattr(self, name, getattr(self, name))
        self._encoders: dict[type, Callable[[Any], int]] = {
            str: self._persist_str, int: self._persist_int, float: self._persist_float,
            bytes: self._persist_bytes,
        }

    # -- transactions --------------------------------------------------------------------

    def transaction(self) -> Transaction:
        """The pool's transaction object (a nestable context manager)."""
        return self._transaction

    # -- raw memory ----------------------------------------------------------------------

    def alloc(self, size: int, type_num: int = L.RAW_TYPE_NUM) -> int:
        """Allocate ``size`` bytes (contents undefined) inside a transaction; return the oid."""
        if size == 0:
            return L.OID_NULL
        return self.heap.alloc(size, type_num)

    def zalloc(self, size: int, type_num: int = L.RAW_TYPE_NUM) -> int:
        """Allocate ``size`` zeroed bytes inside a transaction."""
        if size == 0:
            return L.OID_NULL
        return self.heap.alloc(size, type_num, 0, bytes(size))

    def alloc_object(self, cls: type | int, size: int, init: bytes = b"") -> int:
        """Allocate a PObject of ``cls`` (or type code) with ``size`` payload bytes.

        ``init`` fills the payload's start; its first 8 bytes are the refcount (0)."""
        code = cls if isinstance(cls, int) else self.get_type_code(cls)
        return self.heap.alloc(size, L.POBJECT_TYPE_NUM, code, init)

    def free(self, oid: int) -> None:
        """Free memory inside a transaction; frees of oid 0 are ignored."""
        if oid == L.OID_NULL:
            return
        self.heap.free(oid)
        self._purge(oid)
        if self._track_free is not None:
            self._track_free.add(oid)

    @contextlib.contextmanager
    def recording_frees(self) -> Iterator[set[int]]:
        """Yield a set that receives every oid freed inside the block (gc uses it to skip
        objects that an earlier free's cascade already freed)."""
        freed: set[int] = set()
        self._track_free = freed
        try:
            yield freed
        finally:
            self._track_free = None

    def realloc(self, oid: int, size: int, type_num: int | None = None) -> int:
        return self._realloc(oid, size, type_num, zero=False)

    def zrealloc(self, oid: int, size: int, type_num: int | None = None) -> int:
        return self._realloc(oid, size, type_num, zero=True)

    def _realloc(self, oid: int, size: int, type_num: int | None, zero: bool) -> int:
        with self._transaction:
            if oid == L.OID_NULL:
                tn = L.RAW_TYPE_NUM if type_num is None else type_num
                return self.zalloc(size, tn) if zero else self.alloc(size, tn)
            old_size, old_tn, code = self.heap.header(oid)
            if type_num is not None and type_num != old_tn:
                raise ValueError(f"realloc of type {old_tn} memory as type {type_num}")
            if size == 0:
                self.free(oid)
                return L.OID_NULL
            keep = self.read(oid, min(size, old_size))
            tail = bytes(size - len(keep)) if zero else b""
            new = self.heap.alloc(size, old_tn, code, keep + tail)
            self.free(oid)
            return new

    def usable_size(self, oid: int) -> int:
        return self.heap.header(oid)[0]

    def direct(self, oid: int) -> bytes:
        """A copy of the allocation's bytes (pynvm returned a raw pointer)."""
        return self.read(oid, self.heap.header(oid)[0])

    @staticmethod
    def otuple(oid: Any) -> Any:
        """pynvm normalized oids to tuples; here an oid is already an immutable int."""
        return oid

    # -- refcounts -----------------------------------------------------------------------

    def incref(self, oid: int) -> None:
        if oid <= L.OID_FALSE:
            if oid == L.OID_NULL:
                raise ValueError("incref of OID_NULL")
            return
        eng = self._eng
        if oid in eng.fresh_objs:       # created by this transaction: no log needed
            eng.q[oid >> 3] += 1
            return
        eng.set(oid, eng.get(oid) + 1)

    def decref(self, oid: int) -> None:
        """Drop a reference; at zero the object is freed when the transaction commits,
        unless it was referenced again by then or Python still holds a proxy of it."""
        if oid <= L.OID_FALSE:
            if oid == L.OID_NULL:
                raise ValueError("decref of OID_NULL")
            return
        eng = self._eng
        rc = eng.get(oid)
        if rc <= 0:
            raise PmReplicaError(errno.EINVAL, f"object {oid:#x} refcount is {rc}; "
                                               "cannot decrement")
        if oid in eng.fresh_objs:
            eng.q[oid >> 3] = rc - 1
        else:
            eng.set(oid, rc - 1)
        if rc == 1:
            if not self._zct:
                eng.on_abort.append(self._zct.clear)
            self._zct.add(oid)

    def xdecref(self, oid: int) -> None:
        if oid != L.OID_NULL:
            self.decref(oid)

    def committed_refcount(self, oid: int) -> int:
        """The refcount of the object at ``oid`` in the committed state, which is what a
        walk of the heap (``heap.allocations()``) sees."""
        return self._eng.q[oid >> 3]

    def has_proxy(self, oid: int) -> bool:
        """True while Python holds a proxy of the object at ``oid`` (a refcount-0 object
        with one is not garbage yet: it may still be stored somewhere)."""
        return oid in self._objs

    def _free_zero_counts(self) -> None:
        """Pre-commit: free objects whose refcount stayed zero (children follow). One that
        Python still holds a proxy of (``x = lst.pop()``) is kept while the proxy lives,
        and freed by the first commit after it is gone."""
        zct, objs, get, held = self._zct, self._objs, self._eng.get, self._held
        gone = [oid for oid in held if oid not in objs]
        if gone:
            held.difference_update(gone)
            zct.update(gone)
        kept = []
        while zct:
            oid = zct.pop()
            if get(oid) == 0:
                if oid in objs:
                    kept.append(oid)
                else:
                    self.deallocate(oid)
        if kept or gone:
            held.update(kept)

            def undo() -> None:  # the commit failed: as it was before
                held.difference_update(kept)
                held.update(gone)
            self._eng.on_abort.append(undo)

    def deallocate(self, oid: int) -> None:
        """Drop the object's references and free it (inside a transaction)."""
        if not self._eng.in_tx():
            with self._transaction:
                self.deallocate(oid)
            return
        _, _, code = self.heap.header(oid)
        if self._decoder(code) is self._resurrect_persistent:
            obj = self.resurrect(oid)
            dealloc = getattr(obj, "_p_deallocate", None)
            if dealloc is not None:
                dealloc()
        self.free(oid)

    # -- persisting and resurrecting -----------------------------------------------------

    def new(self, typ: type, *args: Any, **kw: Any) -> Any:
        """Create a ``typ`` instance in the pool (one transaction: all of it or nothing)."""
        with self._transaction:
            obj = typ.__new__(typ)
            obj._p_new(self)
            obj.__init__(*args, **kw)
        return obj

    def register(self, obj: Any) -> None:
        """Record a freshly created Persistent object. If its transaction aborts, the object
        never existed: its proxy is dropped and detached, so that a use of it fails instead
        of reaching (or storing a reference to) memory that is free again."""
        oid = obj._p_oid
        self._objs[oid] = obj

        def undo() -> None:
            self._objs.pop(oid, None)
            obj._p_mm = UNDONE
        self._eng.on_abort.append(undo)

    def persist(self, obj: Any) -> int:
        """Return the oid of ``obj`` in the pool, storing it first if needed."""
        if obj is None:
            return L.OID_NONE
        if obj is True:
            return L.OID_TRUE
        if obj is False:
            return L.OID_FALSE
        mm = getattr(obj, "_p_mm", None)
        if mm is not None:
            if mm is UNDONE:
                UNDONE.fail()
            if mm is not self:
                raise ValueError(f"{type(obj).__name__} object belongs to another pool")
            return obj._p_oid
        t = type(obj)
        enc = self._encoders.get(t)
        if enc is None:
            try:
                name = class_string(t)
            except TypeError:
                name = None
            if name is None or name not in self._pickleable:
                raise TypeError(f"Don't know how to persist {class_string_or_name(t)!r}")
            enc = self._persist_pickle
        key = _value_key(obj)
        try:
            oid = self._oids.get(key)
        except TypeError:          # an unhashable pickled value: stored, not shared
            key = None
            oid = None
        if oid is not None:
            return oid
        if self._eng.in_tx():
            oid = enc(obj)
        else:
            with self._transaction:
                oid = enc(obj)
        if key is not None:
            self._cache_value(oid, obj, key)
        return oid

    def _cache_value(self, oid: int, obj: Any, key: Any) -> None:
        if len(self._values) >= _VALUE_CACHE_LIMIT:
            self._values.clear()
            self._oids.clear()
        self._values[oid] = obj
        self._oids[key] = oid
        if self._eng.stage:  # created inside a transaction that may still abort

            def undo(oid: int = oid, key: Any = key) -> None:
                self._values.pop(oid, None)
                if self._oids.get(key) == oid:
                    del self._oids[key]
            self._eng.on_abort.append(undo)

    def _purge(self, oid: int) -> None:
        self._held.discard(oid)
        v = self._values.pop(oid, None)
        if v is not None:
            key = _value_key(v)
            if self._oids.get(key) == oid:
                del self._oids[key]
        self._objs.pop(oid, None)

    def _persist_str(self, s: str) -> int:
        data = s.encode("utf-8", "surrogatepass")
        return self.alloc_object(str, 8 + len(data), bytes(8) + data)

    def _persist_bytes(self, b: bytes) -> int:
        return self.alloc_object(bytes, 8 + len(b), bytes(8) + b)

    def _persist_int(self, i: int) -> int:
        data = i.to_bytes((i.bit_length() + 8) // 8, "little", signed=True)
        return self.alloc_object(int, 8 + len(data), bytes(8) + data)

    def _persist_float(self, f: float) -> int:
        return self.alloc_object(float, 16, bytes(8) + _F64.pack(f))

    def _persist_pickle(self, obj: Any) -> int:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        return self.alloc_object(PICKLE_SENTINEL, 8 + len(data), bytes(8) + data)

    def _payload(self, oid: int) -> bytes:
        q = self._eng.q
        size = q[(oid - 16) >> 3]
        return self._eng.buf[oid + 8:oid + size].tobytes()

    def _resurrect_str(self, oid: int) -> str:
        return self._payload(oid).decode("utf-8", "surrogatepass")

    def _resurrect_bytes(self, oid: int) -> bytes:
        return self._payload(oid)

    def _resurrect_int(self, oid: int) -> int:
        return int.from_bytes(self._payload(oid), "little", signed=True)

    def _resurrect_float(self, oid: int) -> float:
        return _F64.unpack_from(self._eng.buf, oid + 8)[0]

    def _resurrect_pickle(self, oid: int) -> Any:
        return pickle.loads(self._payload(oid))

    def _resurrect_persistent(self, oid: int) -> Any:
        code = self._eng.q[(oid - 8) >> 3] >> 32
        cls = find_class(self._type_names[code]) if code else self._PersistentList
        obj = cls.__new__(cls)
        obj._p_resurrect(self, oid)
        return obj

    def _decoder(self, code: int) -> Callable[[int], Any]:
        dec = self._decoders.get(code)
        if dec is not None:
            return dec
        if code == 0:
            dec = self._resurrect_persistent
        else:
            try:
                name = self._type_names[code]
            except IndexError:
                raise PmReplicaError(errno.EINVAL, f"type code {code} is not in the pool's "
                                                   "type table") from None
            dec = {"builtins:str": self._resurrect_str, "builtins:int": self._resurrect_int,
                   "builtins:float": self._resurrect_float,
                   "builtins:bytes": self._resurrect_bytes,
                   _PICKLE_NAME: self._resurrect_pickle}.get(name, self._resurrect_persistent)
        self._decoders[code] = dec
        return dec

    def resurrect(self, oid: int) -> Any:
        """The Python object for ``oid``: a value, or a proxy of a Persistent object."""
        if oid <= L.OID_FALSE:
            if oid == L.OID_NONE:
                return None
            if oid == L.OID_TRUE:
                return True
            if oid == L.OID_FALSE:
                return False
            raise ValueError("resurrect of OID_NULL")
        v = self._values.get(oid)
        if v is not None:
            return v
        obj = self._objs.get(oid)
        if obj is not None:
            return obj
        code = self._eng.q[(oid - 8) >> 3] >> 32
        dec = self._decoder(code)
        obj = dec(oid)
        if dec is self._resurrect_persistent:
            self._objs[oid] = obj
        elif dec is not self._resurrect_pickle or type(obj).__hash__ is not None:
            self._cache_value(oid, obj, _value_key(obj))
        return obj

    def type_name_of(self, oid: int) -> str:
        """``__name__`` of the type stored at ``oid`` (for gc's type counts)."""
        code = self._eng.q[(oid - 8) >> 3] >> 32
        name = self._type_names[code]
        return name.rsplit(":", 1)[1].rsplit(".", 1)[-1]

    def is_container_code(self, code: int) -> bool:
        if self._decoder(code) is not self._resurrect_persistent:
            return False
        cls = find_class(self._type_names[code]) if code else self._PersistentList
        return hasattr(cls, "_p_traverse")

    # -- the type table ------------------------------------------------------------------

    def create_type_table(self) -> int:
        """Create the type table of a new pool (codes 0 and 1 are fixed); return its oid."""
        PL = self._PersistentList
        self._type_names = [class_string(PL), class_string(str)]
        self._type_codes = {PL: 0, str: 1}
        with self._transaction:
            table = self.new(PL, list(self._type_names))
            self.incref(table._p_oid)
        self._type_table = table
        return table._p_oid

    def load_type_table(self, oid: int) -> None:
        """Attach to the type table of an existing pool at ``oid``."""
        self._type_names = [class_string(self._PersistentList), class_string(str)]
        table = self.resurrect(oid)
        self._type_table = table
        self._type_names = [FORMER_NAMES.get(name, name) for name in table]
        self._type_codes = {}

    def persist_via_pickle(self, cls: type) -> None:
        """Store instances of ``cls`` (immutable, not a container) with pickle."""
        self._pickleable.add(class_string(cls))

    def get_type_code(self, cls: type) -> int:
        """The type table index of ``cls``, appending it (transactionally) if new."""
        code = self._type_codes.get(cls)
        if code is not None:
            return code
        name = class_string(cls)
        try:
            code = self._type_names.index(name)
        except ValueError:
            code = len(self._type_names)
            self._type_names.append(name)

            def undo(name: str = name) -> None:
                if self._type_names and self._type_names[-1] == name:
                    self._type_names.pop()
                self._type_codes = {c: i for c, i in self._type_codes.items() if i < code}
                self._decoders.pop(code, None)
            self._eng.on_abort.append(undo)
            with self._transaction:
                self._type_table.append(name)
        self._type_codes[cls] = code
        return code


def class_string_or_name(t: type) -> str:
    try:
        return class_string(t)
    except TypeError:
        return f"{t.__module__}:{t.__qualname__}"


_PICKLE_NAME = class_string(PICKLE_SENTINEL)

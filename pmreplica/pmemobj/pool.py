"""PersistentObjectPool: opening, creating, the root object, gc, close."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import struct
from collections.abc import Iterator
from typing import Any, Iterable

from ..errors import PmReplicaError
from . import layout as L
from . import redolog
from .gc import collect
from .heap import Heap
from .memory import MemoryManager, Transaction
from .txn import Engine

log = logging.getLogger("pmreplica.pmemobj")

MIN_POOL_SIZE = L.MIN_POOL_SIZE


def _poolset_class() -> Any:
    from ..poolset import PoolSet
    return PoolSet


def _is_poolset_file(path: str) -> bool:
    from ..setfile import is_poolset_file
    return is_poolset_file(path)


class PersistentObjectPool:
    """A pool of persistent Python objects in a file or a pool set (with replicas).

    ``flag``: 'w' open an existing pool, 'x' create a new one, 'c' open or create,
    'r' open read-only (changes raise OSError(EROFS); no gc). ``pool_size`` and ``mode``
    apply when a single-file pool is created (a pool set file gives its own sizes)."""

    closed = False

    def __init__(self, filename: str | os.PathLike[str], flag: str = "w",
                 pool_size: int = MIN_POOL_SIZE, mode: int = 0o666, debug: bool = False,
                 *, plugins: Iterable[Any] = ()) -> None:
        self.filename = filename
        self.debug = debug
        path = os.fspath(filename)
        if flag not in ("w", "x", "c", "r"):
            raise ValueError(f"Invalid flag value {flag!r}")
        PoolSet = _poolset_class()
        create = flag == "x"
        if flag == "c":
            create = not os.path.exists(path) or (_is_poolset_file(path) and
                                                 not _poolset_parts_exist(path))
        if create:
            is_set = os.path.exists(path) and _is_poolset_file(path)
            if not is_set and pool_size < MIN_POOL_SIZE:
                raise ValueError(f"pool size {pool_size} smaller than {MIN_POOL_SIZE}")
            if is_set:
                _check_set_size(path)
            self._ps = PoolSet.create(path, size=None if is_set else pool_size,
                                      signature=L.POOL_SIGNATURE, mode=mode,
                                      plugins=plugins)
        else:
            if not os.path.exists(path):
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
            _refuse_other_pool_types(path)
            self._ps = PoolSet.open(path, signature=L.POOL_SIGNATURE, plugins=plugins)
        try:
            self._setup(create, readonly=flag == "r")
        except BaseException:
            if hasattr(self, "_eng"):
                self._eng.release()
            self._ps.close()
            raise

    def _setup(self, create: bool, readonly: bool) -> None:
        ps = self._ps
        if create:
            geo = L.Geometry.plan(ps.data_offset, ps.size)
            self._format(geo)
        geo = L.Geometry.load(ps.buf, ps.data_offset, ps.size)
        self._geo = geo
        self._eng = eng = Engine(ps, geo, readonly=readonly)
        replayed = eng.recover()
        if replayed:
            log.debug("replayed %d log records", replayed)
        self._heap = Heap(eng, geo)
        self.mm = mm = MemoryManager(eng, self._heap, geo)
        self.lock = mm.lock
        types_oid = eng.get(geo.sb + L.SB_W_TYPES)
        if types_oid == L.OID_NULL:
            if readonly:
                raise PmReplicaError(errno.EINVAL, "object pool was never initialized")
            with mm.transaction():
                oid = mm.create_type_table()
                eng.set(geo.sb + L.SB_W_TYPES, oid)
                eng.set(geo.sb + L.SB_W_ROOT, L.OID_NONE)
                eng.set(geo.sb + L.SB_W_CLEAN, 0)
            gc_needed = False
        else:
            root = eng.get(geo.sb + L.SB_W_ROOT)
            with self._damage_is_einval():
                self._heap.header(types_oid)  # EINVAL unless both name allocated objects
                if not L.OID_NONE <= root <= L.OID_FALSE:
                    self._heap.header(root)
                mm.load_type_table(types_oid)
            gc_needed = eng.get(geo.sb + L.SB_W_CLEAN) == 0
        if readonly:
            return
        if gc_needed:
            log.info("%s was not closed cleanly: collecting orphaned objects", self.filename)
            self.gc()
        # Until close() finishes, the pool counts as not cleanly shut down.
        with mm.transaction():
            eng.set(geo.sb + L.SB_W_CLEAN, 0)
            self._heap.reclaim_empty_runs()

    def _format(self, geo: L.Geometry) -> None:
        """Write the superblock of a new pool (the rest of a new pool reads as zero)."""
        ps = self._ps
        buf = ps.buf
        zero_end = geo.log + 64
        buf[geo.sb:zero_end] = bytes(zero_end - geo.sb)
        ps.persist(geo.sb, zero_end - geo.sb)
        buf[geo.log:geo.log + redolog.CTL_SLOT] = redolog.control_slot(1, 0).tobytes()
        ps.persist(geo.log, redolog.CTL_SLOT)
        buf[geo.sb:geo.sb + L.SB_STATIC + 8] = geo.static_words()
        ps.persist(geo.sb, L.SB_STATIC + 8)

    # -- pynvm's API ---------------------------------------------------------------------

    def transaction(self) -> Transaction:
        """A context manager for a (nestable) transaction; also begin/commit/abort."""
        return self.mm.transaction()

    @property
    def root(self) -> Any:
        """The root object: everything reachable from it survives; assignable."""
        with self.lock:
            return self.mm.resurrect(self._eng.get(self._geo.sb + L.SB_W_ROOT))

    @root.setter
    def root(self, value: Any) -> None:
        mm, eng = self.mm, self._eng
        with mm.transaction():
            oid = mm.persist(value)
            mm.incref(oid)
            slot = self._geo.sb + L.SB_W_ROOT
            old = eng.get(slot)
            eng.set(slot, oid)
            mm.xdecref(old)

    def new(self, typ: type, *args: Any, **kw: Any) -> Any:
        """Create a ``typ`` instance managed by this pool (atomically)."""
        return self.mm.new(typ, *args, **kw)

    def persist_via_pickle(self, *types: type) -> None:
        """Store instances of these immutable, non-container types with pickle."""
        for t in types:
            self.mm.persist_via_pickle(t)

    def gc(self, debug: bool | None = None) -> tuple[dict[str, int], dict[str, int]]:
        """Free objects not reachable from the root (cycles, and orphans left by crashes).

        Returns ``(type_counts, gc_counts)`` as pynvm did: objects per type before the
        collection, and what was found and freed."""
        debug = self.debug if debug is None else debug
        with self.lock:
            if self._eng.depth:  # it frees in transactions of its own, from the committed state
                raise RuntimeError("gc inside a transaction")
            return self._collect(debug, closing=False)

    def _collect(self, debug: bool, closing: bool) -> tuple[dict[str, int], dict[str, int]]:
        """gc from the pool's roots: its type table and its root object."""
        sb, get = self._geo.sb, self._eng.get
        with self._damage_is_einval():
            return collect(self.mm, (get(sb + L.SB_W_TYPES), get(sb + L.SB_W_ROOT)), debug,
                           closing)

    @contextlib.contextmanager
    def _damage_is_einval(self) -> Iterator[None]:
        """What reading objects raises when the words on the media are not what was written
        (a damaged data area whose checksummed header and superblock are intact), as the
        EINVAL of a damaged pool."""
        try:
            yield
        except PmReplicaError as e:  # the heap's own checks (an oid outside it, say)
            if e.errno != errno.EINVAL:
                raise
            raise PmReplicaError(errno.EINVAL, f"{self.filename}: the object pool's data is "
                                               f"damaged: {e.strerror}") from e
        except (IndexError, KeyError, ValueError, TypeError, struct.error,
                UnicodeDecodeError) as e:
            raise PmReplicaError(errno.EINVAL, f"{self.filename}: the object pool's data is "
                                               f"damaged ({type(e).__name__}: {e})") from e

    def close(self) -> None:
        """gc, mark the pool cleanly shut down, and close it (and its replicas)."""
        if self.closed or not hasattr(self, "_ps"):
            return
        if hasattr(self, "_eng") and self._eng.abandon():
            log.warning("%s closed inside a transaction: it was rolled back", self.filename)
        with self.lock:
            if self.closed:
                return
            self.closed = True
            try:
                if hasattr(self, "_eng") and not self._eng.readonly and self._eng.broken is None:
                    self._collect(self.debug, closing=True)
                    with self.mm.transaction():
                        self._heap.reclaim_empty_runs()
                        self._eng.set(self._geo.sb + L.SB_W_CLEAN, 1)
                    with self.lock:
                        self._eng.checkpoint()      # replicas byte-identical, log empty
                        self._ps.drain()
            finally:
                if hasattr(self, "_eng"):
                    self._eng.release()
                self._ps.close()

    def __enter__(self) -> "PersistentObjectPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown or a broken pool: nothing more to do
            pass

    # -- pmreplica additions -------------------------------------------------------------

    def checkpoint(self) -> None:
        """Write every in-place change since the last checkpoint to the replicas and empty
        the log (commits are durable without it; this makes replicas byte-identical)."""
        eng = self._eng
        if eng.readonly:
            return
        with self.lock:
            if eng.depth:
                raise RuntimeError("checkpoint inside a transaction")
            eng.checkpoint()
            self._ps.drain()

    @property
    def poolset(self) -> Any:
        """The underlying :class:`pmreplica.PoolSet` (replica status, hooks)."""
        return self._ps

    @property
    def replicas(self) -> Any:
        return self._ps.replicas


#: pools other libraries make, by signature, and what opens them
_OTHER_POOLS = {b"PMEMOBJ": "a libpmemobj pool (PMDK's object store: pynvm's nvm.pmemobj "
                            "makes such pools)",
                b"PMEMLOG": "a libpmemlog pool (PMDK's log)",
                b"PMEMBLK": "a libpmemblk pool (PMDK's block store)"}


def _refuse_other_pool_types(path: str) -> None:
    """EINVAL, saying what it is and what to do, if ``path`` is a pool of another kind (a
    sound header with another signature): PoolSet would call it inconsistent and suggest
    replica-sync, which cannot help."""
    from ..header import HDR_SIZE, PoolHeader
    from ..setfile import load_set

    first = load_set(path).master.parts[0].path
    try:  # (this module's open() is pynvm's, not the builtin)
        fd = os.open(first, os.O_RDONLY | os.O_CLOEXEC)
        try:
            raw = os.pread(fd, HDR_SIZE, 0)
        finally:
            os.close(fd)
    except OSError:
        return  # PoolSet.open says what is wrong with it
    if len(raw) < HDR_SIZE or not PoolHeader.checksum_ok(raw):
        return
    sig = PoolHeader.unpack(raw).signature.rstrip(b"\0")
    if sig == L.POOL_SIGNATURE or not sig:
        return
    what = _OTHER_POOLS.get(sig, f"not an object pool (its pool type is {sig!r})")
    hint = ("; open it with pynvm (nvm.pmemobj over libpmemobj), or copy its objects into a "
            "pool made by pmreplica.pmemobj" if sig == b"PMEMOBJ" else "")
    raise PmReplicaError(errno.EINVAL, f"{path} is {what}: pmreplica.pmemobj keeps objects in "
                                       f"a format of its own and cannot open it{hint}")


def _poolset_parts_exist(path: str) -> bool:
    from ..setfile import parse
    return any(os.path.exists(p.path) for p in parse(path).master.parts)


def _check_set_size(path: str) -> None:
    from ..setfile import parse
    size = parse(path).pool_size
    if size < MIN_POOL_SIZE:
        raise ValueError(f"pool size {size} smaller than {MIN_POOL_SIZE}")


def open(filename: str | os.PathLike[str], debug: bool = False, **kw: Any
         ) -> PersistentObjectPool:
    """Open an existing pool (OSError if it does not exist); gc it if it was not closed
    cleanly."""
    return PersistentObjectPool(filename, flag="w", debug=debug, **kw)


def create(filename: str | os.PathLike[str], pool_size: int = MIN_POOL_SIZE,
           mode: int = 0o666, debug: bool = False, **kw: Any) -> PersistentObjectPool:
    """Create a new pool (OSError if it exists) of ``pool_size`` bytes, file mode ``mode``."""
    return PersistentObjectPool(filename, flag="x", pool_size=pool_size, mode=mode,
                                debug=debug, **kw)

"""The collector behind ``PersistentObjectPool.gc``: pynvm's algorithm over the heap walk.

It catalogs every object of the committed state, frees refcount-0 orphans (what a crash
between ``new()`` and the first reference leaves), traces from the roots and frees what
is left: unreachable cycles of containers, and non-containers no live object references.
Everything it needs comes from the MemoryManager's public methods and its heap's walk.
"""

from __future__ import annotations

import collections
import logging
import reprlib
from typing import Iterable

from . import layout as L
from .memory import MemoryManager

log = logging.getLogger("pmreplica.pmemobj")

#: gc frees unreachable objects in transactions of this many objects each.
GC_BATCH = 256

#: the keys of gc's counts, as pynvm named them
COUNT_KEYS = ("containers-total", "other-total", "orphans0-gced", "containers-live",
              "other-live", "collections-gced", "other-gced", "orphans1-gced")


def collect(mm: MemoryManager, roots: Iterable[int], debug: bool, closing: bool
            ) -> tuple[dict[str, int], dict[str, int]]:
    """Free what ``roots`` (oids) do not reach; return pynvm's ``(type_counts, gc_counts)``.

    ``closing``: the pool is closing, so a refcount-0 object is an orphan even if Python
    still holds a proxy of it. ``debug`` logs each object freed and checks that every
    substructure (a non-object allocation) belongs to exactly one container."""
    containers: set[int] = set()
    other: set[int] = set()
    orphans: list[int] = []
    substructures: dict[int, dict[int, list[int]]] = collections.defaultdict(dict)
    type_counts: dict[str, int] = collections.defaultdict(int)
    gc_counts: dict[str, int] = dict.fromkeys(COUNT_KEYS, 0)
    container_code: dict[int, bool] = {}
    #: refcount-0 containers Python holds a proxy of: live (they may be stored yet), and
    #: so is what they reach
    held: list[int] = []
    refcount, has_proxy = mm.committed_refcount, mm.has_proxy
    for oid, _size, type_num, code in mm.heap.allocations():
        if type_num != L.POBJECT_TYPE_NUM:
            if debug:
                substructures[type_num][oid] = []
            continue
        type_counts[mm.type_name_of(oid)] += 1
        is_container = container_code.get(code)
        if is_container is None:
            is_container = container_code[code] = mm.is_container_code(code)
        if refcount(oid) == 0:
            if closing or not has_proxy(oid):
                if debug:
                    log.debug("gc: orphan %#x", oid)
                orphans.append(oid)
            elif is_container:
                held.append(oid)
        elif is_container:
            containers.add(oid)
        else:
            other.add(oid)
    gc_counts["containers-total"] = len(containers)
    gc_counts["other-total"] = len(other)

    with mm.recording_frees() as freed:
        # Refcount-0 objects: left by a crash between creation and first reference, or
        # created and dropped (pool.new without storing the result).
        gc_counts["orphans0-gced"] = len(orphans)
        for i in range(0, len(orphans), GC_BATCH):
            with mm.transaction():
                for oid in orphans[i:i + GC_BATCH]:
                    if oid in freed:
                        continue
                    if debug:
                        log.warning("deallocating orphan (refcount 0): %#x %s",
                                    oid, reprlib.repr(mm.resurrect(oid)))
                    mm.deallocate(oid)
        containers -= freed
        other -= freed

        if debug:
            _check_substructures(mm, containers, substructures)

        live = _trace(mm, roots, containers, other, gc_counts, held)
        gc_counts["containers-live"] = len(live)

        # Unreachable containers (cycles): pin them all, drop their references, free them.
        garbage = sorted(containers)
        gc_counts["collections-gced"] = len(garbage)
        for i in range(0, len(garbage), GC_BATCH):
            batch = [o for o in garbage[i:i + GC_BATCH] if o not in freed]
            with mm.transaction():
                for oid in batch:
                    mm.incref(oid)
                for oid in batch:
                    if debug:
                        log.debug("gc: deallocating container %#x", oid)
                    mm.resurrect(oid)._p_deallocate()
                for oid in batch:
                    mm.free(oid)
        for oid in sorted(other):
            if oid in freed:
                gc_counts["other-gced"] += 1
                continue
            log.warning("Orphaned with positive refcount: %#x: %s", oid,
                        reprlib.repr(mm.resurrect(oid)))
            with mm.transaction():
                mm.free(oid)
            gc_counts["orphans1-gced"] += 1
    return dict(type_counts), gc_counts


def _trace(mm: MemoryManager, roots: Iterable[int], containers: set[int], other: set[int],
           gc_counts: dict[str, int], held: list[int]) -> list[int]:
    """Move what ``roots`` and the ``held`` containers (refcount 0, held by Python) reach
    out of ``containers`` and ``other``; return the live containers of ``containers`` (the
    ``other`` objects found live are counted in ``gc_counts``)."""
    live = []
    for root in roots:
        if root in containers:
            containers.discard(root)
            live.append(root)
        elif root in other:
            other.discard(root)
    reached = held + live
    n = 0
    while n < len(reached):
        for sub in list(mm.resurrect(reached[n])._p_traverse()):
            if sub in containers:
                containers.discard(sub)
                live.append(sub)
                reached.append(sub)
            elif sub in other:
                other.discard(sub)
                gc_counts["other-live"] += 1
        n += 1
    return live


def _check_substructures(mm: MemoryManager, containers: set[int],
                         substructures: dict[int, dict[int, list[int]]]) -> None:
    """Log substructures a container points to that are not allocated, and those that do
    not have exactly one owner (``substructures``: type_num -> oid -> owners, filled)."""
    for c in containers:
        subs = getattr(mm.resurrect(c), "_p_substructures", None)
        for sub, type_num in (subs() if subs is not None else ()):
            if sub == L.OID_NULL:
                continue
            if sub not in substructures.get(type_num, {}):
                log.error("%#x points to substructure type %s at %#x, which is not "
                          "allocated", c, type_num, sub)
            else:
                substructures[type_num][sub].append(c)
    for type_num, structs in substructures.items():
        for sub, parents in structs.items():
            if len(parents) != 1:
                log.error("substructure type %s at %#x is referenced by %d objects",
                          type_num, sub, len(parents))

"""The open-addressing table shared by PersistentDict and PersistentSet.

CPython's compact layout: an index array probed with CPython's perturbation sequence and
an entry array in insertion order, so iteration follows insertion like dict's. One table
allocation::

    [nslots][nentries][index: nslots words][entries: capacity x width words]

Index words: 0 empty, 1 deleted, k >= 2 entry k-2. Entry: hash, key oid[, value oid];
a deleted entry has key oid 0. The collection object is ``[refcnt][used][table oid]``; an
empty collection has no table. A full table is rebuilt fresh (no log) at the next insert.
"""

from __future__ import annotations

from typing import Any, Iterator

from .hashing import stable_hash

MIN_SLOTS = 8
PERTURB_SHIFT = 5
EMPTY, DUMMY = 0, 1


def capacity(nslots: int) -> int:
    return (nslots << 1) // 3


class HashTable:
    """Mixin: table access for a collection object with ``_p_mm``/``_p_oid``."""

    __slots__ = ()
    _WIDTH = 2
    _TABLE_TYPE = 0

    # -- reading -------------------------------------------------------------------------

    def _ht_table(self) -> int:
        return self._p_mm.get_u64(self._p_oid + 16)  # type: ignore[attr-defined]

    def _ht_lookup(self, table: int, key: Any, h: int) -> tuple[int, int]:
        """(entry index or -1, index slot where ``key`` is or would go)."""
        mm = self._p_mm  # type: ignore[attr-defined]
        get = mm.get_u64
        nslots = get(table)
        mask = nslots - 1
        index = table + 16
        entries = index + 8 * nslots
        esize = 8 * self._WIDTH
        i = h & mask
        perturb = h
        freeslot = -1
        while True:
            ix = get(index + 8 * i)
            if ix == EMPTY:
                return -1, (i if freeslot < 0 else freeslot)
            if ix == DUMMY:
                if freeslot < 0:
                    freeslot = i
            else:
                eoff = entries + esize * (ix - 2)
                if get(eoff) == h:
                    k = mm.resurrect(get(eoff + 8))
                    if k is key or k == key:
                        return ix - 2, i
            perturb >>= PERTURB_SHIFT
            i = (i * 5 + perturb + 1) & mask

    def _ht_find(self, key: Any) -> tuple[int, int, int]:
        """(table, entry index or -1, slot) for ``key``; table 0 when empty."""
        h = stable_hash(key)
        table = self._ht_table()
        if not table:
            return 0, -1, 0
        e, slot = self._ht_lookup(table, key, h)
        return table, e, slot

    def _ht_entry_off(self, table: int, e: int) -> int:
        nslots = self._p_mm.get_u64(table)  # type: ignore[attr-defined]
        return table + 16 + 8 * nslots + 8 * self._WIDTH * e

    def _ht_entries(self) -> list[list[int]]:
        """Live entries in insertion order, as lists of words."""
        mm = self._p_mm  # type: ignore[attr-defined]
        table = self._ht_table()
        if not table:
            return []
        nslots, nentries = mm.get_words(table, 2)
        w = self._WIDTH
        flat = mm.get_words(table + 16 + 8 * nslots, w * nentries)
        return [flat[i:i + w] for i in range(0, w * nentries, w) if flat[i + 1]]

    def _ht_key_oids(self) -> Iterator[int]:
        return (e[1] for e in self._ht_entries())

    # -- writing (inside a transaction) --------------------------------------------------

    def _ht_insert(self, table: int, slot: int, h: int, words: list[int]) -> None:
        """Add a new entry (``words`` = key oid[, value oid]) for a key known absent."""
        mm = self._p_mm  # type: ignore[attr-defined]
        oid = self._p_oid  # type: ignore[attr-defined]
        used = mm.get_u64(oid + 8)
        if table:
            nslots, nentries = mm.get_words(table, 2)
        if not table or nentries >= capacity(nslots):
            table = self._ht_rebuild(used + 1)
            nslots, nentries = mm.get_words(table, 2)
            slot = self._ht_empty_slot(table, nslots, h)
        eoff = table + 16 + 8 * nslots + 8 * self._WIDTH * nentries
        mm.set_words(eoff, [h] + words)
        mm.set_u64(table + 16 + 8 * slot, nentries + 2)
        mm.set_u64(table + 8, nentries + 1)
        mm.set_u64(oid + 8, used + 1)

    def _ht_empty_slot(self, table: int, nslots: int, h: int) -> int:
        get = self._p_mm.get_u64  # type: ignore[attr-defined]
        mask = nslots - 1
        i = h & mask
        perturb = h
        while get(table + 16 + 8 * i) != EMPTY:
            perturb >>= PERTURB_SHIFT
            i = (i * 5 + perturb + 1) & mask
        return i

    def _ht_delete(self, table: int, e: int, slot: int) -> list[int]:
        """Remove entry ``e``; return its key oid[, value oid] for the caller to decref."""
        mm = self._p_mm  # type: ignore[attr-defined]
        eoff = self._ht_entry_off(table, e)
        words = mm.get_words(eoff + 8, self._WIDTH - 1)
        mm.set_u64(table + 16 + 8 * slot, DUMMY)
        mm.set_words(eoff + 8, [0] * (self._WIDTH - 1))
        mm.set_u64(self._p_oid + 8, mm.get_u64(self._p_oid + 8) - 1)  # type: ignore[attr-defined]
        return words

    def _ht_rebuild(self, want: int) -> int:
        """Write a fresh table holding the live entries with room for ``want``; return it."""
        mm = self._p_mm  # type: ignore[attr-defined]
        live = self._ht_entries()
        nslots = MIN_SLOTS
        target = max(want, 2 * len(live))      # double, like CPython's growth rate
        while capacity(nslots) < target:
            nslots <<= 1
        cap = capacity(nslots)
        mask = nslots - 1
        index = [EMPTY] * nslots
        for n, entry in enumerate(live):
            h = entry[0]
            i = h & mask
            perturb = h
            while index[i] != EMPTY:
                perturb >>= PERTURB_SHIFT
                i = (i * 5 + perturb + 1) & mask
            index[i] = n + 2
        w = self._WIDTH
        flat = [x for entry in live for x in entry]
        words = [nslots, len(live)] + index + flat + [0] * (w * (cap - len(live)))
        new = mm.alloc(8 * len(words), self._TABLE_TYPE)
        mm.write_new_words(new, words)
        old = self._ht_table()
        mm.set_u64(self._p_oid + 16, new)  # type: ignore[attr-defined]
        mm.free(old)
        return new

    def _ht_clear(self) -> list[list[int]]:
        """Drop the table; return the live entries for the caller to decref."""
        mm = self._p_mm  # type: ignore[attr-defined]
        live = self._ht_entries()
        old = self._ht_table()
        if old:
            mm.set_words(self._p_oid + 8, (0, 0))  # type: ignore[attr-defined]
            mm.free(old)
        return live

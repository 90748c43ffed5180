"""A deterministic stream of transactions, applied to a pool or to a plain-Python model.

Transaction ``i`` draws its operations from ``random.Random(i)`` and the state left by
transactions ``1..i-1``, so the writer (a child process the crash tests kill) and the
checker (the test) agree on the expected state after any prefix without talking.
The pool's ``root["n"]`` is the number of the last committed transaction.
"""

from __future__ import annotations

import random
from typing import Any

from pmreplica import pmemobj
from pmreplica.pmemobj import layout


class Rollback(Exception):
    """Raised by transactions the workload aborts on purpose."""


class Thing(pmemobj.PersistentObject):
    """A user class, stored through the type table."""


def _value(rng: random.Random, i: int) -> Any:
    r = rng.random()
    if r < 0.3:
        return rng.randrange(-1000, 1000)
    if r < 0.55:
        return f"s{i}-{rng.randrange(100)}" * rng.randrange(1, 4)
    if r < 0.65:
        return rng.random()
    if r < 0.75:
        return bytes([i & 0xFF]) * rng.randrange(0, 3000)
    if r < 0.8:
        return rng.randrange(2 ** 100)
    if r < 0.85:
        return None
    if r < 0.95:
        return ("list", [f"e{i}.{k}" for k in range(rng.randrange(0, 6))])
    return ("huge", f"h{i}" * 40000)                   # > one chunk: a huge block


def ops_for(i: int, model: dict[str, Any]) -> tuple[list[tuple], bool]:
    """Operations of transaction ``i`` given the state before it; and whether it aborts."""
    rng = random.Random(i)
    ops: list[tuple] = []
    d, lst, st = model["d"], model["l"], model["s"]
    dkeys, llen, skeys = list(d), len(lst), sorted(st, key=repr)
    for _ in range(rng.randrange(1, 7)):
        r = rng.random()
        if r < 0.25:
            ops.append(("dset", f"k{rng.randrange(40)}", _value(rng, i)))
            if ops[-1][1] not in dkeys:
                dkeys.append(ops[-1][1])
        elif r < 0.35 and dkeys:
            k = rng.choice(dkeys)
            dkeys.remove(k)
            ops.append(("ddel", k))
        elif r < 0.5:
            ops.append(("linsert", rng.randrange(-3, llen + 3), _value(rng, i)))
            llen += 1
        elif r < 0.58 and llen:
            ops.append(("ldel", rng.randrange(llen)))
            llen -= 1
        elif r < 0.68 and llen:
            ops.append(("lset", rng.randrange(llen), _value(rng, i)))
        elif r < 0.76:
            ops.append(("sadd", f"m{rng.randrange(60)}"))
        elif r < 0.82 and skeys:
            ops.append(("sdiscard", rng.choice(skeys)))
        elif r < 0.9:
            ops.append(("oset", f"a{rng.randrange(8)}", _value(rng, i)))
        elif r < 0.95:
            ops.append(("orphan", i))
        elif r < 0.97:
            ops.append(("bulk", i, rng.randrange(200, 1500)))
            llen = ops[-1][2]
        else:
            ops.append(("dclear",))
            dkeys = []
    return ops, rng.random() < 0.1


def new_model() -> dict[str, Any]:
    return {"n": 0, "d": {}, "l": [], "s": set(), "o": {}}


def _plain(v: Any) -> Any:
    if isinstance(v, tuple) and v[0] == "list":
        return list(v[1])
    if isinstance(v, tuple) and v[0] == "huge":
        return v[1]
    return v


def apply_model(model: dict[str, Any], i: int) -> None:
    ops, aborts = ops_for(i, model)
    if aborts:
        return
    d, lst, st, obj = model["d"], model["l"], model["s"], model["o"]
    for op in ops:
        kind = op[0]
        if kind == "dset":
            d[op[1]] = _plain(op[2])
        elif kind == "ddel":
            del d[op[1]]
        elif kind == "linsert":
            lst.insert(op[1], _plain(op[2]))
        elif kind == "ldel":
            del lst[op[1]]
        elif kind == "lset":
            lst[op[1]] = _plain(op[2])
        elif kind == "sadd":
            st.add(op[1])
        elif kind == "sdiscard":
            st.discard(op[1])
        elif kind == "oset":
            obj[op[1]] = _plain(op[2])
        elif kind == "bulk":
            model["l"] = lst = [f"b{op[1]}.{k}" for k in range(op[2])]
        elif kind == "dclear":
            d.clear()
    model["n"] = i


def model_after(n: int) -> dict[str, Any]:
    model = new_model()
    for i in range(1, n + 1):
        apply_model(model, i)
    return model


def committed(i: int, model_before: dict[str, Any]) -> bool:
    return not ops_for(i, model_before)[1]


def init_pool(pool: pmemobj.PersistentObjectPool) -> None:
    with pool.transaction():
        pool.root = pool.new(pmemobj.PersistentDict, n=0, d=pool.new(pmemobj.PersistentDict),
                             l=pool.new(pmemobj.PersistentList),
                             s=pool.new(pmemobj.PersistentSet), o=pool.new(Thing))


def _pvalue(pool: pmemobj.PersistentObjectPool, v: Any) -> Any:
    if isinstance(v, tuple) and v[0] == "list":
        return pool.new(pmemobj.PersistentList, v[1])
    if isinstance(v, tuple) and v[0] == "huge":
        return v[1]
    return v


def apply_pool(pool: pmemobj.PersistentObjectPool, i: int, model: dict[str, Any],
               hook: Any = None) -> None:
    """Run transaction ``i`` on the pool (``model``: the state before it, then updated).

    ``hook(j)`` is called before operation ``j`` inside the transaction, and once more
    after the last one, before the commit."""
    ops, aborts = ops_for(i, model)
    root = pool.root
    try:
        with pool.transaction():
            d, lst, st, obj = root["d"], root["l"], root["s"], root["o"]
            for j, op in enumerate(ops):
                if hook is not None:
                    hook(j)
                kind = op[0]
                if kind == "dset":
                    d[op[1]] = _pvalue(pool, op[2])
                elif kind == "ddel":
                    del d[op[1]]
                elif kind == "linsert":
                    lst.insert(op[1], _pvalue(pool, op[2]))
                elif kind == "ldel":
                    del lst[op[1]]
                elif kind == "lset":
                    lst[op[1]] = _pvalue(pool, op[2])
                elif kind == "sadd":
                    st.add(op[1])
                elif kind == "sdiscard":
                    st.discard(op[1])
                elif kind == "oset":
                    setattr(obj, op[1], _pvalue(pool, op[2]))
                elif kind == "orphan":
                    pool.new(pmemobj.PersistentList, [f"orphan{op[1]}"])
                elif kind == "bulk":
                    root["l"] = lst = pool.new(pmemobj.PersistentList,
                                               [f"b{op[1]}.{k}" for k in range(op[2])])
                elif kind == "dclear":
                    d.clear()
            root["n"] = i
            if hook is not None:
                hook(len(ops))
            if aborts:
                raise Rollback
    except Rollback:
        pass
    apply_model(model, i)


def snapshot(pool: pmemobj.PersistentObjectPool) -> dict[str, Any]:
    """The pool's root as plain Python values, comparable with a model."""
    def plain(v: Any) -> Any:
        if isinstance(v, pmemobj.PersistentList):
            return [plain(x) for x in v]
        return v
    root = pool.root
    o = root["o"]
    return {"n": root["n"], "d": {k: plain(v) for k, v in root["d"].items()},
            "l": [plain(v) for v in root["l"]], "s": set(root["s"]),
            "o": {k: plain(v) for k, v in o._p_dict.items()}}


def assert_no_leaks(pool: pmemobj.PersistentObjectPool) -> None:
    """Everything allocated is reachable: objects from the root, raw blocks from objects."""
    _, gc_counts = pool.gc()
    assert {k: v for k, v in gc_counts.items() if k.endswith("-gced") and v} == {}
    assert gc_counts["containers-total"] == gc_counts["containers-live"]
    assert gc_counts["other-total"] == gc_counts["other-live"]
    mm, heap = pool.mm, pool._heap
    raw, owned = set(), set()
    for oid, _size, type_num, code in heap.allocations():
        if type_num != layout.POBJECT_TYPE_NUM:
            raw.add(oid)
        elif mm.is_container_code(code):
            owned.update(s for s, _ in mm.resurrect(oid)._p_substructures() if s)
    assert raw == owned

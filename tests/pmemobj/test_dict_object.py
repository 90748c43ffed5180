"""PersistentDict behaves like dict, PersistentObject like a plain object, across reopen."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pmreplica import pmemobj
from tests.helpers import ROOT


def make(ph, *args, **kw):
    ph.pool.root = ph.pool.new(pmemobj.PersistentDict, *args, **kw)
    return ph.pool.root


def test_set_get(ph) -> None:
    d = make(ph)
    d["a"] = 1
    assert d["a"] == 1
    assert ph.reopen().root["a"] == 1


def test_unknown_key(ph) -> None:
    d = make(ph)
    with pytest.raises(KeyError):
        d["a"]
    d["a"] = 1
    with pytest.raises(KeyError):
        d["aa"]
    with pytest.raises(KeyError):
        del d["b"]
    with pytest.raises(TypeError):
        d[[1]] = 2
    assert d.get("zz", 7) == 7


def test_keys_of_various_types(ph) -> None:
    data = {"a": 1, 2: 3.7, 4.1: 3, "something": "somewhere", "főo": "bàr", 7: None,
            None: "bing", True: False, False: True, b"raw": b"bytes",
            -5: "neg", 2 ** 80: "big"}
    d = make(ph)
    for key, value in data.items():
        d[key] = value
        assert d[key] == value
    d = ph.reopen().root
    assert dict(d.items()) == data
    assert d[1.0] is False          # 1.0 == True == 1: one key, as in dict


def test_keys_are_found_in_a_new_process(ph) -> None:
    """str hashes change per process; the pool's hash must not."""
    make(ph, {f"key{i}": i for i in range(50)})
    ph.pool.close()
    code = ("import sys\nfrom pmreplica import pmemobj\n"
            "with pmemobj.open(sys.argv[1]) as p:\n"
            "    assert all(p.root[f'key{i}'] == i for i in range(50))\n"
            "    p.root['from child'] = 'yes'\n")
    for seed in ("1", "2"):
        env = {"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"}
        done = subprocess.run([sys.executable, "-c", code, str(ph.path)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    ph.pool = pmemobj.open(str(ph.path))
    assert ph.pool.root["from child"] == "yes"


def test_replace_and_delete(ph) -> None:
    d = make(ph)
    d["a"] = 1
    d["a"] = "foo"
    assert ph.reopen().root["a"] == "foo"
    d = ph.pool.root
    del d["a"]
    assert d == {} and len(d) == 0


def test_iteration_keeps_insertion_order(ph) -> None:
    d = make(ph)
    for k in [45, "a", 1, "z", 0]:
        d[k] = str(k)
    del d["a"]
    d["a"] = "again"
    assert list(ph.reopen().root) == [45, 1, "z", 0, "a"]


def test_constructor_forms(ph) -> None:
    kw = dict(a=1, b=2, c=3)
    arg = (("z", 5), ("a", 7))
    assert make(ph, **kw) == kw
    assert make(ph, arg) == dict(arg)
    assert make(ph, kw) == kw
    assert make(ph, arg, **kw) == dict(arg, **kw)
    assert make(ph, kw, **dict(arg)) == dict(kw, **dict(arg))
    with pytest.raises(TypeError):
        make(ph, {}, {})


def test_repr(ph) -> None:
    data = dict(a=1, b=250, c="abc", foo="bár")
    d = make(ph, data)
    assert repr(d) == f"PersistentDict({data!r})"
    assert repr(ph.reopen().root) == f"PersistentDict({data!r})"


def test_len(ph) -> None:
    d = make(ph)
    d["a"] = 1
    d["b"] = 7
    d[999] = -1
    del d["b"]
    assert len(d) == 2
    d = ph.reopen().root
    assert len(d) == 2
    del d[999]
    del d["a"]
    assert len(d) == 0


def test_clear(ph) -> None:
    d = make(ph, a=1, b=2, c=3)
    d.clear()
    assert d == {} and len(d) == 0
    d = ph.reopen().root
    assert d == {}
    d[1] = 7
    assert d == {1: 7}


def test_mapping_methods(ph) -> None:
    d = make(ph, a=1)
    assert d.setdefault("a", 5) == 1 and d.setdefault("b", 2) == 2
    assert d.pop("a") == 1 and d.pop("a", "gone") == "gone"
    with pytest.raises(KeyError):
        d.pop("a")
    d.update({"x": 1}, y=2)
    d["z"] = 3
    assert d.popitem() == ("z", 3)
    assert sorted(d.keys()) == ["b", "x", "y"] and sorted(d.values()) == [1, 2, 2]
    assert "x" in d and "q" not in d
    assert d.copy() == {"b": 2, "x": 1, "y": 2}
    assert ph.reopen().root == {"b": 2, "x": 1, "y": 2}


def test_many_dicts_and_gc(big_ph) -> None:
    e = [dict(a="foo", b="bar"), dict(a=1, bp=3), dict(z=7, p=300), dict(l=9)]
    e += [dict(a=1, b=2, c=3, d=4) for _ in range(4, 20)]
    lst = big_ph.pool.root = big_ph.pool.new(pmemobj.PersistentList)
    for x in e:
        lst.append(big_ph.pool.new(pmemobj.PersistentDict, x))
    assert list(big_ph.reopen().root) == e
    lst = big_ph.pool.root
    for i in range(10):
        lst[i] = None
    lst = big_ph.reopen().root
    assert list(lst) == [None] * 10 + e[10:]
    assert big_ph.pool.gc()[0]["PersistentDict"] == 10
    big_ph.pool.root = None
    assert big_ph.reopen().root is None
    assert "PersistentDict" not in big_ph.pool.gc()[0]


def test_resize_and_shrink(ph) -> None:
    d = make(ph)
    for i in range(3):
        d[i] = i
    d = ph.reopen().root
    for i in range(3, 40):
        d[i] = i
    assert ph.reopen().root == {i: i for i in range(40)}
    d = ph.pool.root
    for i in list(range(7)) + list(range(10, 40)):
        del d[i]
    assert ph.reopen().root == {i: i for i in range(7, 10)}
    for i in range(1000):              # churn: deleted entries must be reclaimed
        ph.pool.root[f"t{i}"] = i
        del ph.pool.root[f"t{i}"]
    assert ph.reopen().root == {i: i for i in range(7, 10)}


# -- objects -------------------------------------------------------------------------------

class Foo(pmemobj.PersistentObject):
    class_attr = 10

    def no_fubar(self, x):
        return x + 1


class Foo2(pmemobj.PersistentObject):
    def _v__init__(self):
        self._v_bar = "baz"


class Foo3(pmemobj.PersistentObject):
    def __init__(self, bing="this is a test"):
        self.bar = None
        self.bing = bing


def make_obj(ph, cls, *args, **kw):
    ph.pool.root = ph.pool.new(cls, *args, **kw)
    return ph.pool.root


def test_object_attributes(ph) -> None:
    o = make_obj(ph, Foo)
    with pytest.raises(AttributeError):
        o.bar
    assert not hasattr(o, "foo")
    o.bar = 1
    o.baz = "bing"
    o.bar += 1
    assert hasattr(o, "bar") and hasattr(o, "_p_mm")
    o = ph.reopen().root
    assert isinstance(o, Foo) and (o.bar, o.baz) == (2, "bing")
    del o.bar
    with pytest.raises(AttributeError):
        o.bar
    with pytest.raises(AttributeError):
        del o.foo
    o = ph.reopen().root
    assert not hasattr(o, "bar") and o.baz == "bing"


def test_object_class_attributes_and_methods(ph) -> None:
    o = make_obj(ph, Foo)
    assert o.class_attr == 10 and o.no_fubar(10) == 11
    o.class_attr += 10
    o = ph.reopen().root
    assert o.class_attr == 20 and Foo.class_attr == 10 and o.no_fubar(1) == 2


def test_object_dict_attribute(ph) -> None:
    o = make_obj(ph, Foo)
    o.bar = ph.pool.new(pmemobj.PersistentDict)
    o.bar["a"] = "b"
    assert ph.reopen().root.bar == {"a": "b"}


def test_object_volatile_init(ph) -> None:
    o = make_obj(ph, Foo2)
    assert o._v_bar == "baz"
    o._v_bar = "changed"
    assert ph.reopen().root._v_bar == "baz"


def test_object_init_runs_once(ph) -> None:
    o = make_obj(ph, Foo3, bing="given")
    assert o.bar is None and o.bing == "given"
    o.bing = "changed"
    assert ph.reopen().root.bing == "changed"


def test_object_gc(ph) -> None:
    o = make_obj(ph, Foo3)
    o.friend = ph.pool.new(Foo3)
    o.friend.friend = o                      # a cycle through attribute dicts
    counts = ph.pool.gc()[0]
    assert counts["Foo3"] == 2
    ph.pool.root = None
    del o
    type_counts, gc_counts = ph.pool.gc()
    assert gc_counts["collections-gced"] >= 2
    assert "Foo3" not in ph.pool.gc()[0]


# -- a Persistent type of one's own, on the MemoryManager's low-level API ------------------

class Pair:
    """``[refcnt][count][other oid]``: a counter and one reference, laid out by hand."""

    def _p_new(self, mm):
        self._p_mm = mm
        self._p_oid = mm.alloc_object(type(self), 24, bytes(8) + (0).to_bytes(8, "little")
                                      + pmemobj.MemoryManager.OID_NULL.to_bytes(8, "little"))
        mm.register(self)

    def _p_resurrect(self, mm, oid):
        self._p_mm, self._p_oid = mm, oid

    def _p_traverse(self):
        other = self._p_mm.get_u64(self._p_oid + 16)
        return [other] if other else []

    def _p_deallocate(self):
        self._p_mm.xdecref(self._p_mm.get_u64(self._p_oid + 16))

    def bump(self):
        mm = self._p_mm
        with mm.transaction():
            mm.set_u64(self._p_oid + 8, mm.get_u64(self._p_oid + 8) + 1)

    @property
    def count(self):
        return self._p_mm.get_u64(self._p_oid + 8)

    @property
    def other(self):
        oid = self._p_mm.get_u64(self._p_oid + 16)
        return self._p_mm.resurrect(oid) if oid else None

    @other.setter
    def other(self, value):
        mm = self._p_mm
        with mm.transaction():
            oid = mm.persist(value)
            mm.incref(oid)
            mm.xdecref(mm.get_u64(self._p_oid + 16))
            mm.set_u64(self._p_oid + 16, oid)


def test_custom_persistent_type(ph) -> None:
    pool = ph.pool
    pair = pool.root = pool.new(Pair)
    pair.bump()
    pair.bump()
    pair.other = pool.new(pmemobj.PersistentList, ["linked"])
    with pytest.raises(RuntimeError, match="outside of a transaction"):
        pool.mm.set_u64(pair._p_oid + 8, 99)           # writes need a transaction
    pair = ph.reopen().root
    assert isinstance(pair, Pair) and pair.count == 2 and pair.other == ["linked"]
    type_counts, _ = ph.pool.gc()
    assert type_counts["Pair"] == 1 and type_counts["PersistentList"] == 2
    del pair                          # a live proxy would keep the object (as an orphan)
    ph.pool.root = None
    assert "Pair" not in ph.pool.gc()[0] and ph.pool.gc()[0]["PersistentList"] == 1

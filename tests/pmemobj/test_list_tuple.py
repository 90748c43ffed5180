"""PersistentList and PersistentTuple behave like list and tuple, across reopen."""

from __future__ import annotations

import pytest

from pmreplica import pmemobj


def make(ph, typ, arg):
    ph.pool.root = ph.pool.new(typ, arg)
    return ph.pool.root


# -- list ----------------------------------------------------------------------------------

def test_insert_positions(ph) -> None:
    lst = make(ph, pmemobj.PersistentList, [])
    expected: list[str] = []
    for index, value in [(0, "b"), (-1, "a"), (2, "c"), (-10, "z"), (10, "y")]:
        lst.insert(index, value)
        expected.insert(index, value)
        assert lst == expected
        lst = ph.reopen().root
        assert lst == expected


def test_getitem_setitem_delitem(ph) -> None:
    lst = make(ph, pmemobj.PersistentList, ["a", "b", "c"])
    assert [lst[0], lst[1], lst[2], lst[-1]] == ["a", "b", "c", "c"]
    for bad in (3, -4, 10, -10):
        with pytest.raises(IndexError):
            lst[bad]
        with pytest.raises(IndexError):
            lst[bad] = "z"
        with pytest.raises(IndexError):
            del lst[bad]
    lst[1] = "z"
    lst[-3] = "y"
    assert ph.reopen().root == ["y", "z", "c"]
    lst = ph.pool.root
    del lst[1]
    assert lst == ["y", "c"]
    del lst[-2]
    del lst[0]
    assert ph.reopen().root == []


def test_len_append_across_reopen(ph) -> None:
    lst = make(ph, pmemobj.PersistentList, [])
    for i in range(6):
        assert len(lst) == i
        lst = ph.reopen().root
        assert len(lst) == i
        lst.append("a")


def test_growth_and_shifts(ph) -> None:
    lst = make(ph, pmemobj.PersistentList, [])
    ref: list[int] = []
    for i in range(300):
        lst.insert(i // 3, i)
        ref.insert(i // 3, i)
    assert list(lst) == ref
    for i in range(0, 250, 7):
        del lst[i % len(lst)]
        del ref[i % len(ref)]
    assert list(ph.reopen().root) == ref


def test_slices(ph) -> None:
    lst = make(ph, pmemobj.PersistentList, list(range(10)))
    ref = list(range(10))
    assert lst[2:5] == ref[2:5] and lst[::-2] == ref[::-2]
    lst[2:5] = ["a", "b"]
    ref[2:5] = ["a", "b"]
    del lst[::3]
    del ref[::3]
    lst[::2] = [None] * len(ref[::2])
    ref[::2] = [None] * len(ref[::2])
    with pytest.raises(ValueError):
        lst[::2] = [1]
    assert list(ph.reopen().root) == ref


def test_mixins_and_extras(ph) -> None:
    lst = make(ph, pmemobj.PersistentList, [3, 1, 2])
    lst.extend([5, 4])
    lst += [0]
    assert lst.pop() == 0 and lst.pop(0) == 3
    lst.remove(5)
    assert 4 in lst and 9 not in lst
    assert lst.index(2) == 1 and lst.count(1) == 1
    lst.reverse()
    assert lst == [4, 2, 1]
    lst.sort()
    assert lst == [1, 2, 4]
    lst.sort(key=lambda v: -v)
    assert list(reversed(lst)) == [1, 2, 4]
    assert ph.reopen().root == [4, 2, 1]
    assert repr(ph.pool.root) == "PersistentList([4, 2, 1])"
    with pytest.raises(TypeError):
        hash(ph.pool.root)


def test_clear(ph) -> None:
    lst = make(ph, pmemobj.PersistentList, [1, 3, 2])
    lst.clear()
    assert lst == []
    lst.append(1)
    assert ph.reopen().root == [1]


def test_eq(ph) -> None:
    lst = make(ph, pmemobj.PersistentList, [])
    assert lst == []
    lst.append(ph.pool.new(pmemobj.PersistentList))
    lst.append(ph.pool.new(pmemobj.PersistentList))
    assert lst == [[], []] and lst[0] == lst[1]
    lst[0].extend([1, 3, 2])
    lst[1].extend([1, 3, 2])
    assert lst[0] == lst[1] == [1, 3, 2]
    assert lst[0] != [1] and lst[0] != [1, 2, 3] and lst[0] != (1, 3, 2)
    lst[0].append(5)
    assert lst[0] != lst[1]
    assert lst[1] < lst[0]


def test_repr_recursive(ph) -> None:
    lst = make(ph, pmemobj.PersistentList, ["a"])
    lst.append(lst)
    assert repr(lst) == "PersistentList(['a', ...])"
    lst.pop()


def test_iteration_while_deleting_is_safe(ph) -> None:
    lst = make(ph, pmemobj.PersistentList, [str(i) for i in range(600)])
    seen = []
    for v in lst:
        seen.append(v)
        if len(lst) > 300:
            del lst[0]
    assert all(isinstance(v, str) for v in seen)
    assert len(lst) == 300


# -- tuple ---------------------------------------------------------------------------------

def test_tuple_is_immutable(ph) -> None:
    tpl = make(ph, pmemobj.PersistentTuple, ["a", "b", "c"])
    for op in (lambda: tpl.insert(0, "a"), lambda: tpl.append("a"), tpl.clear,
               lambda: tpl.__setitem__(1, "z"), lambda: tpl.__setitem__(10, "z"),
               lambda: tpl.__delitem__(1)):
        with pytest.raises(TypeError):
            op()
    tpl = ph.reopen().root
    with pytest.raises(TypeError):
        tpl[1] = "z"
    assert tpl == ("a", "b", "c")


def test_tuple_access(ph) -> None:
    tpl = make(ph, pmemobj.PersistentTuple, ["a", "b", "c"])
    assert (tpl[0], tpl[1], tpl[2], tpl[-1]) == ("a", "b", "c", "c")
    assert tpl[1:] == ("b", "c")
    for bad in (3, -4, 10, -10):
        with pytest.raises(IndexError):
            tpl[bad]
    assert repr(tpl) == "PersistentTuple(('a', 'b', 'c'))"
    assert repr(ph.reopen().root) == "PersistentTuple(('a', 'b', 'c'))"


@pytest.mark.parametrize("n", range(6))
def test_tuple_len(ph, n) -> None:
    tpl = make(ph, pmemobj.PersistentTuple, list(range(n)))
    assert len(tpl) == n
    assert len(ph.reopen().root) == n


def test_tuple_eq_and_hash(ph) -> None:
    t1 = make(ph, pmemobj.PersistentTuple, [1, 3, 2])
    assert t1 == (1, 3, 2)
    t2 = ph.pool.new(pmemobj.PersistentTuple, [1, 3, 2])
    assert t1 == t2 and hash(t1) == hash((1, 3, 2))
    assert t1 != ph.pool.new(pmemobj.PersistentTuple, [1, 2, 3])
    d = ph.pool.new(pmemobj.PersistentDict)
    ph.pool.root = d
    d[t2] = "by tuple"                 # hashable: usable as a key, found by a plain tuple
    assert ph.reopen().root[(1, 3, 2)] == "by tuple"

"""PersistentSet and PersistentFrozenSet behave like set and frozenset."""

from __future__ import annotations

import pytest

from pmreplica import pmemobj


class PassThru(Exception):
    pass


def check_pass_thru():
    raise PassThru
    yield 1  # pragma: no cover


KINDS = [pmemobj.PersistentSet, pmemobj.PersistentFrozenSet]
WORD, OTHER = "simsalabim", "madagascar"
LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
FORMS = [set, frozenset, dict.fromkeys, str, list, tuple]


@pytest.fixture
def mk(big_ph):
    """Make a set of the parametrized kind, kept alive by the root list."""
    big_ph.pool.root = big_ph.pool.new(pmemobj.PersistentList)

    def make(kind, items=()):
        s = big_ph.pool.new(kind, items)
        big_ph.pool.root.append(s)
        return s
    make.ph = big_ph
    return make


@pytest.mark.parametrize("kind", KINDS)
def test_basics(mk, kind) -> None:
    s = mk(kind, WORD)
    assert sorted(s) == sorted(set(WORD)) and len(s) == len(set(WORD))
    full = mk(kind, LETTERS)
    assert all(c in full for c in LETTERS) and "!" not in full
    with pytest.raises(PassThru):
        kind(check_pass_thru())
    root = mk.ph.reopen().root
    assert root[0] == set(WORD) and type(root[0]) is kind


@pytest.mark.parametrize("kind", KINDS)
def test_algebra_methods(mk, kind) -> None:
    s = mk(kind, WORD)
    for name, op in [("union", set.union), ("intersection", set.intersection),
                     ("difference", set.difference),
                     ("symmetric_difference", set.symmetric_difference)]:
        res = getattr(s, name)(OTHER)
        assert type(res) is kind and res == op(set(WORD), set(OTHER)), name
        for form in FORMS:
            got = getattr(mk(kind, "abcba"), name)(form("cdc"))
            assert got == op(set("abcba"), set(form("cdc"))), (name, form)
    assert s == set(WORD)                        # unchanged
    assert s.union("ef", "fg") == set(WORD) | set("efg")
    assert mk(kind, "abcba").intersection("cbcf", "bag") == {"b"}
    assert mk(kind, "abcba").difference("a", "b") == {"c"}
    assert mk(kind, [0, "", None]).difference("x") == {0, "", None}
    x = mk(kind, [])
    assert x.union({1}, x, {2}) == mk(kind, [1, 2])


@pytest.mark.parametrize("kind", KINDS)
def test_operators_take_sets_only(mk, kind) -> None:
    s = mk(kind, WORD)
    for op, fn in [("|", set.union), ("&", set.intersection), ("-", set.difference),
                   ("^", set.symmetric_difference)]:
        for other in (set(OTHER), frozenset(OTHER), mk(kind, OTHER)):
            res = eval(f"s {op} other")
            assert res == fn(set(WORD), set(OTHER)) and type(res) is kind
        with pytest.raises(TypeError):
            eval(f"s {op} OTHER")
    assert set(OTHER) | s == set(OTHER) | set(WORD)     # reflected: a plain set


@pytest.mark.parametrize("kind", KINDS)
def test_comparisons(mk, kind) -> None:
    p, q, r = mk(kind, "ab"), mk(kind, "abcde"), mk(kind, "def")
    assert p < q and p <= q and q <= q and q > p and q >= p
    assert not (q < r or q <= r or q > r or q >= r)
    assert mk(kind, "a").issubset("abc") and mk(kind, "abc").issuperset("a")
    assert not mk(kind, "a").issubset("cbs") and not mk(kind, "cbs").issuperset("ab")
    s = mk(kind, WORD)
    assert s == set(WORD) and s == frozenset(WORD) and (s == WORD) is False
    assert s != set(OTHER) and (s != WORD) is True
    for larg in ("", "a", "ab", "abc", "ababac", "cdc", "cc", "efgfe", "ccb", "ef"):
        s1 = mk(kind, larg)
        for rarg in ("", "a", "cdc", "ef"):
            for form in FORMS:
                assert s1.isdisjoint(form(rarg)) is (not set(larg) & set(form(rarg)))


def test_set_mutation(mk) -> None:
    s = mk(pmemobj.PersistentSet, WORD)
    s.add("Q")
    assert "Q" in s
    s.remove("a")
    assert "a" not in s
    with pytest.raises(KeyError) as ei:
        s.remove((1,))
    assert ei.value.args[0] == (1,)
    key = mk(pmemobj.PersistentSet, [3, 4])
    with pytest.raises(KeyError) as ei:
        s.remove(key)
    assert ei.value.args[0] is key
    with pytest.raises(TypeError):
        s.remove([])
    s.discard("Q")
    s.discard("not there")
    with pytest.raises(TypeError):
        s.discard([])
    with pytest.raises(TypeError):
        hash(s)
    popped = [s.pop() for _ in range(len(s))]
    assert set(popped) == set(WORD) - {"a"}
    with pytest.raises(KeyError):
        s.pop()
    s.update("xyz", [1])
    s |= {2}
    s -= {"x"}
    s &= {"y", "z", 1, 2, 3}
    s ^= {3, "z"}
    assert s == {"y", 1, 2, 3}
    s.clear()
    assert s == set() and len(s) == 0
    s.add(5)
    assert mk.ph.reopen().root[0] == {5}


def test_frozenset_is_immutable_and_hashable(mk) -> None:
    f = mk(pmemobj.PersistentFrozenSet, "abc")
    with pytest.raises(AttributeError):
        f.add("d")
    with pytest.raises(AttributeError):
        f.discard("a")
    assert hash(f) == hash(frozenset("abc"))
    s = mk(pmemobj.PersistentSet, [f])
    assert frozenset("abc") in s and f in s


def test_set_churn_and_gc(mk) -> None:
    s = mk(pmemobj.PersistentSet)
    for i in range(500):
        s.add(f"k{i}")
        if i % 3:
            s.discard(f"k{i}")
    assert s == {f"k{i}" for i in range(0, 500, 3)}
    root = mk.ph.reopen().root
    assert root[0] == {f"k{i}" for i in range(0, 500, 3)}
    root[0].clear()
    type_counts, _ = mk.ph.pool.gc()
    assert type_counts["str"] == 3           # the type table's names only

"""PersistentObjectPool: pynvm's documented behaviours (flags, root, transactions, gc) and
what pmreplica adds (read-only mode, thread safety, EBUSY, clear errors)."""

from __future__ import annotations

import errno
import gzip
import logging
import subprocess
import threading
from decimal import Decimal
from pathlib import Path

import pytest

from pmreplica import pmemobj
from tests.helpers import run_python, run_threads


class NotPersistable:
    pass


# -- creating and opening ------------------------------------------------------------------

def test_create_open_close(pool_dir: Path) -> None:
    fn = str(pool_dir / "p")
    pool = pmemobj.create(fn)
    assert pool.filename == fn
    pool.close()
    pool.close()                       # a second close is harmless
    pool = pmemobj.open(fn)
    assert pool.root is None
    pool.close()


def test_create_refuses_existing_file(pool_dir: Path) -> None:
    fn = pool_dir / "p"
    pmemobj.create(str(fn)).close()
    before = fn.read_bytes()
    with pytest.raises(OSError) as ei:
        pmemobj.create(str(fn))
    assert ei.value.errno == errno.EEXIST
    assert fn.read_bytes() == before
    with pytest.raises(OSError):
        pmemobj.PersistentObjectPool(str(fn), flag="x")


def test_open_missing_file(pool_dir: Path) -> None:
    with pytest.raises(OSError) as ei:
        pmemobj.open(str(pool_dir / "nope"))
    assert ei.value.errno == errno.ENOENT
    with pytest.raises(OSError):                 # the default flag is 'w'
        pmemobj.PersistentObjectPool(str(pool_dir / "nope"))
    assert not (pool_dir / "nope").exists()


def test_a_libpmemobj_pool_is_named_as_such(pool_dir: Path, pmempool: str) -> None:
    """Not "inconsistent, run replica-sync": it is another library's pool."""
    fn = pool_dir / "pmdk.obj"
    made = subprocess.run([pmempool, "create", "obj", str(fn)], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    with pytest.raises(OSError) as ei:
        pmemobj.open(str(fn))
    assert ei.value.errno == errno.EINVAL
    msg = str(ei.value)
    assert msg.startswith(f"{fn} is a libpmemobj pool") and "pynvm" in msg, msg
    assert "replica-sync" not in msg


def test_a_directory_is_not_a_pool(pool_dir: Path) -> None:
    with pytest.raises(OSError) as ei:
        pmemobj.open(str(pool_dir))
    assert ei.value.errno == errno.EISDIR and "is a directory" in str(ei.value)


def test_log_to_routes_records_to_pynvms_logger(ph) -> None:
    """Code written for pynvm configures or captures the logger nvm.pmemobj."""
    got: list[logging.LogRecord] = []
    catcher = logging.Handler(logging.DEBUG)
    catcher.emit = got.append  # type: ignore[method-assign]
    theirs = logging.getLogger("nvm.pmemobj")
    theirs.addHandler(catcher)
    pmemobj.log_to("nvm.pmemobj")
    try:
        ph.pool.new(pmemobj.PersistentList)
        ph.pool.gc(debug=True)
    finally:
        pmemobj.log_to("pmreplica.pmemobj")
        theirs.removeHandler(catcher)
    assert any("orphan" in r.getMessage() for r in got)
    assert logging.getLogger("pmreplica.pmemobj").propagate    # and undone


def test_flag_c_creates_then_opens(pool_dir: Path) -> None:
    fn = str(pool_dir / "p")
    pool = pmemobj.PersistentObjectPool(fn, flag="c")
    pool.root = 10
    pool.close()
    pool = pmemobj.PersistentObjectPool(fn, flag="c")
    assert pool.root == 10
    pool.close()


def test_bad_flag(pool_dir: Path) -> None:
    with pytest.raises(ValueError, match="Invalid flag"):
        pmemobj.PersistentObjectPool(str(pool_dir / "p"), flag="q")


def test_small_pool_size(pool_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"size ?\d+ smaller than %d" % pmemobj.MIN_POOL_SIZE):
        pmemobj.create(str(pool_dir / "p"), pmemobj.MIN_POOL_SIZE - 1)
    assert not (pool_dir / "p").exists()


def test_mode_is_applied(pool_dir: Path) -> None:
    fn = pool_dir / "p"
    pmemobj.create(str(fn), mode=0o600).close()
    assert fn.stat().st_mode & 0o777 == 0o600


def test_not_an_object_pool(pool_dir: Path) -> None:
    fn = pool_dir / "junk"
    fn.write_bytes(b"x" * (8 << 20))
    with pytest.raises(OSError):
        pmemobj.open(str(fn))
    assert fn.read_bytes() == b"x" * (8 << 20)


def test_type_table_names_the_public_classes(pool_dir: Path) -> None:
    """The pool names built-in types by their public path, not by the module holding
    them, so that moving a class between this package's modules keeps pools readable."""
    fn = pool_dir / "p"
    with pmemobj.create(str(fn)) as pool:
        pool.root = pool.new(pmemobj.PersistentDict, {"s": pool.new(pmemobj.PersistentSet)})
    image = fn.read_bytes()
    for name in ("PersistentList", "PersistentDict", "PersistentSet"):
        assert f"pmreplica.pmemobj:{name}".encode() in image
    assert b"pmreplica.pmemobj.dict:" not in image and b"pmreplica.pmemobj.set:" not in image


def test_a_pool_made_before_the_modules_were_renamed_opens(pool_dir: Path) -> None:
    """data/pool-before-rename.gz was made by the release before this package's modules
    took pynvm's names (its type table says pmreplica.pmemobj.pdict:PersistentDict ...):
    it opens, reads and takes new objects of those types without a second table entry."""
    fn = pool_dir / "old"
    fn.write_bytes(gzip.decompress((Path(__file__).parent / "data" /
                                    "pool-before-rename.gz").read_bytes()))
    assert b"pmreplica.pmemobj.pdict:PersistentDict" in fn.read_bytes()
    with pmemobj.open(str(fn)) as pool:
        root = pool.root
        assert list(root["list"]) == [1, "two", 3.0]
        assert set(root["set"]) == {1, 2, 3} and set(root["frozen"]) == {"a", "b"}
        assert tuple(root["tuple"]) == (1, "x") and root["nested"][0]["k"] == "v"
        root["more"] = pool.new(pmemobj.PersistentSet, {4})
        root["list"].append(pool.new(pmemobj.PersistentDict, {"n": 1}))
    image = fn.read_bytes()
    assert b"pmreplica.pmemobj:PersistentSet" not in image  # the old entry was used
    assert b"pmreplica.pmemobj:PersistentDict" not in image
    with pmemobj.open(str(fn)) as pool:
        assert set(pool.root["more"]) == {4} and pool.root["list"][3]["n"] == 1


def test_context_manager_closes(pool_dir: Path) -> None:
    fn = str(pool_dir / "p")
    with pmemobj.create(fn) as pool:
        pool.root = "kept"
    assert pool.closed
    with pmemobj.open(fn) as pool:
        assert pool.root == "kept"


def test_second_open_is_ebusy(pool_dir: Path) -> None:
    fn = str(pool_dir / "p")
    with pmemobj.create(fn):
        with pytest.raises(OSError) as ei:
            pmemobj.open(fn)
        assert ei.value.errno == errno.EBUSY
        assert "already open in this process" in str(ei.value)  # not "another process"


def test_implicit_close_on_del(pool_dir: Path) -> None:
    fn = str(pool_dir / "p")
    pool = pmemobj.create(fn)
    pool.root = 5
    del pool
    with pmemobj.open(fn) as pool:
        assert pool.root == 5


# -- values --------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [5, -7, 2 ** 200, -(2 ** 70), 0, 10.5, -0.0, float("inf"),
                                   "abcde", "abő", "", "\udcff", b"\x00bytes\xff", b""])
def test_immutable_root_values(ph, value) -> None:
    ph.pool.root = value
    assert ph.pool.root == value and type(ph.pool.root) is type(value)
    root = ph.reopen().root
    assert root == value and type(root) is type(value)
    if isinstance(value, float):
        assert str(root) == str(value)


@pytest.mark.parametrize("value", [None, True, False])
def test_singletons_keep_identity(ph, value) -> None:
    ph.pool.root = value
    assert ph.pool.root is value
    assert ph.reopen().root is value


def test_equal_values_of_different_types_stay_apart(ph) -> None:
    pool = ph.pool
    pool.root = pool.new(pmemobj.PersistentList, [1, 1.0, True, 0.0, -0.0, "1", b"1"])
    vals = list(ph.reopen().root)
    assert [type(v) for v in vals] == [int, float, bool, float, float, str, bytes]
    assert str(vals[4]) == "-0.0"


def test_unknown_type_is_refused(ph) -> None:
    with pytest.raises(TypeError, match="on't know how.*NotPersistable"):
        ph.pool.root = NotPersistable()
    assert ph.pool.root is None


def test_persist_via_pickle(ph) -> None:
    ph.pool.persist_via_pickle(Decimal)
    ph.pool.root = Decimal("120.00075")
    pool = ph.reopen()
    assert pool.root == Decimal("120.00075") and type(pool.root) is Decimal


def test_cached_int_is_not_an_id(ph) -> None:
    pool = ph.pool
    root = pool.root = pool.new(pmemobj.PersistentList)
    pid = id(pool.root)
    pool.root.append(pid)
    assert pool.root is root
    assert pool.root[0] == pid


def test_object_of_another_pool_is_refused(ph, pool_dir: Path) -> None:
    with pmemobj.create(str(pool_dir / "other")) as other:
        lst = other.new(pmemobj.PersistentList)
        with pytest.raises(ValueError, match="another pool"):
            ph.pool.root = lst


# -- transactions --------------------------------------------------------------------------

def test_non_context_commit(ph) -> None:
    trans = ph.pool.transaction()
    trans.begin()
    ph.pool.root = 10
    trans.commit()
    assert ph.pool.root == 10
    assert ph.reopen().root == 10


def test_non_context_abort_raises_and_resets(ph) -> None:
    trans = ph.pool.transaction()
    trans.begin()
    ph.pool.root = 10
    with pytest.raises(OSError) as ei:
        trans.abort(errno.ECANCELED)
    assert ei.value.errno == errno.ECANCELED
    assert ph.pool.root is None
    assert ph.reopen().root is None


def test_context_commit(ph) -> None:
    with ph.pool.transaction():
        ph.pool.root = 10
    assert ph.pool.root == 10
    assert ph.reopen().root == 10


def test_context_abort_raises_and_resets(ph) -> None:
    with pytest.raises(OSError) as ei:
        with ph.pool.transaction() as trans:
            ph.pool.root = 10
            trans.abort(errno.ECANCELED)
    assert ei.value.errno == errno.ECANCELED
    assert ph.pool.root is None
    pool = ph.reopen()
    assert pool.root is None
    with pool.transaction():                    # the machinery is usable again
        pool.root = 10
    assert pool.root == 10


def test_changes_after_abort_in_context_are_refused(ph) -> None:
    with pytest.raises(OSError):
        with ph.pool.transaction() as trans:
            trans.abort()
            with pytest.raises(RuntimeError, match="aborted"):
                ph.pool.root = 1
    assert ph.pool.root is None


def test_exception_aborts_and_propagates(ph) -> None:
    pool = ph.pool
    pool.root = pool.new(pmemobj.PersistentDict, a=1)
    with pytest.raises(KeyError, match="boo"):
        with pool.transaction():
            pool.root["a"] = 2
            pool.root["b"] = pool.new(pmemobj.PersistentList, [1, 2, 3])
            del pool.root["a"]
            raise KeyError("boo")
    assert pool.root == {"a": 1}
    with pool.transaction():
        pool.root["c"] = 3
    assert ph.reopen().root == {"a": 1, "c": 3}


def test_non_context_commit_inside_context_aborts(ph) -> None:
    with pytest.raises(RuntimeError, match="Non-context commit"):
        with ph.pool.transaction() as trans:
            ph.pool.root = 10
            trans.commit()
    assert ph.pool.root is None
    with ph.pool.transaction():
        ph.pool.root = 10
    assert ph.pool.root == 10


def test_abort_and_commit_outside_transaction(ph) -> None:
    trans = ph.pool.transaction()
    ph.pool.root = 10
    with pytest.raises(RuntimeError, match="abort.*outside.*trans"):
        trans.abort()
    with pytest.raises(RuntimeError, match="commit.*outside.*trans"):
        trans.commit()
    assert ph.pool.root == 10


@pytest.mark.parametrize("end, error", [
    ("abort", OSError),          # an abort at any level
    ("commit", RuntimeError),    # a non-context commit inside a context: an error
], ids=["abort", "context-commit-error"])
def test_nested_abort_or_commit_error_aborts_everything(ph, end, error) -> None:
    pool = ph.pool
    with pytest.raises(error):
        with pool.transaction():
            pool.root = 10
            with pool.transaction():
                pool.root = 20
                with pool.transaction() as trans:
                    pool.root = 30
                    getattr(trans, end)()
    assert pool.root is None
    with pool.transaction():
        pool.root = 10
    assert pool.root == 10


def test_nested_commit_is_durable_only_with_the_outer(ph) -> None:
    pool = ph.pool
    pool.root = pool.new(pmemobj.PersistentList)
    with pytest.raises(ZeroDivisionError):
        with pool.transaction():
            with pool.transaction():
                pool.root.append("inner")
            assert list(pool.root) == ["inner"]     # visible inside the transaction
            1 / 0
    assert list(pool.root) == []
    assert list(ph.reopen().root) == []


def test_transaction_depth(ph) -> None:
    trans = ph.pool.transaction()
    assert trans.depth == 0
    with trans:
        with trans:
            assert trans.depth == 2
        assert trans.depth == 1
    assert trans.depth == 0


def test_aborted_new_objects_vanish(ph) -> None:
    pool = ph.pool
    counts_before = pool.gc()[0]
    with pytest.raises(ValueError):
        with pool.transaction():
            pool.root = pool.new(pmemobj.PersistentDict, {"k": pool.new(pmemobj.PersistentSet,
                                                                          "abc")})
            raise ValueError
    assert pool.gc()[0] == counts_before


def test_pop_and_reinsert_keeps_the_object(ph) -> None:
    pool = ph.pool
    pool.root = pool.new(pmemobj.PersistentList)
    pool.root.append(pool.new(pmemobj.PersistentList, ["inner"]))
    node = pool.root.pop()               # refcount 0, but Python holds it: not freed
    pool.root.append(node)
    assert ph.reopen().root == [["inner"]]


@pytest.mark.parametrize("damage", ["type table oid", "root oid", "root not an oid",
                                    "first heap chunk"])
def test_a_damaged_data_area_is_einval(pool_dir: Path, damage: str) -> None:
    """Words of the data area that are no longer what was written (the checksummed header
    and superblock intact) make open fail with EINVAL naming the pool, not an IndexError
    or a wrong object."""
    from pmreplica.pmemobj import layout as L
    path = pool_dir / "p"
    with pmemobj.create(str(path)) as pool:
        pool.root = pool.new(pmemobj.PersistentDict, {"a": pool.new(pmemobj.PersistentList, [1])})
        geo = pool._geo
    at, data = {"type table oid": (geo.sb + L.SB_W_TYPES, (1 << 40).to_bytes(8, "little")),
                "root oid": (geo.sb + L.SB_W_ROOT, (1 << 40).to_bytes(8, "little")),
                "root not an oid": (geo.sb + L.SB_W_ROOT, (5).to_bytes(8, "little")),
                "first heap chunk": (geo.heap, bytes(L.CHUNK))}[damage]
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(data)
    with pytest.raises(OSError) as e:
        pmemobj.open(str(path)).close()
    assert e.value.errno == errno.EINVAL
    assert f"{path}: the object pool's data is damaged" in str(e.value)


def test_an_object_made_in_an_aborted_transaction_cannot_be_used(ph) -> None:
    """The object never existed: its proxy fails at every use (ValueError), and storing it
    stores nothing, where it once stored a reference to free memory."""
    pool = ph.pool
    pool.root = pool.new(pmemobj.PersistentDict)
    with pytest.raises(RuntimeError):
        with pool.transaction():
            item = pool.new(pmemobj.PersistentList, ["a", "b"])
            pool.root["item"] = item
            raise RuntimeError("the application's failure")
    for use in (lambda: item.append("c"), lambda: len(item), lambda: repr(item),
                lambda: pool.root.__setitem__("kept", item)):
        with pytest.raises(ValueError, match="created in a transaction that aborted"):
            use()
    pool.root["other"] = pool.new(pmemobj.PersistentList, [1, 2, 3])
    assert dict(ph.reopen().root) == {"other": [1, 2, 3]}


def test_read_only_open_of_a_pool_whose_log_holds_commits(pool_dir: Path) -> None:
    """A replica taken on its own before a checkpoint keeps its last commits in its log: a
    read-only open shows them (strings, numbers, new objects, as a read-write open does)
    and leaves its file as it was."""
    from pmreplica.promote import promote
    from tests.helpers import write_set
    path = write_set(pool_dir / "objs.set", f"16M {pool_dir}/master", "REPLICA",
                     f"16M {pool_dir}/replica")
    alone = pool_dir / "alone.pool"
    with pmemobj.create(str(path)) as pool:
        pool.root = pool.new(pmemobj.PersistentDict)
        pool.checkpoint()
        pool.root["greeting"] = "hello, replica"
        pool.root["numbers"] = pool.new(pmemobj.PersistentList, [12345, 2.5, b"bytes"])
        alone.write_bytes((pool_dir / "replica").read_bytes())
    promote(alone, force=True)
    before = alone.read_bytes()
    with pmemobj.PersistentObjectPool(str(alone), flag="r") as pool:
        assert pool.root == {"greeting": "hello, replica", "numbers": [12345, 2.5, b"bytes"]}
    assert alone.read_bytes() == before


# -- gc ------------------------------------------------------------------------------------

def _assert_collected_nothing(gc_counts: dict[str, int]) -> None:
    assert {k: v for k, v in gc_counts.items() if k.endswith("-gced") and v} == {}


def test_gc_type_counts(ph) -> None:
    pool = ph.pool
    type_counts, _ = pool.gc(debug=True)
    # the type table is a PersistentList of the two bootstrap type names
    assert type_counts == {"PersistentList": 1, "str": 2}
    pool.root = pool.new(pmemobj.PersistentList, [1, "a", 3.6, 3])
    type_counts, _ = pool.gc(debug=True)
    assert type_counts == {"PersistentList": 2, "int": 2, "str": 5, "float": 1}


def test_gc_root_immutable_assignment(ph) -> None:
    pool = ph.pool
    pool.root = 12
    before = pool.gc(debug=True)
    pool.root = 15
    after = pool.gc(debug=True)
    assert before == after
    _assert_collected_nothing(after[1])


def test_gc_root_container_assignment(ph) -> None:
    pool = ph.pool
    pool.root = pool.new(pmemobj.PersistentList, [1, 2])
    before = pool.gc(debug=True)
    pool.root = pool.new(pmemobj.PersistentList, [3, 4])
    after = pool.gc(debug=True)
    assert before == after
    _assert_collected_nothing(after[1])


def test_gc_collects_orphan(ph) -> None:
    ph.pool.new(pmemobj.PersistentList)
    _, gc_counts = ph.pool.gc()
    assert gc_counts["orphans0-gced"] == 1
    _assert_collected_nothing(ph.pool.gc()[1])


def test_gc_keeps_orphan_that_python_still_holds(ph) -> None:
    lst = ph.pool.new(pmemobj.PersistentList, [1])
    _, gc_counts = ph.pool.gc()
    assert gc_counts["orphans0-gced"] == 0
    ph.pool.root = lst
    assert ph.reopen().root == [1]


def test_gc_keeps_what_an_object_python_holds_reaches(ph) -> None:
    """A refcount-0 object Python holds (popped, or built before it is stored) is live, and
    so is everything it reaches: storing it after a gc stores it whole."""
    pool = ph.pool
    pool.root = pool.new(pmemobj.PersistentDict)
    pool.root["queue"] = pool.new(pmemobj.PersistentList, [
        pool.new(pmemobj.PersistentList, [pool.new(pmemobj.PersistentDict, {"job": "A"})])])
    popped = pool.root["queue"].pop()
    built = pool.new(pmemobj.PersistentDict)
    built["items"] = pool.new(pmemobj.PersistentList, ["a", "b"])
    _assert_collected_nothing(pool.gc(debug=True)[1])
    pool.checkpoint()  # what gc freed would be reused from here
    pool.root["done"], pool.root["built"] = popped, built
    pool.root["filler"] = pool.new(pmemobj.PersistentDict, {"unrelated": "value"})
    del popped, built
    root = ph.reopen().root
    assert root["done"] == [{"job": "A"}] and root["built"] == {"items": ["a", "b"]}


def test_a_popped_object_is_freed_once_python_drops_it(ph) -> None:
    """pop() returns a proxy of an object with no reference left in the pool: the object is
    freed by the first commit after the proxy is gone, so a bounded queue runs for ever;
    one stored again meanwhile stays."""
    pool = ph.pool
    pool.root = pool.new(pmemobj.PersistentList, [pool.new(pmemobj.PersistentList)])
    queue = pool.root[0]
    for i in range(3000):  # about 3 MiB of payload through a queue of ten, in an 8 MiB pool
        queue.append(pool.new(pmemobj.PersistentDict, {"payload": "x" * 1000 + str(i)}))
        if len(queue) > 10:
            queue.pop(0)
    kept = queue.pop()
    pool.checkpoint()  # a commit with the proxy alive: kept
    pool.root.append(kept)
    del kept
    pool.root.append(1)  # a commit with the proxy gone: stored again, not freed
    _, gc_counts = pool.gc(debug=True)
    assert gc_counts["orphans0-gced"] <= 1, gc_counts  # the last popped: no commit since
    assert len(queue) == 9 and ph.reopen().root[1]["payload"] == "x" * 1000 + "2999"


def test_gc_inside_a_transaction_is_refused(ph) -> None:
    """gc works on the committed state in transactions of its own: inside a transaction it
    is refused (RuntimeError, as checkpoint is), and the transaction is undone whole."""
    pool = ph.pool
    pool.root = pool.new(pmemobj.PersistentDict)
    with pytest.raises(RuntimeError, match="gc inside a transaction"):
        with pool.transaction():
            pool.root["holder"] = pool.new(pmemobj.PersistentList, ["precious"])
            pool.gc()
    assert ph.reopen().root == {}


def test_gc_debug_logs_orphans(ph, caplog) -> None:
    ph.pool.new(pmemobj.PersistentList)
    with caplog.at_level(logging.WARNING, logger="pmreplica.pmemobj"):
        ph.pool.gc(debug=True)
    assert any("orphan" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("kind", ["list", "dict"])
def test_gc_collects_cycles(ph, kind) -> None:
    pool = ph.pool
    if kind == "list":
        pool.root = pool.new(pmemobj.PersistentList)
        pool.root.append(pool.new(pmemobj.PersistentList))
        pool.root.append(pool.new(pmemobj.PersistentList))
        pool.root[0].append(pool.root[1])
        pool.root[1].append(pool.root[0])
        name, total = "PersistentList", 4
    else:
        pool.root = pool.new(pmemobj.PersistentDict)
        pool.root["a"] = pool.new(pmemobj.PersistentDict)
        pool.root["b"] = pool.new(pmemobj.PersistentDict)
        pool.root["a"]["b"] = pool.root["b"]
        pool.root["b"]["a"] = pool.root["a"]
        name, total = "PersistentDict", 3
    type_counts, gc_counts = pool.gc()
    assert type_counts[name] == total and gc_counts["collections-gced"] == 0
    pool.root.clear()
    type_counts, gc_counts = pool.gc(debug=True)
    assert type_counts[name] == total and gc_counts["collections-gced"] == 2
    type_counts, gc_counts = pool.gc()
    assert type_counts[name] == total - 2
    _assert_collected_nothing(gc_counts)


def test_gc_unreferenced_new_objects(ph) -> None:
    pool = ph.pool
    pool.new(pmemobj.PersistentList)
    pool.new(pmemobj.PersistentDict)
    type_counts, gc_counts = pool.gc()
    assert type_counts["PersistentList"] == 2 and type_counts["PersistentDict"] == 1
    assert gc_counts["orphans0-gced"] == 2
    type_counts, gc_counts = pool.gc()
    assert type_counts["PersistentList"] == 1 and "PersistentDict" not in type_counts
    assert gc_counts["orphans0-gced"] == 0


def test_gc_runs_on_close(ph) -> None:
    ph.pool.new(pmemobj.PersistentList)
    ph.pool.new(pmemobj.PersistentDict)
    type_counts, gc_counts = ph.reopen().gc()
    assert type_counts["PersistentList"] == 1 and "PersistentDict" not in type_counts
    assert gc_counts["orphans0-gced"] == 0


def test_gc_runs_on_open_after_unclean_exit(pool_dir: Path) -> None:
    fn = str(pool_dir / "p")
    pmemobj.create(fn).close()
    # a process that leaves an orphan and exits without closing the pool
    done = run_python(
        "import os, sys\n"
        "from pmreplica import pmemobj\n"
        "pool = pmemobj.open(sys.argv[1])\n"
        "pool.root = pool.new(pmemobj.PersistentList, ['kept'])\n"
        "pool.new(pmemobj.PersistentDict, a=1)\n"
        "os._exit(0)\n", fn)
    assert done.returncode == 0, done.stderr
    with pmemobj.open(fn) as pool:
        type_counts, gc_counts = pool.gc()
        assert "PersistentDict" not in type_counts
        assert gc_counts["orphans0-gced"] == 0
        assert pool.root == ["kept"]


def test_no_gc_on_open_after_clean_close(ph, monkeypatch) -> None:
    ph.pool.root = ph.pool.new(pmemobj.PersistentDict)
    ph.pool.close()
    called = []
    monkeypatch.setattr(pmemobj.PersistentObjectPool, "gc",
                        lambda self, debug=None: called.append(1))
    ph.pool = pmemobj.open(str(ph.path))
    assert called == []


def test_large_transaction_spills_the_log(ph) -> None:
    pool = ph.pool
    n = 16000
    strings = [str(i) for i in range(n)]
    pool.root = pool.new(pmemobj.PersistentList, strings)
    pool.root.append(pool.new(pmemobj.PersistentList, strings))   # each string twice
    spills = pool._eng.spills
    with pool.transaction():
        for i in range(0, n, 2):
            pool.root[i] = i       # ~8000 slots and ~8000 refcounts: more than the log area
    assert pool._eng.spills == spills + 1
    root = ph.reopen().root
    assert root[:4] == [0, "1", 2, "3"] and root[n - 1] == str(n - 1)
    assert len(root) == n + 1 and root[n][:2] == ["0", "1"]


def test_reclaimed_run_serves_no_allocation_before_its_checkpoint(ph) -> None:
    pool = ph.pool
    pool.root = pool.new(pmemobj.PersistentList, [b"%04d" % i + b"x" * 3000 for i in range(9)])
    pool.root.clear()
    pool.checkpoint()                                 # the 3 KiB run is empty now
    with pool.transaction():
        assert pool._heap.reclaim_empty_runs() >= 1
    pool.root.extend([b"%04d" % i + b"y" * 3000 for i in range(9)])
    del pool.root[:5]                                 # frees in the new run
    assert [v[:4] for v in ph.reopen().root] == [b"0005", b"0006", b"0007", b"0008"]
    _assert_collected_nothing(ph.pool.gc()[1])


def test_freed_memory_is_reused_after_checkpoints(ph) -> None:
    """Churn far beyond the pool size: frees come back (at checkpoints, or when an
    allocation finds the pool full)."""
    pool = ph.pool
    pool.root = pool.new(pmemobj.PersistentDict)
    for i in range(400):
        pool.root[i % 3] = b"%06d" % i * 5000          # 30 KB each, 12 MB in all
    assert ph.reopen().root[399 % 3] == b"%06d" % 399 * 5000


def test_pool_full_is_memoryerror_and_loses_nothing(ph) -> None:
    pool = ph.pool
    pool.root = pool.new(pmemobj.PersistentList)
    with pytest.raises(MemoryError) as ei:
        with pool.transaction():
            for _ in range(10000):
                pool.root.append(b"%05d" % len(pool.root) + b"x" * 4000)
    assert ei.value.errno == errno.ENOMEM
    assert list(pool.root) == []
    pool.root.append("still works")
    assert list(ph.reopen().root) == ["still works"]


# -- read-only mode ------------------------------------------------------------------------

def test_read_only_mode(ph) -> None:
    ph.pool.root = ph.pool.new(pmemobj.PersistentDict, a=[1] and "x")
    ph.pool.close()
    before = ph.path.read_bytes()
    pool = pmemobj.PersistentObjectPool(str(ph.path), flag="r")
    assert pool.root == {"a": "x"}
    with pytest.raises(OSError) as ei:
        pool.root["b"] = 1
    assert ei.value.errno == errno.EROFS
    with pytest.raises(OSError):
        pool.root = 1
    pool.close()
    assert ph.path.read_bytes() == before
    ph.pool = pmemobj.open(str(ph.path))


# -- threads -------------------------------------------------------------------------------

def test_concurrent_transactions_are_serialized(big_ph) -> None:
    pool = big_ph.pool
    pool.root = pool.new(pmemobj.PersistentDict, counter=0, log=pool.new(pmemobj.PersistentList))
    def worker(n: int) -> None:
        for i in range(150):
            with pool.transaction():
                c = pool.root["counter"]
                pool.root["log"].append(f"{n}:{i}")
                pool.root["counter"] = c + 1

    errors = run_threads(worker, 4)
    assert errors == []
    assert pool.root["counter"] == 600          # no lost update: no interleaving
    assert len(pool.root["log"]) == 600
    root = big_ph.reopen().root
    assert root["counter"] == 600 and len(set(root["log"])) == 600


def test_reader_never_sees_uncommitted_changes(ph) -> None:
    pool = ph.pool
    pool.root = pool.new(pmemobj.PersistentList, [0, 0])
    inside, release = threading.Event(), threading.Event()
    seen: list[list[int]] = []

    def writer() -> None:
        with pool.transaction():
            pool.root[0] = 1
            inside.set()
            release.wait(5)
            pool.root[1] = 1

    def reader() -> None:
        seen.append(list(pool.root))

    w = threading.Thread(target=writer)
    w.start()
    assert inside.wait(5)
    r = threading.Thread(target=reader)
    r.start()
    r.join(0.2)
    assert r.is_alive()                  # blocked while the transaction is open
    release.set()
    w.join()
    r.join()
    assert seen == [[1, 1]]


def test_transaction_must_end_in_its_thread(ph) -> None:
    trans = ph.pool.transaction()
    trans.begin()
    ph.pool.root = 1
    errs: list[BaseException] = []

    def other() -> None:
        try:
            trans.commit()
        except RuntimeError as e:
            errs.append(e)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert len(errs) == 1 and "outside of transaction" in str(errs[0])
    trans.commit()
    assert ph.reopen().root == 1


def test_close_inside_a_transaction_rolls_it_back(ph, caplog) -> None:
    ph.pool.root = "committed"
    trans = ph.pool.transaction()
    trans.begin()
    ph.pool.root = "never committed"
    with caplog.at_level(logging.WARNING, logger="pmreplica.pmemobj"):
        ph.pool.close()
    assert any("rolled back" in r.getMessage() for r in caplog.records)
    assert ph.reopen().root == "committed"


def test_objects_of_a_closed_pool_say_so(pool_dir: Path) -> None:
    with pmemobj.create(str(pool_dir / "p")) as pool:
        pool.root = pool.new(pmemobj.PersistentDict, a=1)
        d = pool.root
    with pytest.raises(ValueError, match="pool is closed") as ei:
        d["a"]
    assert ei.value.errno == errno.EBADF
    with pytest.raises(OSError, match="pool is closed"):
        d["b"] = 2

"""A full pool: a transaction that frees space commits, a refused transaction changes
nothing and leaves the pool usable, and freed small-object space serves a large value
without a reopen."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pmreplica import pmemobj

POOL_SIZE = 8 << 20


def fill(pool: pmemobj.PersistentObjectPool, batch: int = 200) -> int:
    """Small dicts into ``root`` until the pool refuses a batch; returns how many."""
    root = pool.root
    n = 0
    while True:
        try:
            with pool.transaction():
                for i in range(n, n + batch):
                    root[i] = pool.new(pmemobj.PersistentDict, a=i)
        except pmemobj.PoolFullError:
            if batch == 1:
                return n
            batch = max(1, batch // 8)
            continue
        n += batch


@pytest.fixture(scope="module")
def full_template() -> Iterator[tuple[Path, int]]:
    """A full pool, closed: made once, copied for each test."""
    d = Path(tempfile.mkdtemp(prefix="pmreplica-full-", dir="/dev/shm"))
    try:
        with pmemobj.create(str(d / "full.pool"), pool_size=POOL_SIZE) as pool:
            pool.root = pool.new(pmemobj.PersistentDict)
            n = fill(pool)
        assert n > 15000                          # the pool holds what it should
        yield d / "full.pool", n
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def full(full_template: tuple[Path, int], pool_dir: Path):
    """The full pool, open (its copy in this test's directory)."""
    template, n = full_template
    shutil.copyfile(template, pool_dir / "full.pool")
    pool = pmemobj.open(str(pool_dir / "full.pool"))
    try:
        yield pool, n
    finally:
        pool.close()


def test_clearing_a_full_pool_commits(full, pool_dir: Path) -> None:
    """Freeing ~18,000 dicts in one transaction on a full pool: the record of all those
    frees used to outgrow the log, had nowhere to spill, and left the pool broken (EIO on
    every write until reopen, and the same failure again after it)."""
    pool, n = full
    pool.root.clear()
    assert len(pool.root) == 0
    pool.root["after"] = "done"                   # the pool takes writes
    pool.close()
    with pmemobj.open(str(pool_dir / "full.pool")) as pool:
        assert dict(pool.root) == {"after": "done"}
        assert fill(pool) >= n - 10                # the space is all back


def test_a_refused_transaction_changes_nothing(full, pool_dir: Path) -> None:
    """A transaction whose commit record fits neither the log nor the (no) free space is
    refused with PoolFullError before anything is written: the pool keeps its state and
    takes the next transaction."""
    pool, n = full
    root = pool.root
    with pytest.raises(pmemobj.PoolFullError, match="nothing was changed"):
        with pool.transaction():
            for i in range(n):                    # one logged word per dict, no space freed
                root[i]["a"] = True
    assert pool._eng.broken is None
    assert root[7]["a"] == 7 and root[n - 1]["a"] == n - 1
    del root[0]                                   # a transaction that fits commits
    pool.close()
    with pmemobj.open(str(pool_dir / "full.pool")) as pool:
        assert len(pool.root) == n - 1 and pool.root[n - 1]["a"] == n - 1


@pytest.mark.parametrize("maintenance", [False, True], ids=["at-once", "after-gc-checkpoint"])
def test_freed_small_objects_serve_a_large_value(full, maintenance: bool) -> None:
    """Space freed by small objects holds a value of half the pool without a reopen: the
    runs emptied go back to the free chunks when an allocation needs them (or at gc and
    checkpoint)."""
    pool, _ = full
    pool.root.clear()
    if maintenance:
        pool.gc()
        pool.checkpoint()
    pool.root["big"] = b"x" * (POOL_SIZE // 2)
    assert len(pool.root["big"]) == POOL_SIZE // 2

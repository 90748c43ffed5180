"""Fixtures of the object store tests: a pool on tmpfs that each test reopens at will."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pmreplica import pmemobj


class PoolHandle:
    """A pool file and its open pool; ``reopen()`` closes and opens it again."""

    def __init__(self, path: Path, **create_kw: object) -> None:
        self.path = path
        self.pool = pmemobj.create(str(path), **create_kw)

    def reopen(self, **kw: object) -> pmemobj.PersistentObjectPool:
        self.pool.close()
        self.pool = pmemobj.open(str(self.path), **kw)
        return self.pool

    def close(self) -> None:
        self.pool.close()


@pytest.fixture
def ph(pool_dir: Path) -> Iterator[PoolHandle]:
    """A fresh 8 MiB pool (debug on, as pynvm's container tests had it)."""
    h = PoolHandle(pool_dir / "objs.pool", debug=True)
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def big_ph(pool_dir: Path) -> Iterator[PoolHandle]:
    """A 32 MiB pool for tests that make many objects."""
    h = PoolHandle(pool_dir / "big.pool", pool_size=32 << 20, debug=True)
    try:
        yield h
    finally:
        h.close()

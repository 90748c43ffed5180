"""replica-sync reaches every replica through its plugin's target, the local ones included:
a plugin that wraps the local plugin's target sees every read and write of a repair, in the
crash-safe order (:mod:`pmreplica.sync`); a target without the header-page capability
serving the same kind of replica is still repaired and verified through the contract."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from pmreplica import hookimpl, sync
from pmreplica.header import HDR_SIZE
from pmreplica.plugins import local
from pmreplica.setfile import LocalReplica, load_set
from pmreplica.target import HeaderPageKeeper

from .sync_harness import M, PoolLayout, fill

#: what a target without the header-page capability (nor a mapping to lend) lacks
KEEPER_METHODS = ("header_pages", "restore", "clear_header", "write_headers", "store_record",
                  "write_through", "map_replica")


class Recorder:
    """The local plugin's target, every call recorded as (replica index, method)."""

    def __init__(self, target, index: int, calls: list, hide_keeper: bool) -> None:
        self._target, self._index, self._calls = target, index, calls
        self._hide = hide_keeper

    def __getattr__(self, name: str):
        if self._hide and name in KEEPER_METHODS:
            raise AttributeError(name)
        value = getattr(self._target, name)
        if not callable(value):
            return value

        def call(*args, **kwargs):
            self._calls.append((self._index, name))
            return value(*args, **kwargs)

        return call


class WrappingPlugin:
    """Serves local replicas through the local plugin's target, recorded; ``plain``: the
    replicas other than the master without the header-page capability (a third-party
    target written to the bare contract)."""

    def __init__(self, plain: bool = False) -> None:
        self.calls: list[tuple[int, str]] = []
        self.plain = plain

    @hookimpl
    def pmreplica_open_replica(self, spec, index, poolset, create):
        if not isinstance(spec, LocalReplica):
            return None
        target = local.pmreplica_open_replica(spec=spec, index=index, poolset=poolset,
                                              create=create)
        return Recorder(target, index, self.calls, self.plain and index > 0)

    def of(self, index: int) -> list[str]:
        return [name for i, name in self.calls if i == index]


def _layout(d: Path) -> PoolLayout:
    layout = PoolLayout(d, replicas=[[4 * M]])
    fill(layout.path, layout.env(), seed=3)
    return layout


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 1]))


def test_sync_repairs_a_local_replica_only_through_its_target(pool_dir):
    layout = _layout(pool_dir)
    expected = layout.data(0)
    layout.parts[1][0][1].unlink()
    plugin = WrappingPlugin()

    rep = sync.check(layout.path, plugins=[plugin])
    assert rep.exit_code == 4 and rep.replicas[1].health == "broken"
    # the broken replica's pages were read through its target, never opened
    assert plugin.of(1) == ["header_pages", "close"]
    assert "header_pages" in plugin.of(0)

    plugin.calls.clear()
    rep = sync.sync(layout.path, plugins=[plugin])
    assert rep.exit_code == 1 and rep.replicas[1].result == "repaired"
    assert layout.data(1) == expected
    calls = plugin.calls
    first = calls.index
    # rule 2: the stale mark recorded in the master before replica 1 is touched; rule 3:
    # its storage restored, its header cleared before its data, headers written once the
    # data is durable, its record copy stored after
    assert first((0, "store_record")) < first((1, "restore")) < first((1, "clear_header")) \
        < first((1, "write_through")) < first((1, "write_headers")) \
        < first((1, "store_record"))
    # its data made durable once, after the last write and before its headers
    assert (1, "flush") not in calls and calls.count((1, "drain")) == 1
    last_write = max(i for i, c in enumerate(calls) if c == (1, "write_through"))
    assert last_write < calls.index((1, "drain")) < first((1, "write_headers"))
    # the source was mapped through its target (MappedTarget), not from its files
    assert "map_replica" in plugin.of(0)
    assert sync.check(layout.path).status == "healthy"


def test_a_target_without_the_capability_is_repaired_and_verified(pool_dir):
    layout = _layout(pool_dir)
    expected = layout.data(0)
    layout.parts[1][0][1].unlink()
    plugin = WrappingPlugin(plain=True)

    rep = sync.sync(layout.path, plugins=[plugin])
    assert rep.exit_code == 1 and rep.replicas[1].action == "recreate and copy"
    assert layout.data(1) == expected
    # recreated (remove hook, create) and relinked through the bare contract
    names = plugin.of(1)
    assert "create" in names and "set_attr" in names and "flush" in names
    assert not set(names) & set(KEEPER_METHODS)

    off = HDR_SIZE + 3 * M + 777
    _flip(layout.parts[1][0][1], off)
    plugin.calls.clear()
    rep = sync.check(layout.path, verify=True, plugins=[plugin])
    block = 64 << 10
    assert rep.exit_code == 4 and rep.replicas[1].differing == [(off // block * block, block)]
    assert "read" in plugin.of(1)  # no digests of its own: verified by reading
    rep = sync.sync(layout.path, verify=True, repair=True, plugins=[plugin])
    assert rep.exit_code == 1 and rep.replicas[1].result == "repaired"
    assert layout.data(1) == expected
    assert sync.check(layout.path, verify=True).exit_code == 0


class BuggyWriter(WrappingPlugin):
    """Replica 1's target raises a RuntimeError when written to: a plugin's bug."""

    @hookimpl
    def pmreplica_open_replica(self, spec, index, poolset, create):
        target = super().pmreplica_open_replica(spec, index, poolset, create)
        if index == 1 and target is not None:
            def write_through(*_args):
                raise RuntimeError("bug in write_through")
            target.write_through = write_through
        return target


def test_a_plugin_bug_fails_its_replica_not_the_run(pool_dir):
    """A target raising something other than an OSError during a repair fails that replica
    with EIO and its message (exit status 4, problems left), as an open pool takes it; the
    run goes on and reports, instead of ending in a traceback and the exit status that
    means "repaired"."""
    layout = _layout(pool_dir)
    layout.parts[1][0][1].unlink()
    rep = sync.sync(layout.path, plugins=[BuggyWriter()])
    assert rep.exit_code == 4 and rep.replicas[1].result == "failed"
    assert "RuntimeError: bug in write_through" in rep.replicas[1].error
    assert "EIO" in rep.replicas[1].error
    assert sync.sync(layout.path).exit_code == 1  # repaired by the local plugin after all


def test_local_target_outside_a_pool_set(pool_dir):
    """The local target is built from what a TargetHost gives: without a buffer to copy
    from it still reads its pages, and refuses to open for writing with an OSError."""
    layout = _layout(pool_dir)
    set_file = load_set(str(layout.path))

    class Bare:  # a host without ``buf``
        size = set_file.pool_size
        sparse = False

        def __init__(self) -> None:
            self.set_file = set_file

        def report_progress(self, *args) -> None:
            pass

    target = local.pmreplica_open_replica(spec=set_file.replicas[1], index=1,
                                          poolset=Bare(), create=False)
    assert isinstance(target, HeaderPageKeeper)
    pages = target.header_pages()
    assert pages.problems == () and len(pages.pages[0]) == HDR_SIZE
    with pytest.raises(OSError) as e:
        target.open()
    assert e.value.errno == errno.EINVAL and "no buffer to copy from" in str(e.value)
    target.close()

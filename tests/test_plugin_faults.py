"""A replica's plugin raising anything fails that replica and nothing else: an OSError as it
is, anything else (a bug, a wrong return type) as EIO; the pool, replica-sync and the
command line go on, every target is closed exactly once, and the CLI says one line. Each
test drives a fault-injecting plugin over real pool files."""

from __future__ import annotations

import errno
import uuid
from pathlib import Path

import pytest

from pmreplica import PoolSet, ReplicaError, cli, hookimpl, plugin_manager, sync
from pmreplica.header import HDR_SIZE
from pmreplica.plugins import local
from pmreplica.setfile import LocalReplica, RemoteReplica

from .helpers import write_set
from .sync_harness import M, PoolLayout, fill

#: what the wrapped local target hides unless asked to keep it: the header-page and mapping
#: capabilities, so that replica-sync reaches it as a third-party target (open, stat, read)
KEEPER_METHODS = ("header_pages", "restore", "clear_header", "write_headers", "store_record",
                  "write_through", "map_replica")
#: a fault that makes the call return this instead of raising (a plugin's wrong return)
WRONG_TYPE = "wrong type"


class FaultyTarget:
    """The local plugin's target, every call recorded as (replica index, method), and the
    faults of its plugin applied: before the call, the exception given is raised (or the
    call returns an object of no use, for WRONG_TYPE)."""

    def __init__(self, plugin: FaultyPlugin, target, index: int) -> None:
        self._plugin, self._target, self._index = plugin, target, index
        self.closes = 0

    def __getattr__(self, name: str):
        if self._plugin.plain and name in KEEPER_METHODS:
            raise AttributeError(name)
        value = getattr(self._target, name)
        if not callable(value):
            return value

        def call(*args, **kwargs):
            self._plugin.calls.append((self._index, name))
            self.closes += name == "close"
            fault = self._plugin.fault(name, self._index)
            if fault is WRONG_TYPE:
                return {"not": "what the contract says"}
            return value(*args, **kwargs)

        return call


class FaultyPlugin:
    """A fault-injecting plugin: serves local replicas other than the master through
    :class:`FaultyTarget` (``plain``: without the header-page capability). ``faults`` maps
    ``"method@index"`` (a target method, or ``open_replica`` for the hook) to the exception
    to raise, or WRONG_TYPE; each applies ``times`` times (None: always). The hooks it is
    told are recorded too."""

    def __init__(self, faults: dict | None = None, plain: bool = True,
                 times: int | None = None) -> None:
        self.faults = dict(faults or {})
        self.plain = plain
        self.times = times
        self.calls: list[tuple[int, str]] = []
        self.hooks: list[tuple] = []
        self.targets: list[FaultyTarget] = []

    def fault(self, name: str, index: int):
        fault = self.faults.get(f"{name}@{index}")
        if fault is None:
            return None
        if self.times is not None:
            self.times -= 1
            if self.times == 0:
                self.faults.clear()
        if isinstance(fault, BaseException):
            raise fault
        return fault

    def of(self, index: int) -> list[str]:
        return [name for i, name in self.calls if i == index]

    @hookimpl
    def pmreplica_open_replica(self, spec, index, poolset, create):
        if not isinstance(spec, LocalReplica) or index == 0:
            return None
        self.hooks.append(("open_replica", index, create))
        if self.fault("open_replica", index) is WRONG_TYPE:
            return object()
        target = local.pmreplica_open_replica(spec=spec, index=index, poolset=poolset,
                                              create=create)
        self.targets.append(FaultyTarget(self, target, index))
        return self.targets[-1]

    @hookimpl
    def pmreplica_replica_failed(self, replica, error):
        self.hooks.append(("failed", replica.index, error))

    @hookimpl
    def pmreplica_replica_restored(self, replica):
        self.hooks.append(("restored", replica.index))

    @hookimpl
    def pmreplica_sync_progress(self, replica, phase, done, total):
        self.hooks.append(("progress", replica.index, phase, done, total))

    def failed(self) -> dict[int, OSError]:
        return {h[1]: h[2] for h in self.hooks if h[0] == "failed"}

    def assert_closed_once(self) -> None:
        """Every target the plugin handed out was closed, once (opened or not)."""
        assert self.targets and [t.closes for t in self.targets] == [1] * len(self.targets), \
            self.calls


def bug(what: str = "a bug") -> RuntimeError:
    return RuntimeError(f"plugin: {what}")


def eio(what: str = "EIO") -> ReplicaError:
    return ReplicaError(errno.EIO, f"plugin: {what}")


def two_replicas(d: Path) -> Path:
    return write_set(d / "p.set", f"4M {d}/m", "REPLICA", f"4M {d}/r1", "REPLICA",
                     f"4M {d}/r2")


def _created(d: Path) -> Path:
    """A pool set of a master and two local replicas, written once, closed."""
    path = two_replicas(d)
    with PoolSet.create(path) as pool:
        pool.buf[HDR_SIZE:HDR_SIZE + 5] = b"first"
        pool.persist(HDR_SIZE, 5)
    return path


# -- an open pool ---------------------------------------------------------------------------

@pytest.mark.parametrize("second", ["store_generation@2", "close@1"])
def test_a_bug_while_another_replica_fails_stays_in_the_pool(pool_dir, second):
    """Replica 1 fails a persist (EIO); the new generation is then stored on replica 2,
    and replica 1's target closed: a bug of the plugin in either fails that replica (EIO)
    or is logged, and never reaches the application's persist."""
    plugin = FaultyPlugin()
    pool = PoolSet.create(two_replicas(pool_dir), plugins=[plugin])
    plugin.faults = {"flush@1": eio(), second: bug(second)}
    pool.buf[HDR_SIZE:HDR_SIZE + 4] = b"abcd"
    pool.persist(HDR_SIZE, 4)
    failed = plugin.failed()
    assert failed[1].errno == errno.EIO
    if second == "store_generation@2":
        assert [r.state for r in pool.replicas] == ["ok", "failed", "failed"]
        assert failed[2].errno == errno.EIO and "RuntimeError: plugin: store_generation@2" \
            in str(failed[2])
    else:
        assert [r.state for r in pool.replicas] == ["ok", "failed", "ok"]
    pool.close()
    plugin.assert_closed_once()


def test_close_closes_every_target_and_the_pool_whatever_a_plugin_raises(pool_dir):
    """A bug in replica 1's close: replica 2's target is closed too, the session ends
    (no activity log left), the pool is unmapped and unlocked."""
    plugin = FaultyPlugin()
    path = two_replicas(pool_dir)
    pool = PoolSet.create(path, plugins=[plugin])
    pool.buf[HDR_SIZE:HDR_SIZE + 4] = b"abcd"
    pool.persist(HDR_SIZE, 4)
    plugin.faults = {"close@1": bug("close")}
    pool.close()
    assert pool.mapping.closed
    assert not (pool_dir / "m.pmractive").exists()
    plugin.assert_closed_once()
    with PoolSet.open(path) as again:  # unlocked, closed cleanly
        assert [r.state for r in again.replicas] == ["ok", "ok", "ok"]


@pytest.mark.parametrize("fault", ["open_replica:bug", "open_replica:wrong", "open:bug",
                                   "open:wrong", "stat:bug", "stat:wrong"])
def test_open_fails_the_replica_whose_plugin_has_a_bug(pool_dir, fault):
    """A bug (or a wrong return type) in the open hook, or in its target's open or stat,
    fails replica 1 with EIO: the pool opens degraded, the target is closed."""
    path = _created(pool_dir)
    method, kind = fault.split(":")
    plugin = FaultyPlugin({f"{method}@1": bug(method) if kind == "bug" else WRONG_TYPE})
    with PoolSet.open(path, plugins=[plugin]) as pool:
        assert [r.state for r in pool.replicas] == ["ok", "failed", "ok"]
        assert pool.replicas[1].error.errno == errno.EIO
        assert plugin.failed()[1] is pool.replicas[1].error
        pool.buf[HDR_SIZE:HDR_SIZE + 4] = b"next"
        pool.persist(HDR_SIZE, 4)
    assert all(t.closes == 1 for t in plugin.targets)
    with PoolSet.open(path) as pool:
        assert [r.state for r in pool.replicas] == ["ok", "stale", "ok"]


def test_a_replica_whose_generation_cannot_be_read_is_not_taken_as_in_step(pool_dir):
    """Replica 1 opens, then its stat fails (EIO): it may have been promoted elsewhere, so
    it is failed, not put on the write path unchecked; a stat that is not supported
    (ENOTSUP: a target that keeps no generation) leaves it in step."""
    path = _created(pool_dir)
    plugin = FaultyPlugin({"stat@1": eio("stat")})
    with PoolSet.open(path, plugins=[plugin]) as pool:
        assert [r.state for r in pool.replicas] == ["ok", "failed", "ok"]
        assert pool.replicas[1].error.errno == errno.EIO
    plugin.assert_closed_once()
    (pool_dir / "again").mkdir()
    path = _created(pool_dir / "again")
    plugin = FaultyPlugin({"stat@1": OSError(errno.ENOTSUP, "no generations here")})
    with PoolSet.open(path, plugins=[plugin]) as pool:
        assert [r.state for r in pool.replicas] == ["ok", "ok", "ok"]


def test_open_fails_a_replica_that_cannot_record_the_new_generation(pool_dir):
    """Replica 2 fails to open, so the open starts a generation without it; replica 1
    failing to record it fails too, instead of staying on the write path without it."""
    path = _created(pool_dir)
    plugin = FaultyPlugin({"open@2": eio("open"), "store_generation@1": eio("generation")})
    with PoolSet.open(path, plugins=[plugin]) as pool:
        assert [r.state for r in pool.replicas] == ["ok", "failed", "failed"]
        assert sorted(plugin.failed()) == [1, 2]
    plugin.assert_closed_once()


def test_create_fails_when_a_replica_cannot_record_the_first_generation(pool_dir):
    """The first generation is every replica's: one that cannot record it fails the
    create, which leaves nothing behind."""
    path = two_replicas(pool_dir)
    plugin = FaultyPlugin({"store_generation@2": eio("generation")})
    with pytest.raises(ReplicaError) as e:
        PoolSet.create(path, plugins=[plugin])
    assert e.value.errno == errno.EIO and "generation" in str(e.value)
    assert sorted(p.name for p in pool_dir.iterdir()) == ["p.set"]
    plugin.assert_closed_once()


@pytest.mark.parametrize("fault", [eio("generation"), bug("generation")],
                         ids=["oserror", "bug"])
def test_a_resync_whose_replica_cannot_record_the_generation_fails_it(pool_dir, fault):
    """The resynced replica rejoins the write path but cannot record the generation it
    rejoins in: it is failed again (told once, never restored), its target closed once,
    and resync raises that failure; later persists skip it."""
    plugin = FaultyPlugin()
    pool = PoolSet.create(two_replicas(pool_dir), plugins=[plugin])
    try:
        plugin.faults = {"flush@1": eio("flush")}
        pool.buf[HDR_SIZE:HDR_SIZE + 4] = b"abcd"
        pool.persist(HDR_SIZE, 4)
        assert pool.replicas[1].state == "failed"
        plugin.hooks.clear()
        plugin.faults = {"store_generation@1": fault}
        with pytest.raises(OSError) as e:
            pool.resync(1)
        assert e.value.errno == errno.EIO
        assert [h[:2] for h in plugin.hooks if h[0] != "progress"] == [
            ("open_replica", 1), ("failed", 1)]
        assert pool.replicas[1].state == "failed" and pool.replicas[1].target is None
        plugin.faults = {}
        pool.persist(HDR_SIZE, 4)
    finally:
        pool.close()
    plugin.assert_closed_once()
    assert [i for i, name in plugin.calls if name == "flush"][-1:] == [2]


def test_an_oserror_without_errno_is_told_as_eio(pool_dir):
    plugin = FaultyPlugin()
    with PoolSet.create(two_replicas(pool_dir), plugins=[plugin]) as pool:
        plugin.faults = {"flush@1": OSError("no errno")}
        pool.buf[HDR_SIZE:HDR_SIZE + 4] = b"abcd"
        pool.persist(HDR_SIZE, 4)
        error = plugin.failed()[1]
        assert error.errno == errno.EIO and "no errno" in str(error)


# -- replica-sync and check -----------------------------------------------------------------

def _layout(d: Path) -> PoolLayout:
    layout = PoolLayout(d, replicas=[[4 * M]])
    fill(layout.path, layout.env(), seed=5)
    return layout


def test_check_fails_a_replica_whose_open_has_a_bug_and_closes_it(pool_dir):
    layout = _layout(pool_dir)
    plugin = FaultyPlugin({"open@1": bug("open")})
    rep = sync.check(layout.path, plugins=[plugin])
    assert rep.exit_code == 4 and rep.replicas[1].health == "unreachable"
    assert any("RuntimeError: plugin: open" in m and "EIO" in m
               for m in rep.replicas[1].problems)
    plugin.assert_closed_once()


@pytest.mark.parametrize("repair", [False, True])
def test_verify_fails_a_replica_whose_read_fails(pool_dir, repair):
    """A replica whose read fails (a bug, or EIO) is failed, never reported the same as
    the source; the run ends with problems left (4), not an internal error."""
    layout = _layout(pool_dir)
    plugin = FaultyPlugin({"read@1": bug("read") if repair else eio("read")})
    rep = sync.sync(layout.path, verify=True, repair=repair, plugins=[plugin])
    r = rep.replicas[1]
    assert rep.exit_code == 4 and r.result == "failed" and "read" in r.error
    assert r.differing is None
    assert "verified: same as the source" not in "\n".join(sync_render(rep))
    plugin.assert_closed_once()


def sync_render(rep) -> list[str]:
    from pmreplica.sync.command import render
    return render(rep)


def _recreated_failing(d: Path) -> FaultyPlugin:
    """replica-sync recreates replica 1 (its part removed), whose flushes fail (EIO)."""
    layout = _layout(d)
    layout.parts[1][0][1].unlink()
    plugin = FaultyPlugin({"flush@1": eio("flush")})
    rep = sync.sync(layout.path, plugins=[plugin])
    assert rep.exit_code == 4 and rep.replicas[1].result == "failed"
    plugin.assert_closed_once()
    return plugin


def test_a_failed_copy_is_not_reported_done(pool_dir):
    """A copy that fails is reported as far as it went, never at its total."""
    plugin = _recreated_failing(pool_dir)
    copy = [h for h in plugin.hooks if h[0] == "progress" and h[2] == "copy"]
    assert copy and all(done < total for *_, done, total in copy)


def test_a_recreated_replica_is_asked_for_to_be_created(pool_dir):
    """The open hook is told create=True for the target replica-sync creates."""
    plugin = _recreated_failing(pool_dir)
    opened = [h for h in plugin.hooks if h[:2] == ("open_replica", 1)]
    assert opened[0] == ("open_replica", 1, False)  # the probe
    assert opened[-1] == ("open_replica", 1, True) and plugin.of(1)[-3:-1] == ["create",
                                                                              "flush"]


# -- the command line -----------------------------------------------------------------------

class BuggyRemote:
    """A fault-injecting plugin for ``REPLICA bug.invalid NAME`` replicas: its hooks raise
    RuntimeError (its open hook returns an object that is no target when ``wrong``)."""

    def __init__(self, wrong: bool = False) -> None:
        self.wrong = wrong

    @hookimpl
    def pmreplica_open_replica(self, spec, index, poolset, create):
        if isinstance(spec, RemoteReplica) and spec.node == "bug.invalid":
            if self.wrong:
                return object()
            raise RuntimeError("plugin: open_replica")
        return None

    @hookimpl
    def pmreplica_remove_replica(self, spec, index, force, remove_pool_set):
        if isinstance(spec, RemoteReplica) and spec.node == "bug.invalid":
            raise RuntimeError("plugin: remove")
        return None

    @hookimpl
    def pmreplica_describe_replica(self, spec, index):
        if isinstance(spec, RemoteReplica) and spec.node == "bug.invalid":
            raise RuntimeError("plugin: describe")
        return None


@pytest.fixture
def buggy_entry_point(monkeypatch):
    """Installs a BuggyRemote as if found through the entry point group."""
    def install(plugin: BuggyRemote) -> None:
        found = plugin_manager._entry_point_plugins()
        monkeypatch.setattr(plugin_manager, "_entry_point_plugins",
                            lambda: (*found, (f"buggy-{uuid.uuid4()}", plugin)))
    return install


@pytest.mark.parametrize("command", ["create", "create-wrong", "info", "rm"])
def test_cli_says_one_line_for_a_plugin_bug(pool_dir, capsys, buggy_entry_point, command):
    d = pool_dir
    path = write_set(d / "p.set", f"4M {d}/m", "REPLICA bug.invalid x.set")
    buggy_entry_point(BuggyRemote(wrong=command == "create-wrong"))
    if command != "create" and command != "create-wrong":
        assert cli.main(["create", str(write_set(d / "q.set", f"4M {d}/q"))]) == 0
        (d / "m").write_bytes((d / "q").read_bytes())  # the master of p.set, made
    capsys.readouterr()
    assert cli.main([command.split("-")[0], str(path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("pmreplica: ") and ("plugin" in last or "object" in last)
    if command == "create":
        assert err.count("\n") == 1 and "replica 1 (bug.invalid:x.set)" in last
        assert "EIO" in last

"""Third-party plugins: one passed to PoolSet.open(plugins=[...]) and one found through the
`pmreplica` entry point of a distribution installed with pip (tests/plugin_dist), each
serving a replica kept in a dict; their hooks are called with the right objects."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from pmreplica import PoolSet, ReplicaError, hookimpl
from pmreplica.header import HDR_SIZE, PoolAttr, PoolHeader
from pmreplica.setfile import LocalReplica, RemoteReplica

from .helpers import ROOT, pip_install, replica_bytes, run_python, write_set

M = 1 << 20


class DictReplicas:
    """A host application's plugin: replicas on node ``dict.invalid`` live in ``self.stores``;
    with ``take_local``, it also serves local replica 1 instead of the built-in plugin."""

    def __init__(self, take_local: bool = False) -> None:
        self.take_local = take_local
        self.stores: dict[str, dict[int, bytes]] = {}
        self.attrs: dict[str, PoolAttr] = {}
        self.calls: list[tuple] = []

    @hookimpl
    def pmreplica_open_replica(self, spec, index, poolset, create):
        self.calls.append(("open_replica", spec, index, poolset, create))
        if isinstance(spec, RemoteReplica) and spec.node == "dict.invalid":
            return DictTarget(self, spec.pool_set, poolset)
        if self.take_local and isinstance(spec, LocalReplica) and index == 1:
            return DictTarget(self, "local-1", poolset)
        return None

    @hookimpl
    def pmreplica_replica_failed(self, replica, error):
        self.calls.append(("failed", replica, error))

    @hookimpl
    def pmreplica_replica_restored(self, replica):
        self.calls.append(("restored", replica))


class DictTarget:
    nlanes = 2

    def __init__(self, plugin: DictReplicas, name: str, poolset) -> None:
        self.plugin, self.name, self.poolset = plugin, name, poolset

    def create(self, attr):
        self.plugin.calls.append(("create", self.name, attr))
        self.plugin.attrs[self.name] = attr
        self.plugin.stores[self.name] = {}

    def open(self):
        self.plugin.calls.append(("open", self.name))
        return self.plugin.attrs[self.name]

    def persist(self, offset, length, lane=0, flags=0):
        data = bytes(self.poolset.buf[offset:offset + length])
        if data.startswith(b"FAIL"):
            raise ReplicaError(errno.EIO, f"dict replica {self.name}: asked to fail")
        self.plugin.stores[self.name][offset] = data

    flush = deep_persist = persist

    def drain(self, lane=0):
        self.plugin.calls.append(("drain", self.name, lane))

    def close(self):
        self.plugin.calls.append(("close", self.name))


def _calls(plugin: DictReplicas, kind: str) -> list[tuple]:
    return [c for c in plugin.calls if c[0] == kind]


def test_plugin_passed_to_open_serves_its_replica_and_gets_notified(pool_dir):
    d = pool_dir
    path = write_set(d / "p.set", f"4M {d}/m", "REPLICA", f"4M {d}/r",
                     "REPLICA dict.invalid sets/x.set")
    plugin = DictReplicas()
    with PoolSet.create(path, plugins=[plugin]) as pool:
        assert plugin in pool.plugin_manager.get_plugins()
        assert pool.nlanes == 2  # the smallest lane count of the replicas
        (_, spec, index, poolset, create), = [c for c in _calls(plugin, "open_replica")
                                              if c[2] == 2]
        assert (spec.node, spec.pool_set, index, poolset, create) == (
            "dict.invalid", "sets/x.set", 2, pool, True)
        # the local replica went to the built-in plugin after this one declined it
        assert [c[2] for c in _calls(plugin, "open_replica")] == [1, 2]
        (_, name, attr), = _calls(plugin, "create")
        hdr = pool.header
        assert name == "sets/x.set" and attr.signature.rstrip(b"\0") == b"PMREPLIC"
        assert attr.poolset_uuid == hdr.poolset_uuid.bytes_le
        assert uuid.UUID(bytes_le=attr.next_uuid) == hdr.uuid  # replica 2 -> master
        replica1 = PoolHeader.unpack((d / "r").read_bytes()[:HDR_SIZE])
        assert uuid.UUID(bytes_le=attr.prev_uuid) == replica1.uuid  # replica 1 <- replica 2
        pool.buf[HDR_SIZE + 10:HDR_SIZE + 15] = b"hello"
        pool.persist(HDR_SIZE + 10, 5, lane=1)
        assert plugin.stores["sets/x.set"] == {HDR_SIZE + 10: b"hello"}
        assert ("drain", "sets/x.set", 1) in plugin.calls
        # the plugin's replica fails: it is told so, with its ReplicaStatus; the rest go on
        pool.buf[HDR_SIZE:HDR_SIZE + 8] = b"FAIL now"
        pool.persist(HDR_SIZE, 8)
        (_, replica, error), = _calls(plugin, "failed")
        assert replica is pool.replicas[2] and replica.state == "failed"
        assert error.errno == errno.EIO and "asked to fail" in str(error)
        assert ("close", "sets/x.set") in plugin.calls
        assert replica_bytes([(4 * M, d / "r")])[HDR_SIZE:HDR_SIZE + 8] == b"FAIL now"
        pool.buf[HDR_SIZE:HDR_SIZE + 8] = b"fine now"  # (the plugin's replica is away)
        pool.persist(HDR_SIZE, 8)
        pool.resync(2)  # back, online: told so
        assert _calls(plugin, "restored") == [("restored", pool.replicas[2])]
        assert plugin.stores["sets/x.set"][HDR_SIZE][:8] == b"fine now"
    plugin.calls.clear()
    with PoolSet.open(path, plugins=[plugin]) as pool:
        assert [c[4] for c in _calls(plugin, "open_replica")] == [False, False]
        assert _calls(plugin, "open") == [("open", "sets/x.set")]
        assert [r.state for r in pool.replicas] == ["ok", "ok", "ok"]


def test_a_plugin_whose_failure_hook_raises_does_not_silence_the_others(pool_dir, caplog):
    """Two host plugins watch failures; the one asked first has a bug and raises. The other
    is told all the same, the bug is logged, and the pool goes on."""

    class Buggy:
        @hookimpl
        def pmreplica_replica_failed(self, replica, error):
            raise RuntimeError("the dashboard's bug")

    d = pool_dir
    path = write_set(d / "p.set", f"4M {d}/m", "REPLICA dict.invalid x.set")
    plugin = DictReplicas()
    with PoolSet.create(path, plugins=[plugin, Buggy()]) as pool:
        pool.buf[HDR_SIZE:HDR_SIZE + 8] = b"FAIL now"
        pool.persist(HDR_SIZE, 8)
        assert [c[1] for c in _calls(plugin, "failed")] == [pool.replicas[1]]
    assert any("the dashboard's bug" in r.exc_text for r in caplog.records if r.exc_text)


def test_plugin_can_take_over_a_local_replica(pool_dir):
    d = pool_dir
    path = write_set(d / "p.set", f"4M {d}/m", "REPLICA", f"4M {d}/r")
    plugin = DictReplicas(take_local=True)
    with PoolSet.create(path, plugins=[plugin]) as pool:
        pool.persist(HDR_SIZE, 100)
        assert list(plugin.stores["local-1"]) == [HDR_SIZE]
    assert not (d / "r").exists()  # the built-in local plugin was never asked


# -- through an entry point of an installed distribution ----------------------------------

@pytest.fixture(scope="session")
def toy_site(tmp_path_factory) -> Path:
    """tests/plugin_dist installed with pip into a directory of its own."""
    return pip_install(ROOT / "tests" / "plugin_dist", tmp_path_factory.mktemp("toy-plugin"))


ENTRY_POINT_CHILD = r"""
import importlib.metadata, json, logging, sys
logging.basicConfig()  # an application that shows warnings
from pmreplica import PoolSet
path = sys.argv[1]
eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="pmreplica")}
with PoolSet.create(path) as pool:
    import pmreplica_toy
    assert pool.plugin_manager.get_plugin("toy") is pmreplica_toy
    pool.buf[8192:8197] = b"hello"
    pool.persist(8192, 5, lane=3)
    pool.buf[8192:8196] = b"FAIL"
    pool.persist(8192, 4)
    states = [r.state for r in pool.replicas]
    header = pool.header
store = pmreplica_toy.STORES["toy.set"][1]
print(json.dumps({"eps": eps, "states": states, "store": {k: v.hex() for k, v in store.items()},
                  "poolset_uuid": str(header.poolset_uuid), "uuid": str(header.uuid)}))
"""


def _toy_env(site: Path, log: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(site), PMREPLICA_TOY_LOG=str(log))
    return env


def test_entry_point_plugin_is_found_and_its_hooks_called(pool_dir, toy_site):
    d = pool_dir
    path = write_set(d / "p.set", f"4M {d}/m", "REPLICA", f"4M {d}/r",
                     "REPLICA toy.invalid toy.set")
    log = d / "toy.log"
    run = run_python(ENTRY_POINT_CHILD, str(path), env=_toy_env(toy_site, log))
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["eps"]["toy"] == "pmreplica_toy"
    assert out["states"] == ["ok", "ok", "failed"]
    assert out["store"] == {"8192": b"hello".hex()}
    # the distribution's broken entry point is logged, and did not stop the pool
    assert "plugin 'broken' (pmreplica_toy_missing_module) failed to load" in run.stderr
    # its plugin named "local" as the built-in is is registered too, under a longer name,
    # and the built-in still serves the local replica
    assert "pmreplica plugin 'local' of " in run.stderr and "the name is taken" in run.stderr
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert events[0] == {"event": "open_replica", "node": "toy.invalid", "pool_set": "toy.set",
                         "index": 2, "create": True}
    assert events[1]["event"] == "create" and events[1]["poolset_uuid"] == out["poolset_uuid"]
    assert events[1]["uuid"] != out["uuid"]
    assert {"event": "persist", "name": "toy.set", "offset": 8192, "length": 5,
            "lane": 3} in events
    failed = [e for e in events if e["event"] == "replica_failed"]
    assert failed == [{"event": "replica_failed", "index": 2,
                       "name": "replica 2 (toy.invalid:toy.set)", "state": "failed",
                       "errno": errno.EIO, "message": "toy replica toy.set: asked to fail (EIO)"}]
    assert {"event": "close", "name": "toy.set"} in events


def test_cli_create_and_rm_use_the_entry_point_plugin(pool_dir, toy_site, pmreplica_cmd):
    d = pool_dir
    path = write_set(d / "p.set", f"4M {d}/m", "REPLICA", f"4M {d}/r",
                     "REPLICA toy.invalid sub/toy.set")
    log = d / "toy.log"
    env = _toy_env(toy_site, log)
    create = subprocess.run(pmreplica_cmd + ["create", str(path)], env=env, capture_output=True,
                            text=True)
    assert create.returncode == 0, create.stderr
    assert (d / "m").exists() and (d / "r").exists()
    rm = subprocess.run(pmreplica_cmd + ["rm", "-r", str(path)], env=env,
                        capture_output=True, text=True)
    assert rm.returncode == 0, rm.stderr
    assert sorted(p.name for p in d.iterdir()) == ["p.set", "toy.log"]
    events = [json.loads(line) for line in log.read_text().splitlines()]
    # rm asks the open hook which plugin serves the replica (its target is closed unopened),
    # then that plugin's remove hook
    assert [e["event"] for e in events] == ["open_replica", "create", "close", "open_replica",
                                            "close", "remove_replica"]
    assert events[-3]["create"] is False
    assert events[-1] == {"event": "remove_replica", "pool_set": "sub/toy.set", "index": 2,
                          "force": False, "remove_pool_set": True}


def test_front_door_exports_what_a_plugin_needs():
    """Everything a plugin is written against comes from `pmreplica` itself, and the
    installed distribution's version is the package's."""
    import importlib.metadata

    import pmreplica
    for name in pmreplica.__all__:
        assert getattr(pmreplica, name) is not None, name
    assert {"ReplicaTarget", "TargetStat", "GenerationKeeper", "DigestTarget", "RELAXED",
            "PoolAttr", "Replica", "LocalReplica", "RemoteReplica", "hookimpl"} <= set(
        pmreplica.__all__)
    assert importlib.metadata.version("pmreplica") == pmreplica.__version__
    assert (ROOT / "pmreplica" / "py.typed").exists()


class ViewHoldingReplicas(DictReplicas):
    """Its targets keep a view of the pool's mapping while open (as the rpmem target's data
    path does) and take ``close_seconds`` to let it go (a host that is slow to give up)."""

    close_seconds = 0.5

    @hookimpl
    def pmreplica_open_replica(self, spec, index, poolset, create):
        if isinstance(spec, RemoteReplica) and spec.node == "dict.invalid":
            return ViewHoldingTarget(self, spec.pool_set, poolset)
        return None


class ViewHoldingTarget(DictTarget):
    def __init__(self, plugin, name, poolset) -> None:
        super().__init__(plugin, name, poolset)
        self.view = poolset.buf[:]

    def close(self):
        time.sleep(self.plugin.close_seconds)
        self.view.release()
        super().close()


def test_close_waits_for_a_replica_failing_on_another_thread(pool_dir):
    """A heartbeat thread fails a replica while the application closes the pool: close waits
    for the failed target to let go of its view of the mapping instead of refusing (EBUSY)."""
    path = write_set(pool_dir / "p.set", f"4M {pool_dir}/m", "REPLICA dict.invalid x.set")
    plugin = ViewHoldingReplicas()
    pool = PoolSet.create(path, plugins=[plugin])
    target = pool.replicas[1].target
    failing = threading.Thread(target=pool.target_failed,
                               args=(target, ReplicaError(errno.ECONNRESET, "peer lost")))
    failing.start()
    while pool.replicas[1].target is not None:  # the failure is under way ...
        time.sleep(0.001)
    pool.close()  # ... and its target still holds the mapping: close waits, then unmaps
    failing.join()
    assert pool.mapping.closed
    (_, replica, error), = _calls(plugin, "failed")
    assert replica.state == "failed" and error.errno == errno.ECONNRESET


# -- a plugin's target that keeps its header pages ----------------------------------------
class FilePlugin:
    """Serves ``REPLICA <node> NAME`` with a file ``NAME`` in ``d`` (its remove hook)."""

    node = ""

    def __init__(self, d: Path) -> None:
        self.d = d

    @hookimpl
    def pmreplica_remove_replica(self, spec, index, force, remove_pool_set):
        if isinstance(spec, RemoteReplica) and spec.node == self.node:
            (self.d / spec.pool_set).unlink(missing_ok=True)
            return True


class KeeperPlugin(FilePlugin):
    """``REPLICA keep NAME``: the local plugin's own target on the file ``NAME``, behind a
    plugin of its own: a HeaderPageKeeper that is not a local replica line."""

    node = "keep"

    @hookimpl
    def pmreplica_open_replica(self, spec, index, poolset, create):
        from pmreplica.plugins.local import LocalTarget
        from pmreplica.setfile.model import Part
        from pmreplica.status import describe
        if isinstance(spec, RemoteReplica) and spec.node == "keep":
            local = LocalReplica([Part(8 << 20, str(self.d / spec.pool_set))])
            return LocalTarget(poolset.set_file, local, poolset.size,
                               getattr(poolset, "buf", None), describe(spec, index),
                               sparse=poolset.sparse)


class FailingFilePlugin(FilePlugin):
    """``REPLICA file NAME``: a plain file (data at pool offsets, attributes in page 0)
    that keeps no generation nor header pages, whose writes fail while ``failing``."""

    node = "file"
    failing = False

    @hookimpl
    def pmreplica_open_replica(self, spec, index, poolset, create):
        if isinstance(spec, RemoteReplica) and spec.node == "file":
            return FileTarget(self, str(self.d / spec.pool_set), poolset)


class FileTarget:
    nlanes = 64

    def __init__(self, plugin: FailingFilePlugin, path: str, pool) -> None:
        self.plugin, self.path, self.pool, self.fd = plugin, path, pool, -1

    def create(self, attr: PoolAttr) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self.fd, self.pool.size)
        self.set_attr(attr)

    def open(self) -> PoolAttr:
        self.fd = os.open(self.path, os.O_RDWR)
        return PoolAttr.unpack(os.pread(self.fd, 104, 0))

    def flush(self, off: int, n: int, lane: int = 0, flags: int = 0) -> None:
        if self.plugin.failing:
            raise ReplicaError(errno.EIO, "file: disk gone")
        os.pwrite(self.fd, self.pool.buf[off:off + n], off)

    def drain(self, lane: int = 0) -> None:
        os.fdatasync(self.fd)

    def persist(self, off: int, n: int, lane: int = 0, flags: int = 0) -> None:
        self.flush(off, n)
        self.drain()

    deep_persist = persist

    def read(self, dest, off: int, lane: int = 0) -> None:
        os.preadv(self.fd, [dest], off)

    def set_attr(self, attr: PoolAttr) -> None:
        os.pwrite(self.fd, attr.pack(), 0)

    def stat(self):
        from pmreplica import TargetStat
        return TargetStat(self.pool.size, os.path.exists(self.path))

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


def test_an_open_pool_stores_its_record_through_a_keeping_target(pool_dir):
    """A replica kept by a plugin's HeaderPageKeeper gets the replica-state record's copy
    from an open pool, as a local replica's part file does. Replica 2 fails, is repaired,
    then fails again and misses a write; the master is lost. replica-sync must not take
    replica 2 for a healthy source: it did, from the keeper's copy an open pool never
    updated, and rebuilt the pool without the last acknowledged write."""
    from pmreplica import sync
    d = pool_dir
    files = FailingFilePlugin(d)
    plugins = [KeeperPlugin(d), files]
    path = write_set(d / "p.set", f"8M {d}/m", "REPLICA keep r1", "REPLICA file r2")

    def write(tag: bytes, failing: bool = False) -> list[str]:
        files.failing = failing
        try:
            with PoolSet.open(path, plugins=plugins) as pool:
                pool.buf[HDR_SIZE:HDR_SIZE + 4] = tag
                pool.persist(HDR_SIZE, 4)
                return [r.state for r in pool.replicas]
        finally:
            files.failing = False

    PoolSet.create(path, plugins=plugins).close()
    write(b"AAAA", failing=True)
    assert sync.sync(path, plugins=plugins).replicas[2].result == "repaired"
    write(b"BBBB")
    assert write(b"CCCC", failing=True) == ["ok", "ok", "failed"]  # replica 2 missed it
    (d / "m").unlink()  # the master is lost
    report = sync.sync(path, plugins=plugins)
    assert report.source != 2, report
    if (d / "m").exists():
        assert (d / "m").read_bytes()[HDR_SIZE:HDR_SIZE + 4] == b"CCCC"
    assert (d / "r1").read_bytes()[HDR_SIZE:HDR_SIZE + 4] == b"CCCC"


class VaultPlugin:
    """``REPLICA vault NAME``: a file (FileTarget) whose plugin has no remove or describe
    hook; its ``create`` makes the file anew."""

    failing = False

    def __init__(self, d: Path) -> None:
        self.d = d

    @hookimpl
    def pmreplica_open_replica(self, spec, index, poolset, create):
        if isinstance(spec, RemoteReplica) and spec.node == "vault":
            return FileTarget(self, str(self.d / spec.pool_set), poolset)


def test_a_remote_line_another_plugin_serves_is_never_the_rpmem_plugins(pool_dir, monkeypatch,
                                                                       capsys):
    """The rpmem plugin answers the remove and describe hooks for any remote line; for a
    line another plugin serves it is not asked: info shows no SSH launcher for it,
    replica-sync recreates its lost storage through its target, and rm says that no plugin
    removes it (each went to the rpmem plugin, which looked for a host named "vault")."""
    from pmreplica import cli, plugin_manager, sync
    d = pool_dir
    found = plugin_manager._entry_point_plugins()
    monkeypatch.setattr(plugin_manager, "_entry_point_plugins",
                        lambda: (*found, ("vault", VaultPlugin(d))))
    path = write_set(d / "p.set", f"8M {d}/m", "REPLICA vault r1")
    assert cli.main(["create", str(path)]) == 0
    capsys.readouterr()
    assert cli.main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Replica 1 - remote: node vault, pool set r1" in out and "launcher" not in out
    (d / "r1").unlink()  # the vault's storage is lost
    report = sync.sync(path)
    assert report.replicas[1].result == "repaired", report
    assert (d / "r1").read_bytes()[HDR_SIZE:] == (d / "m").read_bytes()[HDR_SIZE:]
    assert cli.main(["rm", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "pmreplica: replica 1 (vault:r1): no plugin can remove this kind " \
                          "of replica", err
    assert not (d / "m").exists() and (d / "r1").exists()

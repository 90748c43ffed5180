"""pmreplica's power-loss scenarios (see pmreplica.powerloss): each runs a workload under
the simulation and says, for every crash image, whether it holds a state the workload
allowed at that moment.

``Objects``      the object-store crash workload (dicts, lists, sets, objects, orphans,
                 huge values) with gc, checkpoints, spilled records, clean reopens and
                 power cuts inside commits followed by recovery (itself cut at times),
                 optionally on a pool set with a local replica (checked on its own too);
``FullPool``     fill a pool until it refuses, clear it, gc, checkpoint, store a value of
                 half the pool, fill again;
``RecordWrites`` a PoolSet whose replicas fail (at open, and while written): the
                 replica-state record in the master's header and its copies, then
                 replica-sync on every image;
``SyncRepair``   replica-sync repairing a stale replica, a lost replica and broken links
                 (header rewrites): a second run must repair every image;
``UncleanReopen`` a PoolSet left open as a killed process leaves it, then reopened (the
                 activity log's recovery, itself cut at times): every image must open with
                 its replicas in step and equal to the master;
``EpochReopen``  the same with the log's epochs one chunk long, chunks leaving the log
                 as the sessions write.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
from pathlib import Path
from typing import Any, Iterator

from pmreplica import PoolSet, activity, pmemobj, sync
from pmreplica.header import HDR_SIZE
from pmreplica.pmemobj import txn
from pmreplica.powerloss.model import PowerCut, Simulation
from pmreplica.replica import release_locks
from pmreplica.state import ReplicaState
from tests.helpers import promoted, write_set
from tests.pmemobj import workload

M = 1 << 20
POOL = "objs.pool"


def is_cut(e: BaseException | None) -> bool:
    """True if ``e`` is the simulation's power cut, or was raised while handling one (a
    clean-up step failing because the cut left it half done)."""
    while e is not None:
        if isinstance(e, PowerCut):
            return True
        e = e.__context__
    return False


def abandon(pool: pmemobj.PersistentObjectPool) -> None:
    """Let go of a pool without closing it, as a crash does (nothing more is written); a
    mapping still referenced from a dead frame stays mapped, which changes nothing."""
    pool.closed = True
    try:
        pool._eng.release()
    except AttributeError:  # the cut came before the engine existed
        pass
    try:
        pool._ps.close()
    except OSError:
        pass


def tune(pool: pmemobj.PersistentObjectPool, knobs: int) -> None:
    """Checkpoint often (1), or give the log an 8 KiB window that fills after a few records
    and makes bigger transactions spill into free chunks (2); 0 keeps the defaults."""
    if knobs == 1:
        txn.RELEASE_BATCH, txn.DIRTY_BATCH = 8, 32
    elif knobs == 2:
        pool._eng.log_end = min(pool._eng.log_end, pool._geo.log + 8192)


@contextlib.contextmanager
def unavailable(part: Path) -> Iterator[None]:
    """Within the block, a one-page file stands where ``part`` is (the replica fails when a
    pool set opens: too short); afterwards the part is back as it was, having missed every
    write of the block."""
    os.rename(part, part.with_name(part.name + ".away"))
    part.write_bytes(bytes(HDR_SIZE))
    try:
        yield
    finally:
        os.replace(part.with_name(part.name + ".away"), part)


def _replica_copy(imagedir: str, name: str) -> str:
    """A local replica's part copied into a pool file of its own and promoted to master,
    as after losing the master (the image itself untouched)."""
    copy = Path(imagedir, name + ".alone")
    shutil.copyfile(os.path.join(imagedir, name), copy)
    return str(promoted(copy))


class _LosesHeapFlushes:
    """A PoolSet whose flushes of the heap do nothing (a bug put in on purpose)."""

    def __init__(self, ps: PoolSet, heap: int) -> None:
        self._ps, self._heap = ps, heap

    def flush(self, offset: int, length: int, lane: int = 0, flags: int = 0) -> None:
        if offset < self._heap:
            self._ps.flush(offset, length, lane, flags)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ps, name)


def inject(pool: pmemobj.PersistentObjectPool, fault: str | None) -> None:
    """Put a known bug into an open pool, for showing that the explorer finds it:
    ``unfenced`` drops the master's fences (in-place words may outrun their record),
    ``unflushed`` never writes the heap back (a checkpoint empties the log over data that
    is not durable)."""
    if fault == "unfenced":
        pool._eng._fence = lambda: None
    elif fault == "unflushed":
        pool._eng.ps = _LosesHeapFlushes(pool._ps, pool._geo.heap)
    elif fault is not None:
        raise ValueError(f"unknown fault {fault!r}")


class Objects:
    """The crash workload of tests/pmemobj on one pool (``replica``: a pool set with a local
    replica). ``cuts``: power cuts at random durability points, each followed by a reopen
    (recovery and gc run under the simulation, and may be cut again). ``fault``: see
    :func:`inject`."""

    def __init__(self, seed: int = 1, transactions: int = 60, knobs: int = 0,
                 replica: bool = False, cuts: int = 3, fault: str | None = None) -> None:
        self.seed, self.transactions, self.knobs = seed, transactions, knobs
        self.replica, self.cuts, self.fault = replica, cuts, fault
        self._models: dict[int, dict[str, Any]] = {}

    def _open(self, path: str) -> pmemobj.PersistentObjectPool:
        pool = pmemobj.open(path)
        tune(pool, self.knobs)
        inject(pool, self.fault)
        return pool

    def path(self, workdir: str) -> str:
        return os.path.join(workdir, "objs.set" if self.replica else POOL)

    def setup(self, workdir: str) -> None:
        if self.replica:
            write_set(Path(workdir, "objs.set"), f"8M {workdir}/master.part", "REPLICA",
                       f"8M {workdir}/replica.part")
            pool = pmemobj.create(self.path(workdir))
        else:
            pool = pmemobj.create(self.path(workdir), pool_size=8 * M)
        with pool:
            workload.init_pool(pool)

    def run(self, workdir: str, sim: Simulation) -> None:
        rng = random.Random(self.seed)
        path = self.path(workdir)
        last = 0
        sim.context = {"n": [0]}
        pool = self._open(path)
        model = workload.model_after(0)
        i = 1
        cuts = self.cuts
        cut_every = max(2, self.transactions // (cuts + 1))
        while i <= self.transactions:
            allowed = [last] + ([i] if workload.committed(i, model) else [])
            sim.context = {"n": allowed}
            if cuts and i % cut_every == 0 and sim.cut_at < sim.points:
                sim.cut_at = sim.points + rng.randrange(1, 24)
            try:
                workload.apply_pool(pool, i, model)
                last = allowed[-1]
                sim.context = {"n": [last]}
                if i % 7 == 0:
                    pool.gc()
                if i % 11 == 0:
                    pool.checkpoint()
                if i % 17 == 0:
                    pool.close()
                    pool = self._open(path)
            except BaseException as e:
                if not is_cut(e):
                    raise
                del e
                allowed = sim.context["n"]
                cuts -= 1
                abandon(pool)
                sim.power_cut(rng)
                # every other time, the recovery that follows is cut too
                sim.cut_at = sim.points + rng.randrange(1, 40) if cuts % 2 else -1
                pool = self._reopen(path, sim, rng)
                last = pool.root["n"]
                assert last in allowed, (last, allowed)
                model = workload.model_after(last)
                assert workload.snapshot(pool) == model, f"torn state after the cut: {last}"
                sim.context = {"n": [last]}
                i = last
            i += 1
        sim.cut_at = -1
        pool.close()

    def _reopen(self, path: str, sim: Simulation, rng: random.Random
                ) -> pmemobj.PersistentObjectPool:
        """Open after a power cut; a cut during the recovery itself is followed by another
        open (after losing what that one had not made durable)."""
        while True:
            try:
                pool = self._open(path)
                sim.cut_at = -1
                return pool
            except BaseException as e:
                if not is_cut(e):
                    raise
                del e
                sim.cut_at = -1
                sim.power_cut(rng)

    def _model(self, n: int) -> dict[str, Any]:
        if n not in self._models:
            self._models[n] = workload.model_after(n)
        return self._models[n]

    def _check(self, path: str, allowed: list[int]) -> int:
        """Open (recovering), compare with the model, look for leaks, and close (which
        commits a transaction and checkpoints: the recovered pool takes changes)."""
        with pmemobj.open(path) as pool:
            n = pool.root["n"]
            assert n in allowed, f"root['n'] is {n}, allowed {allowed}"
            assert workload.snapshot(pool) == self._model(n), f"state after {n} differs"
            workload.assert_no_leaks(pool)
        return n

    def verify(self, imagedir: str, context: dict[str, Any]) -> str:
        allowed = context["n"]
        if self.replica:
            self._check(_replica_copy(imagedir, "replica.part"), allowed)
        n = self._check(self.path(imagedir), allowed)
        if len(allowed) == 1:
            return "settled"
        return "in-flight committed" if n == allowed[-1] else "in-flight lost"


class FullPool:
    """Fill an 8 MiB pool with small dicts (``batch`` per transaction) until it refuses,
    clear them in one transaction, gc and checkpoint, store a value of half the pool,
    fill again. The root: ``{"items": {k: {"i": k, "v": bytes}}, "big": bytes | None,
    "round": r}``."""

    def __init__(self, seed: int = 1, batch: int = 16, rounds: int = 2) -> None:
        self.seed, self.batch, self.rounds = seed, batch, rounds

    def _value(self, k: int) -> bytes:
        return bytes([k & 0xFF]) * (2000 + (k * 997 + self.seed * 131) % 5000)

    def setup(self, workdir: str) -> None:
        with pmemobj.create(os.path.join(workdir, POOL), pool_size=8 * M) as pool:
            with pool.transaction():
                pool.root = pool.new(pmemobj.PersistentDict, round=0, big=None,
                                     items=pool.new(pmemobj.PersistentDict))

    def run(self, workdir: str, sim: Simulation) -> None:
        pool = pmemobj.open(os.path.join(workdir, POOL))
        tune(pool, 1)
        root = pool.root
        state = {"round": 0, "big": 0, "items": (0, 0)}   # items: keys [lo, hi)

        def allow(*states: dict[str, Any]) -> None:
            sim.context = {"states": [dict(s) for s in states]}

        allow(state)
        for r in range(self.rounds):
            lo = hi = state["items"][1]
            refused = 0
            while refused < 2:
                new = dict(state, items=(lo, hi + self.batch))
                allow(state, new)
                try:
                    with pool.transaction():
                        items = root["items"]
                        for k in range(hi, hi + self.batch):
                            items[k] = pool.new(pmemobj.PersistentDict, i=k, v=self._value(k))
                    state, hi = new, hi + self.batch
                except pmemobj.PoolFullError:
                    refused += 1             # the pool stays usable: try a smaller batch
                    allow(state)
                    root["big"] = None       # an update that allocates nothing
                    self.batch = max(1, self.batch // 4)
            cleared = dict(state, items=(hi, hi))
            allow(state, cleared)
            root["items"].clear()             # frees everything, on a full pool
            state = cleared
            allow(state)
            pool.gc()
            pool.checkpoint()
            big = dict(state, big=r + 1)
            allow(state, big)
            root["big"] = bytes([r + 1]) * (4 * M)
            state = big
            allow(state)
            after = dict(state, round=r + 1)
            allow(state, after)
            root["round"] = r + 1
            state = after
            allow(state)
            root["big"] = None
            state = dict(state, big=0)
            allow(state)
        pool.close()

    def verify(self, imagedir: str, context: dict[str, Any]) -> str:
        with pmemobj.open(os.path.join(imagedir, POOL)) as pool:
            root = pool.root
            big = root["big"]
            items = root["items"]
            found = {"round": root["round"], "big": big[0] if big else 0}
            keys = list(items)
            matches = [s for s in context["states"]
                       if {k: s[k] for k in ("round", "big")} == found
                       and keys == list(range(*s["items"]))]
            assert matches, f"state {found} with items {keys[:1]}..{keys[-1:]} " \
                            f"({len(keys)}) is none of {context['states']}"
            if big:
                assert big == bytes([found["big"]]) * (4 * M)
            for k in keys:
                assert items[k]["i"] == k and items[k]["v"] == self._value(k)
            workload.assert_no_leaks(pool)
        return "settled" if len(context["states"]) == 1 else "in flight"


class _ThreeReplicas:
    """Scenarios on a 4 MiB pool set (master m0, local replicas r1 and r2) that starts
    filled with random bytes, then takes ``writes`` persists."""

    SIZE = 4 * M

    def __init__(self, seed: int = 1, writes: int = 24) -> None:
        self.seed, self.writes = seed, writes

    def setup(self, workdir: str) -> None:
        d = Path(workdir)
        write_set(d / "p.set", f"4M {d}/m0", "REPLICA", f"4M {d}/r1", "REPLICA", f"4M {d}/r2")
        with PoolSet.create(d / "p.set") as ps:
            ps.buf[HDR_SIZE:] = random.Random(self.seed).randbytes(ps.size - HDR_SIZE)
            ps.persist(HDR_SIZE, ps.size - HDR_SIZE)


class RecordWrites(_ThreeReplicas):
    """A PoolSet with two local replicas written with persist: replica 2 is missing at one
    open (it fails at open), and its part is removed under the open pool later (it fails on
    the next write); writes go on degraded, recording the chunks they touch. Every image
    must open, keep every persist that returned on the master (and on replica 1 while it
    is not stale), record replica 2 stale with those chunks dirty (or, a torn record,
    read as "every replica stale, resync in full"), and be repaired by replica-sync."""


    def run(self, workdir: str, sim: Simulation) -> None:
        d = Path(workdir)
        rng = random.Random(self.seed + 1)
        # writes: persists that returned; dirty: those the record must show written while
        # replica 2 was stale; stale: replicas the record must show stale; inflight: the
        # range being persisted (the replicas may differ there after a crash)
        ctx: dict[str, Any] = {"writes": [], "dirty": [], "stale": [], "inflight": []}

        def write(ps: PoolSet) -> None:
            n = rng.randrange(8, 3000)
            off = rng.randrange(HDR_SIZE, ps.size - n)
            data = rng.randbytes(n)
            ctx["inflight"] = [(off, n)]
            sim.context = dict(ctx)
            ps.buf[off:off + n] = data
            ps.persist(off, n)
            ctx["inflight"] = []
            ctx["writes"].append((off, data))
            if ps.replicas[2].state != "ok":
                ctx["dirty"].append((off, len(data)))
                ctx["stale"] = [2]
            sim.context = dict(ctx)

        sim.context = dict(ctx)
        with unavailable(d / "r2"), PoolSet.open(d / "p.set") as ps:
            ctx["stale"] = [2]
            sim.context = dict(ctx)
            for _ in range(self.writes // 3):
                write(ps)
        with PoolSet.open(d / "p.set") as ps:   # replica 2 opens, still stale
            for _ in range(self.writes // 3):
                write(ps)
        ctx.update(dirty=[], stale=[])           # the sync may clear the marks
        sim.context = dict(ctx)
        assert sync.sync(d / "p.set").status == sync.OK_REPAIRED
        with PoolSet.open(d / "p.set") as ps:
            write(ps)
            os.unlink(d / "r2")                 # fails at the next write
            for _ in range(self.writes // 3):
                write(ps)

    def verify(self, imagedir: str, context: dict[str, Any]) -> str:
        d = Path(imagedir)
        page = (d / "m0").read_bytes()[:HDR_SIZE]
        st = ReplicaState.load(page, self.SIZE, 3)    # the record as the image holds it
        for i in context["stale"]:
            assert st.is_stale(i), f"replica {i} not recorded stale: {st}"
        if not st.is_full(2):
            dirty = st.dirty_ranges(self.SIZE)
            for off, n in context["dirty"]:
                assert any(a <= off and off + n <= a + ln for a, ln in dirty), \
                    f"write at {off} not in the record's dirty chunks {dirty}"
        label = "record intact" if st.intact else "record damaged: all stale"
        with PoolSet.open(d / "p.set") as ps:
            for off, data in context["writes"]:
                assert ps.buf[off:off + len(data)] == data, f"persist at {off} lost"
        if not st.is_stale(1):
            raw = (d / "r1").read_bytes()
            for off, data in context["writes"]:
                assert raw[off:off + len(data)] == data, f"replica 1 lacks the persist at {off}"
        rep = sync.sync(d / "p.set")
        assert rep.status in (sync.OK_HEALTHY, sync.OK_REPAIRED), \
            f"replica-sync: {rep.status} {rep.reason}"
        _assert_replicas_equal(d, ["m0", "r1", "r2"], context["inflight"])
        return label


def _digest(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _assert_replicas_equal(d: Path, parts: list[str],
                           unsettled: list[tuple[int, int]]) -> None:
    """Sync's check finds every replica healthy and their data equal, but in the
    ``unsettled`` ranges (a persist that had not returned may have reached some replicas
    and not others: a replica holds either the old or the new bytes there)."""
    rep = sync.check(d / "p.set")
    assert rep.status == sync.OK_HEALTHY, f"after repair: {rep.status}: " + "; ".join(
        f"{r.name} {r.health} {r.problems}" for r in rep.replicas)

    def data(name: str) -> bytearray:
        raw = bytearray((d / name).read_bytes())
        for off, n in unsettled:
            raw[off:off + n] = bytes(n)
        return raw[HDR_SIZE:]
    first = data(parts[0])
    for name in parts[1:]:
        assert data(name)[:len(first)] == first, f"{name} differs from {parts[0]}"


class SyncRepair:
    """replica-sync repairing, all in one run: replica 1 stale (it missed writes while its
    part could not be opened), replica 2's part lost, and (``relink``) replica 3 dropped
    from the pool set file, so that the others' replica links need rewriting. Every image
    must be repaired by the next replica-sync run, after which every replica holds the
    master's data."""

    def __init__(self, seed: int = 1, relink: bool = True) -> None:
        self.seed, self.relink = seed, relink

    def setup(self, workdir: str) -> None:
        d = Path(workdir)
        reps = ["REPLICA", f"4M {d}/r1", "REPLICA", f"4M {d}/r2"]
        extra = ["REPLICA", f"4M {d}/r3"] if self.relink else []
        write_set(d / "p.set", f"2M {d}/m0", f"2M {d}/m1", *reps, *extra)
        rng = random.Random(self.seed)
        with PoolSet.create(d / "p.set") as ps:
            ps.buf[HDR_SIZE:] = rng.randbytes(ps.size - HDR_SIZE)
            ps.persist(HDR_SIZE, ps.size - HDR_SIZE)
        with unavailable(d / "r1"), PoolSet.open(d / "p.set") as ps:
            assert ps.replicas[1].state == "failed"
            for _ in range(12):
                n = rng.randrange(8, 64 << 10)
                off = rng.randrange(HDR_SIZE, ps.size - n)
                ps.buf[off:off + n] = rng.randbytes(n)
                ps.persist(off, n)
            (d / "expected.sha256").write_text(_digest(ps.buf[HDR_SIZE:]))
        os.unlink(d / "r2")
        if self.relink:
            write_set(d / "p.set", f"2M {d}/m0", f"2M {d}/m1", *reps)
            os.unlink(d / "r3")

    def run(self, workdir: str, sim: Simulation) -> None:
        sim.context = {}
        rep = sync.sync(Path(workdir) / "p.set")
        assert rep.status == sync.OK_REPAIRED, rep

    def verify(self, imagedir: str, context: dict[str, Any]) -> str:
        d = Path(imagedir)
        before = sync.check(d / "p.set").status
        rep = sync.sync(d / "p.set")
        assert rep.status in (sync.OK_HEALTHY, sync.OK_REPAIRED), \
            f"second run: {rep.status} {rep.reason}: " + "; ".join(
                f"{r.name} {r.health} {r.action} {r.result} {r.error}" for r in rep.replicas)
        master = (d / "m0").read_bytes()[HDR_SIZE:] + (d / "m1").read_bytes()[HDR_SIZE:]
        assert _digest(master) == (d / "expected.sha256").read_text(), "master data changed"
        rep = sync.check(d / "p.set")
        assert rep.status == sync.OK_HEALTHY, rep.status
        for name in ("r1", "r2"):
            data = (d / name).read_bytes()[HDR_SIZE:HDR_SIZE + len(master)]
            assert data == master, f"{name} differs from the master after the second run"
        return f"found {before}"


@contextlib.contextmanager
def _environment(name: str, value: str | None) -> Iterator[None]:
    """The environment variable ``name`` set to ``value`` meanwhile (None: as it is)."""
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _killed(ps: PoolSet) -> None:
    """Let go of an open pool set as a killed process does: no close, so its marker and
    activity log stay; the mappings and the lock go. A stand-in: the simulation runs in
    this process, which cannot be killed and go on. Every replica was drained, so closing
    their targets writes nothing."""
    for status in ps.replicas[1:]:
        if status.target is not None:
            status.target.close()
    if ps._activity is not None:
        os.close(ps._activity._fd)
    ps.buf.release()
    ps.mapping.close()
    release_locks(ps._locks)


class UncleanReopen(_ThreeReplicas):
    """A PoolSet with two local replicas, written with persists, left open as a killed
    process leaves it, reopened (which brings what the session was writing in line on the
    replicas), written again and closed. A crash inside a persist may leave the master
    with bytes a replica lacks, or the reverse; the recovery is cut too. Every image must
    open with every replica in step and holding every persist that returned, and after
    that open (no replica-sync) the replicas must equal the master. Each session first
    persists the whole pool, so every write lies in a chunk its log holds: a store that no
    call has named yet is outside the log (its bytes are undefined, as in PMDK)."""

    SLOT = 4096
    #: PMREPLICA_ACTIVITY_MIB for the sessions (None: the default)
    ACTIVITY_MIB: str | None = None

    def run(self, workdir: str, sim: Simulation) -> None:
        d = Path(workdir)
        rng = random.Random(self.seed + 1)
        slots = rng.sample(range(1, self.SIZE // self.SLOT), self.writes)
        ctx: dict[str, Any] = {"writes": []}  # persists that returned, each in a slot of its own

        def session(ps: PoolSet, n: int) -> None:
            self.begin(ps)
            for _ in range(n):
                size = rng.randrange(8, self.SLOT)
                off = slots.pop() * self.SLOT
                self.write(ps, off, rng.randbytes(size), rng, ctx, sim)
                sim.context = dict(ctx)

        with _environment(activity.ENV, self.ACTIVITY_MIB):
            sim.context = dict(ctx)
            ps = PoolSet.open(d / "p.set")
            session(ps, self.writes // 2)
            _killed(ps)
            with PoolSet.open(d / "p.set") as ps:
                assert [s.state for s in ps.replicas] == ["ok"] * 3
                session(ps, self.writes - self.writes // 2)

    def begin(self, ps: PoolSet) -> None:
        """A session's start: every chunk in its log."""
        ps.persist(HDR_SIZE, ps.size - HDR_SIZE)

    def write(self, ps: PoolSet, off: int, data: bytes, rng: random.Random,
              ctx: dict[str, Any], sim: Simulation) -> None:
        """Store ``data`` at ``off`` and persist it, recorded once it returned."""
        ps.buf[off:off + len(data)] = data
        ps.persist(off, len(data))
        ctx["writes"].append((off, data))

    def verify(self, imagedir: str, context: dict[str, Any]) -> str:
        d = Path(imagedir)
        with open(d / "m0", "rb") as f:
            label = "clean" if activity.read_marker(f.read(HDR_SIZE)) is None else "recovered"
        with PoolSet.open(d / "p.set") as ps:
            assert [s.state for s in ps.replicas] == ["ok"] * 3, \
                [(s.state, s.error) for s in ps.replicas]
            for off, data in context["writes"]:
                assert ps.buf[off:off + len(data)] == data, f"persist at {off} lost"
            master = bytes(ps.buf)
        for name in ("r1", "r2"):
            replica = bytearray((d / name).read_bytes())
            for off, old in context.get("inflight", []):  # see EpochReopen
                n = len(old)
                if replica[off:off + n] not in (master[off:off + n], old):
                    raise AssertionError(f"{name} holds at {off} neither the master's bytes "
                                         "nor those before the interrupted persist's store")
                replica[off:off + n] = master[off:off + n]
            if replica[HDR_SIZE:] != master[HDR_SIZE:]:
                raise AssertionError(f"{name} differs from the master after the reopen")
        return label


class EpochReopen(UncleanReopen):
    """UncleanReopen with the activity log's epochs one chunk long: chunks leave the log as
    the sessions write, and no session persists the whole pool first. Every image must
    open with its replicas in step, holding every persist that returned, and equal to the
    master but in the range of the persist a cut interrupted, if any: when its chunk had
    left the log, its store may be on the master alone (undefined, as in PMDK), so a
    replica may hold the bytes from before it there, and nothing else."""

    ACTIVITY_MIB = "2"  # an epoch: one chunk new to the log

    def begin(self, ps: PoolSet) -> None:
        """Nothing: chunks enter the log as the writes name them."""

    def write(self, ps: PoolSet, off: int, data: bytes, rng: random.Random,
              ctx: dict[str, Any], sim: Simulation) -> None:
        """As UncleanReopen's, on a lane of two drawn from ``rng``, the range and its bytes
        before the store recorded as in flight until the persist returns."""
        ctx["inflight"] = [(off, bytes(ps.buf[off:off + len(data)]))]
        sim.context = dict(ctx)
        ps.buf[off:off + len(data)] = data
        ps.persist(off, len(data), lane=rng.randrange(2))
        ctx["writes"].append((off, data))
        ctx["inflight"] = []

"""``pmreplica promote``: make a replica the master of its pool, when the master's host is lost.

The replica to promote is the master replica of the pool set given: on a target host, the
set the agent served it by (its parts only), or any local set whose first replica is that
replica, optionally listing further replicas (they become the new master's). Before it
changes anything, promote compares the replica's generation (generation.py) with every
other replica the set lists: it refuses when one holds newer acknowledged writes (it names
it: promote that one) or when they diverged, and when a listed replica cannot be asked (or
none is listed) it cannot tell, and wants ``force``.

Promotion is one durable write, the commit point: a new generation of which this replica
is the master. Before it, nothing was changed; after it, the old master can never again be
taken for current where this replica can be reached (it is behind, or diverged), and this
replica opens as a master. Then the pool's replica-state record is begun afresh in its
header page, with every replica the set lists marked stale, to be compared and brought in
line by replica-sync (a replica may hold writes that were in flight when the master was
lost). Should a crash come between the two, the generations still tell: every listed
replica is behind the promoted one, which opening the pool or replica-sync finds.
"""

from __future__ import annotations

import errno
import functools
import logging
import mmap
import os
import sys
from dataclasses import dataclass, field
from typing import Iterable

import pluggy

from . import generation, health
from .errors import PmReplicaError
from .generation import AHEAD, BEHIND, DIVERGED, SAME, Generation
from .identity import Identity
from .plugin_manager import make_plugin_manager
from .replica import lock_pool
from .setfile import load_set
from .state import ReplicaState, store_copy
from .target_host import TargetHost, open_target

log = logging.getLogger(__name__)

_MAP_NORESERVE = 0x4000


@dataclass
class Compared:
    """Another replica of the set, as promote found it."""

    index: int
    name: str
    generation: Generation | None = None
    relation: str | None = None  # SAME, AHEAD (of it), BEHIND or DIVERGED; None: unknown
    problem: str = ""


@dataclass
class Promotion:
    """What promote found and did."""

    path: str
    previous: Generation | None
    generation: Generation | None = None
    already: bool = False
    compared: list[Compared] = field(default_factory=list)


def promote(path: str | os.PathLike[str], *, force: bool = False,
            plugins: Iterable[object] = ()) -> Promotion:
    """Make the master replica of the pool set at ``path`` (a replica of a lost master) the
    master of its pool; see the module docstring. Errors: EBUSY (open), EINVAL (broken, or
    not a pool), ESTALE (another replica is ahead, or diverged), EAGAIN (a listed replica
    cannot be asked, or none is listed, without ``force``)."""
    path = os.fspath(path)
    set_file = load_set(path)
    set_file.validate()
    size = set_file.pool_size
    first = set_file.master.parts[0].path
    lock_fd = lock_pool(first, f"{path}: the pool set is open; close it before promoting")
    pm = make_plugin_manager(plugins)
    try:
        me = _probe(pm, set_file, 0, memoryview(b""))  # the master's header: nothing written
        if not me.sound:
            raise PmReplicaError(errno.EINVAL, f"{path}: cannot promote a damaged replica: "
                                               + "; ".join(me.problems[:3]))
        assert me.header is not None
        mine = me.generation
        out = Promotion(path, mine)
        if mine is not None and mine.is_master(me.header.uuid):
            out.already, out.generation = True, mine
        else:
            out.compared = _compare(set_file, size, mine, pm, me.identity)
            _judge(path, out, force)
            # the commit point: from here this replica is the master of its pool
            out.generation = (mine.next(1, me.header.uuid) if mine is not None
                              else Generation.first(me.header.uuid, 1))
            generation.store(first, out.generation)
            log.info("%s: promoted to master of %s", path, out.generation.describe())
            _begin_record(first, size, len(set_file.replicas), out.generation)
        return out
    finally:
        os.close(lock_fd)


def _compare(set_file, size: int, mine: Generation | None, pm: pluggy.PluginManager,
             me: Identity | None) -> list[Compared]:
    """Every other replica of the set: its generation and how it relates to ``mine`` (one
    whose header is this replica's, ``me``, listed again under another name, tells
    nothing)."""
    out = []
    scratch = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | _MAP_NORESERVE)
    view = memoryview(scratch)
    try:
        for i in range(1, len(set_file.replicas)):
            p = _probe(pm, set_file, i, view)
            c = Compared(i, p.name, p.generation)
            if not p.reachable or p.generation is None and p.problems:
                c.problem = "; ".join(p.problems) or "unreachable"
            elif me is not None and p.identity is not None and p.identity.uuid == me.uuid:
                c.problem = "it is this replica itself, listed again"
            elif p.generation is not None:
                # one in a generation is ahead of one in none: this replica was made or
                # recreated (a repair cut off before its copy) and never brought in step
                c.relation = p.generation.relation(mine) if mine is not None else AHEAD
            out.append(c)
    finally:
        view.release()
        scratch.close()
    return out


def _probe(pm: pluggy.PluginManager, set_file, index: int, view: memoryview) -> health.Probe:
    """Replica ``index`` probed through its plugin's target (bound to ``view``), let go."""
    spec = set_file.replicas[index]
    p = health.probe_target(index, spec, set_file.pool_size, functools.partial(
        open_target, pm, spec, index, TargetHost(set_file, view, pm)))
    p.close()
    return p


def _judge(path: str, out: Promotion, force: bool) -> None:
    """Refuse a promotion that would lose acknowledged writes or fork the pool."""
    mine = out.previous
    for c in out.compared:
        if c.relation == AHEAD:
            raise PmReplicaError(errno.ESTALE, (
                f"{path}: cannot promote: {c.name} holds newer acknowledged writes "
                f"({c.generation.describe()}, this replica: "  # type: ignore[union-attr]
                f"{mine.describe() if mine else 'none'}); promote {c.name} instead"))
        if c.relation == DIVERGED:
            raise PmReplicaError(errno.ESTALE, (
                f"{path}: cannot promote: this replica and {c.name} both took writes after "
                f"they parted (split brain); choose with replica-sync --discard"))
    if force:
        return
    if mine is None:
        raise PmReplicaError(errno.EAGAIN, f"{path}: this replica records no generation (a pool "
                                           "made before them): nothing shows whether it missed "
                                           "writes; --force promotes it anyway")
    # every listed replica must answer: any one that cannot be asked may be in a newer
    # generation (the lost master began it when this replica fell behind), holding
    # acknowledged writes this one lacks; one in step or behind says nothing of the others
    unknown = [c for c in out.compared if c.relation not in (SAME, BEHIND)]
    if not out.compared or unknown:
        why = ("no other replica is listed in the pool set" if not out.compared else
               "; ".join(f"{c.name} could not be asked ({c.problem})" if c.problem else
                         f"{c.name} records no generation" for c in unknown))
        raise PmReplicaError(errno.EAGAIN, f"{path}: cannot tell whether this replica missed "
                                           f"writes: {why}; list the pool's other replicas "
                                           "in the set file and make them reachable, or "
                                           "promote with --force if you know it holds every "
                                           "acknowledged write")


def _begin_record(part0: str, size: int, nreplicas: int, gen: Generation | None) -> None:
    """A fresh replica-state record for the promoted master: every listed replica stale, to
    be compared (``replica-sync`` brings them in line), unless the set lists none."""
    state = ReplicaState(size, generation=gen.epoch if gen else 1)
    for i in range(1, nreplicas):
        state.mark_stale(i, full=True, compare=True)
    store_copy(part0, state.pack())


# -- the command ------------------------------------------------------------------------------
def register(sub) -> None:
    """Add ``promote`` to the ``pmreplica`` command (cli.COMMAND_MODULES)."""
    p = sub.add_parser(
        "promote", help="make a replica the master of its pool (the master's host is lost)",
        description="Make the master replica of POOLSET (a replica of a lost master: the set "
                    "its agent served, or a local set listing it first, with the pool's other "
                    "replicas after it) the master of its pool. Refused when another listed "
                    "replica holds newer acknowledged writes, or diverged; when none can be "
                    "asked, --force is needed. Then run replica-sync POOLSET to bring the "
                    "listed replicas in line.")
    p.add_argument("poolset", metavar="POOLSET")
    p.add_argument("--force", action="store_true",
                   help="promote even when no other replica can tell whether this one "
                        "missed writes")
    p.add_argument("--json", action="store_true", help="print the outcome as JSON")
    p.set_defaults(func=cmd_promote)


def cmd_promote(args) -> int:
    import json

    out = promote(args.poolset, force=args.force)
    gen = out.generation
    assert gen is not None
    if args.json:
        json.dump({"path": os.path.abspath(out.path), "already": out.already,
                   "epoch": gen.epoch, "previous_epoch": out.previous.epoch if out.previous
                   else None,
                   "compared": [{"index": c.index, "name": c.name, "relation": c.relation,
                                 "epoch": c.generation.epoch if c.generation else None,
                                 "problem": c.problem} for c in out.compared]},
                  sys.stdout, indent=2)
        print()
        return 0
    if out.already:
        print(f"{out.path}: already the master ({gen.describe()})")
        return 0
    for c in out.compared:
        what = {SAME: "in step", BEHIND: "behind (missed writes)"}.get(
            c.relation or "", c.problem or "records no generation")
        print(f"  {c.name}: {what}")
    print(f"{out.path}: promoted to master ({gen.describe()})")
    if out.compared:
        print(f"next: replica-sync {out.path}  (brings the listed replicas in line)")
    return 0

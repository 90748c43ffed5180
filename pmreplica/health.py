"""The health of a pool set's replicas, judged as replica-sync needs it before repairing.

Each replica is probed through its plugin's target, the local ones included: a target that
keeps its header pages (:class:`~pmreplica.target.HeaderPageKeeper`, the local plugin's) is
read for them and their problems (present, readable, sizes, header checksums, part links),
broken or not; any other is opened for its attributes (the target staying open for the copy
or the checksums that follow, the rpmem target holding the remote pool's lock; when that
fails, ``stat`` for its size and header health). Then the replicas are judged together:

* identity: all must carry the pool set uuid and format of the master; when the master is
  not sound, of the uuid most sound replicas share (ties: the lowest-numbered);
* links: each replica's next/previous replica uuids must name its neighbours;
* freshness, from the replica-state record (:mod:`pmreplica.state`). The record is read
  from the master and from the copies in the replicas that keep header pages; the one with
  the highest generation is the authority (copies of one generation are merged, stale marks
  unioned). The master vouches for every replica, itself included. A copy vouches for every
  replica except the one holding it: a replica that failed after its copy was last written
  would otherwise clear itself (its failure was recorded only where it could still be
  written). A replica not marked stale but vouched for by nobody is *unknown*: never a
  source, resynced in full. With no record at all (master lost, no local replica), the
  master alone counts as up to date.

The source of a repair is the lowest-numbered replica that is sound, of the pool set's
identity, and known to be up to date (PMDK picks the lowest-numbered healthy replica too).
"""

from __future__ import annotations

import errno
import logging
import os
import uuid as _uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

from . import dirtymap, generation
from .errors import PmReplicaError, as_replica_failure
from .generation import AHEAD, BEHIND, DIVERGED, Generation
from .header import HDR_SIZE, NIL, PoolAttr, PoolHeader
from .identity import Identity, membership_problem
from .setfile import LocalReplica, Replica
from .state import ReplicaState
from .status import NamedReplica, close_quietly
from .target import HeaderPageKeeper, HeaderPages, ReplicaTarget, open_checked, stat_checked

log = logging.getLogger(__name__)

# health of a replica, as reported
HEALTHY = "healthy"  # sound, of this pool set, known to be up to date
STALE = "stale"  # sound, but marked stale: it missed writes
UNKNOWN = "unknown"  # sound, but nothing shows it is up to date
BROKEN = "broken"  # missing or damaged storage or header, or another pool set's
UNREACHABLE = "unreachable"  # its agent could not be asked, or its pool not opened (busy)

# freshness of a sound replica
FRESH = "fresh"


@dataclass(eq=False)
class Probe(NamedReplica):
    """One replica as found: where it is, what is wrong with it, what its header says."""

    index: int
    spec: Replica
    #: what is wrong with the replica's storage, header or identity (empty: sound)
    problems: list[str] = field(default_factory=list)
    #: wrong replica links: fixed by rewriting headers, the data is not in question
    link_problems: list[str] = field(default_factory=list)
    identity: Identity | None = None
    #: the first part's header as read (replicas that keep header pages)
    header: PoolHeader | None = None
    #: part 0's header page (replicas that keep header pages; the replica-state record
    #: copy lives in it)
    page: bytes | None = None
    #: the target of a replica that keeps its header pages (not open; bound to a scratch
    #: buffer): its pages are read and written through it
    keeper: HeaderPageKeeper | None = None
    #: the open target of a replica (bound to a scratch buffer)
    target: ReplicaTarget | None = None
    #: the attributes its target's open() gave
    attr: PoolAttr | None = None
    reachable: bool = True
    #: False when replica-sync cannot repair it (too small, NOHDRS, directory-based)
    repairable: bool = True
    #: fresh, stale or unknown (sound replicas only)
    freshness: str | None = None
    #: the generation the replica records (generation.py), None if none
    generation: Generation | None = None
    #: to be repaired by comparing checksums with the source (it may hold what it lacks)
    compare: bool = False
    #: what the generations say of it, beside its problems
    remarks: list[str] = field(default_factory=list)

    @property
    def sound(self) -> bool:
        return self.reachable and not self.problems and self.identity is not None

    @property
    def health(self) -> str:
        if not self.reachable:
            return UNREACHABLE
        if not self.sound:
            return BROKEN
        return {FRESH: HEALTHY, STALE: STALE}.get(self.freshness or "", UNKNOWN)

    @property
    def keeps_pages(self) -> bool:
        """Whether the replica keeps its header pages (and a copy of the record in them)."""
        return self.keeper is not None

    def close(self) -> None:
        """Let go of the targets the probe holds."""
        for target in (self.target, self.keeper):
            if target is not None:
                close_quietly(target)
        self.target = self.keeper = None


def probe_target(index: int, spec: Replica, pool_size: int,
                 new_target: Callable[[], ReplicaTarget]) -> Probe:
    """Ask the replica's plugin for its target (``new_target()``, unopened). One that keeps
    its header pages is read for them (``probe.keeper``); any other is opened for the
    attributes (the target stays open in ``probe.target``: the rpmem target holds the remote
    pool's lock), and when that fails, its ``stat()`` says why: unreachable, too small, or
    which parts and headers are broken. What the plugin raises beside OSErrors (a bug) is the
    replica's failure, EIO (as_replica_failure), as in an open pool."""
    probe = Probe(index, spec)
    try:
        target = new_target()
    except Exception as e:  # noqa: BLE001 - a plugin's bug fails its replica alone
        return _unreachable(probe, e)
    if isinstance(target, HeaderPageKeeper):
        try:
            pages = target.header_pages()
        except Exception as e:  # noqa: BLE001 - as above
            close_quietly(target)
            error = as_replica_failure(probe.name, e)
            probe.problems.append(error.strerror or str(error))
            probe.repairable = False
            return probe
        probe.keeper = target
        _judge_pages(probe, pages)
        return probe
    try:
        attr = open_checked(target)
    except Exception as e:  # noqa: BLE001 - as above
        refused = as_replica_failure(probe.name, e)
    else:
        probe.target, probe.attr = target, attr
        if attr.is_zeroed:
            probe.problems.append("replica has no header (a NOHDRS pool set): "
                                  "replica-sync needs pool headers")
            probe.repairable = False
        else:
            probe.identity = Identity.of_attr(attr)
            try:
                probe.generation = stat_checked(target).generation
            except OSError as e:
                log.debug("%s: no generation: %s", probe.name, e)
            except Exception as e:  # noqa: BLE001 - as above (closed with the probe)
                return _unreachable(probe, e)
        return probe
    try:
        st = stat_checked(target)
    except Exception as e:  # noqa: BLE001 - as above
        return _unreachable(probe, e)
    finally:
        close_quietly(target)
    probe.generation = st.generation
    if st.size < pool_size:
        probe.repairable = False
        probe.problems.append(f"the replica holds {st.size} bytes, the pool needs {pool_size}")
    elif not st.healthy:
        probe.problems.extend(_tidy(st.detail.split("; ")) if st.detail
                              else ["replica is inconsistent"])
    else:  # sound, but not to be had: open in another session, or its data path fails
        probe.reachable = False
        probe.problems.append(_message(refused))
    return probe


def _unreachable(probe: Probe, error: Exception) -> Probe:
    """``probe``, its replica not to be had: ``error`` is why."""
    probe.reachable = False
    probe.problems.append(_message(as_replica_failure(probe.name, error)))
    return probe


def _judge_pages(probe: Probe, found: HeaderPages) -> None:
    """What a replica's header pages say of it: its problems, header, identity, generation
    and record page."""
    probe.problems += _tidy(list(found.problems))
    first = found.pages[0] if found.pages else None
    if first is not None and len(first) == HDR_SIZE:
        probe.page = first
    if not found.problems and probe.page is not None:
        probe.header = PoolHeader.unpack(probe.page)
        probe.identity = Identity.of_header(probe.header)
        probe.generation = generation.of_page(probe.page)
    elif not found.pages:
        probe.problems.append("replica has no headers")


def not_contacted(index: int, spec: Replica) -> Probe:
    """A replica left alone (``pmreplica info`` contacts no plugin's replica): judged as
    one whose health is not known."""
    return Probe(index, spec, problems=["not contacted"], reachable=False)


_ENOENT = ": " + os.strerror(errno.ENOENT)


def _tidy(problems: list[str]) -> list[str]:
    """A part that is missing said once (``check`` finds it by its size and its header)."""
    missing = [m[:-len(_ENOENT)] for m in problems
               if m.endswith(_ENOENT) and ": cannot read" not in m]
    return [f"{m}: part file is missing" for m in missing] + [
        msg for msg in problems if not any(msg.startswith(m + ": ") for m in missing)]


def _message(e: OSError) -> str:
    return str(e) if isinstance(e, PmReplicaError) else (e.strerror or str(e))


@dataclass
class Judgement:
    """The replicas judged together: identity, the authoritative state record, freshness,
    the replica uuids the links must name."""

    #: the replica whose pool set uuid and format all must share (None: no sound replica)
    reference: Probe | None
    #: the authoritative replica-state record (merged copies of the newest generation)
    state: ReplicaState | None
    #: replicas whose copy of the record has the newest generation
    holders: list[int]
    #: each replica's uuid as the repaired pool set will have it
    canonical: list[_uuid.UUID]
    #: why nothing may be repaired without the operator's choice (split brain, superseded)
    conflict: str | None = None
    #: the newest generation of the replicas (None: none recorded)
    newest: Generation | None = None
    #: the replica whose newer generation another master began (this set was superseded)
    superseded_by: int | None = None
    #: two replicas that took writes after they parted (split brain), one of each side
    split: tuple[int, int] | None = None


def judge(probes: list[Probe], pool_size: int,
          discard: frozenset[int] = frozenset()) -> Judgement:
    """Judge the probed replicas together; adds identity and link problems to the probes
    and sets their freshness (``discard``: replicas whose data the operator gives up, see
    :func:`_generations`)."""
    n = len(probes)
    reference = _reference(probes)
    if reference is not None:
        ref = reference.identity
        assert ref is not None
        for p in probes:
            if p.sound and p is not reference:
                problem = membership_problem(p.identity, ref,  # type: ignore[arg-type]
                                             f"replica {reference.index}")
                if problem:
                    p.problems.append(problem)
        seen: dict[_uuid.UUID, int] = {}
        for p in probes:  # a copied part file: its data and its record are another's
            if p.sound:
                first = seen.setdefault(p.identity.uuid, p.index)  # type: ignore[union-attr]
                if first != p.index:
                    p.problems.append(f"has the replica uuid of replica {first} (a copy of "
                                      "its file?)")
    state, holders = _authority(probes, reference, pool_size)
    for p in probes:
        if not p.sound:
            continue
        if state is None:
            p.freshness = FRESH if p.index == 0 else UNKNOWN
        elif state.is_stale(p.index):
            p.freshness = STALE
        elif p.index == 0 or 0 in holders or set(holders) - {p.index}:
            p.freshness = FRESH
        else:
            p.freshness = UNKNOWN
    canonical = _canonical_uuids(probes)
    for p in probes:
        if not p.sound:
            continue
        ident = p.identity
        assert ident is not None
        nxt, prv = (p.index + 1) % n, (p.index - 1) % n
        if ident.next_repl != canonical[nxt]:
            p.link_problems.append(f"next replica uuid does not name replica {nxt}")
        if ident.prev_repl != canonical[prv]:
            p.link_problems.append(f"previous replica uuid does not name replica {prv}")
        if state is not None and state.is_stale(p.index) and state.needs_compare(p.index):
            p.compare = True
    out = Judgement(reference, state, holders, canonical)
    _generations(out, probes, canonical[0], discard)
    return out


def _generations(out: Judgement, probes: list[Probe], master: _uuid.UUID,
                 discard: frozenset[int]) -> None:
    """Judge the replicas' generations (generation.py): a replica behind the newest one
    missed acknowledged writes (stale, repaired by comparison: it may also hold writes the
    newest line lacks); replicas in ``discard`` are treated as behind, whatever they hold.
    Sets in ``out`` why the pool set cannot be repaired without a choice (two lines of
    generations that both took writes: split brain; or the newest begun by another master:
    this set was superseded), and the newest generation."""
    gens = {p.index: p.generation for p in probes
            if p.sound and p.generation is not None and p.index not in discard}
    heads = [i for i, g in gens.items()
             if not any(gens[j].relation(g) == AHEAD for j in gens if j != i)]
    lines: dict[bytes, list[int]] = {}
    for i in heads:
        lines.setdefault(gens[i].id, []).append(i)
    behind = [p for p in probes if p.sound and (p.index in discard or (
        p.index in gens and gens[p.index].id not in lines))]
    for p in behind:
        if p.freshness != STALE or p.index in discard:  # what it lacks is not on record
            p.compare = True
        p.freshness = STALE
        p.remarks.append(f"discarded (--discard {p.index}): repaired from the source"
                         if p.index in discard else
                         f"behind: it missed acknowledged writes ({gens[p.index].describe()})")
    if len(lines) > 1:
        a, b = [Side(probes[ids[0]].name, gens[ids[0]], tuple(ids))
                for ids in lines.values()][:2]
        out.split = (a.indices[0], b.indices[0])
        out.conflict = conflict(DIVERGED, a, b)
        return
    if not lines:
        return
    (ids,) = lines.values()
    out.newest = newest = gens[ids[0]]
    if newest.master != master.bytes:
        out.superseded_by = ids[0]
        master_probe = probes[0]
        ours = Side(master_probe.name,
                    master_probe.generation if master_probe.sound else None, (0,))
        out.conflict = conflict(BEHIND, ours, Side(probes[ids[0]].name, newest, tuple(ids)))


class Side(NamedTuple):
    """One side of a conflict between generations: the replica named for it, its
    generation, and the replicas ``--discard`` names to give that side up."""

    name: str
    generation: Generation | None
    indices: tuple[int, ...]


def conflict(relation: str, ours: Side, theirs: Side) -> str:
    """The verdict when two lines of generations cannot be reconciled without the operator,
    in the one wording ``PoolSet.open`` and replica-sync give: ``relation`` BEHIND, ours was
    superseded by theirs (begun by another master: a replica promoted since); DIVERGED,
    both took writes after they parted (split brain)."""
    def discard(side: Side) -> str:
        return "replica-sync " + " ".join(f"--discard {i}" for i in side.indices)

    assert theirs.generation is not None
    if relation == BEHIND:
        mine = (f"; {ours.name}: {ours.generation.describe()}"
                if ours.generation is not None else "")
        return (f"this pool set was superseded: {theirs.name} holds newer data "
                f"({theirs.generation.describe()}{mine}) under another master (a replica "
                f"promoted since); rejoin this set's master as a replica of that pool "
                f"(replica-sync there), or keep this set's data with `{discard(theirs)}`")
    assert ours.generation is not None
    parted = ours.generation.parted(theirs.generation)
    since = f"generation {parted}" if parted is not None else "a generation no longer recorded"
    return (f"split brain: {ours.name} and {theirs.name} both took writes after they parted "
            f"at {since} ({ours.name}: {ours.generation.describe()}; {theirs.name}: "
            f"{theirs.generation.describe()}); nothing is overwritten until you choose: "
            f"`{discard(theirs)}` keeps {ours.name}'s data, `{discard(ours)}` keeps "
            f"{theirs.name}'s")


def _reference(probes: list[Probe]) -> Probe | None:
    """The replica whose identity the others must share: the master when sound, else the
    lowest-numbered of the pool set uuid most sound replicas carry."""
    sound = [p for p in probes if p.sound]
    if not sound:
        return None
    if sound[0].index == 0:
        return sound[0]
    votes = Counter(p.identity.poolset_uuid for p in sound)  # type: ignore[union-attr]
    best = max(votes.values())
    return next(p for p in sound if votes[p.identity.poolset_uuid] == best)  # type: ignore[union-attr]


def _authority(probes: list[Probe], reference: Probe | None,
               pool_size: int) -> tuple[ReplicaState | None, list[int]]:
    """The newest intact replica-state record and the replicas holding it."""
    n = len(probes)
    ref_uuid = reference.identity.poolset_uuid if reference else None  # type: ignore[union-attr]
    found: list[tuple[int, ReplicaState]] = []
    for p in probes:
        if not p.keeps_pages or p.page is None:
            continue
        if p.index == 0:
            # the master's record counts even when the rest of the master is broken (its
            # own CRC protects it), unless a sound header says it is another pool's
            hdr = PoolHeader.unpack(p.page)
            if (PoolHeader.checksum_ok(p.page) and not hdr.is_zeroed and ref_uuid is not None
                    and hdr.poolset_uuid != ref_uuid):
                continue
        elif not p.sound:
            continue
        st = ReplicaState.load(p.page, pool_size, n)
        if st.intact:
            found.append((p.index, st))
    if not found:
        return None, []
    newest = max(st.generation for _, st in found)
    holders = [i for i, st in found if st.generation == newest]
    state: ReplicaState | None = None
    for _, st in found:  # the master's first: a copy that adds nothing keeps its fine map
        if st.generation != newest:
            continue
        if state is None:
            state = st
        else:
            state.merge(st)
    master = probes[0].spec
    if state is not None and isinstance(master, LocalReplica) and master.parts:
        state.attach(dirtymap.path_for(master.parts[0].path))
    return state, holders


def _canonical_uuids(probes: list[Probe]) -> list[_uuid.UUID]:
    """Each replica's uuid: its own when sound, else the one its neighbours link to, else a
    new one."""
    n = len(probes)
    out: list[_uuid.UUID | None] = [p.identity.uuid if p.sound else None  # type: ignore[union-attr]
                                    for p in probes]
    for p in probes:
        if out[p.index] is not None:
            continue
        prv, nxt = probes[(p.index - 1) % n], probes[(p.index + 1) % n]
        guess = None
        if prv.sound and prv.identity.next_repl != NIL:  # type: ignore[union-attr]
            guess = prv.identity.next_repl  # type: ignore[union-attr]
        elif nxt.sound and nxt.identity.prev_repl != NIL:  # type: ignore[union-attr]
            guess = nxt.identity.prev_repl  # type: ignore[union-attr]
        if guess is None or guess in out:
            guess = _uuid.uuid4()
        out[p.index] = guess
    return out  # type: ignore[return-value]


def choose_source(probes: list[Probe], forced: int | None = None) -> tuple[int | None, str]:
    """The replica to repair from and, when there is none, why. ``forced`` names one the
    operator vouches for: it must be sound and must not be marked stale."""
    if forced is not None:
        if not 0 <= forced < len(probes):
            return None, f"there is no replica {forced}"
        p = probes[forced]
        if not p.sound:
            return None, f"{p.name} cannot be the source: it is {p.health}"
        if p.freshness == STALE:
            return None, f"{p.name} cannot be the source: it is marked stale (it missed writes)"
        return forced, ""
    for p in probes:
        if p.sound and p.freshness == FRESH:
            return p.index, ""
    unknown = [p for p in probes if p.sound and p.freshness == UNKNOWN]
    if unknown:
        names = ", ".join(p.name for p in unknown)
        return None, (f"no replica is known to be up to date: the replica-state record that "
                      f"would vouch for {names} was lost; if you know one did not miss "
                      f"writes, name it with --source N")
    return None, "no healthy replica is left to repair from"

"""Power-loss crash images (pmreplica.powerloss): each scenario of scenarios.py runs under
the simulation and every crash image it yields must recover to a state the workload allowed
there. The budgets keep the whole module near a minute on two CPUs;
tools/powerloss_stress.py explores the same scenarios with more seeds and images.

The last tests put known bugs back (a missing fence, a missing flush) and require the
explorer to find them: the guard that it can fail."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pmreplica.powerloss import Report, explore
from tests.helpers import ROOT


def run(pool_dir: Path, scenario: str, params: dict[str, Any], **budget: Any) -> Report:
    return explore(f"tests.powerloss.scenarios:{scenario}", params, pool_dir, cwd=str(ROOT),
                   workers=2, keep_failures=str(pool_dir / "failed"), **budget)


def assert_clean(report: Report, min_images: int) -> None:
    print(report.summary())
    failures = "\n".join(f"  {f}" for f in report.result.failures)
    assert report.failed == 0, f"{report.summary()}\n{failures}"
    assert report.images >= min_images, report.summary()


def test_object_store(pool_dir: Path) -> None:
    """Dicts, lists, sets, objects, orphans and huge values, with gc, checkpoints (often),
    clean reopens, and power cuts inside commits followed by recoveries that are cut too:
    both outcomes of a commit in flight happen, and nothing else."""
    report = run(pool_dir, "Objects", {"seed": 1, "transactions": 36, "knobs": 1, "cuts": 3},
                 sample=0.5, images_per_point=6)
    assert_clean(report, 800)
    labels = report.result.labels
    assert labels["in-flight committed"] and labels["in-flight lost"], labels


def test_object_store_with_a_replica_and_spilled_records(pool_dir: Path) -> None:
    """The same on a pool set with a local replica (checked on its own too, as replica-sync
    would promote it), with an 8 KiB log window, so that bigger transactions spill."""
    report = run(pool_dir, "Objects", {"seed": 2, "transactions": 24, "knobs": 2, "cuts": 2,
                                       "replica": True}, sample=0.4, images_per_point=4)
    assert_clean(report, 350)


def test_full_pool(pool_dir: Path) -> None:
    """Filling a pool until it refuses, clearing it in one transaction, gc, checkpoint, a
    value of half the pool, and filling again."""
    report = run(pool_dir, "FullPool", {"rounds": 1}, sample=0.03, images_per_point=3)
    assert_clean(report, 200)


def test_replica_state_record(pool_dir: Path) -> None:
    """Replicas failing at open and under writes: the replica-state record and its copies,
    then replica-sync on every image. A record torn by the power failure reads as "every
    replica stale, resync in full" (state.py's safe reading): never a replica taken for
    current that is not."""
    report = run(pool_dir, "RecordWrites", {"writes": 12}, images_per_point=3)
    assert_clean(report, 150)
    assert report.result.labels["record intact"], report.result.labels


def test_replica_sync_header_rewrites(pool_dir: Path) -> None:
    """replica-sync repairing a stale replica and a lost one and rewriting broken replica
    links, cut at every durability point: the next run repairs every image."""
    report = run(pool_dir, "SyncRepair", {}, images_per_point=4)
    assert_clean(report, 55)


def test_unclean_reopen(pool_dir: Path) -> None:
    """A pool set left open by a killed process, then reopened, cut at every durability
    point of both sessions and of the recovery between them: every reopen brings the
    replicas in line with the master, with no replica-sync."""
    report = run(pool_dir, "UncleanReopen", {"writes": 10}, images_per_point=4)
    assert_clean(report, 150)
    assert report.result.labels["recovered"], report.result.labels


def test_unclean_reopen_with_epochs(pool_dir: Path) -> None:
    """The same with the activity log's epochs one chunk long: a chunk leaves the log only
    once no call can still be writing to it, so every reopen still brings the replicas in
    line, but for the store of a persist the cut interrupted."""
    report = run(pool_dir, "EpochReopen", {"writes": 12}, images_per_point=4)
    assert_clean(report, 150)
    assert report.result.labels["recovered"], report.result.labels


@pytest.mark.parametrize("fault", ["unfenced", "unflushed"])
def test_the_explorer_finds_a_known_bug(pool_dir: Path, fault: str) -> None:
    report = run(pool_dir, "Objects", {"seed": 3, "transactions": 14, "knobs": 1, "cuts": 0,
                                       "fault": fault}, images_per_point=4)
    assert report.failed, report.summary()
    assert any("root['n']" in f.error or "differs" in f.error
               for f in report.result.failures), report.result.failures

"""replica-sync SIGKILLed at random moments (with the agents it started): after each kill,
every replica a check reports healthy still holds the newest data, and the next sync
completes with every replica byte-identical to it. The faults rotate: a deleted replica
part, a deleted master part (repaired from replica 1), a removed remote pool, a remote
replica that missed writes, a truncated part, and a master whose record is lost (repaired
from the remote replica). tools/sync_stress.py runs the same loop longer."""

from __future__ import annotations

from .sync_harness import FAULTS, PoolLayout, crash_loop, fill

RUNS = 24


def test_sync_survives_sigkill_at_random_points(pool_dir):
    layout = PoolLayout(pool_dir)
    fill(layout.path, layout.env(), seed=99)
    result = crash_loop(layout, RUNS, seed=2024, log=lambda msg: None)
    assert result.runs == RUNS and RUNS >= 4 * len(FAULTS)
    # the kills landed in every phase: while probing, while repairing, after finishing
    assert result.kills.get("while repairing", 0) >= 3, result.kills
    assert result.kills.get("before copying", 0) >= 1, result.kills
    assert result.checked_healthy >= RUNS

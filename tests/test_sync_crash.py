"""replica-sync SIGKILLed while it runs (with the agents it started): after each kill,
every replica a check reports healthy still holds the newest data, and the next sync
completes with every replica byte-identical to it. The faults rotate: a deleted replica
part, a deleted master part (repaired from replica 1), a removed remote pool, a remote
replica that missed writes, a truncated part, and a master whose record is lost (repaired
from the remote replica). Each fault's undisturbed sync is timed first; most kills are
drawn over its repair window (counted from its first copy), a few over its probing.
tools/sync_stress.py runs the same loop longer."""

from __future__ import annotations

from .sync_harness import FAULTS, crash_layout, crash_loop, fill

RUNS = 24


def test_sync_survives_sigkill_at_random_points(pool_dir):
    layout = crash_layout(pool_dir)
    fill(layout.path, layout.env(), seed=99)
    result = crash_loop(layout, RUNS, seed=2024, log=lambda msg: None)
    assert result.runs == RUNS and RUNS >= 4 * len(FAULTS)
    # most kills land while the sync is repairing (about 20 of 24 on a quiet machine; the
    # bound leaves room for a loaded one), some while it is still probing
    assert result.kills.get("while repairing", 0) >= RUNS // 2, (result.kills,
                                                                     result.timings)
    assert result.kills.get("before copying", 0) >= 1, (result.kills, result.timings)
    assert result.checked_healthy >= RUNS

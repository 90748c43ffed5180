"""`pmreplica bench` end to end against a real agent, and the placement its method relies
on: with the client pinned to one CPU, the processes it starts land where they are meant to."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from pmreplica import bench

from .helpers import unavailable

AFFINITY = [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"]


def test_started_processes_are_placed_after_the_client_pinned_itself():
    if bench._cpus() is None:
        unavailable("placement needs two CPUs")
    first, other = bench._cpus()
    with bench._running_on(first):
        for same_cpu, cpu in ((True, first), (False, other)):
            run = subprocess.run(bench._pinned(AFFINITY, same_cpu), capture_output=True,
                                 text=True, check=True)
            assert run.stdout == f"[{cpu}]\n", same_cpu
    assert len(os.sched_getaffinity(0)) > 1  # the client's own affinity comes back


def test_a_quick_run_reports_every_figure_beside_its_baseline():
    out = io.StringIO()
    rows = bench.run(quick=True, out=out, as_json=True)
    persist = [f"persist {n} {q}{tls}" for n in ("64 B", "4 KiB", "64 KiB")
               for q in ("median", "p99") for tls in ("", ", TLS")]
    streams = [f"persist {n}{tls}" for n in ("1 MiB x1 lane", "16 MiB x1 lane",
                                             "1 MiB x4 lanes", "16 MiB x4 lanes")
               for tls in ("", ", TLS")]
    assert [r.metric for r in rows] == [*persist, "read 64 B median", "read 64 B median, TLS",
                                        *streams, "create+close, local launcher"]
    for r in rows:
        assert r.value > 0, r
        if r.baseline is not None:
            assert r.ratio == pytest.approx(r.value / r.baseline), r
        assert (r.ok is None) == (not r.target), r
    assert [row["metric"] for row in json.loads(out.getvalue())] == [r.metric for r in rows]
    assert len(os.sched_getaffinity(0)) == len(bench._ALLOWED)

"""Run a scenario under the simulation in one process, then check its images in others.

The writer (``python -m pmreplica.powerloss record``) runs the scenario's ``setup`` and,
under a :class:`~pmreplica.powerloss.model.Simulation`, its ``run``, and writes the stream;
``workers`` checkers (``python -m pmreplica.powerloss check``) then share its images.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .check import CheckResult


@dataclass
class Report:
    """What one exploration recorded and found."""

    scenario: str
    params: dict[str, Any]
    points: int = 0          # durability points the workload passed
    recorded: int = 0        # of them, recorded
    result: CheckResult = field(default_factory=CheckResult)
    seconds: float = 0.0
    stream: str = ""

    @property
    def images(self) -> int:
        return self.result.images

    @property
    def failed(self) -> int:
        return self.result.failed

    def summary(self) -> str:
        labels = ", ".join(f"{k} {v}" for k, v in sorted(self.result.labels.items()))
        return (f"{self.scenario} {self.params}: {self.images} images from "
                f"{self.recorded} of {self.points} durability points in "
                f"{self.seconds:.1f} s, {self.failed} failed ({labels})")


def _run(cmd: list[str], cwd: str | None, timeout: float) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}:\n"
                           f"{proc.stderr[-4000:]}")
    return proc.stdout


def explore(scenario: str, params: dict[str, Any], base: str | os.PathLike[str], *,
            sample: float = 1.0, max_points: int = 1 << 30, images_per_point: int = 8,
            workers: int = 2, seed: int = 0, cwd: str | None = None,
            keep_failures: str | None = None, timeout: float = 1800) -> Report:
    """Record ``scenario`` (``module:Class``, built with ``params``) in ``base``/work and
    check its images with ``workers`` processes; ``cwd`` is where the scenario's module
    imports from."""
    start = time.monotonic()
    base = Path(base)
    workdir, scratch = base / "work", base / "scratch"
    workdir.mkdir(parents=True, exist_ok=True)
    stream = str(base / "stream")
    py = [sys.executable, "-m", "pmreplica.powerloss"]
    out = _run(py + ["record", stream, "--scenario", scenario, "--params", json.dumps(params),
                     "--workdir", str(workdir), "--sample", str(sample), "--max-points",
                     str(max_points), "--seed", str(seed)], cwd, timeout)
    written = json.loads(out.splitlines()[-1])
    report = Report(scenario, params, written["points"], written["recorded"], stream=stream)
    procs = []
    for w in range(workers):
        cmd = py + ["check", stream, "--scratch", f"{scratch}{w}", "--images-per-point",
                    str(images_per_point), "--worker", str(w), "--workers", str(workers),
                    "--seed", str(seed)]
        if keep_failures:
            cmd += ["--keep-failures", keep_failures]
        procs.append(subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    errors = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        if p.returncode != 0:
            errors.append(f"checker exited {p.returncode}:\n{stderr[-4000:]}")
            continue
        report.result.merge(CheckResult.from_json(stdout.splitlines()[-1]))
    if errors:
        raise RuntimeError("\n".join(errors))
    report.seconds = time.monotonic() - start
    return report

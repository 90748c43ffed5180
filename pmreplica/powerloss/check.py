"""Checking crash images: replay a stream, and hand each image to a fresh process.

A checker replays the stream's durable image and, at each recorded point, picks the images
(images.py). Each image is written to a scratch directory and checked by a child forked for
it from the checker, which itself never opens a pool: the scenario's ``verify`` runs in a
process that has seen nothing of the workload or of other images. Several checkers share a
stream: checker ``worker`` of ``workers`` takes every ``workers``-th image.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import random
import signal
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from ..plugin_manager import make_plugin_manager
from . import images as _images
from .stream import read

#: failures reported in full (the rest are counted)
MAX_REPORTED = 20


def load_scenario(spec: str, params: dict[str, Any]) -> Any:
    """Instantiate the scenario class named ``module:qualname`` with ``params``."""
    module, _, name = spec.partition(":")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj(**params)


@dataclass
class Failure:
    """One image whose check failed, and how to find it again: the durability point (its
    number and kind), the image's index there, how many of the point's pending words it
    kept, the workload's context, the error, and where the image was kept."""

    point: int
    kind: str
    image: int
    kept: int
    pending: int
    context: Any
    error: str
    saved: str | None = None


@dataclass
class CheckResult:
    """What one or more checkers found (``merge`` adds another's share)."""

    points: int = 0
    images: int = 0
    #: the scenario's labels of what the images recovered to, counted
    labels: Counter = field(default_factory=Counter)
    failures: list[Failure] = field(default_factory=list)
    failed: int = 0

    def merge(self, other: "CheckResult") -> None:
        self.points = max(self.points, other.points)
        self.images += other.images
        self.labels.update(other.labels)
        self.failed += other.failed
        self.failures += other.failures[:max(0, MAX_REPORTED - len(self.failures))]

    def to_json(self) -> str:
        d = asdict(self)
        d["labels"] = dict(self.labels)
        # a failure's context is the workload's (bytes a persist wrote, say): shown, not read
        return json.dumps(d, default=repr)

    @classmethod
    def from_json(cls, text: str) -> "CheckResult":
        d = json.loads(text)
        return cls(d["points"], d["images"], Counter(d["labels"]),
                   [Failure(**f) for f in d["failures"]], d["failed"])


class DurableImage:
    """The durable content of a run's files, rebuilt event by event from its stream;
    ``generation`` counts the changes (two points of one generation share the image)."""

    def __init__(self) -> None:
        self.files: dict[str, bytearray] = {}
        self.generation = 0

    def apply(self, ev: tuple) -> None:
        tag, rel = ev[0], ev[1]
        if tag == "d":
            off, data = ev[2], ev[3]
            self.files[rel][off:off + len(data)] = data
        elif tag == "f":
            self.files[rel] = bytearray(ev[2])       # the content, or that many zeros
        elif tag == "r":
            f = self.files[rel]
            if len(f) > ev[2]:
                del f[ev[2]:]
            else:
                f.extend(bytes(ev[2] - len(f)))
        elif tag == "g":
            self.files.pop(rel, None)
        self.generation += 1


def check(stream: str, scratch: str, *, images_per_point: int = 8, worker: int = 0,
          workers: int = 1, seed: int = 0, timeout: float = 120,
          keep_failures: str | None = None, only: tuple[int, int] | None = None
          ) -> CheckResult:
    """Check this worker's share of the images of ``stream`` (failing ones are copied into
    ``keep_failures``); ``only`` = (point, image) checks that one image alone, and keeps
    it whatever the outcome."""
    header, events = read(stream)
    scenario = load_scenario(header["scenario"], header["params"])
    # loaded once here rather than in every child: what plugins exist is no pool's state
    make_plugin_manager()
    workdir = header["workdir"]
    image = DurableImage()
    result = CheckResult()
    checked: set[int] = set()
    counter = 0
    logging.disable(logging.CRITICAL)  # recovery's warnings are what the images are for
    for ev in events:
        if ev[0] != "p":
            image.apply(ev)
            continue
        _, seq, kind, context, pending = ev
        result.points += 1
        if only is not None and seq != only[0]:
            continue
        where, values = _images.flatten(pending)
        rng = random.Random(f"{seed}:{seq}")
        for j, subset in enumerate(_images.choose(where, rng, images_per_point)):
            key = hash((image.generation, repr(context),
                        tuple(where[i] + (values[i],) for i in subset)))
            if key in checked:
                continue
            checked.add(key)
            counter += 1
            if (j != only[1]) if only is not None else (counter % workers != worker):
                continue
            words = [(where[i][0], where[i][1], values[i]) for i in subset]
            ok, label = _run_one(scenario, scratch, image.files, workdir, words, context,
                                 timeout)
            result.images += 1
            if ok:
                result.labels[label] += 1
            else:
                result.failed += 1
            saved = None
            if keep_failures is not None and (only is not None or
                                              (not ok and result.failed <= MAX_REPORTED)):
                # the image as it was before the check (which may have changed it)
                saved = os.path.join(keep_failures, f"point{seq}-image{j}")
                _images.write_image(saved, image.files, workdir, words)
            if not ok and len(result.failures) < MAX_REPORTED:
                result.failures.append(Failure(seq, kind, j, len(subset), len(where),
                                               context, label, saved))
    return result


def _run_one(scenario: Any, scratch: str, files: dict[str, bytearray], workdir: str,
             words: list[tuple[str, int, bytes]], context: Any, timeout: float
             ) -> tuple[bool, str]:
    """Write the image and verify it in a forked child; (passed, label or error)."""
    _images.write_image(scratch, files, workdir, words)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: verify, report through the pipe, never return
        os.close(r)
        code, text = 1, "verify did not finish"
        try:
            signal.alarm(int(timeout))
            label = scenario.verify(scratch, context)
            code, text = 0, str(label or "ok")
        except BaseException as e:  # everything a verify raises is the finding
            text = "".join(traceback.format_exception_only(type(e), e)).strip()
            tb = traceback.extract_tb(e.__traceback__)[-4:]
            text += " | at " + " < ".join(f"{os.path.basename(f.filename)}:{f.lineno}"
                                          for f in reversed(tb))
        finally:
            try:
                os.write(w, text.encode(errors="replace")[:4000])
            finally:
                os._exit(code)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    text = b"".join(chunks).decode(errors="replace")
    if os.WIFSIGNALED(status):
        return False, f"checker child killed by signal {os.WTERMSIG(status)} {text}".strip()
    return os.WEXITSTATUS(status) == 0, text

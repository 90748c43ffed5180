"""pmreplica's pool set parser against PMDK's, on thousands of generated files.

Each run writes PMREPLICA_POOLSET_CASES (default 2400) files from a seeded generator
(tests/poolset_cases.py; the seed is printed, PMREPLICA_POOLSET_SEED repeats a run), asks
Debian's ``pmempool`` for PMDK's verdict on each (tests/pmempool_oracle.py) and parses it
with :func:`pmreplica.setfile.parse`. Both must agree on accept or refuse, on the line named
and on the words, everywhere but where the README's list of deliberate differences lets
pmreplica refuse a line PMDK takes (the generator marks those lines; pmreplica must then
refuse at the first of them, or earlier where PMDK refuses earlier).
"""

from __future__ import annotations

import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pmreplica import PoolSetError, setfile

from .pmempool_oracle import Verdict, ask
from .poolset_cases import Case, Generator

CASES = int(os.environ.get("PMREPLICA_POOLSET_CASES", "2400"))
#: PMDK's parser messages (parser_errstr) a run must meet at least once
PMDK_WORDS = (
    "the first line must be exactly 'PMEMPOOLSET'", "exactly 'REPLICA' expected",
    "invalid token found in the current line",
    "address of remote node and descriptor of remote pool set expected",
    "incorrect format of size", "cannot determine size of a part",
    "incorrect path (must be an absolute one)", "incorrect descriptor (must be a relative path)",
    "no pool set parts", "no replica parts", "unexpected parts for remote replica",
    "unknown option", "missing option name",
    # and those it gives without a line
    "cannot mix directories and files in a set", "cannot use the same directory twice",
    "file type ", "os_access ")

pytestmark = pytest.mark.timeout(300)


def _case_dir(root: Path, i: int) -> Path:
    d = root / str(i)
    (d / "d1").mkdir(parents=True)
    (d / "d2").mkdir()
    os.mkfifo(d / "fifo")
    (d / "file").write_bytes(b"")
    return d


def _pmreplica(path: Path) -> Verdict:
    try:
        setfile.parse(path)
    except PoolSetError as e:
        assert e.path == str(path), e
        return Verdict(False, e.line, str(e).removeprefix(f"{path}:{e.line}: "))
    return Verdict(True)


def _agrees(case: Case, pmdk: Verdict, ours: Verdict) -> bool:
    """pmreplica's verdict is the one PMDK's asks for, given the deliberate differences."""
    lax = case.stricter
    if lax is not None and (pmdk.accepted or pmdk.line is None or pmdk.line >= lax):
        # pmreplica refuses at the first stricter line, unless PMDK refuses (lineless) earlier
        return (not ours.accepted and ours.line is not None
                and (ours.line == lax or (pmdk.line is None and not pmdk.accepted
                                          and ours.line < lax)))
    if pmdk.accepted or ours.accepted:
        return pmdk.accepted == ours.accepted
    if pmdk.line is None:  # PMDK names no line: pmreplica names one, in PMDK's words
        return ours.line is not None and (
            not pmdk.what.startswith(("cannot mix", "cannot use")) or
            ours.what.startswith(pmdk.what))
    return ours.line == pmdk.line and ours.what.startswith(pmdk.what)


def test_parser_decides_as_pmdk_on_generated_sets(pool_dir, pmempool, capsys):
    seed = int(os.environ.get("PMREPLICA_POOLSET_SEED", random.randrange(1 << 32)))
    with capsys.disabled():
        print(f"\npool set differential test: {CASES} cases, seed {seed} "
              f"(PMREPLICA_POOLSET_SEED={seed} repeats it)")
    rng = random.Random(seed)
    cases, paths = [], []
    for i in range(CASES):
        d = _case_dir(pool_dir, i)
        case = Generator(rng, os.fsencode(d)).case()
        (d / "c.set").write_bytes(case.data)
        cases.append(case)
        paths.append(d / "c.set")
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        pmdk = list(pool.map(lambda p: ask(pmempool, p), paths))
    ours = [_pmreplica(p) for p in paths]

    bad = [i for i in range(CASES) if not _agrees(cases[i], pmdk[i], ours[i])]
    shown = "\n".join(f"case {i}: {cases[i].data!r} (stricter from line {cases[i].stricter})"
                      f"\n  PMDK:      {pmdk[i]}\n  pmreplica: {ours[i]}" for i in bad[:10])
    assert not bad, f"{len(bad)} of {CASES} cases disagree (seed {seed}):\n{shown}"

    # the generator reaches every rule: both verdicts in good number, every PMDK message
    accepted = sum(v.accepted for v in pmdk)
    assert 0.2 * CASES < accepted < 0.8 * CASES, f"PMDK accepted {accepted} of {CASES}"
    assert sum(c.stricter is not None for c in cases) > 0.02 * CASES
    missing = [w for w in PMDK_WORDS if not any(v.what.startswith(w) for v in pmdk)]
    assert not missing, f"no generated case made PMDK say {missing} (seed {seed})"

"""The RDMA tests of tests/rxe, run where they can: in the QEMU guest of tools/rxevm, which has
a real soft-RoCE device. The guest boots once and runs all of tests/rxe."""

import os
import shlex
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from .helpers import unavailable

ROOT = Path(__file__).resolve().parent.parent
RXEVM = ROOT / "tools" / "rxevm"
#: boot (~4 s under TCG) plus every test in tests/rxe: 2-4 minutes, more on a loaded host
GUEST_SECONDS = 480
#: the guest is an emulated machine, 10-50x slower than its host: a live agent in it may
#: not answer a heartbeat within the default second (the knob a slow host is given)
GUEST_PEER_TIMEOUT = "10"


@pytest.mark.timeout(GUEST_SECONDS + 60)
def test_rxe_tests_pass_in_guest(tmp_path):
    check = subprocess.run([RXEVM / "check"], capture_output=True, text=True)
    if check.returncode:
        unavailable(check.stdout.strip() or check.stderr.strip())
    pyverbs = subprocess.run([sys.executable, "-c", "import pyverbs.device"], capture_output=True)
    if pyverbs.returncode:
        unavailable(f"{sys.executable} cannot import pyverbs (python3-pyverbs, tools/bootstrap)")

    junit = tmp_path / "junit.xml"  # tmp_path is the guest's output folder: it writes there
    guest_pytest = ["env", f"PMREPLICA_PEER_TIMEOUT={GUEST_PEER_TIMEOUT}",
                    sys.executable, "-m", "pytest", "tests/rxe", "-p", "no:cacheprovider", "-rA",
                    "--timeout=120",  # a hung test shows its traceback before the guest is killed
                    # away from the host's pytest-of-*, where tmp_path is mounted into the guest:
                    "--basetemp=/tmp/pmreplica-rxe-guest",
                    f"--junitxml={junit}",
                    *shlex.split(os.environ.get("PMREPLICA_RXE_PYTEST_ARGS", ""))]
    run = subprocess.run([RXEVM / "run", "-t", str(GUEST_SECONDS), "-o", str(tmp_path), "--",
                          *guest_pytest], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    print(run.stdout)
    assert run.returncode == 0, f"pytest in the guest exited {run.returncode}:\n{run.stdout}"

    suite = ElementTree.parse(junit).getroot().find("testsuite")
    ran, skipped = int(suite.get("tests")), int(suite.get("skipped"))
    assert ran > 0, "the guest collected no tests in tests/rxe"
    assert skipped == 0, f"{skipped} test(s) skipped in the guest, the one place they can run"

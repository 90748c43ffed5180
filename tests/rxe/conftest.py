"""Tests here need a real rxe device. They run inside the guest of tools/rxevm, which
tests/test_rxe_guest.py boots (or on a host with RDMA: `RXE_DEV=rxe0 pytest tests/rxe`).
Anywhere else they are not collected at all, so they never count as skipped or passed.

The remote-pool tests written for TCP (tests/test_rpmem_*) run here again over verbs: this
conftest overrides their ``transport`` and ``local_node`` fixtures, so that agents are
reached at the rxe device's address (the route to it leaves through rxe0) and serve the
pool with GPSPM (tests that take ``local_node`` indirectly also run them with APM)."""

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.rpmem_helpers import Node, check_no_agents_left

HERE = Path(__file__).parent


def _has_rxe() -> bool:
    return os.environ.get("PMREPLICA_RXE_GUEST") == "1" or bool(os.environ.get("RXE_DEV"))


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    return None if _has_rxe() else True


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.rxe)


@dataclass(frozen=True)
class RxeDevice:
    name: str
    gid_index: int  # the RoCE v2 GID of the device's IPv4 address
    ip: str


@pytest.fixture(scope="session")
def rxe_device() -> RxeDevice:
    name = os.environ.get("RXE_DEV", "rxe0")
    if not Path("/sys/class/infiniband", name).is_dir():
        pytest.fail(f"RDMA device {name!r} is missing; run these tests in the guest:"
                    " tools/rxevm/run -- .venv/bin/python -m pytest tests/rxe")
    return RxeDevice(name, int(os.environ.get("RXE_GID_INDEX", "1")), os.environ.get("RXE_IP", ""))


@pytest.fixture
def shm_dir():
    """A fresh folder on tmpfs, where pools live in tests."""
    path = Path(tempfile.mkdtemp(prefix="pmreplica-rxe-", dir="/dev/shm"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=["verbs"])
def transport(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=["gpspm"])
def local_node(request: pytest.FixtureRequest, transport: str, pool_dir: Path,
               rxe_device: RxeDevice):
    """Agents started as local processes on ``pool_dir/sets``, targeted at the rxe device's
    address. They serve with GPSPM; parametrized indirectly with "apm" they declare their
    platform fit for APM (``--persist-apm``)."""
    if not rxe_device.ip:
        pytest.fail("RXE_IP is not set: the address of the rxe device's network interface")
    sets = pool_dir / "sets"
    sets.mkdir()
    args = ("--persist-apm",) if request.param == "apm" else ()
    node = Node(transport, "local", rxe_device.ip, sets, agent_args=args)
    yield node
    check_no_agents_left(node)

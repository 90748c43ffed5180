"""Shared fixtures: a fresh pool directory on /dev/shm per test, PMDK's pmempool, a small
file system that can be failed under an open pool, and the `pmreplica` console script.

A missing real part (pmempool, loop devices) fails the test under CI=true and skips it,
saying what is missing, elsewhere."""

from __future__ import annotations

import fcntl
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .helpers import unavailable

pytest_plugins = ["tests.fixtures.sshd", "tests.fixtures.client_user", "tests.fixtures.hosts"]

SHM = Path("/dev/shm")




@pytest.fixture
def pool_dir() -> Iterator[Path]:
    """A fresh directory on tmpfs (/dev/shm) for the test's pools, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="pmreplica-test-", dir=SHM))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def pmempool() -> str:
    """Path of PMDK's pmempool (Debian package pmdk-tools)."""
    path = shutil.which("pmempool")
    if path is None:
        unavailable("pmempool not found: install Debian's pmdk-tools (tools/bootstrap --tests)")
    return path


@pytest.fixture(scope="session")
def pmreplica_cmd() -> list[str]:
    """The installed `pmreplica` console script of the interpreter running the tests."""
    script = Path(sys.executable).parent / "pmreplica"
    if not script.exists():
        pytest.fail(f"{script} is missing: install the package (tools/bootstrap --tests)",
                    pytrace=False)
    return [str(script)]


# ---------------------------------------------------------------------------------------
# A file system that fails under an open pool

#: EXT4_IOC_SHUTDOWN = _IOR('X', 125, __u32); EXT4_GOING_FLAGS_NOLOGFLUSH = 2
_EXT4_IOC_SHUTDOWN = 0x8004587D
_EXT4_GOING_FLAGS_NOLOGFLUSH = 2


@dataclass
class FailingFs:
    """A small ext4 file system on a loop device whose ``shut_down()`` makes every later
    write to it fail with EIO, as a failing disk does, while files on it stay open."""

    mountpoint: Path
    image: Path

    def remount(self) -> None:
        """Unmount and mount again: after a shutdown, the files are back as last made durable."""
        subprocess.run(["umount", str(self.mountpoint)], check=True)
        subprocess.run(["mount", "-o", "loop", str(self.image), str(self.mountpoint)], check=True)

    def shut_down(self) -> None:
        fd = os.open(self.mountpoint, os.O_RDONLY)
        try:
            fcntl.ioctl(fd, _EXT4_IOC_SHUTDOWN, struct.pack("I", _EXT4_GOING_FLAGS_NOLOGFLUSH))
        finally:
            os.close(fd)


@pytest.fixture
def failing_fs(pool_dir: Path) -> Iterator[FailingFs]:
    """Mounts a 32 MiB ext4 image (kept on tmpfs) through a loop device; unmounts after.

    A tmpfs cannot be remounted read-only while a file on it is open for writing (EBUSY), so
    an ext4 shutdown is the real way to make a replica's storage fail under an open pool."""
    if os.geteuid() != 0:
        unavailable("mounting a loop file system needs root")
    for tool in ("mkfs.ext4", "mount", "umount"):
        if shutil.which(tool) is None:
            unavailable(f"{tool} not found (Debian packages e2fsprogs, mount)")
    image = pool_dir / "ext4.img"
    mnt = pool_dir / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    mkfs = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True, text=True)
    if mkfs.returncode:
        unavailable(f"mkfs.ext4 failed: {mkfs.stderr.strip()}")
    mount = subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], capture_output=True,
                           text=True)
    if mount.returncode:
        unavailable(f"cannot mount a loop device: {mount.stderr.strip()}")
    try:
        yield FailingFs(mnt, image)
    finally:
        # -l: the pool under test may still hold files open when a test fails
        subprocess.run(["umount", "-l", str(mnt)], check=False)

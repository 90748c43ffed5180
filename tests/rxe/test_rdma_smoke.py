"""RDMA over rxe works between two processes, with memory regions over mmap'd tmpfs files:
the ground every RDMA data path of pmreplica stands on."""

import json
import subprocess
import sys
from pathlib import Path

import pyverbs.enums as ev
import pytest
from .verbs_peer import Endpoint, pattern

SIZE = 1 << 20  # both files; the upper half of the server's holds pattern(SEED) for the READ
HALF = SIZE // 2
SEED = 4242
WRITE_AT = 4096 + 123  # unaligned and past the first page: the bytes must land exactly here
WRITE_LEN = 256 << 10


class PeerProcess:
    """verbs_peer.py as the other end, in a process of its own; JSON lines over stdin/stdout."""

    def __init__(self, path: Path) -> None:
        script = Path(__file__).with_name("verbs_peer.py")
        self.proc = subprocess.Popen([sys.executable, str(script), str(path), str(SIZE), str(SEED)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def send(self, message: object) -> None:
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()

    def receive(self) -> object:
        line = self.proc.stdout.readline()
        assert line, f"the peer process ended early (exit code {self.proc.wait()})"
        return json.loads(line)


@pytest.fixture
def server(shm_dir):
    peer = PeerProcess(shm_dir / "server.pool")
    yield peer
    if peer.proc.poll() is None:
        peer.proc.kill()
    peer.proc.wait()


def first_difference(a: bytes, b: bytes) -> int | None:
    """Offset of the first byte where a and b differ, None if equal (keeps failures short)."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.mark.timeout(120)
def test_rc_write_then_read_between_processes(rxe_device, shm_dir, server):
    remote = server.receive()
    with Endpoint(rxe_device.name, rxe_device.gid_index, str(shm_dir / "client.pool"), SIZE) as me:
        server.send(me.coordinates())
        me.connect(remote)
        assert server.receive() == "connected"

        payload = pattern(SEED + 1, WRITE_LEN)
        me.map[:WRITE_LEN] = payload
        me.rdma(ev.IBV_WR_RDMA_WRITE, 0, WRITE_LEN, remote["addr"] + WRITE_AT, remote["rkey"])
        on_server = (shm_dir / "server.pool").read_bytes()  # the file, not the server's mapping
        diff = first_difference(on_server[WRITE_AT:WRITE_AT + WRITE_LEN], payload)
        assert diff is None, f"the server's file differs from the bytes written at +{diff}"
        untouched = on_server[:WRITE_AT] + on_server[WRITE_AT + WRITE_LEN:HALF]
        assert untouched.count(0) == len(untouched), "the WRITE changed bytes outside its range"

        me.rdma(ev.IBV_WR_RDMA_READ, HALF, HALF, remote["addr"] + HALF, remote["rkey"])
        diff = first_difference(me.map[HALF:], pattern(SEED, HALF))
        assert diff is None, f"the bytes read differ from the server's at +{diff}"

        server.send("done")
    assert server.proc.wait(timeout=30) == 0

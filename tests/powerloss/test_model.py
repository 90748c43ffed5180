"""The power-loss model itself: what becomes durable when, read back from the stream as a
checker reads it."""

from __future__ import annotations

import os
from array import array
from pathlib import Path

from pmreplica import pmem
from pmreplica.powerloss.check import DurableImage
from pmreplica.powerloss.model import Simulation
from pmreplica.powerloss.stream import Recorder, read

SIZE = 1 << 20


def points(stream: Path) -> list[tuple[str, dict[str, list[int]], dict[str, bytes]]]:
    """Each point's kind, pending word offsets per file, and the durable image there."""
    _, events = read(str(stream))
    image = DurableImage()
    out = []
    for ev in events:
        if ev[0] != "p":
            image.apply(ev)
            continue
        pending = {rel: array("Q", offs).tolist() for rel, offs, _ in ev[4]}
        out.append((ev[2], pending, {k: bytes(v) for k, v in image.files.items()}))
    return out


def test_durable_only_at_persist_at_the_drain_after_a_flush_and_at_fdatasync(
        pool_dir: Path) -> None:
    work = pool_dir / "work"
    work.mkdir()
    (work / "m").write_bytes(bytes(SIZE))
    (work / "f").write_bytes(bytes(SIZE))
    stream = pool_dir / "stream"
    with Simulation(work, Recorder(str(stream), {})) as sim:
        m = pmem.Mapping.open([pmem.Segment(str(work / "m"), 0, SIZE, 0)])
        buf = m.buf
        buf[64:72] = b"A" * 8
        m.persist(64, 8)                       # point 1: A pending; then durable
        buf[128:136] = b"B" * 8
        m.flush(128, 8)                        # point 2: B pending
        buf[136:144] = b"C" * 8                # stored after the flush: not covered by it
        m.drain()                              # point 3: B and C pending; then B durable
        sim.point("mark")                      # point 4: C alone pending
        fd = os.open(work / "f", os.O_WRONLY)
        os.pwrite(fd, b"D" * 16, 4096)
        os.fdatasync(fd)                       # point 5: D pending; then durable
        os.close(fd)
        buf[256:264] = b"E" * 8                # never made durable: shows at the end
        buf.release()
        m.close()
    got = points(stream)
    kinds = [k for k, _, _ in got]
    assert kinds == ["persist", "flush", "drain", "mark", "fdatasync", "end"]
    assert [p.get("m", []) for _, p, _ in got] == [[64], [128], [128, 136], [136], [136],
                                                    [136, 256]]
    assert [p.get("f", []) for _, p, _ in got] == [[], [], [], [], [4096, 4104], []]
    durable = got[5][2]
    assert durable["m"][64:72] == b"A" * 8 and durable["m"][128:136] == b"B" * 8
    assert durable["m"][136:144] == bytes(8) and durable["m"][256:264] == bytes(8)
    assert durable["f"][4096:4112] == b"D" * 16


def test_a_renamed_file_keeps_its_durable_content_and_a_new_one_starts_empty(
        pool_dir: Path) -> None:
    work = pool_dir / "work"
    work.mkdir()
    (work / "a").write_bytes(b"x" * 4096)
    stream = pool_dir / "stream"
    with Simulation(work, Recorder(str(stream), {})) as sim:
        os.rename(work / "a", work / "b")
        (work / "c").write_bytes(b"y" * 4096)  # written, never synced
        sim.point("mark")
    _, pending, durable = points(stream)[0]
    assert durable["b"] == b"x" * 4096 and "a" not in durable
    assert durable["c"] == bytes(4096) and len(pending["c"]) == 512


def test_a_power_cut_keeps_a_subset_and_the_rest_is_lost(pool_dir: Path) -> None:
    import random

    work = pool_dir / "work"
    work.mkdir()
    (work / "m").write_bytes(bytes(SIZE))
    with Simulation(work, Recorder(str(pool_dir / "stream"), {})) as sim:
        m = pmem.Mapping.open([pmem.Segment(str(work / "m"), 0, SIZE, 0)])
        m.buf[:4096] = b"z" * 4096
        m.buf.release()
        m.close()
        lost = sim.power_cut(random.Random(1))
        live = (work / "m").read_bytes()[:4096]
        assert 0 < lost < 512
        assert live.count(b"z" * 8) + live.count(bytes(8)) == 512
        assert bytes(sim.files["m"].durable[:4096]) == live   # what is left is durable now

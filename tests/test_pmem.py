"""Mapping part files as one range and making ranges durable; the nvm.pmem-compatible API.
Real files on tmpfs (and a small ext4 to run out of space on), real child processes."""

from __future__ import annotations

import errno
import os
import signal

import pytest

from pmreplica import pmem
from pmreplica.errors import PmReplicaError
from pmreplica.pmem import Mapping, Segment, open_part

from .helpers import read_json_line, start_python

M = 1 << 20
PAGE = pmem.PAGE_SIZE


def _two_part_mapping(d):
    """Part a: 64 KiB mapped whole; part b: 64 KiB of which the first page is skipped."""
    a, b = str(d / "a"), str(d / "b")
    for p in (a, b):
        os.close(open_part(p, 64 << 10, create=True))
    segs = [Segment(a, 0, 64 << 10, 0), Segment(b, PAGE, (64 << 10) - PAGE, 64 << 10)]
    return Mapping.open(segs), a, b


def test_segments_form_one_contiguous_range(pool_dir):
    m, a, b = _two_part_mapping(pool_dir)
    try:
        assert m.size == (128 << 10) - PAGE and not m.is_pmem  # tmpfs: msync, not libpmem
        data = os.urandom(8192)
        start = (64 << 10) - 4096
        m.buf[start:start + 8192] = data  # across the part boundary
        m.persist(start, 8192)
        with open(a, "rb") as fa, open(b, "rb") as fb:
            assert os.pread(fa.fileno(), 4096, start) == data[:4096]
            assert os.pread(fb.fileno(), 4096, PAGE) == data[4096:]  # after b's skipped page
            assert os.pread(fb.fileno(), PAGE, 0) == bytes(PAGE)
        # the mapping is shared: a write to the file shows through it
        with open(b, "r+b") as fb:
            os.pwrite(fb.fileno(), b"from the file", PAGE + 100)
        assert bytes(m.buf[(64 << 10) + 100:(64 << 10) + 113]) == b"from the file"
    finally:
        m.close()


def test_out_of_range_is_einval_and_nothing_is_touched(pool_dir):
    m, a, _ = _two_part_mapping(pool_dir)
    try:
        for fn in (m.persist, m.flush, m.deep_persist):
            for off, n in ((m.size - 10, 11), (-1, 10), (0, -1), (m.size + 1, 0)):
                with pytest.raises(PmReplicaError) as e:
                    fn(off, n)
                assert e.value.errno == errno.EINVAL
                assert f"outside the {m.size}-byte mapping" in str(e.value)
        m.persist(m.size - 10, 10)
        m.persist(0, 0)
        m.flush(0, 100)
        m.drain()
    finally:
        m.close()


def test_close_refuses_while_views_are_alive(pool_dir):
    m, _, _ = _two_part_mapping(pool_dir)
    view = m.buf[0:100]
    with pytest.raises(BufferError):
        m.close()
    view.release()
    m.close()
    assert m.closed
    m.close()  # closing twice is harmless


def test_open_part_create_and_open_errors(pool_dir):
    path = str(pool_dir / "p")
    fd = open_part(path, 4 * M, create=True)
    st = os.fstat(fd)
    os.close(fd)
    assert st.st_size == 4 * M and st.st_blocks * 512 >= 4 * M  # allocated, not sparse
    with pytest.raises(FileExistsError):
        open_part(path, 4 * M, create=True)
    with pytest.raises(PmReplicaError) as e:
        open_part(path, 8 * M, create=False)
    assert e.value.errno == errno.EINVAL
    assert f"{path}: file size {4 * M} is smaller than the {8 * M} bytes" in str(e.value)
    with pytest.raises(FileNotFoundError):
        open_part(str(pool_dir / "missing"), 4 * M, create=False)


def test_full_file_system_is_enospc_now_and_leaves_no_file(failing_fs):
    """Blocks are allocated at creation: a full file system fails the create, not a later
    store into the mapping (which would be a SIGBUS)."""
    path = str(failing_fs.mountpoint / "big")
    with pytest.raises(OSError) as e:
        open_part(path, 64 * M, create=True)  # the file system holds 32 MiB
    assert e.value.errno == errno.ENOSPC
    assert not os.path.exists(path)
    with pytest.raises(OSError) as e:
        Mapping.open([Segment(str(failing_fs.mountpoint / "a"), 0, 4 * M, 0),
                      Segment(path, 0, 64 * M, 4 * M)], create=True)
    assert e.value.errno == errno.ENOSPC
    assert os.listdir(failing_fs.mountpoint) == ["lost+found"]


CHILD_WRITER = r"""
import json, os, sys, time
from pmreplica import pmem
buf = pmem.map_file(sys.argv[1], 0, 0, 0)
data = bytes.fromhex(sys.argv[2])
buf.seek(int(sys.argv[3]))
buf.write(data)
pmem.persist(buf)
print(json.dumps({"persisted": True}), flush=True)
time.sleep(60)
"""


def test_persisted_bytes_survive_sigkill(pool_dir):
    path = pool_dir / "pool"
    with pmem.map_file(str(path), 4 * M, pmem.FILE_CREATE | pmem.FILE_EXCL, 0o600) as buf:
        assert len(buf) == 4 * M and not pmem.is_pmem(buf)
    data = os.urandom(5000)
    child = start_python(CHILD_WRITER, str(path), data.hex(), str(3 * M - 100))
    try:
        assert read_json_line(child) == {"persisted": True}
        child.send_signal(signal.SIGKILL)
        assert child.wait(10) == -signal.SIGKILL
    finally:
        child.kill()
        child.wait()
    with open(path, "rb") as f:
        f.seek(3 * M - 100)
        assert f.read(5000) == data


def test_nvm_pmem_api(pool_dir):
    path = str(pool_dir / "nvm")
    buf = pmem.map_file(path, 2 * M, pmem.FILE_CREATE, 0o600)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    buf.write(b"hello")
    buf.seek(2 * M - 3)
    with pytest.raises(RuntimeError):
        buf.write(b"toolong")
    with pytest.raises(RuntimeError):
        buf.seek(-1)
    buf.seek(0)
    assert buf.read(5) == b"hello"
    pmem.flush(buf)
    pmem.drain(buf)
    assert pmem.msync(buf) == 0
    pmem.unmap(buf)
    with pytest.raises(PmReplicaError) as e:
        pmem.map_file(path, 2 * M, pmem.FILE_CREATE | pmem.FILE_EXCL, 0o600)
    assert e.value.errno == errno.EEXIST
    with pmem.FlushContext(pmem.map_file(path, 0, 0, 0)) as again:  # size 0: the file's
        assert again.size == 2 * M and again.read(5) == b"hello"
        again.seek(2 * M)
        with pytest.raises(EOFError):
            again.read()
    with pytest.raises(PmReplicaError) as e:
        pmem.map_file(path, 0, pmem.FILE_TMPFILE, 0)
    assert e.value.errno == errno.ENOTSUP
    assert pmem.has_hw_drain() is False
    if pmem.libpmem is not None:
        assert pmem.check_version(1, 0) is True
        with pytest.raises(RuntimeError):
            pmem.check_version(99, 0)


@pytest.mark.parametrize("before", [0, 5, 3 * M])
def test_map_file_create_sizes_an_existing_file(pool_dir, before):
    """FILE_CREATE on a file that exists (one tempfile.mkstemp made, say) extends or
    truncates it to the length asked for, as libpmem's pmem_map_file does, and maps it;
    what it held stays, up to that length."""
    path = pool_dir / "existing"
    path.write_bytes(b"kept!" + bytes(before - 5) if before else b"")
    buf = pmem.map_file(str(path), 2 * M, pmem.FILE_CREATE, 0o600)
    try:
        assert buf.size == 2 * M and os.path.getsize(path) == 2 * M
        assert buf.read(5) == (b"kept!" if before else bytes(5))
    finally:
        pmem.unmap(buf)


def test_unmap_while_a_slice_lives_fails_and_keeps_the_buffer(pool_dir):
    """A slice of ``buffer`` is a view of the mapping: unmap() is BufferError while one
    lives, and the buffer stays readable and writable; once it is gone, unmap() works."""
    buf = pmem.map_file(str(pool_dir / "m"), 4096, pmem.FILE_CREATE, 0o600)
    buf.write(b"hello")
    header = buf.buffer[0:5]
    with pytest.raises(BufferError):
        pmem.unmap(buf)
    buf.seek(0)
    assert buf.read(5) == b"hello" and bytes(header) == b"hello"
    buf.write(b"!")
    header.release()
    pmem.unmap(buf)

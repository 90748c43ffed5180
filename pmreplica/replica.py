"""The part files of one local replica: where each part lands in the pool's address range,
creating them with linked headers, opening and mapping them, and checking their headers.

Like PMDK, part 0 is mapped whole (its header is the pool's first 4 KiB); a later part with a
header of its own contributes only what follows its header, so the data of all parts forms
one contiguous range. With SINGLEHDR or NOHDRS every part is mapped whole.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import uuid as _uuid
from collections import namedtuple
from collections.abc import Callable

from .errors import HeaderError, PmReplicaError
from .files import kind_of, open_regular
from .generation import OFFSET as GEN_OFFSET, SIZE as GEN_SIZE
from .header import HDR_SIZE, PoolHeader, replica_headers
from .pmem import Mapping, Segment, open_part
from .setfile import LocalReplica, PoolSetFile
from .state import OFFSET as STATE_OFFSET

#: the end of what pmreplica keeps in part 0's page after the header (state record and
#: generation), where PMDK's shutdown state begins
RECORDS_END = 4024
#: the activity log's marker (pmreplica.activity.MARKER_OFFSET), after the generation
MARKER_OFFSET = GEN_OFFSET + GEN_SIZE


class PartHeader(namedtuple("PartHeader", "path raw header problems")):
    """A part's header as read from its file (``raw`` bytes, decoded ``header``, either None
    if unreadable) and what is wrong with it (``problems``, empty if fine)."""

    __slots__ = ()


class LocalReplicaFiles:
    """The files of ``replica`` laid out as the first ``pool_size`` bytes of the pool."""

    def __init__(self, set_file: PoolSetFile, replica: LocalReplica, pool_size: int) -> None:
        if any(p.is_dir for p in replica.parts):
            raise PmReplicaError(errno.ENOTSUP, "directory-based replicas (parts created on "
                                                "demand in a directory) are not supported")
        self.set_file = set_file
        self.replica = replica
        self.pool_size = pool_size
        self.nhdrs = set_file.nhdrs(replica)
        self.segments = self._layout()

    def _layout(self) -> list[Segment]:
        segs, at = [], 0
        for i, part in enumerate(self.replica.parts):
            skip = HDR_SIZE if 0 < i < self.nhdrs else 0
            length = min(part.aligned_size - skip, self.pool_size - at)
            if length <= 0:
                break
            segs.append(Segment(part.path, skip, length, at))
            at += length
        if at < self.pool_size:
            raise PmReplicaError(errno.EINVAL, f"replica parts hold {at} bytes, less than the "
                                               f"{self.pool_size}-byte pool")
        return segs

    @property
    def paths(self) -> list[str]:
        return [p.path for p in self.replica.parts]

    def create(self, template: PoolHeader | None, mode: int = 0o666, sparse: bool = False,
               progress: Callable[[int, int], None] | None = None) -> None:
        """Create every part in full (EEXIST if one exists) and, given a template, write the
        parts' headers: part 0 gets the template's uuid, the replica links are its own.
        Each file gets the size its line gives, as PMDK makes it; the page-aligned part of it
        is mapped. ``progress(done, total)`` follows the allocation, in bytes."""
        for p in self.replica.parts:
            if os.path.lexists(p.path):
                raise PmReplicaError(errno.EEXIST, f"file {p.path} already exists")
        made = []
        total, before = sum(p.size for p in self.replica.parts), 0
        try:
            for p in self.replica.parts:
                step = None if progress is None else (
                    lambda n, at=before: progress(at + n, total))  # type: ignore[misc]
                os.close(open_part(p.path, p.size, create=True, mode=mode, sparse=sparse,
                                   progress=step))
                made.append(p.path)
                before += p.size
            if template is not None and self.nhdrs:
                uuids = [template.uuid] + [_uuid.uuid4() for _ in range(self.nhdrs - 1)]
                self.write_headers(template, uuids, template.prev_repl, template.next_repl)
        except BaseException:
            for path in made:
                os.unlink(path)
            raise

    def write_headers(self, template: PoolHeader, part_uuids: list[_uuid.UUID],
                      prev_repl: _uuid.UUID, next_repl: _uuid.UUID,
                      state: bytes | None = None, gen: bytes | None = None) -> None:
        """Write the headers of all parts into their files' first page, durably; ``state``
        (a packed replica-state record) and ``gen`` (a packed generation) go into part 0's
        page with its header, in the same write. What part 0's page holds beyond the header
        and is not given (the replica-state record, the generation) stays."""
        for i, (part, hdr) in enumerate(zip(self.replica.parts, replica_headers(
                template, part_uuids, prev_repl, next_repl))):
            page = hdr.pack()
            if i == 0:
                kept = _read_page(part.path)[STATE_OFFSET:RECORDS_END]
                page = page[:STATE_OFFSET] + kept.ljust(RECORDS_END - STATE_OFFSET, b"\0") \
                    + page[RECORDS_END:]
                for at, record in ((STATE_OFFSET, state), (GEN_OFFSET, gen)):
                    if record is not None:
                        page = page[:at] + record + page[at + len(record):]
            _pwrite_durable(part.path, page, 0)

    def clear_header(self, state: bytes | None = None) -> None:
        """Zero part 0's header (keeping ``state`` in its page, and an activity log's marker:
        a master repaired after an unclean session still has it folded in by its next
        open), durably: the replica is not a pool until :meth:`write_headers` runs again.
        replica-sync does this before rewriting a replica's data, so that a replica it
        leaves half-copied is never taken for a sound one."""
        page = bytearray(HDR_SIZE)
        if state is not None:
            page[STATE_OFFSET:STATE_OFFSET + len(state)] = state
        page[MARKER_OFFSET:RECORDS_END] = _read_page(self.replica.parts[0].path)[
            MARKER_OFFSET:RECORDS_END].ljust(RECORDS_END - MARKER_OFFSET, b"\0")
        _pwrite_durable(self.replica.parts[0].path, bytes(page), 0)

    def restore_parts(self, mode: int = 0o666) -> None:
        """Give every part file its full size: create the missing ones, extend the short
        ones (their blocks allocated, so a full file system is ENOSPC now)."""
        for p in self.replica.parts:
            if not os.path.lexists(p.path):
                os.close(open_part(p.path, p.size, create=True, mode=mode))
                continue
            fd = open_regular(p.path, os.O_RDWR)
            try:
                if os.fstat(fd).st_size < p.size:
                    os.posix_fallocate(fd, 0, p.size)
            finally:
                os.close(fd)

    def open(self) -> Mapping:
        """Map the existing parts (ENOENT if one is missing)."""
        return Mapping.open(self.segments, create=False)

    def read_headers(self, remote: bool = False) -> list[PartHeader]:
        """Read each header-carrying part's header from its file, with its own problems
        (``remote``: judged as an agent judges a remote pool's, see PoolHeader.problems)."""
        out = []
        for p in self.replica.parts[: self.nhdrs]:
            try:
                fd = open_regular(p.path)
                try:
                    raw = os.pread(fd, HDR_SIZE, 0)
                finally:
                    os.close(fd)
            except OSError as e:
                why = e.strerror.removeprefix(p.path + ": ") if e.strerror else str(e)
                out.append(PartHeader(p.path, None, None, (f"cannot read: {why}",)))
                continue
            if len(raw) < HDR_SIZE:
                out.append(PartHeader(p.path, raw, None, ("file shorter than a pool header",)))
                continue
            hdr = PoolHeader.unpack(raw)
            zeroed = raw == bytes(HDR_SIZE) if remote else hdr.is_zeroed
            probs = ("header is zeroed",) if zeroed else tuple(hdr.problems(raw, remote))
            out.append(PartHeader(p.path, raw, hdr, probs))
        return out

    def check(self, signature: bytes | None = None,
              remote: bool = False) -> tuple[list[PartHeader], list[str]]:
        """Check files and headers: sizes, checksums, shared identity and the part links.
        Returns the headers and a list of problems (empty if the replica is consistent)."""
        problems = []
        for p in self.replica.parts:
            try:
                st = os.stat(p.path)
            except OSError as e:
                problems.append(f"{p.path}: {e.strerror}")
                continue
            size = st.st_size
            if not stat.S_ISREG(st.st_mode):
                problems.append(f"{p.path}: not a regular file ({kind_of(st.st_mode)})")
            elif size < p.aligned_size:
                problems.append(f"{p.path}: size {size} is smaller than {p.aligned_size}")
        headers = self.read_headers(remote) if self.nhdrs else []
        for h in headers:
            problems.extend(f"{h.path}: {msg}" for msg in h.problems)
        good = [h for h in headers if h.header is not None and not h.problems]
        if len(good) == len(headers) and headers:
            problems.extend(_link_problems([h.header for h in good], self.paths))  # type: ignore[misc]
            first = good[0].header
            assert first is not None
            single = bool(first.incompat & 1)
            if single != ("SINGLEHDR" in self.set_file.options):
                problems.append(f"{headers[0].path}: SINGLEHDR feature does not match the "
                                "pool set's options")
            if signature is not None and first.signature != signature.ljust(8, b"\0"):
                problems.append(f"{headers[0].path}: wrong pool type (signature "
                                f"{first.signature.rstrip(bytes(1))!r}, expected {signature!r})")
        return headers, problems

    def remove(self, force: bool = False) -> None:
        """Delete the part files (missing ones are an error unless ``force``)."""
        remove_parts(self.replica, force)


def lock_pool(path: str, busy: str) -> int:
    """Take the exclusive lock an open pool holds on its first part (flock, released when
    the returned fd is closed); EBUSY with the message ``busy`` if another process holds
    it, saying so if this process does (the pool is open here already)."""
    fd = open_regular(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        mine = _locked_by_this_process(fd)
        os.close(fd)
        if mine:
            busy = f"{path}: pool is already open in this process (use that open pool, or " \
                   "close it first)"
        raise PmReplicaError(errno.EBUSY, busy) from None
    return fd


def lock_pool_set(set_file: PoolSetFile, busy: str, master: bool = True,
                  held: dict[int, int] | None = None) -> dict[int, int]:
    """Take the locks an open pool set holds (:func:`lock_pool`): on the first part of its
    master and of each local replica, as PMDK locks every part it opens. Held on the
    master's file alone, a pool whose master was deleted or replaced under it would look
    closed to replica-sync. Returns the fds by replica index; a part that does not exist
    is skipped (the master's is an error when ``master``), and so is a replica's that
    cannot be opened (its own open tells). ``held``, what an earlier call returned, is
    added to for the parts made since."""
    fds = dict(held) if held else {}
    taken = []
    files = {_file_id(os.fstat(fd)) for fd in fds.values()}
    try:
        for i, replica in enumerate(set_file.replicas):
            if i in fds or not isinstance(replica, LocalReplica):
                continue
            path = replica.parts[0].path
            try:
                if i and _file_id(os.stat(path)) in files:
                    continue  # the same file listed again (a link): its own open tells
                fds[i] = lock_pool(path, busy)
            except FileNotFoundError:
                if i == 0 and master:
                    raise
                continue
            except OSError as e:
                if i == 0 or e.errno == errno.EBUSY:
                    raise
                continue
            taken.append(fds[i])
            files.add(_file_id(os.fstat(fds[i])))
    except BaseException:
        for fd in taken:
            os.close(fd)
        raise
    return fds


def _file_id(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def release_locks(fds: dict[int, int], index: int | None = None) -> None:
    """Let go of the locks :func:`lock_pool_set` took (only replica ``index``'s, if given)."""
    for i in list(fds) if index is None else [index]:
        fd = fds.pop(i, -1)  # a replica failing on another thread meanwhile let it go
        if fd >= 0:
            os.close(fd)


def _locked_by_this_process(fd: int) -> bool:
    """True if this process holds a flock on ``fd``'s file. Linux lists every lock in
    /proc/locks with the pid that took it: ``1: FLOCK ADVISORY WRITE pid maj:min:inode ...``
    (waiters' lines carry ``->`` instead of the kind)."""
    st = os.fstat(fd)
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pid = str(os.getpid())
    try:
        with open("/proc/locks") as f:
            return any(len(fields) > 5 and fields[1] == "FLOCK" and fields[4] == pid
                       and fields[5] == where for fields in map(str.split, f))
    except OSError:
        return False


def remove_parts(replica: LocalReplica, force: bool = False) -> None:
    """Delete a local replica's part files; a missing one is ENOENT unless ``force``."""
    for p in replica.parts:
        try:
            os.unlink(p.path)
        except FileNotFoundError:
            if not force:
                raise


def _link_problems(hdrs: list[PoolHeader], paths: list[str]) -> list[str]:
    """PMDK's part checks: one pool set uuid and format, parts linked in a circle."""
    out = []
    first = hdrs[0]
    n = len(hdrs)
    for i, h in enumerate(hdrs):
        if (h.poolset_uuid, h.signature, h.major) != (first.poolset_uuid, first.signature,
                                                       first.major):
            out.append(f"{paths[i]}: header belongs to another pool (pool set uuid or format "
                       "differs from part 0)")
        if (h.prev_repl, h.next_repl) != (first.prev_repl, first.next_repl):
            out.append(f"{paths[i]}: replica links differ from part 0")
        if n == 1 and h.uuid not in (h.next_part, h.prev_part) and not h.is_zeroed:
            # a part file named on its own (a pool set's part 0, say): not a broken pool
            out.append(f"{paths[i]}: one part of a pool of several parts (its header links "
                       "to another part): this part was named instead of its pool set file, "
                       "or the set file lists no other part")
        elif h.next_part != hdrs[(i + 1) % n].uuid or h.prev_part != hdrs[i - 1].uuid:
            out.append(f"{paths[i]}: part links are broken (next/prev part uuid)")
    return out


def _read_page(path: str) -> bytes:
    """The header page of the part file ``path`` as it is (b"" if it cannot be read)."""
    try:
        fd = open_regular(path)
    except OSError:
        return b""
    try:
        return os.pread(fd, HDR_SIZE, 0)
    except OSError:
        return b""
    finally:
        os.close(fd)


def _pwrite_durable(path: str, data: bytes, offset: int) -> None:
    fd = open_regular(path, os.O_WRONLY)
    try:
        if os.pwrite(fd, data, offset) != len(data):
            raise PmReplicaError(errno.EIO, f"{path}: short write")
        os.fdatasync(fd)
    finally:
        os.close(fd)


def raise_if_broken(what: str, problems: list[str]) -> None:
    """Turn a replica's problem list into a HeaderError (EINVAL) that says how to repair."""
    if problems:
        shown = "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else "")
        raise HeaderError(errno.EINVAL, f"{what} is inconsistent: {shown} "
                                        "(run `replica-sync` to repair it from a healthy replica)")


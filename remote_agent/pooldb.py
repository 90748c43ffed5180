"""The agent's pool database: pool set files under one directory and the pools they describe.

Names come from the client and are trusted no further than this: absolute names and names
that climb out of the directory (``..``, symlinks pointing outside) are refused. An open pool
holds an exclusive lock on its first part, so a second open of the same pool is EBUSY.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import time
from collections.abc import Iterator

from pmreplica import generation, setfile
from pmreplica.errors import PmReplicaError, PoolSetError
from pmreplica.files import open_regular, read_fd
from pmreplica.header import FEAT_SINGLEHDR, HDR_SIZE, PoolAttr
from pmreplica.pmem import Mapping
from pmreplica.replica import LocalReplicaFiles, lock_pool, remove_parts

log = logging.getLogger("remote_agent.pooldb")

#: the most a pool set file may hold for the agent to read it (a remote pool set lists one
#: replica: tens of thousands of parts fit)
MAX_SET_FILE = 4 << 20
#: Linux's limit on a path's length, its terminating NUL included
PATH_MAX = 4096
#: how long a create or remove waits for the opens and stats of a pool set to let it go (s)
SET_LOCK_WAIT = 2.0


class PoolError(PmReplicaError):
    """A request the pool database refuses; ``errno`` picks the protocol status."""


class OpenPool:
    """A pool this session created or opened: mapped, locked, ready for the data path.
    ``pool_size`` is the size the client asked for; the data path stays below it."""

    def __init__(self, name: str, set_file: setfile.PoolSetFile, files: LocalReplicaFiles,
                 mapping: Mapping, lock_fd: int, pool_size: int, data_offset: int,
                 created: bool, attr: PoolAttr) -> None:
        self.name, self.set_file, self.files = name, set_file, files
        self.mapping, self.lock_fd = mapping, lock_fd
        self.pool_size, self.data_offset = pool_size, data_offset
        self.created, self.attr = created, attr

    def set_attr(self, attr: PoolAttr) -> None:
        if not self.set_file.has_headers:
            raise PoolError(errno.EINVAL, "cannot set attributes of a pool without headers "
                                          "(NOHDRS)")
        if bool(attr.incompat_features & FEAT_SINGLEHDR) != (
                setfile.OPT_SINGLEHDR in self.set_file.options):
            raise PoolError(errno.EINVAL, "pool incompat feature flags and remote poolset "
                                          "options do not match")
        hdr = attr.to_header()
        uuids = [h.header.uuid for h in self.files.read_headers(remote=True)
                 if h.header is not None]
        # part 0 takes the attributes' uuid, as PMDK's util_replica_set_attr does
        self.files.write_headers(hdr, [hdr.uuid] + uuids[1:], hdr.prev_repl, hdr.next_repl)
        self.attr = attr

    def store_generation(self, raw: bytes) -> None:
        """Record the pool's generation in part 0's header page, durably."""
        if not self.set_file.has_headers:
            raise PoolError(errno.EINVAL, "a pool without headers (NOHDRS) keeps no generation")
        if generation.Generation.unpack(raw) is None or len(raw) != generation.SIZE:
            raise PoolError(errno.EINVAL, "malformed generation record")
        at = generation.OFFSET
        self.mapping.buf[at:at + len(raw)] = raw
        self.mapping.persist(at, len(raw))

    def close(self, remove: bool = False) -> None:
        self.mapping.close()
        if remove and self.created:
            remove_parts(self.set_file.master, force=True)
            log.info("removed pool %s created in this session", self.name)
        os.close(self.lock_fd)


class PoolDB:
    """Pool set files under ``root``.

    Each request holds an flock on the pool set file while it works: shared to open or
    stat, exclusive to create or remove. An open or stat meeting a create or remove is
    EBUSY at once, so it never sees half-made parts (it would call them inconsistent); a
    create or remove waits a moment for opens and stats to finish, then is EBUSY."""

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        if not os.path.isdir(self.root):
            raise PoolError(errno.ENOENT, f"pool set directory {self.root} does not exist")

    def resolve(self, name: str) -> str:
        """The pool set file for ``name``; EINVAL if it is absolute, leaves the root, or is
        longer than PATH_MAX (resolving a long name costs time that grows with the square of
        its length, and no file could have it)."""
        if len(name) >= PATH_MAX:
            raise PoolError(errno.EINVAL, f"pool set name of {len(name)} characters "
                                          f"(at most {PATH_MAX - 1})")
        try:
            setfile.check_pool_set_name(name)
        except PoolSetError as e:
            raise PoolError(errno.EINVAL, e.strerror or "invalid pool set name") from None
        path = os.path.realpath(os.path.join(self.root, name))
        if os.path.commonpath([path, self.root]) != self.root:
            raise PoolError(errno.EINVAL, f"pool set name {name!r} leaves the pool set directory")
        return path

    @contextlib.contextmanager
    def _set(self, name: str, how: int,
             validate: bool = True) -> Iterator[setfile.PoolSetFile]:
        """The parsed pool set ``name`` (``validate``: validated for a remote pool), its file
        locked with ``how`` (LOCK_SH or LOCK_EX) until the block ends. The file is read by
        the name given (``x.set/`` is not ``x.set``), never blocking, at most MAX_SET_FILE
        bytes."""
        self.resolve(name)
        path = os.path.join(self.root, name)
        try:
            fd = open_regular(path)
        except FileNotFoundError:
            raise PoolError(errno.ENOENT, f"pool set file {name} does not exist") from None
        except OSError as e:
            raise _set_file_error(name, path, e) from None
        try:
            _lock_set(fd, how, name)
            try:
                data = read_fd(fd, path, MAX_SET_FILE)
            except OSError as e:
                raise _set_file_error(name, path, e) from None
            try:
                set_file = setfile.parse_bytes(data, path)
                if validate:
                    set_file.validate(remote=True)
            except PoolSetError as e:
                raise PoolError(errno.EINVAL, f"{name}: {e.strerror}") from None
            yield set_file
        finally:
            os.close(fd)

    def _files(self, name: str, set_file: setfile.PoolSetFile,
               pool_size: int) -> LocalReplicaFiles:
        size = set_file.pool_size
        if size < pool_size:
            raise PoolError(errno.EFBIG, f"remote pool {name} has {size} bytes, less than the "
                                         f"{pool_size} the client needs")
        return LocalReplicaFiles(set_file, set_file.master, pool_size)

    def create(self, name: str, pool_size: int, attr: PoolAttr) -> OpenPool:
        with self._set(name, fcntl.LOCK_EX) as set_file:
            if attr.is_zeroed == set_file.has_headers:
                raise PoolError(errno.EINVAL, "pool attributes are required exactly when the "
                                              "remote pool set has headers (no NOHDRS option)")
            if not attr.is_zeroed and bool(attr.incompat_features & FEAT_SINGLEHDR) != (
                    setfile.OPT_SINGLEHDR in set_file.options):
                raise PoolError(errno.EINVAL, "pool incompat feature flags and remote poolset "
                                              "options do not match")
            files = self._files(name, set_file, pool_size)
            for p in set_file.master.parts:
                if os.path.lexists(p.path):
                    raise PoolError(errno.EEXIST, f"part file {p.path} already exists")
            files.create(None if attr.is_zeroed else attr.to_header())
            try:
                return self._map(name, set_file, files, pool_size, True, attr,
                                 lock(set_file.master.parts[0].path, name))
            except OSError as e:
                # EBUSY: something that takes no set lock (a local tool) opened the new
                # pool before our lock; its parts are in use now and stay
                if e.errno != errno.EBUSY:
                    remove_parts(set_file.master, force=True)
                raise
            except BaseException:
                remove_parts(set_file.master, force=True)
                raise

    def open(self, name: str, pool_size: int) -> OpenPool:
        with self._set(name, fcntl.LOCK_SH) as set_file:
            files = self._files(name, set_file, pool_size)
            missing = [p.path for p in set_file.master.parts if not os.path.exists(p.path)]
            if missing:
                raise PoolError(errno.ENOENT, f"remote pool {name} does not exist "
                                              f"(missing {missing[0]})")
            denied = [p.path for p in set_file.master.parts
                      if not os.access(p.path, os.R_OK | os.W_OK)]
            if denied:  # before the header check, which would call an unreadable pool inconsistent
                raise PoolError(errno.EACCES, f"{denied[0]}: permission denied (remote pool "
                                              f"{name})")
            fd = lock(set_file.master.parts[0].path, name)  # EBUSY before any judgement
            try:
                headers, problems = files.check(remote=True)
                if problems:
                    raise PoolError(errno.EINVAL, f"remote pool {name} is inconsistent: "
                                                  + "; ".join(problems[:3]))
                attr = PoolAttr.from_header(headers[0].header) if headers else PoolAttr()
            except BaseException:
                os.close(fd)
                raise
            return self._map(name, set_file, files, pool_size, False, attr, fd)

    def _map(self, name: str, set_file: setfile.PoolSetFile, files: LocalReplicaFiles,
             pool_size: int, created: bool, attr: PoolAttr, lock_fd: int) -> OpenPool:
        """Map the pool whose lock ``lock_fd`` holds (closed here if that fails)."""
        try:
            mapping = files.open()
        except BaseException:
            os.close(lock_fd)
            raise
        return OpenPool(name, set_file, files, mapping, lock_fd, pool_size,
                        HDR_SIZE if set_file.has_headers else 0, created, attr)

    def stat(self, name: str) -> tuple[int, bool, str, bytes]:
        """Size, health, what is wrong, and the generation record of part 0, without opening
        or locking the pool. The record is read from a set that is no replica any more, too
        (a promoted one, with replicas of its own): its generation is what tells a returning
        master that it was superseded."""
        with self._set(name, fcntl.LOCK_SH, validate=False) as set_file:
            record = _generation_of(set_file)
            try:
                set_file.validate(remote=True)
            except PoolSetError as e:
                if not record:
                    raise PoolError(errno.EINVAL, f"{name}: {e.strerror}") from None
                return 0, False, f"{name}: {e.strerror}", record
            files = LocalReplicaFiles(set_file, set_file.master, set_file.pool_size)
            _, problems = files.check(remote=True)
            return set_file.pool_size, not problems, _named(problems), record

    def remove(self, name: str, force: bool, remove_pool_set: bool) -> None:
        """Delete the pool's parts (a consistent pool only, unless ``force``) and maybe its
        set file. A pool open in another session is EBUSY. Whatever can be known to fail
        fails before anything is deleted."""
        with self._set(name, fcntl.LOCK_EX) as set_file:
            set_path = os.path.join(self.root, name)
            if remove_pool_set and not os.access(os.path.dirname(set_path),
                                                 os.W_OK | os.X_OK):
                raise PoolError(errno.EACCES, f"pool set file {name} cannot be removed: its "
                                              "directory is not writable")
            if not force:
                files = LocalReplicaFiles(set_file, set_file.master, set_file.pool_size)
                _, problems = files.check(remote=True)
                if problems:
                    raise PoolError(errno.EINVAL, f"pool {name} is inconsistent, not removed "
                                                  f"without --force: {problems[0]}")
            first = set_file.master.parts[0].path
            fd = lock(first, name) if os.path.exists(first) else -1
            try:
                remove_parts(set_file.master, force)
            finally:
                if fd >= 0:
                    os.close(fd)
            if remove_pool_set:
                # the set file by the name given (a symlink, not what it points to), as rpmemd
                os.unlink(set_path)


#: problems a STAT answer names, at most: a set of thousands of lost parts has two each, and
#: all of them would not fit in one message of the protocol (proto.MAX_MESSAGE)
STAT_PROBLEMS = 8


def _named(problems: list[str]) -> str:
    """The first :data:`STAT_PROBLEMS` problems, and how many more there are."""
    shown = "; ".join(problems[:STAT_PROBLEMS])
    more = len(problems) - STAT_PROBLEMS
    return f"{shown}; and {more} more" if more > 0 else shown


def _lock_set(fd: int, how: int, name: str) -> None:
    """flock the pool set file ``fd``: a shared lock at once or EBUSY (a pool being created
    or removed is busy, however long that takes); an exclusive one waiting up to
    SET_LOCK_WAIT for the brief shared holders (opens, stats) to finish."""
    deadline = time.monotonic() + (SET_LOCK_WAIT if how == fcntl.LOCK_EX else 0)
    while True:
        try:
            fcntl.flock(fd, how | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise PoolError(errno.EBUSY, f"pool set {name} is busy: another session is "
                                             "creating, opening or removing it") from None
            time.sleep(0.002)


def _set_file_error(name: str, path: str, e: OSError) -> PoolError:
    """Pool set file ``name`` (at ``path``) cannot be read: EINVAL unless the errno says
    more to a client."""
    code = e.errno if e.errno in (errno.ENOENT, errno.EACCES, errno.EPERM) else errno.EINVAL
    why = (e.strerror or str(e)).removeprefix(f"{path}: ")
    return PoolError(code, f"pool set file {name}: {why}")


def _generation_of(set_file: setfile.PoolSetFile) -> bytes:
    """The generation record in the header page of the set's first part (b"": none)."""
    if not set_file.has_headers or not set_file.master.parts:
        return b""
    found = generation.load(set_file.master.parts[0].path)
    return found.pack() if found is not None else b""


def lock(path: str, name: str) -> int:
    """Lock the pool whose first part is ``path`` for this session (EBUSY if it is open)."""
    return lock_pool(path, f"remote pool {name} is open in another session")

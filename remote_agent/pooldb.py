"""The agent's pool database: pool set files under one directory and the pools they describe.

Names come from the client and are trusted no further than this: absolute names and names
that climb out of the directory (``..``, symlinks pointing outside) are refused. An open pool
holds an exclusive lock on its first part, so a second open of the same pool is EBUSY.
"""

from __future__ import annotations

import errno
import logging
import os

from pmreplica import generation, poolset
from pmreplica.errors import PmReplicaError, PoolSetError
from pmreplica.header import FEAT_SINGLEHDR, HDR_SIZE, PoolAttr
from pmreplica.pmem import Mapping
from pmreplica.replica import LocalReplicaFiles, lock_pool, remove_parts

log = logging.getLogger("remote_agent.pooldb")


class PoolError(PmReplicaError):
    """A request the pool database refuses; ``errno`` picks the protocol status."""


class OpenPool:
    """A pool this session created or opened: mapped, locked, ready for the data path.
    ``pool_size`` is the size the client asked for; the data path stays below it."""

    def __init__(self, name: str, set_file: poolset.PoolSetFile, files: LocalReplicaFiles,
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
                poolset.OPT_SINGLEHDR in self.set_file.options):
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
    """Pool set files under ``root``."""

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        if not os.path.isdir(self.root):
            raise PoolError(errno.ENOENT, f"pool set directory {self.root} does not exist")

    def resolve(self, name: str) -> str:
        """The pool set file for ``name``; EINVAL if it is absolute or leaves the root."""
        try:
            poolset.check_pool_set_name(name)
        except PoolSetError as e:
            raise PoolError(errno.EINVAL, e.strerror or "invalid pool set name") from None
        path = os.path.realpath(os.path.join(self.root, name))
        if os.path.commonpath([path, self.root]) != self.root:
            raise PoolError(errno.EINVAL, f"pool set name {name!r} leaves the pool set directory")
        return path

    def load(self, name: str) -> poolset.PoolSetFile:
        path = self.resolve(name)
        if not os.path.exists(path):
            raise PoolError(errno.ENOENT, f"pool set file {name} does not exist")
        try:
            set_file = poolset.parse(path)
            set_file.validate(remote=True)
        except PoolSetError as e:
            raise PoolError(errno.EINVAL, f"{name}: {e.strerror}") from None
        return set_file

    def _files(self, name: str, set_file: poolset.PoolSetFile,
               pool_size: int) -> LocalReplicaFiles:
        size = set_file.pool_size
        if size < pool_size:
            raise PoolError(errno.EFBIG, f"remote pool {name} has {size} bytes, less than the "
                                         f"{pool_size} the client needs")
        return LocalReplicaFiles(set_file, set_file.master, pool_size)

    def create(self, name: str, pool_size: int, attr: PoolAttr) -> OpenPool:
        set_file = self.load(name)
        if attr.is_zeroed == set_file.has_headers:
            raise PoolError(errno.EINVAL, "pool attributes are required exactly when the "
                                          "remote pool set has headers (no NOHDRS option)")
        if not attr.is_zeroed and bool(attr.incompat_features & FEAT_SINGLEHDR) != (
                poolset.OPT_SINGLEHDR in set_file.options):
            raise PoolError(errno.EINVAL, "pool incompat feature flags and remote poolset "
                                          "options do not match")
        files = self._files(name, set_file, pool_size)
        for p in set_file.master.parts:
            if os.path.lexists(p.path):
                raise PoolError(errno.EEXIST, f"part file {p.path} already exists")
        files.create(None if attr.is_zeroed else attr.to_header())
        try:
            return self._map(name, set_file, files, pool_size, True, attr)
        except OSError as e:
            # EBUSY: another session opened the new pool between its creation and our lock;
            # its parts are in use now and stay
            if e.errno != errno.EBUSY:
                remove_parts(set_file.master, force=True)
            raise
        except BaseException:
            remove_parts(set_file.master, force=True)
            raise

    def open(self, name: str, pool_size: int) -> OpenPool:
        set_file = self.load(name)
        files = self._files(name, set_file, pool_size)
        missing = [p.path for p in set_file.master.parts if not os.path.exists(p.path)]
        if missing:
            raise PoolError(errno.ENOENT, f"remote pool {name} does not exist "
                                          f"(missing {missing[0]})")
        denied = [p.path for p in set_file.master.parts
                  if not os.access(p.path, os.R_OK | os.W_OK)]
        if denied:  # before the header check, which would call an unreadable pool inconsistent
            raise PoolError(errno.EACCES, f"{denied[0]}: permission denied (remote pool {name})")
        headers, problems = files.check(remote=True)
        if problems:
            raise PoolError(errno.EINVAL, f"remote pool {name} is inconsistent: "
                                          + "; ".join(problems[:3]))
        attr = PoolAttr.from_header(headers[0].header) if headers else PoolAttr()
        return self._map(name, set_file, files, pool_size, False, attr)

    def _map(self, name: str, set_file: poolset.PoolSetFile, files: LocalReplicaFiles,
             pool_size: int, created: bool, attr: PoolAttr) -> OpenPool:
        fd = lock(set_file.master.parts[0].path, name)
        try:
            mapping = files.open()
        except BaseException:
            os.close(fd)
            raise
        return OpenPool(name, set_file, files, mapping, fd, pool_size,
                        HDR_SIZE if set_file.has_headers else 0, created, attr)

    def stat(self, name: str) -> tuple[int, bool, str, bytes]:
        """Size, health, what is wrong, and the generation record of part 0, without opening
        or locking the pool. The record is read from a set that is no replica any more, too
        (a promoted one, with replicas of its own): its generation is what tells a returning
        master that it was superseded."""
        try:
            set_file = self.load(name)
        except PoolError as e:
            if e.errno != errno.EINVAL:
                raise
            record = self._generation(self.resolve(name))
            if not record:
                raise
            return 0, False, e.strerror or str(e), record
        files = LocalReplicaFiles(set_file, set_file.master, set_file.pool_size)
        _, problems = files.check(remote=True)
        return (set_file.pool_size, not problems, "; ".join(problems),
                _generation_of(set_file))

    @staticmethod
    def _generation(path: str) -> bytes:
        """The generation record of the master part of the set file at ``path`` (b"": none)."""
        try:
            return _generation_of(poolset.parse(path))
        except (OSError, PoolSetError):
            return b""

    def remove(self, name: str, force: bool, remove_pool_set: bool) -> None:
        """Delete the pool's parts (a consistent pool only, unless ``force``) and maybe its
        set file. A pool open in another session is EBUSY."""
        set_file = self.load(name)
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
            os.unlink(os.path.join(self.root, name))


def _generation_of(set_file: poolset.PoolSetFile) -> bytes:
    """The generation record in the header page of the set's first part (b"": none)."""
    if not set_file.has_headers or not set_file.master.parts:
        return b""
    found = generation.load(set_file.master.parts[0].path)
    return found.pack() if found is not None else b""


def lock(path: str, name: str) -> int:
    """Lock the pool whose first part is ``path`` for this session (EBUSY if it is open)."""
    return lock_pool(path, f"remote pool {name} is open in another session")

#!/usr/bin/env python3
"""A pool set with a local and a remote replica, written through PoolSet.

    python examples/replicated_poolset.py            # remote replica on a local agent
    python examples/replicated_poolset.py user@host  # remote replica on `host` over SSH
                                                     # (its agent needs remote.set there)

Every persist returns once the range is durable on the master, on the local replica and
on the remote one. A replica that fails is reported through the pmreplica_replica_failed
hook; the pool keeps working.
"""

import os
import sys

from _local_agent import local_agent_dir, scratch_dir
from pmreplica import PoolSet, hookimpl


class Watcher:
    """A host application's hooks: told when a replica fails or is repaired."""

    @hookimpl
    def pmreplica_replica_failed(self, replica, error):
        print(f"  ! {replica.name} failed: {error}")

    @hookimpl
    def pmreplica_replica_restored(self, replica):
        print(f"  + {replica.name} is consistent again")


def main() -> int:
    work = scratch_dir("pmreplica-example-")
    if len(sys.argv) > 1:
        target = sys.argv[1]
    else:
        d = local_agent_dir("pmreplica-example-agent-")
        target = "localhost"
        with open(os.path.join(d, "remote.set"), "w") as f:
            f.write(f"PMEMPOOLSET\n16M {d}/remote.part0\n")
    path = os.path.join(work, "pool.set")
    with open(path, "w") as f:
        f.write("PMEMPOOLSET\n"
                f"16M {work}/master.part0\n"
                "REPLICA\n"
                f"16M {work}/replica.part0\n"
                f"REPLICA {target} remote.set\n")

    with PoolSet.create(path, plugins=[Watcher()]) as ps:
        print(f"created {path}: {ps.size} bytes, replicas:")
        for r in ps.replicas:
            print(f"  {r.name}: {r.state}")
        message = b"hello, replicated persistent memory"
        off = ps.data_offset
        ps.buf[off:off + len(message)] = message
        ps.persist(off, len(message))
        print(f"persisted {len(message)} bytes at offset {off} on every replica")

    with PoolSet.open(path) as ps:
        print("reopened:", bytes(ps.buf[off:off + len(message)]).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())

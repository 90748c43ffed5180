#!/usr/bin/env python3
"""The demo's story in a short script: a persistent dict on a pool set with a local and a
remote replica, the remote agent killed mid-run, the pool going on degraded, the replica
repaired by replica-sync, every replica byte-identical afterwards.

    python examples/replicated_objects.py
"""

import hashlib
import os
import signal
import sys

from _local_agent import local_agent_dir, scratch_dir
from pmreplica import hookimpl, pmemobj, sync
from remote_agent.processes import running_agents


class Watcher:
    @hookimpl
    def pmreplica_replica_failed(self, replica, error):
        print(f"  {replica.name} failed ({error.strerror}); going on degraded")


def data_digest(path):
    with open(path, "rb") as f:
        f.seek(4096)  # each replica's header has its own uuid; the data must be equal
        return hashlib.sha256(f.read()).hexdigest()


def main() -> int:
    work, agent = scratch_dir("pmreplica-example-"), local_agent_dir("pmreplica-example-agent-")
    with open(f"{agent}/remote.set", "w") as f:
        f.write(f"PMEMPOOLSET\n16M {agent}/remote.part0\n")
    path = f"{work}/objects.set"
    with open(path, "w") as f:
        f.write(f"PMEMPOOLSET\n16M {work}/master.part0\n"
                f"REPLICA\n16M {work}/replica.part0\n"
                "REPLICA localhost remote.set\n")

    with pmemobj.PersistentObjectPool(path, flag="c", plugins=[Watcher()]) as pool:
        pool.root = pool.new(pmemobj.PersistentDict)
        for i in range(500):
            with pool.transaction():
                pool.root[f"key{i % 100}"] = i
        print("500 transactions committed on all three replicas")
        for pid in running_agents(agent):
            os.kill(pid, signal.SIGKILL)
        for i in range(500, 800):
            with pool.transaction():
                pool.root[f"key{i % 100}"] = i
        print("300 more committed with the remote replica gone:",
              [r.state for r in pool.replicas])

    report = sync.sync(path)
    print(f"replica-sync: {report.status}, {report.copied} bytes copied")
    digests = {data_digest(p) for p in (f"{work}/master.part0", f"{work}/replica.part0",
                                        f"{agent}/remote.part0")}
    print("replicas identical:", len(digests) == 1)
    return 0 if len(digests) == 1 and report.exit_code in (0, 1) else 1


if __name__ == "__main__":
    sys.exit(main())

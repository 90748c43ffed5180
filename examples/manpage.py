#!/usr/bin/env python3
"""librpmem(7)'s example in Python: create a remote pool, zero the local pool, make it
persistent on the remote node, close.

    python examples/manpage.py                      # a local agent, nothing to set up
    python examples/manpage.py user@host pool.set   # an agent on `host` over SSH

On a real host, `pool.set` is a pool set file in the agent's pool-set directory
(default: the user's home), e.g. "PMEMPOOLSET\\n32M /mnt/pmem/pool.part0\\n".
"""

import mmap
import os
import sys

from pmreplica.header import PoolAttr
from pmreplica.rpmem import RemotePool

POOL_SIGNATURE = b"MANPAGE"
POOL_SIZE = 32 * 1024 * 1024
NLANES = 4
DATA_OFF = 4096  # the first 4096 bytes hold the remote pool's header
DATA_SIZE = POOL_SIZE - DATA_OFF


def main() -> int:
    if len(sys.argv) == 3:
        target, poolset = sys.argv[1], sys.argv[2]
    elif len(sys.argv) == 1:
        from _local_agent import local_agent_dir
        d = local_agent_dir("pmreplica-manpage-")
        target, poolset = "localhost", "manpage.set"
        with open(os.path.join(d, poolset), "w") as f:
            f.write(f"PMEMPOOLSET\n{POOL_SIZE >> 20}M {d}/manpage.part0\n")
    else:
        print(f"usage:\t{sys.argv[0]} [<target> <poolset>]", file=sys.stderr)
        return 1

    pool = mmap.mmap(-1, POOL_SIZE)  # page-aligned local memory pool
    try:
        rpp = RemotePool.create(target, poolset, pool, nlanes=NLANES,
                                attr=PoolAttr(signature=POOL_SIGNATURE))
    except OSError as e:
        print(f"rpmem_create: {e}", file=sys.stderr)
        return 1
    print(f"created {target}:{poolset} ({rpp.nlanes} lanes, {rpp.provider}, "
          f"{rpp.persist_method})")

    pool[DATA_OFF:] = bytes(DATA_SIZE)  # store data on the local pool
    try:
        rpp.persist(DATA_OFF, DATA_SIZE, lane=0)  # make it persistent on the remote node
        rpp.close()
    except OSError as e:
        print(f"rpmem: {e}", file=sys.stderr)
        return 1
    print(f"persisted {DATA_SIZE} bytes and closed the remote pool")
    return 0


if __name__ == "__main__":
    sys.exit(main())

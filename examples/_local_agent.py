"""Helpers the examples share: run the agent as a local process when no host is given.

With no target on the command line, the examples serve their remote pools from a
temporary pool-set directory through a local agent (PMREPLICA_LAUNCHER=local), so they run
as they are on one machine. Give a real `[user@]host[:port]` to use SSH instead.
"""

from __future__ import annotations

import atexit
import os
import shlex
import shutil
import sys
import tempfile


def scratch_dir(prefix: str) -> str:
    """A directory for the example's files, removed when the example ends."""
    d = tempfile.mkdtemp(prefix=prefix, dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    atexit.register(shutil.rmtree, d, True)
    return d


def local_agent_dir(prefix: str) -> str:
    """Make a pool-set directory, point RPMEM_CMD at an agent serving it, use the local
    launcher; the directory is where the remote pool set files go."""
    d = scratch_dir(prefix)
    agent = shutil.which("pmreplica-agent") or os.path.join(os.path.dirname(sys.executable),
                                                            "pmreplica-agent")
    os.environ["PMREPLICA_LAUNCHER"] = "local"
    os.environ["RPMEM_CMD"] = shlex.join([agent, "--poolset-dir", d])
    return d

"""Finding the agents that run on this machine, for tools and tests that must stop one."""

from __future__ import annotations

import os


def running_agents(poolset_dir: str | os.PathLike[str]) -> list[int]:
    """PIDs of the pmreplica-agent processes serving ``poolset_dir``: their command line
    names the agent (the console script or ``remote_agent.main``) and, as an argument of
    its own, the directory (so a shell that merely started one does not count)."""
    want = os.fsencode(poolset_dir)
    me = os.getpid()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if want in argv and any(a.endswith((b"pmreplica-agent", b"remote_agent.main"))
                                for a in argv):
            pids.append(int(entry))
    return pids

"""``pmreplica demo``: the whole story on one machine, with nothing to set up.

A pool set with a local replica and a remote one (served by a local agent over TCP), an
object-store workload with a live line of commits/s and commit latency, the remote agent
killed (degraded mode), brought back, the replica repaired by replica-sync, and the
replicas proved identical byte for byte.

``--failover`` goes on to the day the master's host is lost: the application dies with it
mid-workload, the remote replica is promoted, the application goes on there with every
commit it saw return, the old master comes back and is refused, then rejoins as a replica.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import random
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
from typing import Callable

from .hookspecs import hookimpl

POOL_MIB = 32
ENTRIES = 3000


class _Events:
    """The demo's hook implementations: print what happens to replicas as it happens."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say

    @hookimpl
    def pmreplica_replica_failed(self, replica, error) -> None:
        self.say(f"  !  {replica.name} failed: {error}\n"
                 "     the pool goes on, degraded; the replica is marked stale")

    @hookimpl
    def pmreplica_replica_restored(self, replica) -> None:
        self.say(f"  +  {replica.name} is consistent again")


class Demo:
    def __init__(self, workdir: str, out=sys.stdout, transactions: int = 2000) -> None:
        self.dir = workdir
        self.out = out
        self.transactions = transactions
        self.live = out.isatty()
        self.agent_dir = os.path.join(workdir, "agent")
        self.set_path = os.path.join(workdir, "demo.set")
        self.model: dict[str, int] = {}
        self.rng = random.Random(42)

    def say(self, text: str) -> None:
        if self.live:
            self.out.write("\r\033[K")
        self.out.write(text + "\n")
        self.out.flush()

    # -- setup -----------------------------------------------------------------------------
    def setup(self) -> None:
        os.makedirs(self.agent_dir)
        agent = shutil.which("pmreplica-agent") or os.path.join(
            os.path.dirname(sys.executable), "pmreplica-agent")
        os.environ["PMREPLICA_LAUNCHER"] = "local"
        os.environ["RPMEM_CMD"] = shlex.join([agent, "--poolset-dir", self.agent_dir])
        with open(os.path.join(self.agent_dir, "remote.set"), "w") as f:
            f.write(f"PMEMPOOLSET\n{POOL_MIB}M {self.agent_dir}/remote.part0\n")
        with open(self.set_path, "w") as f:
            f.write("PMEMPOOLSET\n"
                    f"{POOL_MIB}M {self.dir}/master.part0\n"
                    "REPLICA\n"
                    f"{POOL_MIB}M {self.dir}/replica.part0\n"
                    "REPLICA localhost remote.set\n")
        self.say(f"pool set {self.set_path}:")
        self.say(f"  master   {self.dir}/master.part0\n"
                 f"  replica  {self.dir}/replica.part0            (local)\n"
                 f"  replica  localhost:remote.set -> {self.agent_dir}/remote.part0 "
                 "(pmreplica-agent, TCP)")

    # -- workload --------------------------------------------------------------------------
    def workload(self, pool, label: str, count: int) -> None:
        """``count`` transactions on a persistent dict, with a live progress line."""
        root = pool.root
        lat: list[float] = []
        start = last = time.perf_counter()
        for i in range(count):
            key = f"k{self.rng.randrange(ENTRIES)}"
            t = time.perf_counter()
            with pool.transaction():
                root[key] = root.get(key, 0) + 1
                root["commits"] = root.get("commits", 0) + 1
            lat.append(time.perf_counter() - t)
            self.model[key] = self.model.get(key, 0) + 1
            self.model["commits"] = self.model.get("commits", 0) + 1
            now = time.perf_counter()
            if self.live and now - last > 0.1:
                last = now
                self._progress(label, i + 1, now - start, lat[-200:])
        self._progress(label, count, time.perf_counter() - start, lat, final=True)

    def _progress(self, label: str, done: int, secs: float, lat: list[float],
                  final: bool = False) -> None:
        line = (f"  {label:<10} {done:6d} commits  {done / secs:8.0f} commits/s  "
                f"commit latency p50 {statistics.median(lat) * 1e6:6.0f} us")
        if final:
            self.say(line)
        else:
            self.out.write("\r\033[K" + line)
            self.out.flush()

    def kill_agent(self) -> int:
        """SIGKILL the agent serving the remote replica, as an operator's mistake would."""
        from remote_agent.processes import running_agents
        pids = running_agents(self.agent_dir)
        if not pids:
            raise RuntimeError("the remote replica's agent is not running")
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        return pids[0]

    # -- proof -----------------------------------------------------------------------------
    def digests(self) -> dict[str, str]:
        """SHA-256 of each replica's data (its header, with its own uuid, left out)."""
        parts = {"master": f"{self.dir}/master.part0",
                 "local replica": f"{self.dir}/replica.part0",
                 "remote replica": f"{self.agent_dir}/remote.part0"}
        out = {}
        for name, path in parts.items():
            with open(path, "rb") as f:
                f.seek(4096)
                out[name] = hashlib.sha256(f.read()).hexdigest()
        return out

    def run(self) -> int:
        from . import pmemobj, sync

        self.setup()
        # the failure hook below tells the story; the pool's own warnings would repeat it
        for name in ("pmreplica.poolset", "pmreplica.failures"):
            logging.getLogger(name).setLevel(logging.ERROR)
        events = _Events(self.say)
        self.say("\n1. an object store on the pool set: every commit is durable on all replicas")
        pool = pmemobj.PersistentObjectPool(self.set_path, flag="c", plugins=[events])
        try:
            pool.root = pool.new(pmemobj.PersistentDict)
            self.workload(pool, "healthy", self.transactions)

            pid = self.kill_agent()
            self.say(f"\n2. the remote replica's agent (pid {pid}) is killed")
            self.workload(pool, "degraded", self.transactions // 2)
            states = ", ".join(f"{r.name.split(' (')[0]}: {r.state}" for r in pool.replicas)
            self.say(f"  replicas: {states}")
        finally:
            pool.close()

        self.say("\n3. the agent's host is reachable again: replica-sync repairs the replica")
        report = sync.sync(self.set_path, progress=self.live)
        for r in report.replicas:
            if r.action:
                self.say(f"  {r.name}: {r.action}, {r.copy_bytes} bytes copied")
        self.say(f"  replica-sync: {report.status}")
        if report.exit_code not in (0, 1):
            self.say(f"  replica-sync could not repair the pool set: {report.reason}")
            return 1

        self.say("\n4. the replicas, byte for byte (data after each 4 KiB header):")
        digests = self.digests()
        for name, digest in digests.items():
            self.say(f"  {name:15} sha256 {digest[:32]}")
        identical = len(set(digests.values())) == 1
        with pmemobj.PersistentObjectPool(self.set_path, flag="r") as pool:
            content = {k: pool.root[k] for k in self.model}
            healthy = all(r.state == "ok" for r in pool.replicas)
        matches = content == self.model
        self.say(f"  identical: {'yes' if identical else 'NO'}; the store holds "
                 f"{len(self.model) - 1} entries and {self.model['commits']} commits, "
                 f"as committed: {'yes' if matches else 'NO'}; all replicas ok: "
                 f"{'yes' if healthy else 'NO'}")
        return 0 if identical and matches and healthy else 1

    # -- losing the master's host ------------------------------------------------------------
    def failover(self) -> int:
        """Steps 5-8: the master's host is lost mid-workload; promote; go on; rejoin."""
        from . import pmemobj, sync
        from .errors import PmReplicaError
        from .promote import promote

        self.say("\n5. the master's host is lost, and the application with it, mid-workload")
        acked = self._writer_killed()
        from remote_agent.processes import running_agents
        while running_agents(self.agent_dir):  # its agents end when they miss their client
            time.sleep(0.05)
        lost = f"{self.dir}/master.part0"
        os.rename(lost, lost + ".away")  # the host is gone: its files out of reach
        self.say(f"  the application saw {acked} commits return before it died")

        promoted = os.path.join(self.agent_dir, "promoted.set")
        with open(promoted, "w") as f:  # the remote replica's parts, and the pool's others
            f.write(f"PMEMPOOLSET\n{POOL_MIB}M {self.agent_dir}/remote.part0\n"
                    f"REPLICA\n{POOL_MIB}M {self.dir}/replica.part0\n")
        self.say(f"\n6. on the remote replica's host: pmreplica promote {promoted}")
        out = promote(promoted)
        for c in out.compared:
            self.say(f"  {c.name}: {c.relation}")
        self.say(f"  promoted: the master of {out.generation.describe()}")  # type: ignore[union-attr]
        report = sync.sync(promoted)
        self.say(f"  replica-sync: the local replica compared, {report.copied} bytes copied")
        with pmemobj.PersistentObjectPool(promoted, flag="w", plugins=[_Events(self.say)]) as pool:
            commits = pool.root.get("commits", 0)
            self.say(f"  the store holds {commits} commits: every acknowledged one "
                     f"({'yes' if commits >= acked else 'NO'})")
            self.workload(pool, "promoted", self.transactions // 4)

        self.say("\n7. the old master's host comes back")
        os.rename(lost + ".away", lost)
        try:
            pmemobj.PersistentObjectPool(self.set_path, flag="w").close()
            self.say("  the old master opened: SPLIT BRAIN NOT CAUGHT")
            return 1
        except PmReplicaError as e:
            self.say(f"  opening it is refused: {str(e).split(': ', 1)[1]}")

        self.say("\n8. it rejoins as a replica of the promoted master (replica-sync there)")
        with open(promoted, "a") as f:
            f.write(f"REPLICA\n{POOL_MIB}M {lost}\n")
        report = sync.sync(promoted)
        for r in report.replicas:
            if r.action:
                self.say(f"  {r.name}: {r.action}, {r.copy_bytes} bytes copied")
        digests = self.digests()
        same = len(set(digests.values())) == 1
        self.say(f"  master, local and remote replica identical: {'yes' if same else 'NO'}")
        return 0 if same and commits >= acked and report.exit_code == 1 else 1

    def _writer_killed(self) -> int:
        """Run the workload in a process of its own and SIGKILL it after a second; the
        commits it reported done (each printed after its transaction returned)."""
        import subprocess

        child = subprocess.Popen([sys.executable, "-c", _WRITER, self.set_path],
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        acked, deadline = 0, time.monotonic() + 1.0
        while time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            acked = int(line)
        child.kill()
        child.wait()
        child.stdout.close()
        return acked


#: the application on the master's host: counts commits, printing each once it returned
_WRITER = r"""
import sys
from pmreplica import pmemobj
with pmemobj.PersistentObjectPool(sys.argv[1], flag="w") as pool:
    while True:
        with pool.transaction():
            pool.root["commits"] = pool.root.get("commits", 0) + 1
        print(pool.root["commits"], flush=True)
"""


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``demo`` to the ``pmreplica`` command (cli.COMMAND_MODULES)."""
    p = sub.add_parser("demo", help="replicate an object store, break a replica, repair it",
                       description="The whole story on one machine, with nothing to set up: "
                                   "an object store replicated to a local and a remote "
                                   "replica, the remote agent killed, the replica repaired "
                                   "by replica-sync, the replicas proved identical.")
    p.add_argument("--transactions", type=int, default=2000, metavar="N",
                   help="transactions in the healthy phase (default 2000)")
    p.add_argument("--keep", action="store_true", help="keep the pool files (path printed)")
    p.add_argument("--failover", action="store_true",
                   help="go on to losing the master's host: promote, split brain refused, "
                        "rejoin")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    workdir = tempfile.mkdtemp(prefix="pmreplica-demo-",
                               dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        demo = Demo(workdir, transactions=max(10, args.transactions))
        status = demo.run()
        return demo.failover() if status == 0 and args.failover else status
    finally:
        if args.keep:
            print(f"pool files kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

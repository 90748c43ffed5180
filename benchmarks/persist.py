#!/usr/bin/env python3
"""Persist latency and throughput of a remote pool vs raw TCP baselines, in one run.

    .venv/bin/python benchmarks/persist.py [--quick] [--json] [--placements one,two,unpinned]
                                           [--no-sshd | --ssh TARGET]

By default it also starts a private sshd on 127.0.0.1 (Debian's openssh-server, with its own
keys, as the tests do) to time create+close through SSH; `--ssh user@host[:port]` times a
real host instead (its agent must be installed there). `pmreplica bench` runs the same
measurements without the private sshd.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pmreplica import bench  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.add_arguments(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--ssh", metavar="TARGET", help="time create+close against this host")
    g.add_argument("--no-sshd", action="store_true", help="skip the SSH measurements")
    args = p.parse_args()
    where = bench.chosen_placements(args.placements)
    if args.ssh or args.no_sshd:
        rows = bench.run(args.quick, args.ssh, None, as_json=args.json, where=where)
    else:
        from tests.fixtures.sshd import Sshd  # the test suite's private sshd, reused
        with tempfile.TemporaryDirectory(prefix="pmreplica-bench-sshd-") as d:
            server = Sshd(Path(d))
            server.start()
            try:
                env = {k: v for k, v in server.env().items()
                       if k in ("PMREPLICA_SSH_CONFIG", "PATH")}
                rows = bench.run(args.quick, server.target, env, as_json=args.json,
                                 where=where)
            finally:
                server.stop()
    return 0 if all(r.ok is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

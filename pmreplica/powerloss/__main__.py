"""``python -m pmreplica.powerloss record|check``: the writer and checker processes of an
exploration (explore.py starts them; run by hand to look at one image again)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .check import check, load_scenario
from .model import Simulation
from .stream import Recorder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pmreplica.powerloss")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record", help="run a scenario under the simulation, write its stream")
    r.add_argument("stream")
    r.add_argument("--scenario", required=True, help="module:Class")
    r.add_argument("--params", default="{}", help="JSON object of the class's arguments")
    r.add_argument("--workdir", required=True)
    r.add_argument("--sample", type=float, default=1.0)
    r.add_argument("--max-points", type=int, default=1 << 30)
    r.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("check", help="check a stream's crash images")
    c.add_argument("stream")
    c.add_argument("--scratch", required=True, help="directory the images are written to")
    c.add_argument("--images-per-point", type=int, default=8)
    c.add_argument("--worker", type=int, default=0)
    c.add_argument("--workers", type=int, default=1)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--keep-failures", help="copy failing images into this directory")
    c.add_argument("--only", help="POINT:IMAGE: check that one image (and keep it)")
    args = p.parse_args(argv)
    if args.cmd == "record":
        params = json.loads(args.params)
        scenario = load_scenario(args.scenario, params)
        os.makedirs(args.workdir, exist_ok=True)
        scenario.setup(args.workdir)
        header = {"scenario": args.scenario, "params": params,
                  "workdir": os.path.realpath(args.workdir), "seed": args.seed}
        sim = Simulation(args.workdir, Recorder(args.stream, header), sample=args.sample,
                         max_points=args.max_points, seed=args.seed)
        with sim:
            scenario.run(args.workdir, sim)
        print(json.dumps({"points": sim.points, "recorded": sim.recorded}))
        return 0
    only = tuple(int(x) for x in args.only.split(":")) if args.only else None
    result = check(args.stream, args.scratch, images_per_point=args.images_per_point,
                   worker=args.worker, workers=args.workers, seed=args.seed,
                   keep_failures=args.keep_failures, only=only)  # type: ignore[arg-type]
    print(result.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())

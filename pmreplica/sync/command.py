"""The ``replica-sync`` command, and ``pmreplica sync`` / ``pmreplica check``.

Exit status (fsck's numbers): 0 every replica healthy, 1 replicas were repaired and all are
healthy now, 4 problems are left (found by a check or a dry run, or a repair that failed or
could not start), 8 the run could not be made (invalid pool set file, pool set open: EBUSY),
2 a usage error.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys

from .. import progress as _progress
from .. import sync as _sync

log = logging.getLogger(__name__)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("poolset", metavar="POOLSET", help="pool set file (or single-file pool)")
    p.add_argument("--json", action="store_true", help="print the report as JSON for scripts "
                                                       "(and progress as JSON lines on stderr)")
    add_progress_option(p)


def _add_sync_options(p: argparse.ArgumentParser) -> None:
    _add_common(p)
    p.add_argument("-n", "--dry-run", action="store_true",
                   help="check and report what would be done; change nothing")
    p.add_argument("--verify", action="store_true",
                   help="also compare the healthy replicas with the source, by checksums "
                        "computed where each replica lives, and report differing ranges")
    p.add_argument("--repair", action="store_true",
                   help="with --verify: copy the differing ranges from the source")
    p.add_argument("--source", type=int, metavar="N",
                   help="repair from replica N when no replica is known to be up to date "
                        "(the replica-state record was lost with the master)")
    p.add_argument("--discard", type=int, metavar="N", action="append", default=[],
                   help="give up replica N's data when replicas took writes apart (split "
                        "brain) or a replica was promoted elsewhere: N is repaired from "
                        "the other side (repeatable)")


def _description(check_only: bool) -> str:
    if check_only:
        return ("Check every replica of POOLSET: local parts (present, sizes, header "
                "checksums, uuid links), remote pools through their agents (reachable, size, "
                "header health), the replica links, and which replicas are stale. Changes "
                "nothing. Exit status: 0 healthy, 4 problems found, 8 could not run, "
                "2 usage error.")
    return ("Check every replica of POOLSET, pick the lowest-numbered healthy and up-to-date "
            "replica as the source, recreate missing or broken parts and remote pools, copy "
            "the data into every broken or stale replica (for a stale one only the chunks "
            "written while it was failed), and rewrite the headers and their links. "
            + _EXIT_TEXT)


_EXIT_TEXT = ("Exit status: 0 healthy, 1 repaired, 4 problems left, 8 could not run, "
              "2 usage error.")


def build_parser(prog: str = "replica-sync") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=_description(False))
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="log what happens (twice: debug detail)")
    _add_sync_options(p)
    return p


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``sync`` and ``check`` to the ``pmreplica`` command (cli.COMMAND_MODULES)."""
    p = sub.add_parser("sync", help="repair a pool set's replicas from a healthy one",
                       description=_description(False))
    _add_sync_options(p)
    p.set_defaults(func=cmd_sync)
    p = sub.add_parser("check", help="check the health of a pool set's replicas",
                       description=_description(True))
    _add_common(p)
    p.add_argument("--verify", action="store_true",
                   help="also compare the healthy replicas with the source by checksums")
    p.set_defaults(func=cmd_check)


def cmd_sync(args: argparse.Namespace) -> int:
    if args.repair and not args.verify:
        print(f"{_prog(args)}: --repair needs --verify", file=sys.stderr)
        return 2
    return _run(args, lambda progress: _sync.sync(
        args.poolset, dry_run=args.dry_run, verify=args.verify, repair=args.repair,
        source=args.source, discard=args.discard, progress=progress))


def cmd_check(args: argparse.Namespace) -> int:
    return _run(args, lambda progress: _sync.check(args.poolset, verify=args.verify,
                                                   progress=progress))


def _prog(args: argparse.Namespace) -> str:
    return "pmreplica " + args.command if getattr(args, "command", None) else "replica-sync"


def add_progress_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show progress on stderr (default): a bar on a terminal, a line every "
                        "few seconds elsewhere, JSON lines with --json")


def _run(args: argparse.Namespace, call) -> int:
    progress = _progress.mode_for(sys.stderr, args.progress, args.json)
    try:
        report = call(progress)
    except Exception as e:  # noqa: BLE001 - one line and the error status, whatever it is
        from ..cli import failure_message
        message = failure_message(e)
        print(f"{_prog(args)}: {message}", file=sys.stderr)
        if args.json:  # scripts get a document on stdout in every case
            json.dump({"path": os.path.abspath(args.poolset), "status": "error",
                       "error": message,
                       "errno": errno.errorcode.get(getattr(e, "errno", None) or 0),
                       "exit_code": _sync.EXIT_ERROR}, sys.stdout, indent=2)
            sys.stdout.write("\n")
        return _sync.EXIT_ERROR
    if args.json:
        json.dump(report.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write("\n".join(render(report)) + "\n")
    return report.exit_code


def _size(n: int) -> str:
    for unit in ("GiB", "MiB", "KiB"):
        scale = {"GiB": 1 << 30, "MiB": 1 << 20, "KiB": 1 << 10}[unit]
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def render(report: _sync.Report) -> list[str]:
    """The report as text: one block per replica, then the outcome."""
    out = [f"pool set {report.path}: {report.pool_size} bytes, {len(report.replicas)} "
           f"replica(s)" + (" (dry run)" if report.dry_run else "")]
    if report.unclean:
        out.append("not closed cleanly: what its last session was writing is brought in line "
                   "on every replica" + (" (by opening the pool, or replica-sync)"
                                         if report.dry_run else ""))
    rec = report.record
    if rec is not None and rec["stale"]:
        out.append(f"replica-state record: stale {', '.join(map(str, rec['stale']))}, "
                   f"{_size(rec['dirty_bytes'])} written since (generation "
                   f"{rec['generation']})")
    width = max(len(r.name) for r in report.replicas)
    for r in report.replicas:
        line = f"  {r.name:<{width}}  {r.health}"
        if r.source:
            line += ", source"
        if r.action:
            what = r.action + (f" ({_size(r.copy_bytes)})" if r.copy_bytes else "")
            line += f"; {what}"
            if r.result:
                line += f": {r.result}"
            elif report.dry_run and r.action != "cannot repair":
                line += ": not done (dry run)"
        out.append(line)
        for msg in r.problems:
            out.append(f"      {msg}")
        if r.error:
            out.append(f"      error: {r.error}")
        if r.differing is not None:
            if r.differing:
                total = sum(n for _, n in r.differing)
                out.append(f"      differs from the source in {len(r.differing)} range(s), "
                           f"{_size(total)}:")
                out.extend(f"        [{o:#x}, {o + n:#x})" for o, n in r.differing[:20])
                if len(r.differing) > 20:
                    out.append(f"        ... {len(r.differing) - 20} more")
            else:
                out.append("      verified: same as the source")
    if report.reason:
        out.append(f"cannot repair: {report.reason}")
    if report.status == _sync.NEEDS_REPAIR and not report.dry_run:
        summary = ("needs repair: replicas differ from the source (--verify --repair copies "
                   "the differing ranges)")
    else:
        summary = {
            _sync.OK_HEALTHY: "all replicas healthy",
            _sync.OK_REPAIRED: f"repaired ({_size(report.copied)} copied)",
            _sync.NEEDS_REPAIR: "needs repair" + (f" ({_size(report.copied)} to copy)"
                                                  if report.copied else ""),
            _sync.FAILED: "failed: problems are left",
        }[report.status]
    out.append(f"result: {summary}")
    return out


def main(argv: list[str] | None = None) -> int:
    """The ``replica-sync`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = (logging.WARNING if not args.verbose else logging.INFO if args.verbose == 1
             else logging.DEBUG)
    logging.basicConfig(level=level, format="replica-sync: %(message)s", stream=sys.stderr)
    try:
        return cmd_sync(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`replica-sync ... | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return _sync.EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())

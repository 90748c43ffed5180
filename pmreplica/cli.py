"""The ``pmreplica`` command: create, inspect and remove pool sets here; the modules in
COMMAND_MODULES add check, sync, demo and bench.

Each command is a function taking the parsed arguments and returning the exit status, and a
``register(subparsers)`` function adds its parser. Errors the user can act on are ``OSError``
subclasses: they become one line on stderr (``pmreplica: <message>``) and exit status 1, as
does anything else a command raises (a bug, a plugin's or ours: ``internal error: ...``, its
traceback in the debug log); usage errors exit 2, as argparse's own do.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from typing import Callable

from . import activity, dirtymap
from . import info as _info
from . import setfile
from .errors import PmReplicaError
from .replica import lock_pool_set, release_locks
from .setfile import LocalReplica, PoolSetFile

log = logging.getLogger(__name__)

#: Modules that bring further subcommands (check, sync, bench, demo, ...). Each offers
#: ``register(subparsers)``: it adds its parsers and sets ``func`` (args -> exit status) on
#: them with ``set_defaults``; ``-v/--verbose`` is added to every command here. Adding a
#: command module is one line in this tuple.
COMMAND_MODULES: tuple[str, ...] = ("pmreplica.sync.command", "pmreplica.promote", "pmreplica.demo",
                                    "pmreplica.bench")

EXIT_ERROR = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """A command line that parses but asks for something contradictory (exit status 2)."""


# ---------------------------------------------------------------------------------------
# create

def _size_arg(text: str) -> int:
    try:
        size = setfile.parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (e.g. 64M, 1GiB, 100MB)"
                                         ) from None
    if size < setfile.MIN_PART:
        raise argparse.ArgumentTypeError(f"{text} is smaller than the minimum pool size "
                                         f"{setfile.format_size(setfile.MIN_PART)}")
    return size


def _signature_arg(text: str) -> bytes:
    if not 0 < len(text) <= 8 or not text.isascii() or not text.isprintable():
        raise argparse.ArgumentTypeError(f"invalid signature {text!r} (1 to 8 printable ASCII "
                                         "characters)")
    return text.encode("ascii")


def cmd_create(args: argparse.Namespace) -> int:
    """Create the pool set's master and replicas (or a single pool file of ``--size``)."""
    from .poolset import PoolSet  # the write path (pluggy, plugins) only for commands that use it

    path = args.poolset
    is_set = os.path.exists(path) and setfile.is_poolset_file(path)
    if is_set and args.size is not None:
        raise UsageError(f"--size is for a single pool file; {path} is a pool set file, "
                         "whose part lines give the sizes")
    if not os.path.exists(path) and args.size is None:
        raise UsageError(f"{path} does not exist: give --size to create a single-file pool")
    from .progress import HookRenderer, mode_for

    renderer = HookRenderer(mode_for(sys.stderr, args.progress, args.json))
    try:
        with PoolSet.create(path, size=args.size, signature=args.signature,
                            plugins=[renderer]) as pool:
            size, nrep = pool.size, len(pool.replicas)
    finally:
        renderer.close()
    log.info("created %s", path)
    if args.json:
        json.dump({"path": os.path.abspath(path), "pool_size": size, "replicas": nrep},
                  sys.stdout)
        sys.stdout.write("\n")
    return 0


def register_create(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("create", help="create a pool set (or a single pool file)",
                       description="Create the part files of every replica of POOLSET with "
                                   "linked pool headers; with --size, create a single pool "
                                   "file instead. Nothing is left behind when it fails.")
    p.add_argument("poolset", metavar="POOLSET", help="pool set file, or the pool file to "
                                                      "create with --size")
    p.add_argument("--size", type=_size_arg, help="size of a single-file pool (e.g. 64M)")
    p.add_argument("--signature", type=_signature_arg, default=b"PMREPLIC",
                   help="pool type signature in the header (default: PMREPLIC)")
    p.add_argument("--json", action="store_true", help="print what was made as JSON (and "
                                                       "progress as JSON lines on stderr)")
    from .sync.command import add_progress_option
    add_progress_option(p)
    p.set_defaults(func=cmd_create)


# ---------------------------------------------------------------------------------------
# info (pmreplica/info.py gathers and renders)

def cmd_info(args: argparse.Namespace) -> int:
    """Print the structure, headers and health of a pool set, pool or part file."""
    info = _info.gather(args.path)
    if args.json:  # one write: json.dump writes every token on its own
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
    else:
        sys.stdout.write("\n".join(_info.render(info)) + "\n")
    return 0


def register_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show a pool set's replicas, headers and health",
                       description="Show the structure of a pool set (replicas, parts, sizes, "
                                   "types), every part header with its checksum and links, "
                                   "each replica's health and the replica-state record of "
                                   "the master. Remote replicas are listed, not contacted.")
    p.add_argument("path", metavar="POOLSET|PART", help="pool set file, pool file or part file")
    p.add_argument("--json", action="store_true", help="print a JSON document for scripts")
    p.set_defaults(func=cmd_info)


# ---------------------------------------------------------------------------------------
# rm

def cmd_rm(args: argparse.Namespace) -> int:
    """Remove the part files of every replica (remote ones through their plugin)."""
    if args.all:
        args.local = args.remote = True
    failures = 0
    for path in args.files:
        failures += _rm_one(path, args)
    return EXIT_ERROR if failures else 0


def _unlink(path: str, args: argparse.Namespace) -> int:
    """Remove one file; 1 if that failed (a missing file is fine with --force)."""
    try:
        os.unlink(path)
    except FileNotFoundError as e:
        if args.force:
            return 0
        _report(e)
        return 1
    except OSError as e:
        _report(e)
        return 1
    if args.verbose:
        print(f"removed '{path}'")
    return 0


def _rm_one(path: str, args: argparse.Namespace) -> int:
    if not os.path.lexists(path) or not setfile.is_poolset_file(path):
        return _unlink(path, args)  # a single-file pool (or whatever the user named)
    set_file = setfile.parse(path)
    # the locks an open PoolSet (or a running replica-sync) holds: never pull parts away
    locks = lock_pool_set(set_file, f"{path}: the pool set is open in another process; not "
                                    "removed", master=False)
    try:
        return _rm_parts(path, set_file, args)
    finally:
        release_locks(locks)


def _rm_parts(path: str, set_file: PoolSetFile, args: argparse.Namespace) -> int:
    from .plugin_manager import make_plugin_manager
    from .plugins import local as local_plugin
    from .status import describe
    from .target_host import TargetHost, ask_plugin, serving_plugin

    failures = 0
    pm = make_plugin_manager()
    host = TargetHost(set_file, memoryview(b""), pm)
    for index, rep in enumerate(set_file.replicas):
        name = describe(rep, index)
        try:
            # a replica is removed by the plugin that serves it; the master's files, and a
            # local replica line's that its plugin (the local one) did not remove, here
            plugin = serving_plugin(pm, rep, index, host) if index > 0 else None
            handled = plugin is not None and plugin is not local_plugin and ask_plugin(
                pm, plugin, "pmreplica_remove_replica", spec=rep, index=index,
                force=args.force, remove_pool_set=args.remote)
        except Exception as e:  # noqa: BLE001 - a plugin's bug: this replica is not removed
            print(f"pmreplica: {name}: {failure_message(e)}", file=sys.stderr)
            failures += 1
            continue
        if isinstance(rep, LocalReplica) and not handled:
            for part in rep.parts:
                failures += _unlink(part.path, args)
            if index == 0:  # the dirty map and activity log beside its first part
                dirtymap.remove(dirtymap.path_for(rep.parts[0].path))
                dirtymap.remove(activity.path_for(rep.parts[0].path))
            continue
        if not handled and not args.force:
            print(f"pmreplica: {name}: no plugin can remove this kind of replica",
                  file=sys.stderr)
            failures += 1
        elif handled and args.verbose:
            print(f"removed {name}")
    if args.local:
        failures += _unlink(path, args)
    return failures


def register_rm(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rm", help="remove the files of a pool set",
                       description="Remove the part files of every replica of each POOLSET "
                                   "(remote replicas through their plugin). The pool set file "
                                   "itself stays unless -l is given. A file that is not a pool "
                                   "set is removed as a single-file pool.")
    p.add_argument("files", nargs="+", metavar="POOLSET")
    p.add_argument("-f", "--force", action="store_true",
                   help="ignore files that do not exist (and replicas no plugin can remove)")
    p.add_argument("-l", "--local", action="store_true", help="also remove the pool set file")
    p.add_argument("-r", "--remote", action="store_true",
                   help="also remove the pool set files of remote replicas")
    p.add_argument("-a", "--all", action="store_true", help="same as -l -r")
    p.set_defaults(func=cmd_rm)


# ---------------------------------------------------------------------------------------
# main

def error_message(e: OSError) -> str:
    """One line for an OSError: pmreplica's own carry their message; the OS's get the file."""
    if isinstance(e, PmReplicaError):
        return str(e)
    text = e.strerror or str(e)
    if e.filename is not None:
        return f"{e.filename}: {text}"
    return text


def failure_message(e: Exception) -> str:
    """One line for what a command failed with: an OSError's (:func:`error_message`), or
    ``internal error: <type>: <message>`` for anything else (a bug, a plugin's or ours);
    the traceback goes to the debug log."""
    log.debug("command failed", exc_info=e)
    if isinstance(e, OSError):
        return error_message(e)
    return f"internal error: {type(e).__name__}: {e}"


def _report(e: OSError) -> None:
    """The error's one line on stderr: ``pmreplica: <message>``."""
    print(f"pmreplica: {error_message(e)}", file=sys.stderr)


_OWN_COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    register_create, register_info, register_rm)


def build_parser() -> argparse.ArgumentParser:
    """The ``pmreplica`` parser: this module's commands, then those of COMMAND_MODULES."""
    parser = argparse.ArgumentParser(
        prog="pmreplica", description="Replicated persistent-memory pools (PMDK pool sets).")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log what happens (twice: debug detail)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in _OWN_COMMANDS:
        register(sub)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for p in sub.choices.values():
        # -v is also accepted after the command; SUPPRESS keeps a top-level -v when absent
        p.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                       help="log what happens (twice: debug detail)")
    return parser


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if not verbose else logging.INFO if verbose == 1 else logging.DEBUG
    fmt = "pmreplica: %(message)s" if verbose < 2 else "%(name)s: %(levelname)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except UsageError as e:
        parser.exit(EXIT_USAGE, f"pmreplica {args.command}: error: {e}\n")
    except BrokenPipeError:
        # the reader went away (`pmreplica info ... | head`): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except Exception as e:  # noqa: BLE001 - one line and the error status, whatever it is
        print(f"pmreplica: {failure_message(e)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""``pmreplica-agent``: serve one session on stdin/stdout, or remove a pool (``--remove``)."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys

from pmreplica.errors import PmReplicaError
from rpmem_common import proto

from .config import AgentConfig, load
from .pooldb import PoolDB
from .session import Session, Stdio

log = logging.getLogger("remote_agent")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pmreplica-agent",
        description="pmreplica's remote agent (the rpmemd of pmreplica). Normally started by "
                    "the client over SSH; speaks the control protocol on stdin/stdout.")
    p.add_argument("--config", help="read settings from this file as well")
    p.add_argument("--poolset-dir", help="directory the pool set names are relative to "
                                         "(default: $HOME)")
    p.add_argument("--log-file", help="log here instead of stderr")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    p.add_argument("--persist-apm", action="store_const", const=True, default=None,
                   help="the platform makes RDMA writes durable (allows the APM method)")
    p.add_argument("--max-lanes", type=int)
    p.add_argument("--require-tls", action="store_const", const=True, default=None,
                   help="refuse clients that ask for clear-text TCP data lanes "
                        "(PMREPLICA_TCP_TLS=0)")
    p.add_argument("--remove", metavar="SET", help="remove the pool of pool set SET and exit; "
                                                   "the exit status is the result (an errno)")
    p.add_argument("--force", action="store_true", help="with --remove: ignore inconsistency")
    p.add_argument("--pool-set", action="store_true",
                   help="with --remove: remove the pool set file as well")
    return p


def _settings(args: argparse.Namespace) -> AgentConfig:
    if args.max_lanes is not None and args.max_lanes < 1:
        raise PmReplicaError(errno.EINVAL, "--max-lanes must be a positive integer")
    config = load(args.config)
    overrides = {k: v for k, v in (("poolset_dir", args.poolset_dir),
                                   ("log_file", args.log_file),
                                   ("log_level", args.log_level),
                                   ("persist_apm", args.persist_apm),
                                   ("max_lanes", args.max_lanes),
                                   ("require_tls", args.require_tls)) if v is not None}
    return config._replace(**overrides)


def _logging(config: AgentConfig) -> None:
    handler: logging.Handler = (logging.FileHandler(config.log_file) if config.log_file
                                else logging.StreamHandler(sys.stderr))
    handler.setFormatter(logging.Formatter("%(asctime)s pmreplica-agent[%(process)d] "
                                           "%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(config.log_level.upper())


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    io = Stdio()
    try:
        config = _settings(args)
        _logging(config)
        db = PoolDB(config.root)
    except OSError as e:
        # the first word the client reads is the status: make it say why
        print(f"pmreplica-agent: {e.strerror or e}", file=sys.stderr)
        io.write(proto.encode_ready(e.errno or errno.EINVAL))
        return e.errno or errno.EINVAL
    if args.remove is not None:
        try:
            db.remove(args.remove, args.force, args.pool_set)
            status = 0
        except OSError as e:
            log.error("removing %s failed: %s", args.remove, e.strerror or e)
            status = e.errno or errno.EIO
        io.write(proto.encode_ready(status))
        return status
    return Session(db, config, io).run()


def run() -> None:
    """Console-script entry: the session is over once its pool is closed, so skip the
    interpreter's teardown (it would add milliseconds to every client's close)."""
    status = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    run()

"""poolset(5), the PMDK pool set file format: :mod:`.text` reads its bytes (lines, fields,
sizes) as PMDK does, :mod:`.model` holds the parsed set with its sizes and PMDK's rules,
:mod:`.parser` reads a file into it."""

from .model import (HDR_SIZE, MAX_FILE, MIN_PART, MIN_REMOTE_POOL, OPT_NOHDRS, OPT_SINGLEHDR,
                    OPTIONS, PAGE_SIZE, SIGNATURE, LocalReplica, Part, PoolSetFile,
                    RemoteReplica, Replica, check_pool_set_name, format_size, parse_size,
                    single_file)
from .parser import is_poolset_file, load_set, parse, parse_bytes, parse_text

__all__ = ["HDR_SIZE", "MAX_FILE", "MIN_PART", "MIN_REMOTE_POOL", "OPT_NOHDRS", "OPT_SINGLEHDR",
           "OPTIONS", "PAGE_SIZE", "SIGNATURE", "LocalReplica", "Part", "PoolSetFile",
           "RemoteReplica", "Replica", "check_pool_set_name", "format_size", "parse_size",
           "single_file", "is_poolset_file", "load_set", "parse", "parse_bytes", "parse_text"]

"""poolset(5): every rule with a set it accepts and one it refuses (refusals are PoolSetError,
an OSError with EINVAL, naming file, line and the fault), size suffixes checked against the
sizes PMDK's pmempool gives the same text, and writing a parsed set back."""

from __future__ import annotations

import errno
import re
import subprocess
from pathlib import Path

import pytest

from pmreplica import PoolSetError
from pmreplica import poolset
from pmreplica.poolset import LocalReplica, Part, PoolSetFile, RemoteReplica

from .helpers import write_set

M = 1 << 20

# (id, lines after PMEMPOOLSET ({d}: the test's pool directory), line named, words named,
#  whether PMDK's pmempool refuses the same file too (None: not comparable here))
REFUSED = [
    ("signature-trailing-blank", None, 1, "the first line must be exactly 'PMEMPOOLSET'", True),
    ("signature-comment", None, 1, "the first line must be exactly 'PMEMPOOLSET'", True),
    ("option-keyword", ["OPTIONS SINGLEHDR", "8M {d}/a"], 2, "unknown option", True),
    ("option-missing-name", ["OPTION", "8M {d}/a"], 2, "missing option name", True),
    ("option-unknown-name", ["OPTION FOO", "8M {d}/a"], 2, "unknown option 'FOO'", True),
    ("options-both", ["OPTION SINGLEHDR NOHDRS", "8M {d}/a"], 2,
     "both SINGLEHDR and NOHDRS poolset options", True),
    ("options-both-two-lines", ["OPTION SINGLEHDR", "OPTION NOHDRS", "8M {d}/a"], 3,
     "both SINGLEHDR and NOHDRS poolset options", True),
    ("replica-keyword", ["8M {d}/a", "REPLICAS", "8M {d}/b"], 3,
     "exactly 'REPLICA' expected", True),
    ("replica-without-parts-at-end", ["8M {d}/a", "REPLICA"], 4, "no replica parts", True),
    ("replica-without-parts", ["8M {d}/a", "REPLICA", "REPLICA", "8M {d}/b"], 4,
     "no replica parts", True),
    ("master-without-parts", ["REPLICA", "8M {d}/b"], 2, "no pool set parts", True),
    ("no-parts-at-all", [], 2, "no pool set parts", True),
    ("relative-path", ["8M rel/a"], 2, "incorrect path (must be an absolute one)", True),
    ("bad-suffix", ["8X {d}/a"], 2, "incorrect format of size", True),
    ("lowercase-suffix", ["8m {d}/a"], 2, "incorrect format of size", True),
    ("zero-size", ["0 {d}/a"], 2, "incorrect format of size", True),
    ("auto-size", ["AUTO {d}/a"], 2, "size autodetection is supported only for device dax",
     True),
    ("part-extra-field", ["8M {d}/a extra"], 2, "invalid token found in the current line", True),
    ("part-one-field", ["8M"], 2, "invalid token found in the current line", True),
    ("same-part-twice", ["8M {d}/a", "8M {d}/a"], 3,
     "cannot use the same part file twice (line 2)", True),
    ("same-part-in-replica", ["8M {d}/a", "REPLICA", "8M {d}/./a"], 4,
     "cannot use the same part file twice (line 2)", True),
    ("same-directory-twice", ["OPTION SINGLEHDR", "8M {d}/dir1/", "8M {d}/dir1"], 4,
     "cannot use the same directory twice (line 3)", True),
    ("mixed-directory-and-file", ["OPTION SINGLEHDR", "8M {d}/dir1", "8M {d}/a"], 4,
     "cannot mix directories and files in a set", True),
    ("remote-with-parts", ["8M {d}/a", "REPLICA host x.set", "8M {d}/b"], 4,
     "unexpected parts for remote replica", True),
    ("remote-without-set", ["8M {d}/a", "REPLICA host"], 3,
     "address of remote node and descriptor of remote pool set expected", True),
    ("remote-extra-field", ["8M {d}/a", "REPLICA host x.set extra"], 3,
     "invalid token found in the current line", True),
    ("remote-absolute-set", ["8M {d}/a", "REPLICA host /x.set"], 3,
     "incorrect descriptor (must be a relative path)", True),
    ("remote-set-escapes", ["8M {d}/a", "REPLICA host sub/../../x.set"], 3,
     "leaves the pool set directory", None),
    ("remote-bad-node", ["8M {d}/a", "REPLICA ho/st x.set"], 3,
     "invalid remote node address 'ho/st'", None),
]

# refused by validate() (the rules for a set used as a pool), not by the parser
REFUSED_BY_VALIDATE = [
    ("part-below-minimum", ["8M {d}/a", "2097151 {d}/b"], 3,
     "part size 2097151 smaller than the minimum part size 2097152", True),
    ("replica-smaller-than-master", ["8M {d}/a", "REPLICA", "4M {d}/b", "4M {d}/c"], 3,
     "replica 1 is smaller than the master replica (8384512 < 8388608 bytes)", True),
    ("nohdrs-local", ["OPTION NOHDRS", "8M {d}/a"], 2,
     "the NOHDRS poolset option is not supported for local poolsets", True),
    ("directory-with-headers", ["8M {d}/dir1"], 2,
     "directory based pools are not supported for poolsets with headers", True),
]


def _set_text(lines: list[str] | None, case: str, d: Path) -> str:
    if lines is None:  # the signature cases
        first = "PMEMPOOLSET " if case == "signature-trailing-blank" else "PMEMPOOLSET # set"
        return f"{first}\n8M {d}/a\n"
    return "\n".join(["PMEMPOOLSET"] + [ln.format(d=d) for ln in lines]) + "\n"


def _assert_refusal(err: PoolSetError, path: Path, line: int, words: str) -> None:
    assert isinstance(err, OSError)
    assert err.errno == errno.EINVAL
    assert err.path == str(path) and err.line == line
    assert str(err).startswith(f"{path}:{line}: "), str(err)
    assert words in str(err)


def _pmdk_refuses(pmempool: str, path: Path) -> bool:
    run = subprocess.run([pmempool, "create", "obj", str(path)], capture_output=True, text=True)
    return run.returncode != 0


@pytest.mark.parametrize("case,lines,line,words,pmdk", REFUSED, ids=[c[0] for c in REFUSED])
def test_parser_refusal_names_file_line_and_fault(pool_dir, pmempool, case, lines, line, words,
                                                  pmdk):
    (pool_dir / "dir1").mkdir()
    path = pool_dir / "case.set"
    path.write_text(_set_text(lines, case, pool_dir))
    with pytest.raises(PoolSetError) as e:
        poolset.parse(path)
    _assert_refusal(e.value, path, line, words)
    if pmdk:
        assert _pmdk_refuses(pmempool, path), "pmempool accepted the set pmreplica refuses"


@pytest.mark.parametrize("case,lines,line,words,pmdk", REFUSED_BY_VALIDATE,
                         ids=[c[0] for c in REFUSED_BY_VALIDATE])
def test_validate_refusal_names_file_line_and_fault(pool_dir, pmempool, case, lines, line,
                                                    words, pmdk):
    (pool_dir / "dir1").mkdir()
    path = pool_dir / "case.set"
    path.write_text(_set_text(lines, case, pool_dir))
    set_file = poolset.parse(path)
    with pytest.raises(PoolSetError) as e:
        set_file.validate()
    _assert_refusal(e.value, path, line, words)
    if pmdk:
        assert _pmdk_refuses(pmempool, path), "pmempool accepted the set pmreplica refuses"


def test_remote_set_must_not_list_replicas(pool_dir):
    path = write_set(pool_dir / "remote.set", f"8M {pool_dir}/a", "REPLICA", f"8M {pool_dir}/b")
    with pytest.raises(PoolSetError) as e:
        poolset.parse(path).validate(remote=True)
    _assert_refusal(e.value, path, 3, "remote pool set cannot have replicas")
    poolset.parse(write_set(pool_dir / "ok.set", f"8M {pool_dir}/a")).validate(remote=True)


def test_unreadable_set_file_is_a_poolset_error_naming_it(pool_dir):
    with pytest.raises(PoolSetError) as e:
        poolset.parse(pool_dir / "missing.set")
    assert e.value.errno == errno.ENOENT
    assert str(e.value).startswith(f"{pool_dir}/missing.set: cannot read pool set file")


# -- the accepted side of each rule --------------------------------------------------------

def test_signature_comments_blank_lines_and_crlf_are_accepted(pool_dir, pmempool):
    text = ("PMEMPOOLSET\r\n# a comment\r\n\r\n   \r\n8M  {d}/a   # master\r\n"
            "\tOPTION SINGLEHDR\r\nREPLICA # local\r\n8M\t{d}/b\r\n").format(d=pool_dir)
    path = pool_dir / "crlf.set"
    path.write_text(text)
    s = poolset.parse(path)
    s.validate()
    assert s.options == {"SINGLEHDR"}
    assert [[(p.size, p.path, p.line) for p in r.parts] for r in s.replicas] == [
        [(8 * M, f"{pool_dir}/a", 5)], [(8 * M, f"{pool_dir}/b", 8)]]
    # PMDK reads CRLF files with comments too (it is stricter about blanks: no blank-only
    # lines, nothing but the keyword on OPTION and REPLICA lines, no leading blanks)
    path.write_text(("PMEMPOOLSET\r\n# a comment\r\n\r\n8M  {d}/a   # master\r\n"
                     "OPTION SINGLEHDR\r\nREPLICA\r\n8M\t{d}/b\r\n").format(d=pool_dir))
    assert poolset.parse(path).equivalent(s)
    run = subprocess.run([pmempool, "create", "obj", str(path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_options_accepted(pool_dir):
    single = poolset.parse(write_set(pool_dir / "s.set", "OPTION SINGLEHDR",
                                     f"8M {pool_dir}/a", f"4M {pool_dir}/b"))
    single.validate()
    assert single.nhdrs(single.master) == 1
    assert single.pool_size == 12 * M  # one header for the whole replica
    nohdrs = poolset.parse(write_set(pool_dir / "n.set", "OPTION NOHDRS", f"8M {pool_dir}/a"))
    nohdrs.validate(remote=True)  # raw remote pools have no headers
    assert not nohdrs.has_headers and nohdrs.pool_size == 8 * M
    plain = poolset.parse(write_set(pool_dir / "p.set", f"8M {pool_dir}/a", f"4M {pool_dir}/b"))
    assert plain.pool_size == 12 * M - 4096  # the second part's header is not mapped


def test_local_and_remote_replicas_accepted(pool_dir):
    s = poolset.parse(write_set(
        pool_dir / "r.set", f"8M {pool_dir}/a", "REPLICA", f"4M {pool_dir}/b",
        f"5M {pool_dir}/c", "REPLICA user@node1:2222 sets/remote.set",
        "REPLICA [fe80::1]:22 r.set", "REPLICA node2 ./x.set"))
    s.validate()
    assert [type(r) for r in s.replicas] == [LocalReplica, LocalReplica, RemoteReplica,
                                             RemoteReplica, RemoteReplica]
    assert [(r.node, r.pool_set, r.line) for r in s.remote_replicas()] == [
        ("user@node1:2222", "sets/remote.set", 6), ("[fe80::1]:22", "r.set", 7),
        ("node2", "./x.set", 8)]
    assert s.replica_size(s.replicas[1]) == 9 * M - 4096 >= s.pool_size


def test_directories_accepted_with_singlehdr(pool_dir):
    (pool_dir / "d1").mkdir()
    (pool_dir / "d2").mkdir()
    s = poolset.parse(write_set(pool_dir / "d.set", "OPTION SINGLEHDR", f"8M {pool_dir}/d1",
                                "REPLICA", f"8M {pool_dir}/d2/"))
    s.validate()
    assert s.is_directory_based and all(p.is_dir for r in s.replicas for p in r.parts)


def test_smallest_part_and_equal_replica_accepted(pool_dir):
    s = poolset.parse(write_set(pool_dir / "min.set", f"2M {pool_dir}/a", "REPLICA",
                                f"2097152 {pool_dir}/b"))
    s.validate()
    assert s.pool_size == s.replica_size(s.replicas[1]) == 2 * M


def test_part_sizes_round_down_to_pages(pool_dir):
    s = poolset.parse(write_set(pool_dir / "a.set", f"{2 * M + 4095} {pool_dir}/a"))
    assert s.master.parts[0].size == 2 * M + 4095
    assert s.pool_size == 2 * M


# -- sizes ---------------------------------------------------------------------------------

SIZES = {
    "8388608": 8388608, "8388608B": 8388608,
    "8192K": 8 * M, "8192KiB": 8 * M, "8389kB": 8389000,
    "8M": 8 * M, "8MiB": 8 * M, "9MB": 9000000,
    "4096G": 4096 << 30, "4096GiB": 4096 << 30, "4000GB": 4000 * 10**9,
    "4T": 4 << 40, "4TiB": 4 << 40, "4TB": 4 * 10**12,
    "1P": 1 << 50, "1PiB": 1 << 50, "1PB": 10**15,
}


def _pmdk_size(pmempool: str, d: Path, text: str) -> int:
    """The size PMDK gives a part written ``text``: the file it creates, or, for sizes no
    file system here can hold, the size its failed posix_fallocate names."""
    path = write_set(d / "size.set", f"{text} {d}/part")
    run = subprocess.run([pmempool, "create", "obj", str(path)], capture_output=True, text=True)
    if run.returncode == 0:
        size = (d / "part").stat().st_size
        (d / "part").unlink()
        return size
    m = re.search(r'posix_fallocate "[^"]+", (\d+)', run.stderr)
    assert m, f"pmempool refused {text}: {run.stderr}"
    return int(m.group(1))


@pytest.mark.parametrize("text", list(SIZES))
def test_size_suffix_means_what_pmdk_means(pool_dir, pmempool, text):
    assert poolset.parse_size(text) == SIZES[text]
    assert _pmdk_size(pmempool, pool_dir, text) == SIZES[text]
    s = poolset.parse(write_set(pool_dir / "s.set", f"{text} {pool_dir}/p"))
    assert s.master.parts[0].size == SIZES[text]


@pytest.mark.parametrize("text", ["", "M", "0", "0M", "8KB", "8kiB", "8mb", "8m", "1.5M", "-8M",
                                  "8 M", "8Mi", "8EiB", "0x10M"])
def test_bad_sizes_refused(text):
    with pytest.raises(ValueError):
        poolset.parse_size(text)


def test_format_size_is_exact_and_shortest():
    for size in (4096, 2 * M, 3 * M + 4096, 5 << 30, 7 << 40, 1 << 50, 123457):
        text = poolset.format_size(size)
        assert poolset.parse_size(text) == size
    assert poolset.format_size(8 * M) == "8M"
    assert poolset.format_size(3 * M + 4096) == "3076K"
    assert poolset.format_size(123457) == "123457"


# -- writing -------------------------------------------------------------------------------

def test_written_set_parses_to_an_equivalent_set(pool_dir, pmempool):
    src = write_set(
        pool_dir / "src.set", "# comment dropped", "OPTION SINGLEHDR",
        f"8M {pool_dir}/a", f"3076K {pool_dir}/b  # note", "REPLICA", f"12M {pool_dir}/c",
        "REPLICA user@host:2222 sub/r.set")
    parsed = poolset.parse(src)
    out = pool_dir / "out.set"
    parsed.write(out)
    again = poolset.parse(out)
    assert again.equivalent(parsed) and parsed.equivalent(again)
    assert again.options == parsed.options
    assert [type(r) for r in again.replicas] == [type(r) for r in parsed.replicas]
    assert out.read_text() == again.to_text()  # a fixed point
    assert [p.name for p in pool_dir.iterdir() if ".tmp" in p.name] == []
    # and PMDK reads the written file as it reads the original (without the remote replica,
    # which needs librpmem)
    local = PoolSetFile(replicas=parsed.replicas[:2], options=parsed.options)
    local.write(pool_dir / "local.set")
    run = subprocess.run([pmempool, "create", "obj", str(pool_dir / "local.set")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert (pool_dir / "b").stat().st_size == 3076 * 1024


def test_equivalence_sees_every_difference(pool_dir):
    base = poolset.parse(write_set(pool_dir / "a.set", f"8M {pool_dir}/a", "REPLICA",
                                   f"8M {pool_dir}/b"))
    variants = [
        poolset.parse(write_set(pool_dir / "b.set", f"9M {pool_dir}/a", "REPLICA",
                                f"8M {pool_dir}/b")),
        poolset.parse(write_set(pool_dir / "c.set", f"8M {pool_dir}/x", "REPLICA",
                                f"8M {pool_dir}/b")),
        poolset.parse(write_set(pool_dir / "d.set", "OPTION SINGLEHDR", f"8M {pool_dir}/a",
                                "REPLICA", f"8M {pool_dir}/b")),
        poolset.parse(write_set(pool_dir / "e.set", f"8M {pool_dir}/a", "REPLICA h r.set")),
        poolset.parse(write_set(pool_dir / "f.set", f"8M {pool_dir}/a")),
    ]
    assert all(not base.equivalent(v) for v in variants)
    same = PoolSetFile(replicas=[LocalReplica([Part(8 * M, f"{pool_dir}/a")]),
                                 LocalReplica([Part(8 * M, f"{pool_dir}//b")])])
    assert base.equivalent(same)


def test_single_file_and_poolset_detection(pool_dir):
    pool = pool_dir / "pool"
    pool.write_bytes(b"\0" * 4096)
    assert not poolset.is_poolset_file(pool)
    assert not poolset.is_poolset_file(pool_dir)
    assert poolset.is_poolset_file(write_set(pool_dir / "x.set", f"8M {pool_dir}/a"))
    s = poolset.single_file(pool, 4 * M)
    assert s.master.parts == [Part(4 * M, str(pool), 0)] and s.pool_size == 4 * M

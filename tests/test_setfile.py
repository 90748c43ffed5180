"""poolset(5): every rule with a set it accepts and one it refuses (refusals are PoolSetError,
an OSError naming file, line and the fault), each compared with what PMDK's parser says of
the same file (tests/pmempool_oracle.py; the generated files of test_setfile_pmdk.py do the
same by the thousand), size suffixes checked against the sizes PMDK's pmempool gives the same
text, and writing a parsed set back."""

from __future__ import annotations

import errno
import os
import re
import subprocess
from pathlib import Path

import pytest

from pmreplica import PoolSetError
from pmreplica import setfile
from pmreplica.setfile import LocalReplica, Part, PoolSetFile, RemoteReplica

from .helpers import write_set
from .pmempool_oracle import ask

M = 1 << 20
LINE, LINELESS, ACCEPTS = "line", "lineless", "accepts"

# (id, the file ({d}: the test's directory, which holds dir1/ and a FIFO, not missing/), line
#  named, words named, what PMDK's parser does: refuses at the same line (LINE), refuses
#  naming no line (LINELESS), takes the line (ACCEPTS: a deliberate difference, see README))
REFUSED = [
    ("signature-trailing-blank", "PMEMPOOLSET \n8M {d}/missing/a\n", 1,
     "the first line must be exactly 'PMEMPOOLSET'", LINE),
    ("signature-comment", "PMEMPOOLSET # set\n8M {d}/missing/a\n", 1,
     "the first line must be exactly 'PMEMPOOLSET'", LINE),
    ("signature-glued", "PMEMPOOLSET2\n8M {d}/missing/a\n", 1,
     "the first line must be exactly 'PMEMPOOLSET'", LINE),
    ("signature-without-newline", "PMEMPOOLSET", 1,
     "the first line must be exactly 'PMEMPOOLSET'", LINE),
    ("blank-only-line", "PMEMPOOLSET\n8M {d}/missing/a\n  \t\n", 3,
     "invalid token found in the current line", LINE),
    ("indented-comment", "PMEMPOOLSET\n  # c\n8M {d}/missing/a\n", 2,
     "invalid token found in the current line", LINE),
    ("indented-replica", "PMEMPOOLSET\n8M {d}/missing/a\n REPLICA\n8M {d}/missing/b\n", 3,
     "invalid token found in the current line", LINE),
    ("tab-before-option", "PMEMPOOLSET\n\tOPTION SINGLEHDR\n8M {d}/missing/a\n", 2,
     "incorrect path (must be an absolute one)", LINE),
    ("option-keyword", "PMEMPOOLSET\nOPTIONS SINGLEHDR\n8M {d}/missing/a\n", 2,
     "unknown option 'S'", LINE),
    ("option-missing-name", "PMEMPOOLSET\nOPTION # SINGLEHDR\n8M {d}/missing/a\n", 2,
     "missing option name", LINE),
    ("option-unknown-name", "PMEMPOOLSET\nOPTION FOO\n8M {d}/missing/a\n", 2,
     "unknown option 'FOO'", LINE),
    ("option-glued-vt", "PMEMPOOLSET\nOPTION SINGLEHDR\v\n8M {d}/missing/a\n", 2,
     "unknown option", LINE),
    ("replica-keyword", "PMEMPOOLSET\n8M {d}/missing/a\nREPLICAS\n8M {d}/missing/b\n", 3,
     "exactly 'REPLICA' expected", LINE),
    ("replica-blank", "PMEMPOOLSET\n8M {d}/missing/a\nREPLICA \n8M {d}/missing/b\n", 3,
     "address of remote node and descriptor of remote pool set expected", LINE),
    ("replica-comment", "PMEMPOOLSET\n8M {d}/missing/a\nREPLICA # local\n8M {d}/missing/b\n",
     3, "address of remote node and descriptor of remote pool set expected", LINE),
    ("replica-without-parts-at-end", "PMEMPOOLSET\n8M {d}/missing/a\nREPLICA\n", 4,
     "no replica parts", LINE),
    ("replica-without-parts", "PMEMPOOLSET\n8M {d}/missing/a\nREPLICA\nREPLICA\n"
     "8M {d}/missing/b\n", 4, "no replica parts", LINE),
    ("master-without-parts", "PMEMPOOLSET\nREPLICA\n8M {d}/missing/b\n", 2,
     "no pool set parts", LINE),
    ("only-a-remote-replica", "PMEMPOOLSET\nREPLICA host x.set\n", 3, "no replica parts", LINE),
    ("no-parts-at-all", "PMEMPOOLSET\n# nothing\n", 3, "no pool set parts", LINE),
    ("relative-path", "PMEMPOOLSET\n8M rel/a\n", 2, "incorrect path (must be an absolute one)",
     LINE),
    ("bad-suffix", "PMEMPOOLSET\n8X {d}/missing/a\n", 2, "incorrect format of size", LINE),
    ("lowercase-suffix", "PMEMPOOLSET\n8m {d}/missing/a\n", 2, "incorrect format of size", LINE),
    ("zero-size", "PMEMPOOLSET\n0 {d}/missing/a\n", 2, "incorrect format of size", LINE),
    ("size-wraps-to-zero", "PMEMPOOLSET\n16384P {d}/missing/a\n", 2,
     "incorrect format of size", LINE),
    ("full-width-digits", "PMEMPOOLSET\n\uff11\uff16M {d}/missing/a\n", 2,
     "incorrect format of size", LINE),
    ("auto-size", "PMEMPOOLSET\nAUTO {d}/missing/a\n", 2, "cannot determine size of a part",
     LINE),
    ("part-extra-field", "PMEMPOOLSET\n8M {d}/missing/a extra\n", 2,
     "invalid token found in the current line", LINE),
    ("part-one-field", "PMEMPOOLSET\n8M\n", 2, "invalid token found in the current line", LINE),
    ("vertical-tab-is-no-blank", "PMEMPOOLSET\n8M\v{d}/missing/a\n", 2,
     "invalid token found in the current line", LINE),
    ("ogham-space-is-no-blank", "PMEMPOOLSET\n8M\u1680{d}/missing/a\n", 2,
     "invalid token found in the current line", LINE),
    ("form-feed-is-no-blank", "PMEMPOOLSET\n8M\f{d}/missing/a\n", 2,
     "invalid token found in the current line", LINE),
    ("same-directory-twice", "PMEMPOOLSET\nOPTION SINGLEHDR\n8M {d}/dir1/\nREPLICA\n"
     "8M {d}//dir1\n", 5, "cannot use the same directory twice", LINELESS),
    ("mixed-directory-and-file", "PMEMPOOLSET\nOPTION SINGLEHDR\n8M {d}/dir1\n"
     "8M {d}/missing/a\n", 4, "cannot mix directories and files in a set", LINELESS),
    ("directory-and-remote", "PMEMPOOLSET\nOPTION SINGLEHDR\n8M {d}/dir1\nREPLICA h x.set\n", 4,
     "cannot mix directories and files in a set", LINELESS),
    ("fifo-part", "PMEMPOOLSET\n8M {d}/fifo\n", 2, "not a regular file (a FIFO)", LINELESS),
    ("part-under-a-file", "PMEMPOOLSET\n8M {d}/fifo/a\n", 2, "Not a directory", LINELESS),
    ("remote-with-parts", "PMEMPOOLSET\n8M {d}/missing/a\nREPLICA host x.set\n"
     "8M {d}/missing/b\n", 4, "unexpected parts for remote replica", LINE),
    ("remote-without-set", "PMEMPOOLSET\n8M {d}/missing/a\nREPLICA host\n", 3,
     "address of remote node and descriptor of remote pool set expected", LINE),
    ("remote-extra-field", "PMEMPOOLSET\n8M {d}/missing/a\nREPLICA host x.set extra\n", 3,
     "invalid token found in the current line", LINE),
    ("remote-absolute-set", "PMEMPOOLSET\n8M {d}/missing/a\nREPLICA host /x.set\n", 3,
     "incorrect descriptor (must be a relative path)", LINE),
    # deliberate differences: PMDK takes these lines
    ("size-with-sign", "PMEMPOOLSET\n+16M {d}/missing/a\n", 2, "incorrect format of size",
     ACCEPTS),
    ("size-wraps-past-2^64", "PMEMPOOLSET\n16385P {d}/missing/a\n", 2,
     "incorrect format of size", ACCEPTS),
    ("size-past-2^64", "PMEMPOOLSET\n18446744073709551616 {d}/missing/a\n", 2,
     "incorrect format of size", ACCEPTS),
    ("size-with-vertical-tab", "PMEMPOOLSET\n8\vM {d}/missing/a\n", 2,
     "incorrect format of size", ACCEPTS),
    # (PMDK's reader cuts a line at a NUL and appends the next line: here the part line
    # after the comment is lost without a word)
    ("nul-byte", "PMEMPOOLSET\n8M {d}/missing/a\n# note\0\n8M {d}/missing/c\n", 3,
     "a NUL byte in the line", ACCEPTS),
    ("remote-set-escapes", "PMEMPOOLSET\n8M {d}/missing/a\nREPLICA host sub/../../x.set\n", 3,
     "leaves the pool set directory", ACCEPTS),
    ("remote-bad-node", "PMEMPOOLSET\n8M {d}/missing/a\nREPLICA ho/st x.set\n", 3,
     "invalid target node address 'ho/st'", ACCEPTS),
    ("remote-node-ssh-option", "PMEMPOOLSET\n8M {d}/missing/a\nREPLICA -oProxyCommand=x x.set\n",
     3, "invalid target node address", ACCEPTS),
]

# refused by validate() (the rules for a set used as a pool), not by the parser; PMDK's
# pmempool refuses each file too (on creating the pool)
REFUSED_BY_VALIDATE = [
    ("part-below-minimum", ["8M {d}/a", "2097151 {d}/b"], 3,
     "part size 2097151 smaller than the minimum part size 2097152"),
    ("nohdrs-local", ["OPTION NOHDRS", "8M {d}/a"], 2,
     "the NOHDRS poolset option is not supported for local poolsets"),
    ("nohdrs-and-singlehdr-local", ["OPTION SINGLEHDR NOHDRS", "8M {d}/a"], 2,
     "the NOHDRS poolset option is not supported for local poolsets"),
    ("directory-with-headers", ["8M {d}/dir1"], 2,
     "directory based pools are not supported for poolsets with headers"),
    ("same-part-twice", ["8M {d}/a", "8M {d}/a"], 3,
     "cannot use the same part file twice (line 2)"),
    ("same-part-in-replica", ["8M {d}/a", "REPLICA", "8M {d}/./a"], 4,
     "cannot use the same part file twice (line 2)"),
]


def _assert_refusal(err: PoolSetError, path: Path, line: int, words: str,
                    code: int = errno.EINVAL) -> None:
    assert isinstance(err, OSError)
    assert err.errno == code
    assert err.path == str(path) and err.line == line
    assert str(err).startswith(f"{path}:{line}: "), str(err)
    assert words in str(err)


def _pmdk_refuses(pmempool: str, path: Path) -> bool:
    run = subprocess.run([pmempool, "create", "obj", str(path)], capture_output=True, text=True)
    return run.returncode != 0


@pytest.mark.parametrize("case,text,line,words,pmdk", REFUSED, ids=[c[0] for c in REFUSED])
def test_parser_refusal_names_file_line_and_fault(pool_dir, pmempool, case, text, line, words,
                                                  pmdk):
    (pool_dir / "dir1").mkdir()
    os.mkfifo(pool_dir / "fifo")
    path = pool_dir / "case.set"
    path.write_bytes(text.format(d=pool_dir).encode("utf-8", "surrogateescape"))
    with pytest.raises(PoolSetError) as e:
        setfile.parse(path)
    code = {"same-directory-twice": errno.EEXIST, "part-under-a-file": errno.ENOTDIR}
    _assert_refusal(e.value, path, line, words, code.get(case, errno.EINVAL))
    verdict = ask(pmempool, path)
    if pmdk == ACCEPTS:
        assert verdict.accepted, verdict
    else:
        assert not verdict.accepted and verdict.line == (line if pmdk == LINE else None), verdict
    assert not (pool_dir / "missing").exists()


@pytest.mark.parametrize("case,lines,line,words", REFUSED_BY_VALIDATE,
                         ids=[c[0] for c in REFUSED_BY_VALIDATE])
def test_validate_refusal_names_file_line_and_fault(pool_dir, pmempool, case, lines, line,
                                                    words):
    (pool_dir / "dir1").mkdir()
    path = write_set(pool_dir / "case.set", *(ln.format(d=pool_dir) for ln in lines))
    set_file = setfile.parse(path)
    with pytest.raises(PoolSetError) as e:
        set_file.validate()
    _assert_refusal(e.value, path, line, words)
    assert _pmdk_refuses(pmempool, path), "pmempool accepted the set pmreplica refuses"


def test_remote_set_rules(pool_dir):
    path = write_set(pool_dir / "remote.set", f"8M {pool_dir}/a", "REPLICA", f"8M {pool_dir}/b")
    with pytest.raises(PoolSetError) as e:
        setfile.parse(path).validate(remote=True)
    _assert_refusal(e.value, path, 3, "remote pool set cannot have replicas")
    # both header options: PMDK logs the clash and goes on with SINGLEHDR; refused here
    path = write_set(pool_dir / "both.set", "OPTION SINGLEHDR", "OPTION NOHDRS", f"8M {pool_dir}/a")
    with pytest.raises(PoolSetError) as e:
        setfile.parse(path).validate(remote=True)
    _assert_refusal(e.value, path, 3, "both SINGLEHDR and NOHDRS poolset options used")
    setfile.parse(write_set(pool_dir / "ok.set", f"8M {pool_dir}/a")).validate(remote=True)


def test_unreadable_set_file_is_a_poolset_error_naming_it(pool_dir):
    with pytest.raises(PoolSetError) as e:
        setfile.parse(pool_dir / "missing.set")
    assert e.value.errno == errno.ENOENT
    assert str(e.value).startswith(f"{pool_dir}/missing.set: cannot read pool set file")


# -- the accepted side of each rule --------------------------------------------------------

def test_comments_empty_lines_crlf_and_what_c_calls_no_blank_are_accepted(pool_dir, pmempool):
    d = pool_dir
    text = (f"PMEMPOOLSET\r\n# a comment\r\n\r\n\n8M  {d}/missing/a   # master\r\n"
            f"OPTIONSINGLEHDR\r\nREPLICA\r\n8M\t{d}/missing/b\xa0c\r\n"
            f"8M {d}/missing/e#f\nREPLICA host x.set#remote").encode("utf-8", "surrogateescape")
    path = pool_dir / "crlf.set"
    path.write_bytes(text)
    s = setfile.parse(path)
    assert s.options == {"SINGLEHDR"}  # PMDK reads the name after "OPTION", blank or not
    assert [[(p.size, p.path, p.line) for p in r.parts] for r in s.local_replicas()] == [
        [(8 * M, f"{d}/missing/a", 5)],
        [(8 * M, f"{d}/missing/b\xa0c", 8),  # a no-break space is part of the name
         (8 * M, f"{d}/missing/e", 9)]]
    assert s.replicas[2] == RemoteReplica("host", "x.set", 10)
    assert ask(pmempool, path).accepted
    # a CR survives where PMDK's reader keeps it: a line of exactly 2560 bytes with its CRLF
    line = f"OPTION SINGLEHDR".ljust(2558).encode() + b"\r\n"
    for pad, refused in ((line, True), (line[:-2] + b" \r\n", False)):
        path.write_bytes(b"PMEMPOOLSET\n" + pad + f"8M {d}/missing/a\n".encode())
        verdict = ask(pmempool, path)
        assert verdict.accepted != refused, verdict
        if refused:
            with pytest.raises(PoolSetError, match="unknown option"):
                setfile.parse(path)
        else:
            assert setfile.parse(path).options == {"SINGLEHDR"}


def test_options_accepted(pool_dir):
    single = setfile.parse(write_set(pool_dir / "s.set", "OPTION SINGLEHDR",
                                     f"8M {pool_dir}/a", f"4M {pool_dir}/b"))
    single.validate()
    assert single.nhdrs(single.master) == 1
    assert single.pool_size == 12 * M  # one header for the whole replica
    nohdrs = setfile.parse(write_set(pool_dir / "n.set", "OPTION NOHDRS", f"8M {pool_dir}/a"))
    nohdrs.validate(remote=True)  # raw remote pools have no headers
    assert not nohdrs.has_headers and nohdrs.pool_size == 8 * M
    plain = setfile.parse(write_set(pool_dir / "p.set", f"8M {pool_dir}/a", f"4M {pool_dir}/b"))
    assert plain.pool_size == 12 * M - 4096  # the second part's header is not mapped


def test_local_and_remote_replicas_accepted(pool_dir):
    s = setfile.parse(write_set(
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
    s = setfile.parse(write_set(pool_dir / "d.set", "OPTION SINGLEHDR", f"8M {pool_dir}/d1",
                                "REPLICA", f"8M {pool_dir}/d2/"))
    s.validate()
    assert s.is_directory_based and all(p.is_dir for r in s.replicas for p in r.parts)


def test_smallest_part_accepted_and_the_pool_is_the_smallest_replica(pool_dir, pmempool):
    s = setfile.parse(write_set(pool_dir / "min.set", f"2M {pool_dir}/a", "REPLICA",
                                f"2097152 {pool_dir}/b"))
    s.validate()
    assert s.pool_size == s.replica_size(s.replicas[1]) == 2 * M
    # a replica smaller than the master: PMDK makes the pool that size, and so does pmreplica
    path = write_set(pool_dir / "small.set", f"8M {pool_dir}/m0", f"4M {pool_dir}/m1", "REPLICA",
                     f"8M {pool_dir}/r", "REPLICA", f"10M {pool_dir}/q")
    s = setfile.parse(path)
    s.validate()
    assert [s.replica_size(r) for r in s.replicas] == [12 * M - 4096, 8 * M, 10 * M]
    assert s.pool_size == 8 * M
    run = subprocess.run([pmempool, "create", "obj", str(path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_part_sizes_round_down_to_pages(pool_dir):
    s = setfile.parse(write_set(pool_dir / "a.set", f"{2 * M + 4095} {pool_dir}/a"))
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
    assert setfile.parse_size(text) == SIZES[text]
    assert _pmdk_size(pmempool, pool_dir, text) == SIZES[text]
    s = setfile.parse(write_set(pool_dir / "s.set", f"{text} {pool_dir}/p"))
    assert s.master.parts[0].size == SIZES[text]


@pytest.mark.parametrize("text", ["", "M", "0", "0M", "8KB", "8kiB", "8mb", "8m", "1.5M", "-8M",
                                  "8 M", "8Mi", "8EiB", "0x10M"])
def test_bad_sizes_refused(text):
    with pytest.raises(ValueError):
        setfile.parse_size(text)


def test_format_size_is_exact_and_shortest():
    for size in (4096, 2 * M, 3 * M + 4096, 5 << 30, 7 << 40, 1 << 50, 123457):
        text = setfile.format_size(size)
        assert setfile.parse_size(text) == size
    assert setfile.format_size(8 * M) == "8M"
    assert setfile.format_size(3 * M + 4096) == "3076K"
    assert setfile.format_size(123457) == "123457"


# -- writing -------------------------------------------------------------------------------

def test_written_set_parses_to_an_equivalent_set(pool_dir, pmempool):
    src = write_set(
        pool_dir / "src.set", "# comment dropped", "OPTION SINGLEHDR",
        f"8M {pool_dir}/a", f"3076K {pool_dir}/b  # note", "REPLICA", f"12M {pool_dir}/c",
        "REPLICA user@host:2222 sub/r.set")
    parsed = setfile.parse(src)
    out = pool_dir / "out.set"
    parsed.write(out)
    again = setfile.parse(out)
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
    base = setfile.parse(write_set(pool_dir / "a.set", f"8M {pool_dir}/a", "REPLICA",
                                   f"8M {pool_dir}/b"))
    variants = [
        setfile.parse(write_set(pool_dir / "b.set", f"9M {pool_dir}/a", "REPLICA",
                                f"8M {pool_dir}/b")),
        setfile.parse(write_set(pool_dir / "c.set", f"8M {pool_dir}/x", "REPLICA",
                                f"8M {pool_dir}/b")),
        setfile.parse(write_set(pool_dir / "d.set", "OPTION SINGLEHDR", f"8M {pool_dir}/a",
                                "REPLICA", f"8M {pool_dir}/b")),
        setfile.parse(write_set(pool_dir / "e.set", f"8M {pool_dir}/a", "REPLICA h r.set")),
        setfile.parse(write_set(pool_dir / "f.set", f"8M {pool_dir}/a")),
    ]
    assert all(not base.equivalent(v) for v in variants)
    same = PoolSetFile(replicas=[LocalReplica([Part(8 * M, f"{pool_dir}/a")]),
                                 LocalReplica([Part(8 * M, f"{pool_dir}//b")])])
    assert base.equivalent(same)


def test_single_file_and_poolset_detection(pool_dir):
    pool = pool_dir / "pool"
    pool.write_bytes(b"\0" * 4096)
    assert not setfile.is_poolset_file(pool)
    assert not setfile.is_poolset_file(pool_dir)
    assert setfile.is_poolset_file(write_set(pool_dir / "x.set", f"8M {pool_dir}/a"))
    s = setfile.single_file(pool, 4 * M)
    assert s.master.parts == [Part(4 * M, str(pool), 0)] and s.pool_size == 4 * M

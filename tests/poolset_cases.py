"""A seeded generator of pool set files for the differential test against PMDK's parser.

Cases are sets people and tools write (options, local and remote replicas, directories) and
near misses of every rule, with the byte-level accidents of real files: tabs, CRLF, no-break
spaces and other characters that look like blanks, stray control characters, comments where
they cut a word, long lines, NUL bytes. Part files are named inside a case directory that
holds ``d1/`` and ``d2/`` (empty directories), ``fifo``, ``file`` (a regular file) and no
``missing/``, so that a parser that accepts a set creates nothing.

Each case also knows the first line where the README's list of deliberate differences says
pmreplica refuses what PMDK may take: a size that is not plain digits and a suffix within
2^64-1 (:func:`c_size` is what C's ``sscanf("%zu%8s")`` makes of it), a remote node other
than a plain ``[user@]host[:port]``, a remote set name that climbs out of the agent's
directory, a NUL byte. That is judged from the finished line's fields, split as poolset(5)
splits them, independently of how the line was made and of pmreplica's code.
"""

from __future__ import annotations

import posixpath
import random
import re
from dataclasses import dataclass

NBSP = "\u00a0".encode()
OGHAM = "\u1680".encode()  # a space character to Python, a letter to C
C_SPACE = b" \t\n\v\f\r"
SUFFIXES = {b"B": 1, b"K": 1 << 10, b"M": 1 << 20, b"G": 1 << 30, b"T": 1 << 40, b"P": 1 << 50,
            b"KiB": 1 << 10, b"MiB": 1 << 20, b"GiB": 1 << 30, b"TiB": 1 << 40, b"PiB": 1 << 50,
            b"kB": 10**3, b"MB": 10**6, b"GB": 10**9, b"TB": 10**12, b"PB": 10**15}
U64 = 1 << 64
#: line lengths (with CRLF) at which PMDK's reader keeps the CR: its fgets() pieces of 2559
#: and 5119 bytes end just before the LF
CR_KEPT = (2560, 7679)

VALID_SIZES = [b"8M", b"2M", b"16M", b"32M", b"1G", b"100G", b"2097152", b"2097153", b"8388608",
               b"4096", b"1", b"3K", b"10kB", b"8MB", b"8MiB", b"2GiB", b"1T", b"1TB", b"1P",
               b"1PiB", b"1PB", b"18446744073709551615", b"8192P", b"00008M", b"12345B", b"7K"]
BAD_SIZES = [b"0", b"0M", b"8m", b"8X", b"M", b"1.5M", b"0x10M", b"8MiBx", b"8KB", b"8kiB",
             "\uff11\uff16M".encode(), b"16384P", b"8Mi", b"-", b"+", b"8E", b"8mb",
             "\u0668M".encode(), b"AUTO", b"8 M", b"8MiBxxxxxxxx"]
LAX_SIZES = [b"+16M", b"-1", b"-8M", b"16385P", b"99999999999999999999", b"8\vM", b"\v8M",
             b"8M\v", b"8M\vjunk", b"+0", b"18446744073709551616", b"-0", b"\f2M", b"2\rM",
             b"-18446744073709551615M"]
VALID_NODES = [b"host", b"node1", b"user@node1", b"node1:2222", b"user@node1:2222", b"[::1]:22",
               b"127.0.0.1", b"fe80::1", b"n.example.com", b"a_b", b"u.x@h-1:65535"]
ODD_NODES = [b"ho/st", b"-oProxyCommand=x", b"user@", b"@host", b"host:", b"host:0",
             b"host:99999", b"[zz]:1", b"a@b@c", "h\u00f3st".encode(), b"host\v",
             b"h" + NBSP + b"x", b"-host", b"host:2a", b"[::1", b"h:1:2:x"]
VALID_DESCS = [b"x.set", b"sub/x.set", b"./x.set", b"a.set", b"s/t/u.set", b"x" + NBSP + b".set"]
ODD_DESCS = [b"../x.set", b"a/../../x.set", b".", b"..", b"sub/../../x", b"./.."]
NAMES = [b"a", b"b", b"c", b"part0", b"p.1", b"a" + NBSP + b"b", b"\xff\xfe", b"x" * 100, b"a#b",
         b"UPPER", b"sp\x1fx", OGHAM, b"a\rb"]
OPTIONS = [b"SINGLEHDR", b"NOHDRS"]


def c_fields(text: bytes) -> list[bytes]:
    """``text`` split at blanks and tabs, as C's ``strtok(text, " \\t")``."""
    return [f for f in text.replace(b"\t", b" ").split(b" ") if f]


def c_size(field: bytes) -> int | None:
    """What PMDK's ``util_parse_size`` makes of a size field: glibc ``sscanf("%zu%8s")``
    (white space skipped, a sign taken, overflow clamped to 2^64-1), the suffix looked up,
    the product wrapped to 64 bits; None where it fails or gives 0."""
    i = len(field) - len(field.lstrip(C_SPACE))
    neg = field[i:i + 1] == b"-"
    i += field[i:i + 1] in (b"+", b"-")
    j = i
    while j < len(field) and field[j:j + 1].isdigit():
        j += 1
    if j == i:
        return None
    value = int(field[i:j])
    value = U64 - 1 if value >= U64 else (-value % U64 if neg else value)
    rest = field[j:].lstrip(C_SPACE)
    if rest:
        unit = rest[:8]
        for k, byte in enumerate(unit):
            if byte in C_SPACE:
                unit = unit[:k]
                break
        if unit not in SUFFIXES:
            return None
        value = value * SUFFIXES[unit] % U64
    return value or None


def plain_size(field: bytes) -> bool:
    """The README's size: ASCII digits and an optional suffix, 1 to 2^64-1 bytes."""
    digits = field.rstrip(b"BKMGTPiBk")
    unit = field[len(digits):]
    return (digits.isdigit() and (not unit or unit in SUFFIXES)
            and 0 < int(digits) * SUFFIXES.get(unit, 1) < U64)


def escapes(desc: bytes) -> bool:
    """A remote set name that is ``.`` or climbs out of the agent's directory."""
    norm = posixpath.normpath(desc)
    return norm in (b".", b"..") or b".." in norm.split(b"/")


def valid_node(node: bytes) -> bool:
    """A node pmreplica takes: one of :data:`VALID_NODES`, or a plain host name, as a noise
    line's keyword becomes when its line end is kept (``REPLICA OPTION<CR>``: node OPTION)."""
    return node in VALID_NODES or re.fullmatch(rb"[A-Za-z][A-Za-z0-9-]*", node) is not None


def stricter(line: bytes) -> bool:
    """True if pmreplica refuses this logical line (no line end) where PMDK may take it."""
    if b"\0" in line:
        return True
    text = line.partition(b"#")[0]
    if not text or text.startswith(b"OPTION"):
        return False
    if text.startswith(b"REPLICA"):
        rest = text[7:]
        words = c_fields(rest)
        if not rest or rest[:1] not in b" \t" or len(words) != 2 or words[1].startswith(b"/"):
            return False
        return not valid_node(words[0]) or escapes(words[1])
    words = c_fields(text)
    if len(words) != 2 or not words[1].startswith(b"/"):
        return False
    return c_size(words[0]) is not None and not plain_size(words[0])


@dataclass(frozen=True)
class Case:
    """A pool set file's bytes and the first line (1-based) where pmreplica is
    deliberately stricter than PMDK (None: nowhere)."""

    data: bytes
    stricter: int | None


class Generator:
    """Cases for files in the case directory ``root`` (bytes)."""

    def __init__(self, rng: random.Random, root: bytes) -> None:
        self.rng = rng
        self.root = root

    def pick(self, weighted: dict[bytes, int]) -> bytes:
        return self.rng.choices(list(weighted), weights=list(weighted.values()))[0]

    def one(self, *lists: list[bytes]) -> bytes:
        return self.rng.choice(self.rng.choice(lists))

    # -- pieces --------------------------------------------------------------------------
    def sep(self) -> bytes:
        return self.pick({b" ": 60, b"\t": 10, b"  ": 8, b" \t ": 4, b"\v": 2, b"\f": 2,
                          NBSP: 2, OGHAM: 1, b"\r": 1})

    def lead(self) -> bytes:
        return self.pick({b"": 90, b" ": 4, b"\t": 4, b"\v": 1, b"\f": 1})

    def trail(self) -> bytes:
        return self.pick({b"": 70, b" ": 6, b"\t": 4, b" # note": 8, b"#": 3, b"\t# x": 3,
                          b"\v": 2, b"\r": 2, NBSP: 2})

    def size(self) -> bytes:
        r = self.rng.random()
        return (self.one(VALID_SIZES) if r < 0.75 else b"AUTO" if r < 0.8 else
                self.one(BAD_SIZES, LAX_SIZES))

    def path(self) -> bytes:
        kind = self.pick({b"missing": 70, b"dir": 10, b"fifo": 5, b"file": 3, b"notdir": 4,
                          b"relative": 6, b"long": 2})
        root = self.root
        if kind == b"missing":
            return root + b"/missing/" + self.one(NAMES) + self.pick({b"": 9, b"/": 1})
        if kind == b"dir":
            return root + self.one([b"/d1", b"/d1/", b"//d1", b"/./d1", b"/d2", b"/d2/"])
        if kind == b"long":  # past NAME_MAX or PATH_MAX
            return root + b"/missing/" + b"n" * self.rng.choice([256, 5000])
        if kind == b"relative":
            return self.one([b"rel/a", b"missing/a", b"./a", b"~/a", b"a"])
        return root + {b"fifo": b"/fifo", b"file": b"/file", b"notdir": b"/file/x"}[kind]

    # -- lines (without their end) -------------------------------------------------------
    def part_line(self) -> bytes:
        words = [self.size(), self.path()]
        r = self.rng.random()
        if r < 0.03:
            words.append(self.one([b"extra", b"/x", b"8M"]))
        elif r < 0.05:
            words = words[self.rng.randrange(2):][:1]
        return self.lead() + self.sep().join(words) + self.trail()

    def local_replica_line(self) -> bytes:
        if self.rng.random() < 0.8:
            return b"REPLICA" + self.pick({b"": 90, b" # local": 5, b"#": 5})
        return self.one([b"REPLICA ", b"REPLICA\t", b"REPLICA #c", b"REPLICAS", b"replica",
                         b" REPLICA", b"REPLICA\v", b"REPLICA\r", b"REPLICA" + NBSP,
                         b"\tREPLICA", b"REPLICA-1"])

    def remote_line(self) -> bytes:
        node = self.one(VALID_NODES) if self.rng.random() < 0.85 else self.one(ODD_NODES)
        r = self.rng.random()
        desc = (self.one(VALID_DESCS) if r < 0.75 else
                self.one([b"/abs.set", b"/"]) if r < 0.9 else self.one(ODD_DESCS))
        words = [node, desc]
        r = self.rng.random()
        if r < 0.04:
            words.append(b"extra")
        elif r < 0.08:
            words = words[:1]
        return self.lead() + b"REPLICA" + self.sep() + self.sep().join(words) + self.trail()

    def option_line(self) -> bytes:
        if self.rng.random() < 0.6:
            names = self.rng.sample(OPTIONS, self.rng.choice([1, 1, 1, 2]))
            return b"OPTION" + self.sep() + self.sep().join(names) + self.trail()
        return self.one([b"OPTION", b"OPTION ", b"OPTION\t", b"OPTION # none", b"OPTION #x",
                         b"OPTIONS SINGLEHDR", b"OPTIONSINGLEHDR", b"OPTION FOO",
                         b"OPTION singlehdr", b" OPTION SINGLEHDR", b"\tOPTION NOHDRS",
                         b"OPTION SINGLEHDR # c", b"OPTION SINGLEHDR\v",
                         b"OPTION\tNOHDRS\tSINGLEHDR", b"OPTION #SINGLEHDR"])

    def noise_line(self) -> bytes:
        return self.one([b"", b"", b"# comment", b"#", b" ", b"\t", b" \t ", b"  # indented",
                         b"\t#x", b"\v", b"\f", NBSP, b"\r", b"garbage", b"PMEMPOOLSET",
                         b"8M", b"/abs/only", b"REPLICA OPTION", b"#REPLICA"])

    def nul_line(self) -> bytes:
        line = self.part_line()
        at = self.rng.randrange(1, len(line) + 1) if line else 0
        return line[:at] + b"\0" + line[at:] if at else b"x\0"

    def any_line(self) -> bytes:
        kinds = {self.part_line: 45, self.local_replica_line: 14, self.remote_line: 14,
                 self.option_line: 10, self.noise_line: 16, self.nul_line: 1}
        return self.rng.choices(list(kinds), weights=list(kinds.values()))[0]()

    # -- whole files -----------------------------------------------------------------------
    def skeleton(self) -> list[bytes]:
        """A set as a user would write it, before any mistake."""
        out: list[bytes] = []
        if self.rng.random() < 0.3:
            out.append(b"OPTION " + self.rng.choice(OPTIONS))
        if self.rng.random() < 0.1:  # directory based, a directory named twice now and then
            dirs = [b"/d1", b"/d1/", b"//d1", b"/./d1", b"/d2", b"/d2/"]
            out[:0] = [b"OPTION SINGLEHDR"]
            for _ in range(self.rng.randint(1, 2)):
                out.append(self.rng.choice(VALID_SIZES) + b" " + self.root + self.rng.choice(dirs))
            if self.rng.random() < 0.6:
                out += [b"REPLICA", self.rng.choice(VALID_SIZES) + b" " + self.root
                        + self.rng.choice(dirs)]
            return out
        for _ in range(self.rng.randint(1, 3)):
            out.append(self.rng.choice(VALID_SIZES[:8]) + b" " + self.root + b"/missing/"
                       + self.rng.choice(NAMES[:5]))
        for _ in range(self.rng.choice([0, 0, 1, 1, 2])):
            if self.rng.random() < 0.6:
                out.append(b"REPLICA")
                out += [self.rng.choice(VALID_SIZES[:8]) + b" " + self.root + b"/missing/r"
                        + self.rng.choice(NAMES[:5]) for _ in range(self.rng.randint(1, 2))]
            else:
                out.append(b"REPLICA " + self.rng.choice(VALID_NODES) + b" "
                           + self.rng.choice(VALID_DESCS))
        return out

    def mutate(self, body: list[bytes]) -> None:
        op = self.rng.choice(["insert", "replace", "delete", "swap", "duplicate"])
        at = self.rng.randrange(len(body) + 1)
        if op == "insert" or not body:
            body.insert(at, self.any_line())
            return
        at = min(at, len(body) - 1)
        if op == "replace":
            body[at] = self.any_line()
        elif op == "delete":
            del body[at]
        elif op == "swap":
            other = self.rng.randrange(len(body))
            body[at], body[other] = body[other], body[at]
        else:
            body.insert(at, body[at])

    def case(self) -> Case:
        if self.rng.random() < 0.15:  # soup: lines of any kind
            body = [self.any_line() for _ in range(self.rng.randint(0, 8))]
        else:
            body = self.skeleton()
            for _ in range(self.rng.choice([0, 0, 0, 1, 1, 2, 3])):
                self.mutate(body)
        first = self.pick({b"PMEMPOOLSET\n": 88, b"PMEMPOOLSET\r\n": 6, b"PMEMPOOLSET \n": 1,
                           b"PMEMPOOLSET2\n": 1, b"PMEMPOOLSET#x\n": 1, b"PMEMPOOLSET": 1,
                           b"PMEMPOOLSET\t\n": 1, b"PMEMPOOLSET\r\r\n": 1})
        data, lax = [first], None
        for lineno, content in enumerate(body, start=2):
            end = self.pick({b"\n": 88, b"\r\n": 10, b"\r\r\n": 2})
            if lineno == len(body) + 1 and self.rng.random() < 0.1:
                end = b""  # a last line without its end: taken as it is
            if end == b"\r\n" and self.rng.random() < 0.03:  # a long line PMDK reads in pieces
                pad = self.rng.choice(CR_KEPT) + self.rng.choice([-1, 0, 0, 1]) - len(content) - 2
                content += b" " * max(pad, 0)
            raw = content + end  # as PMDK's reader hands it on: LF gone, CR before it too
            logical = (raw[:-2] if raw.endswith(b"\r\n") and len(raw) not in CR_KEPT else
                       raw[:-1] if raw.endswith(b"\n") else raw)
            if lax is None and stricter(logical):
                lax = lineno
            data.append(raw)
        return Case(b"".join(data), lax)

"""``pmreplica info``: what a pool set, a pool or a part file holds, gathered as a JSON-able
dict (:func:`gather`) and rendered as text (:func:`render`) in pmempool's words. Local
replicas are read; the others are listed, not contacted (their plugins describe them);
health is :func:`pmreplica.health.judge`'s verdict, the one check and replica-sync give."""

from __future__ import annotations

import errno
import functools
import os
import stat
import time
import uuid as _uuid
from collections.abc import Container
from typing import Any

from . import activity, dirtymap, generation, setfile
from .errors import HeaderError
from .files import open_regular
from .header import (FEAT_CHECK_BAD_BLOCKS, FEAT_CKSUM_2K, FEAT_SDS, FEAT_SINGLEHDR, HDR_SIZE,
                     ArchFlags, PoolHeader)
from .replica import LocalReplicaFiles, PartHeader
from .setfile import LocalReplica, PoolSetFile
from .state import ReplicaState

def _ctime(seconds: int) -> str:
    """A header's creation time as pmempool shows it; a corrupted value is shown as such."""
    try:
        return time.strftime("%a %b %d %Y %H:%M:%S", time.localtime(seconds))
    except (OverflowError, OSError, ValueError):
        return f"{seconds} (not a valid time)"



_INCOMPAT_NAMES = {FEAT_SINGLEHDR: "SINGLEHDR", FEAT_CKSUM_2K: "CKSUM_2K",
                   FEAT_SDS: "SHUTDOWN_STATE"}
_COMPAT_NAMES = {FEAT_CHECK_BAD_BLOCKS: "CHECK_BAD_BLOCKS"}
_MACHINES = {62: "AMD X86-64", 183: "AArch64", 21: "PowerPC64", 243: "RISC-V"}


def _flag_names(value: int, names: dict[int, str]) -> list[str]:
    out = [name for bit, name in names.items() if value & bit]
    unknown = value & ~sum(names)
    return out + ([f"0x{unknown:x}"] if unknown else [])


def header_info(ph: PartHeader) -> dict[str, Any]:
    """A part header's fields as pmempool shows them (uuids in PMDK's byte order)."""
    h = ph.header
    assert h is not None and ph.raw is not None
    arch_ok = h.arch == ArchFlags.current()
    return {
        "signature": h.signature.rstrip(b"\0").decode("ascii", "backslashreplace"),
        "major": h.major,
        "incompat": h.incompat, "incompat_names": _flag_names(h.incompat, _INCOMPAT_NAMES),
        "compat": h.compat, "compat_names": _flag_names(h.compat, _COMPAT_NAMES),
        "ro_compat": h.ro_compat,
        "poolset_uuid": str(h.poolset_uuid), "uuid": str(h.uuid),
        "prev_part": str(h.prev_part), "next_part": str(h.next_part),
        "prev_repl": str(h.prev_repl), "next_repl": str(h.next_repl),
        "crtime": h.crtime,
        "alignment_desc": h.arch.alignment_desc, "class": h.arch.machine_class,
        "data": h.arch.data, "machine": h.arch.machine, "arch_ok": arch_ok,
        "checksum": h.checksum, "checksum_ok": PoolHeader.checksum_ok(ph.raw),
    }


def _file_type(path: str) -> tuple[str, int | None]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing", None
    except OSError as e:
        return f"unreadable ({e.strerror})", None
    if stat.S_ISREG(st.st_mode):
        return "regular file", st.st_size
    if stat.S_ISDIR(st.st_mode):
        return "directory", None
    if stat.S_ISCHR(st.st_mode):
        return "device dax", None
    return "other", None


def _local_replica_info(set_file: PoolSetFile, index: int, rep: LocalReplica
                        ) -> tuple[dict[str, Any], PoolHeader | None, bytes | None]:
    """One local replica: its parts with their headers, and what is wrong with it."""
    info: dict[str, Any] = {"index": index, "kind": "local", "parts": [], "problems": []}
    headers: list[PartHeader] = []
    own: dict[str, list[str]] = {p.path: [] for p in rep.parts}  # each part's problems
    try:
        files = LocalReplicaFiles(set_file, rep, set_file.pool_size)
        headers, problems = files.check()
        missing = {p.path for p in rep.parts if not os.path.lexists(p.path)}
        for path in missing:
            own[path].append("part file is missing")
        info["problems"] = [f"{m}: part file is missing" for m in own if m in missing]
        for msg in problems:
            path, text = split_problem(msg, own)
            if path not in missing:
                info["problems"].append(msg)
                if path is not None:
                    own[path].append(text)
    except OSError as e:
        info["problems"] = [str(e)]
    by_path = {h.path: h for h in headers}
    # replica.check() compares the part links only when every header is sound on its own
    links_checked = bool(headers) and all(h.header is not None and not h.problems
                                          for h in headers)
    for part in rep.parts:
        ftype, fsize = _file_type(part.path)
        pinfo: dict[str, Any] = {"path": part.path, "size": part.size, "type": ftype,
                                 "file_size": fsize}
        ph = by_path.get(part.path)
        if ph is not None:
            pinfo["header"] = header_info(ph) if ph.header is not None else None
            pinfo["problems"] = own[part.path]
            pinfo["links"] = (("broken" if own[part.path] else "consistent") if links_checked
                              else "not checked (a header of this replica is invalid)")
        info["parts"].append(pinfo)
    first = headers[0] if headers else None
    if first is not None and first.header is not None and not first.problems:
        info["generation"] = generation_info(first.raw, first.header)  # type: ignore[arg-type]
        return info, first.header, first.raw
    return info, None, None


def generation_info(page: bytes, hdr: PoolHeader) -> dict[str, Any] | None:
    """The generation a replica records (generation.py), and whether it is its master."""
    gen = generation.of_page(page)
    if gen is None:
        return None
    return {"epoch": gen.epoch, "id": gen.id.hex(), "began": gen.began,
            "master": str(_uuid.UUID(bytes=gen.master)), "is_master": gen.is_master(hdr.uuid),
            "members": [i for i in range(64) if gen.members >> i & 1]}


def split_problem(msg: str, paths: Container[str]) -> tuple[str | None, str]:
    """``("path", "what")`` for a problem ``"path: what"`` about one of ``paths`` (a path
    may hold ": " itself), ``(None, msg)`` for any other."""
    at = msg.find(": ")
    while at >= 0:
        if msg[:at] in paths:
            return msg[:at], msg[at + 2:]
        at = msg.find(": ", at + 1)
    return None, msg


def gather_set(path: str, set_file: PoolSetFile) -> dict[str, Any]:
    """Everything ``info`` reports about a pool set (or a single-file pool). Replicas that
    are not local are listed, not contacted; health is health.judge's verdict, the one
    replica-sync and check give."""
    from . import health
    from .plugin_manager import make_plugin_manager
    from .target_host import TargetHost, ask_plugin, open_target, serving_plugin

    nrep, size = len(set_file.replicas), set_file.pool_size
    pm = make_plugin_manager()
    host = TargetHost(set_file, memoryview(b""), pm)  # nothing is written: no source
    reps: list[dict[str, Any]] = []
    probes: list[health.Probe] = []
    master_raw: bytes | None = None
    for i, rep in enumerate(set_file.replicas):
        if not isinstance(rep, LocalReplica):
            # what the plugin that serves it says of it (not contacting it)
            plugin = serving_plugin(pm, rep, i, host)
            described = plugin is not None and ask_plugin(
                pm, plugin, "pmreplica_describe_replica", spec=rep, index=i)
            reps.append({"index": i, "kind": "remote", "node": rep.node,
                         "pool_set": rep.pool_set, "problems": [],
                         "described": [list(kv) for kv in described or ()]})
            probes.append(health.not_contacted(i, rep))
            continue
        info, _, raw = _local_replica_info(set_file, i, rep)
        reps.append(info)
        probes.append(health.probe_target(i, rep, size, functools.partial(
            open_target, pm, rep, i, host)))
        if i == 0:
            master_raw = raw
    found = [len(p.problems) for p in probes]
    judged = health.judge(probes, size)
    for p in probes:
        p.close()
    for r, p, k in zip(reps, probes, found):
        if r["kind"] == "remote":
            r["health"] = "remote (not contacted)"
            continue
        r["problems"] += p.problems[k:] + p.link_problems  # what the replicas together show
        on_record = judged.state is not None and judged.state.is_stale(p.index)
        r["health"] = ("stale (behind the master's generation)"
                       if p.health == health.STALE and not on_record else p.health)
    if judged.superseded_by is not None:
        reps[0]["health"] = f"superseded (replica {judged.superseded_by} holds a newer generation)"
    if judged.split is not None:
        a, b = judged.split
        for i in judged.split:
            reps[i]["health"] = f"split brain (replica {a} and replica {b} both took writes)"

    state: dict[str, Any] | None = None
    if master_raw is not None:
        rstate = ReplicaState.load(master_raw, size, nrep,
                                   dirtymap.path_for(set_file.master.parts[0].path))
        state = {"intact": rstate.intact, "stale": [i for i in range(nrep) if rstate.is_stale(i)],
                 "generation": rstate.generation, "chunk_size": rstate.chunk,
                 "fine_chunk_size": rstate.fine.chunk if rstate.fine is not None else None,
                 "dirty_bytes": rstate.dirty_bytes(HDR_SIZE, size),
                 "dirty_ranges": sum(1 for _ in rstate.iter_dirty(HDR_SIZE, size)),
                 "session": _session(master_raw, set_file)}
    return {"path": os.path.abspath(path), "kind": "poolset" if set_file.path else "pool",
            "options": sorted(set_file.options), "pool_size": size,
            "replicas": reps, "replica_state": state,
            "healthy": all(r["health"] == "healthy" for r in reps if r["kind"] == "local")}


def _session(page: bytes, set_file: PoolSetFile) -> dict[str, Any] | None:
    """The activity log's marker: None when the pool was closed cleanly (or is not open)."""
    marker = activity.read_marker(page)
    if marker is None:
        return None
    areas = activity.logged_areas(set_file.master.parts[0].path, marker, set_file.pool_size)
    return {"logged": marker.logged,
            "log_bytes": None if areas is None else sum(n for _, n in areas)}


def gather(path: str) -> dict[str, Any]:
    """``info`` for a pool set file, a single-file pool, or one part file of a set."""
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
    if setfile.is_poolset_file(path):
        return gather_set(path, setfile.parse(path))
    fd = open_regular(path)
    try:
        raw = os.pread(fd, HDR_SIZE, 0)
    finally:
        os.close(fd)
    if len(raw) < HDR_SIZE:
        raise HeaderError(errno.EINVAL, f"{path}: not a pool: shorter than a pool header "
                                        f"({len(raw)} bytes)")
    hdr = PoolHeader.unpack(raw)
    if hdr.is_zeroed:
        raise HeaderError(errno.EINVAL, f"{path}: no pool header (all zeros): not a pool, or "
                                        "a later part of a SINGLEHDR pool set")
    single = (hdr.prev_part == hdr.next_part == hdr.prev_repl == hdr.next_repl == hdr.uuid
              and not hdr.incompat & FEAT_SINGLEHDR)
    if single:
        return gather_set(path, setfile.single_file(path, os.stat(path).st_size))
    ftype, fsize = _file_type(path)
    ph = PartHeader(path, raw, hdr, tuple(hdr.problems(raw)))
    return {"path": os.path.abspath(path), "kind": "part", "type": ftype, "file_size": fsize,
            "header": header_info(ph), "problems": list(ph.problems)}


_W = 25  # pmempool's key column


def _line(out: list[str], key: str, value: object) -> None:
    out.append(f"{key:<{_W}}: {value}")


def _render_header(out: list[str], h: dict[str, Any], part_file: bool = False) -> None:
    out.append("POOL Header:")
    sig = h["signature"] + (" [part file]" if part_file else "")
    _line(out, "Signature", sig)
    _line(out, "Major", h["major"])
    names = ", ".join(h["incompat_names"])
    _line(out, "Mandatory features", f"0x{h['incompat']:x}" + (f" [{names}]" if names else ""))
    names = ", ".join(h["compat_names"])
    _line(out, "Not mandatory features", f"0x{h['compat']:x}" + (f" [{names}]" if names else ""))
    _line(out, "Forced RO", f"0x{h['ro_compat']:x}")
    _line(out, "Pool set UUID", h["poolset_uuid"])
    _line(out, "UUID", h["uuid"])
    _line(out, "Previous part UUID", h["prev_part"])
    _line(out, "Next part UUID", h["next_part"])
    _line(out, "Previous replica UUID", h["prev_repl"])
    _line(out, "Next replica UUID", h["next_repl"])
    _line(out, "Creation Time", _ctime(h["crtime"]))
    _line(out, "Alignment Descriptor",
          f"0x{h['alignment_desc']:016x}[{'OK' if h['arch_ok'] else 'wrong'}]")
    _line(out, "Class", {1: "32", 2: "64"}.get(h["class"], f"unknown ({h['class']})"))
    _line(out, "Data", {1: "2's complement, little endian",
                        2: "2's complement, big endian"}.get(h["data"], f"unknown ({h['data']})"))
    _line(out, "Machine", _MACHINES.get(h["machine"], f"unknown ({h['machine']})"))
    _line(out, "Checksum", f"0x{h['checksum']:x} [{'OK' if h['checksum_ok'] else 'wrong'}]")


def _render_set(info: dict[str, Any]) -> list[str]:
    out: list[str] = []
    _line(out, "Pool set" if info["kind"] == "poolset" else "Pool file", info["path"])
    if info["options"]:
        _line(out, "Options", " ".join(info["options"]))
    _line(out, "Pool size", info["pool_size"])
    _line(out, "Number of replicas", len(info["replicas"]))
    st = info["replica_state"]
    if st is None:
        _line(out, "Replica state", "unknown (master header unreadable)")
    elif not st["intact"]:
        _line(out, "Replica state", "record damaged: every replica counts as stale")
    elif st["stale"]:
        _line(out, "Replica state", "stale replicas " + ", ".join(map(str, st["stale"]))
              + f" (written since: {st['dirty_bytes']} bytes in {st['dirty_ranges']} ranges)")
    else:
        _line(out, "Replica state", "no stale replicas")
    session = st and st["session"]
    if session is not None:
        logged = session["log_bytes"]
        _line(out, "Open session", "open, or not closed cleanly: " + (
            f"{logged} bytes in its activity log" if logged is not None else
            "no activity log (the whole pool)") + " to bring in line on the next open")
    for rep in info["replicas"]:
        out.append("")
        i = rep["index"]
        name = f"Replica {i}" + (" (master)" if i == 0 else "")
        if rep["kind"] == "remote":
            out.append(f"{name} - remote: node {rep['node']}, pool set {rep['pool_set']}")
            _line(out, "health", rep["health"])
            for key, value in rep["described"]:
                _line(out, key, value)
            continue
        out.append(f"{name} - local, {len(rep['parts'])} part(s):")
        _line(out, "health", rep["health"])
        gen = rep.get("generation")
        if gen is not None:
            role = ("its master" if gen["is_master"] else
                    f"a replica (master {gen['master']}; `pmreplica promote` to make it one)")
            _line(out, "generation", f"{gen['epoch']} (begun {_ctime(gen['began'])}), {role}")
        paths = {part["path"] for part in rep["parts"]}
        for msg in rep["problems"]:
            if split_problem(msg, paths)[0] is None:  # a part's own are shown with the part
                _line(out, "problem", msg)
        for j, part in enumerate(rep["parts"]):
            out.append(f"part {j}:")
            _line(out, "path", part["path"])
            _line(out, "type", part["type"])
            _line(out, "size", part["size"])
            if part["file_size"] is not None and part["file_size"] != part["size"]:
                _line(out, "file size", part["file_size"])
            if "header" not in part:
                continue
            if part["header"] is None:
                for msg in part["problems"]:
                    _line(out, "problem", msg)
                continue
            _render_header(out, part["header"])
            _line(out, "Links", part["links"])
            for msg in part["problems"]:
                _line(out, "problem", msg)
    return out


def _render_part(info: dict[str, Any]) -> list[str]:
    out = ["Part file:"]
    _line(out, "path", info["path"])
    _line(out, "type", info["type"])
    _line(out, "size", info["file_size"])
    out.append("")
    _render_header(out, info["header"], part_file=True)
    for msg in info["problems"]:
        _line(out, "problem", msg)
    out.append("")
    out.append("This is one part of a pool set: run `pmreplica info` on the pool set file "
               "for its replicas and their health.")
    return out


def render(info: dict[str, Any]) -> list[str]:
    """The text lines of what :func:`gather` found."""
    return _render_part(info) if info["kind"] == "part" else _render_set(info)

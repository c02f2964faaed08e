"""What a files job runs on its remote host: gfs's own tree code, shipped there by treeagent.

This module is not imported by gfs here. treeagent sends it, with the modules it needs
(filetree, treerestore, treeio, treeentry, copy, digest, mounts, btrfs), to the host's
python3 in the command's arguments, and runs `main()` there: the tree is read, linked to the
base generation, checked and restored by the very code a local files job runs, on the host
that holds both the tree and the target's mount, so no file data crosses SSH.

The request is JSON (argv[2]); the entries of a generation are read from its manifest on
the target, and checked against the count and digest of the entries gfs read here, so the
host works on the generation gfs chose. stdout carries `gfs-progress BYTES` lines (at least
every HEARTBEAT seconds, so a long run of hard links does not look idle) and one
`gfs-result JSON` line: `{"ok": ...}`, or `{"error": ..., "type": "os"|"value"|"other"}`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

from gfs_backup.copying.filetree import Base, export_tree, scan_clock_ns
from gfs_backup.copying.treeentry import TreeEntry
from gfs_backup.copying.treerestore import restore_tree, verify_tree
from gfs_backup.tools.btrfs import containing_subvolume
from gfs_backup.tools.mounts import mount_of, read_mounts

HEARTBEAT = 10.0


def entries_digest(tree: list[dict[str, Any]]) -> str:
    """The digest both sides compute over a generation's manifest entries."""
    text = json.dumps(tree, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


class Output:
    """Progress and result lines on stdout, from the worker and the heartbeat thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done = 0
        self.last = 0.0

    def say(self, line: str) -> None:
        with self.lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
            self.last = time.monotonic()

    def progress(self, count: int) -> None:
        self.done += count
        if time.monotonic() - self.last >= 0.5:
            self.say(f"gfs-progress {self.done}")

    def heartbeat(self, stop: threading.Event) -> None:
        while not stop.wait(HEARTBEAT / 2):
            if time.monotonic() - self.last >= HEARTBEAT / 2:
                self.say(f"gfs-progress {self.done}")


def load_entries(spec: dict[str, Any]) -> list[TreeEntry]:
    """The entries of the manifest at spec["manifest"], checked against what gfs read."""
    path = spec["manifest"]
    with open(path, encoding="utf-8") as handle:
        tree = json.load(handle).get("tree")
    if not isinstance(tree, list):
        raise ValueError(f"{path}: no file tree")
    if len(tree) != spec["count"] or entries_digest(tree) != spec["digest"]:
        raise ValueError(f"{path} changed since gfs read it")
    return [TreeEntry.from_json(item, f"{path}: tree[{i}]") for i, item in enumerate(tree)]


def probe(request: dict[str, Any]) -> dict[str, Any]:
    path = Path(request["path"])
    found: dict[str, Any] = {"is_dir": path.is_dir(), "clock_ns": scan_clock_ns()}
    if found["is_dir"]:
        found["fstype"] = mount_of(path, read_mounts()).fstype
        if found["fstype"] == "btrfs":
            found["subvolume"] = str(containing_subvolume(path))
    return found


def export(request: dict[str, Any], out: Output) -> dict[str, Any]:
    base = None
    if request.get("base"):
        spec = request["base"]
        entries = {entry.path: entry for entry in load_entries(spec)}
        base = Base(Path(spec["tree"]), entries, spec["racy_from_ns"], spec["rehash"])
    result = export_tree(
        Path(request["source"]),
        Path(request["dest"]),
        base,
        out.progress,
        scan_started_ns=request.get("scan_started_ns"),
        exclude=frozenset(request.get("exclude", [])),
    )
    problems = []
    if request.get("read_back"):
        problems = verify_tree(Path(request["dest"]), result.entries, content_of=result.copied)
    return {
        "entries": [entry.to_json() for entry in result.entries],
        "copied_files": result.copied_files,
        "linked_files": result.linked_files,
        "copied_bytes": result.copied_bytes,
        "skipped": result.skipped,
        "scan_started_ns": result.scan_started_ns,
        "granularity_ns": result.granularity_ns,
        "warnings": result.warnings,
        "rehashed_files": result.rehashed_files,
        "changed_behind_metadata": result.changed_behind_metadata,
        "copied": sorted(result.copied),
        "read_back": problems,
    }


def verify(request: dict[str, Any], out: Output) -> dict[str, Any]:
    entries = load_entries(request)
    return {"problems": verify_tree(Path(request["tree"]), entries, out.progress)}


def restore(request: dict[str, Any], out: Output) -> dict[str, Any]:
    entries = load_entries(request)
    restore_tree(Path(request["tree"]), entries, Path(request["dest"]), out.progress)
    return {}


def main() -> None:
    request = json.loads(sys.argv[2])
    out = Output()
    stop = threading.Event()
    beat = threading.Thread(target=out.heartbeat, args=(stop,), daemon=True)
    beat.start()
    try:
        op = request["op"]
        if op == "probe":
            result: dict[str, Any] = {"ok": probe(request)}
        elif op == "export":
            result = {"ok": export(request, out)}
        elif op == "verify":
            result = {"ok": verify(request, out)}
        elif op == "restore":
            result = {"ok": restore(request, out)}
        else:
            result = {"error": f"unknown operation {op!r}", "type": "other"}
    except OSError as exc:
        result = {
            "error": exc.strerror or str(exc),
            "type": "os",
            "errno": exc.errno or errno.EIO,
            "filename": exc.filename,
        }
    except ValueError as exc:
        result = {"error": str(exc), "type": "value"}
    finally:
        stop.set()
    out.say(f"gfs-progress {out.done}")  # the total, however recently the last line went
    out.say("gfs-result " + json.dumps(result))

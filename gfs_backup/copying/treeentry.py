"""Manifest entries of a file tree, and their validation: a manifest may be hostile.

Paths must be relative without `.`, `..`, empty components or NUL (the tree's root
directory itself is the one entry named `.`); every field is checked for type and range,
and an entry list must name each parent as a directory and each hard link's first name
as an earlier entry of the same kind.

Fifos and device nodes live in the manifest only (the target may not hold them: NFS with
root_squash refuses mknod); restore creates them.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

ROOT = "."
STORED_KINDS = ("file", "dir", "symlink")  # kinds a generation's tree holds on the target
SPECIAL_KINDS = ("fifo", "char", "block")  # kinds kept in the manifest only
KINDS = (*STORED_KINDS, *SPECIAL_KINDS)
_FIELDS = (
    "path",
    "kind",
    "mode",
    "uid",
    "gid",
    "mtime_ns",
    "size",
    "digest",
    "target",
    "xattrs",
    "ctime_ns",
    "ino",
    "link",
    "rdev",
    "changed",
)
_DIGEST = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class TreeEntry:
    """One object of a tree: `path` relative POSIX (`.` for the root), `kind` one of KINDS,
    `mode` & 0o7777; `size` and `digest` (sha256-1m) for files, `target` for symlinks,
    `rdev` for device nodes, xattr values base64 (POSIX ACLs and file capabilities are
    xattrs: `system.posix_acl_*`, `security.capability`).

    `ctime_ns` and `ino` are the source's, recorded so that the next export can tell an
    unchanged file from one rewritten behind an unchanged size and mtime; they are never
    compared with a copy. `link` names the first entry of a hard-link group this entry
    belongs to (same inode in the source tree). `changed` marks a file that kept changing
    while it was read: its content is one read of a moving file."""

    path: str
    kind: str
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int = 0
    digest: str | None = None
    target: str | None = None
    xattrs: dict[str, str] = field(default_factory=dict)
    ctime_ns: int = 0
    ino: int = 0
    link: str | None = None
    rdev: int = 0
    changed: bool = False

    def to_json(self) -> dict[str, object]:
        """The manifest form: only fields that differ from their defaults."""
        data: dict[str, object] = {name: getattr(self, name) for name in _FIELDS[:6]}
        for name in ("size", "digest", "target", "ctime_ns", "ino", "link", "rdev", "changed"):
            if getattr(self, name):
                data[name] = getattr(self, name)
        if self.xattrs:
            data["xattrs"] = dict(self.xattrs)
        return data

    @classmethod
    def from_json(cls, data: object, where: str) -> TreeEntry:
        """Parse a manifest entry; ValueError naming `where` and every bad field."""
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected an object, got {type(data).__name__}")
        problems = [f"unknown field {key!r}" for key in data if key not in _FIELDS]
        problems += [f"field {key!r} is missing" for key in _FIELDS[:6] if key not in data]
        if problems:
            raise ValueError(f"{where}: {'; '.join(problems)}")
        fields = {key: data[key] for key in _FIELDS if key in data}
        if isinstance(fields.get("xattrs"), dict):
            fields["xattrs"] = dict(fields["xattrs"])
        entry = cls(**fields)  # types are checked just below
        problems = _entry_problems(entry)
        if problems:
            raise ValueError(f"{where}: {'; '.join(problems)}")
        return entry


def _path_problem(path: object, kind: object = None) -> str | None:
    if path == ROOT and kind == "dir":
        return None
    if not isinstance(path, str) or not path:
        return "must be a non-empty relative path"
    if "\0" in path:
        return "must not contain NUL"
    if path.startswith("/"):
        return "must be relative, not absolute"
    if any(part in ("", ".", "..") for part in path.split("/")):
        return "must not contain '.', '..' or empty components"
    return None


def _is_int(value: object, low: float = -math.inf, high: float = math.inf) -> bool:
    return type(value) is int and low <= value <= high  # a bool is no int here


def _xattrs_problem(xattrs: object) -> str | None:
    if not isinstance(xattrs, dict):
        return "must be an object of name: base64 value"
    for name, value in xattrs.items():
        if not isinstance(name, str) or not name or "\0" in name:
            return "names must be non-empty strings without NUL"
        try:
            base64.b64decode(value, validate=True)
        except (TypeError, ValueError, binascii.Error):
            return f"value of {name!r} must be base64"
    return None


def _entry_problems(entry: TreeEntry) -> list[str]:
    """Everything wrong with one entry's fields, as "field 'x' must ..., got value" lines."""
    kind, digest, target = entry.kind, entry.digest, entry.target
    bad = [
        ("path", _path_problem(entry.path, kind)),
        ("xattrs", _xattrs_problem(entry.xattrs)),
    ]
    if entry.link is not None and (_path_problem(entry.link) or kind == "dir"):
        bad.append(("link", "must be the relative path of another entry, not for directories"))
    if kind not in KINDS:
        bad.append(("kind", f"must be one of {', '.join(KINDS)}"))
    for name, high in (("mode", 0o7777), ("uid", 2**32 - 2), ("gid", 2**32 - 2)):
        if not _is_int(getattr(entry, name), 0, high):
            bad.append((name, f"must be an integer 0..{high:#o}"))
    for name in ("mtime_ns", "ctime_ns"):
        if not _is_int(getattr(entry, name)):
            bad.append((name, "must be an integer"))
    if not _is_int(entry.ino, 0, 2**64 - 1):
        bad.append(("ino", "must be an integer >= 0"))
    if not _is_int(entry.rdev, 0, 2**64 - 1) or (entry.rdev and kind not in ("char", "block")):
        bad.append(("rdev", "must be an integer >= 0, for device nodes only"))
    if type(entry.changed) is not bool or (entry.changed and kind != "file"):
        bad.append(("changed", "must be true or false, true for files only"))
    if not _is_int(entry.size, 0) or (kind != "file" and entry.size != 0):
        bad.append(("size", "must be an integer >= 0, for files only"))
    if (digest is not None or kind == "file") and not (
        kind == "file" and isinstance(digest, str) and _DIGEST.fullmatch(digest)
    ):
        bad.append(("digest", "must be 64 lowercase hex digits, for files only"))
    if (target is not None or kind == "symlink") and not (
        kind == "symlink" and isinstance(target, str) and target and "\0" not in target
    ):
        bad.append(("target", "must be a non-empty string without NUL, for symlinks only"))
    return [f"field {name!r} {why}, got {short(getattr(entry, name))}" for name, why in bad if why]


def entry_list_problems(entries: Sequence[TreeEntry]) -> list[str]:
    """Invalid or unsafe entries, duplicates, parents that are not directory entries, and
    hard links whose first name is not an earlier entry (in path order) of the same kind."""
    problems: list[str] = []
    kinds: dict[str, str] = {}
    members: set[str] = set()
    for index, entry in enumerate(entries):
        if entry.link is not None:
            members.add(str(entry.path))
        problems += [
            f"entry {index} ({short(entry.path)}): {problem}" for problem in _entry_problems(entry)
        ]
        if isinstance(entry.path, str) and entry.path in kinds:
            problems.append(f"entry {index} ({short(entry.path)}): listed twice")
        kinds[str(entry.path)] = entry.kind
    if problems:
        return problems
    for entry in entries:
        head = entry.path.rpartition("/")[0]
        if head and kinds.get(head) != "dir":
            problems.append(f"{entry.path}: parent {head!r} is not a directory entry")
        leader = entry.link
        if leader is not None and not (
            leader < entry.path and kinds.get(leader) == entry.kind and leader not in members
        ):
            problems.append(
                f"{entry.path}: hard link to {short(leader)}, which is not an earlier "
                f"{entry.kind} entry that is no link itself"
            )
    return problems


def short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."

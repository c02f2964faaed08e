"""Restore and verify a file tree exported by filetree, against its manifest entries.

Entries read from a manifest are untrusted: `entry_list_problems` refuses unsafe paths,
and every object is reached through real directories (treeio.Dirs), so nothing is read or
written outside the tree. Restore recreates hard-link groups, the root directory's own
metadata, fifos and device nodes (which only the manifest holds), POSIX ACLs and file
capabilities (xattrs, written after chown, which clears capabilities).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Collection, Sequence
from pathlib import Path

from gfs_backup.copying.copy import Progress, copy_open_file, digest_open_file
from gfs_backup.copying.treeentry import ROOT, SPECIAL_KINDS, TreeEntry, entry_list_problems
from gfs_backup.copying.treeio import (
    FORMAT_OF,
    READ_FLAGS,
    WRITE_FLAGS,
    Dirs,
    apply_fd_metadata,
    apply_metadata,
    kind_of,
    read_xattrs,
    syncfs,
)


def restore_tree(
    tree: Path, entries: Sequence[TreeEntry], dest: Path, progress: Progress | None = None
) -> None:
    """Recreate `entries` from `tree` under `dest` (absent or empty), then verify it.

    Raises ValueError listing every problem if an entry is unsafe or invalid, or if the
    restored tree differs from `entries`; FileExistsError if `dest` is not empty. The
    caller restores into a temporary name and removes it on failure (actions.restore).
    """
    ordered = sorted(entries, key=lambda entry: entry.path)
    problems = entry_list_problems(ordered)
    if problems:
        raise ValueError("unsafe or invalid manifest entries:\n" + "\n".join(problems))
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(errno.EEXIST, "restore destination is not empty", str(dest))
    dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    with Dirs(tree) as source, Dirs(dest) as out:
        for entry in ordered:
            if entry.link is not None:
                problems += _link(out, entry)
            elif entry.kind == "dir":
                if entry.path != ROOT:
                    parent, name = out.parent(entry.path)
                    os.mkdir(name, 0o700, dir_fd=parent)
            elif entry.kind == "file":
                problems += _restore_file(source, out, entry, progress)
            else:
                _make_node(out, entry)
        for entry in ordered:  # after all contents: creating them changes the mtime
            if entry.kind == "dir":
                apply_metadata(out, entry, xattrs_optional=False)
        syncfs(out.root_fd)
    problems += verify_tree(dest, ordered, full=True)
    if problems:
        raise ValueError(f"restored tree {dest} differs from its manifest:\n" + "\n".join(problems))


def verify_tree(
    tree: Path,
    entries: Sequence[TreeEntry],
    progress: Progress | None = None,
    *,
    full: bool = False,
    content_of: Collection[str] | None = None,
) -> list[str]:
    """Re-read `tree` and compare it with `entries`: one line per problem, [] if it matches.

    Checks kind, mode, owners, file size, mtime and digest, symlink targets, that each
    hard link is the same inode as its group's first name; objects missing on disk or not
    in `entries`. `full` (a restored tree) also compares xattrs, the mtimes of directories
    and symlinks, and fifos and device nodes, which a generation's tree does not hold.
    `content_of`: the files whose content is re-read (None: all); the others are checked
    by their metadata only (an export's files linked to a verified generation).
    Unsafe entries are reported, never opened.
    """
    problems = entry_list_problems(entries)
    if problems or not tree.is_dir():
        return problems or [f"{tree}: the tree directory is missing"]
    on_disk = _lstat_tree(tree)
    inodes = dict(on_disk)
    with Dirs(tree) as dirs:
        for entry in sorted(entries, key=lambda entry: entry.path):
            if entry.kind in SPECIAL_KINDS and not full:
                continue
            st = on_disk.pop(entry.path, None)
            if st is None:
                problems.append(f"{entry.path}: missing")
                continue
            read = content_of is None or entry.path in content_of
            try:
                found = _compare(dirs, entry, st, inodes, progress, full, read)
            except OSError as exc:
                found = [f"cannot read: {exc.strerror}"]
            problems += [f"{entry.path}: {problem}" for problem in found]
    problems += [f"{path}: not in the manifest" for path in sorted(on_disk)]
    return problems


def _lstat_tree(tree: Path) -> dict[str, os.stat_result]:
    """Every object below `tree` by relative path (the root as `.`), never descending
    into symlinks."""
    found: dict[str, os.stat_result] = {ROOT: os.lstat(tree)}
    pending = [""]
    while pending:
        folder = pending.pop()
        with os.scandir(tree / folder) as listing:
            for child in listing:
                path = f"{folder}/{child.name}" if folder else child.name
                found[path] = child.stat(follow_symlinks=False)
                if stat.S_ISDIR(found[path].st_mode):
                    pending.append(path)
    return found


def _compare(
    dirs: Dirs,
    entry: TreeEntry,
    st: os.stat_result,
    inodes: dict[str, os.stat_result],
    progress: Progress | None,
    full: bool,
    read_content: bool = True,
) -> list[str]:
    kind = kind_of(st)
    if kind != entry.kind:
        return [f"is a {kind}, expected a {entry.kind}"]
    if entry.link is not None:
        first = inodes.get(entry.link)
        if first is None or (first.st_dev, first.st_ino) != (st.st_dev, st.st_ino):
            return [f"is not a hard link of {entry.link}, as the manifest says"]
        return []  # the same inode: its first name's checks cover it
    checks: list[tuple[str, object, object]] = [
        ("mode", oct(entry.mode), oct(st.st_mode & 0o7777)),
        ("uid", entry.uid, st.st_uid),
        ("gid", entry.gid, st.st_gid),
    ]
    if kind == "file" or full:
        checks.append(("mtime_ns", entry.mtime_ns, st.st_mtime_ns))
    if kind == "file":
        checks.append(("size", entry.size, st.st_size))
    if kind in ("char", "block"):
        checks.append(("rdev", entry.rdev, st.st_rdev))
    problems = [
        f"{name} is {found}, expected {wanted}" for name, wanted, found in checks if found != wanted
    ]
    parent, name = dirs.parent(entry.path)
    if kind == "symlink" and (target := os.readlink(name, dir_fd=parent)) != entry.target:
        problems.append(f"symlink target is {target!r}, expected {entry.target!r}")
    if kind == "file" and entry.size == st.st_size and read_content:
        fd = os.open(name, READ_FLAGS, dir_fd=parent)
        try:
            digest = digest_open_file(fd, progress, uncached=True).digest
        finally:
            os.close(fd)
        if digest != entry.digest:
            problems.append(f"content differs: sha256-1m {digest}, expected {entry.digest}")
    if full and (xattrs := read_xattrs(dirs.proc_path(entry.path))) != entry.xattrs:
        problems.append(
            f"xattrs are {sorted(xattrs)}, expected {sorted(entry.xattrs)} (or their values differ)"
        )
    return problems


def _restore_file(
    source: Dirs, out: Dirs, entry: TreeEntry, progress: Progress | None
) -> list[str]:
    try:
        parent, name = source.parent(entry.path)
        fd = os.open(name, READ_FLAGS, dir_fd=parent)
    except OSError as exc:
        return [f"{entry.path}: cannot read it in the backup tree: {exc.strerror}"]
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return [f"{entry.path}: not a regular file in the backup tree"]
        parent, name = out.parent(entry.path)
        into = os.open(name, WRITE_FLAGS, 0o600, dir_fd=parent)
        try:
            copy_open_file(fd, into, progress, sync=False)
            apply_fd_metadata(into, entry, xattrs_optional=False)
        finally:
            os.close(into)
    finally:
        os.close(fd)
    return []


def _make_node(out: Dirs, entry: TreeEntry) -> None:
    """A symlink, fifo or device node (device nodes need root), with its metadata."""
    parent, name = out.parent(entry.path)
    if entry.kind == "symlink":
        assert entry.target is not None  # checked by entry_list_problems
        os.symlink(entry.target, name, dir_fd=parent)
    elif entry.kind == "fifo":
        os.mkfifo(name, 0o600, dir_fd=parent)
    else:
        os.mknod(name, 0o600 | FORMAT_OF[entry.kind], entry.rdev, dir_fd=parent)
    apply_metadata(out, entry, xattrs_optional=False)


def _link(out: Dirs, entry: TreeEntry) -> list[str]:
    """Another name of an inode restored earlier (entry_list_problems checked the order);
    a problem line if that first name could not be restored."""
    assert entry.link is not None
    first_parent, first_name = out.parent(entry.link)
    first_fd = os.dup(first_parent)  # parent() below may close the cached one
    try:
        parent, name = out.parent(entry.path)
        os.link(first_name, name, src_dir_fd=first_fd, dst_dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return [f"{entry.path}: not restored: its first name {entry.link} is missing"]
    finally:
        os.close(first_fd)
    return []

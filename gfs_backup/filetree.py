"""A data directory exported as a plain file tree: export, restore and verify.

A generation's tree is readable without gfs: directories, regular files (sparse stays
sparse), symlinks, with owners, modes, ns mtimes and xattrs. Its manifest entries
(`TreeEntry`) record the same metadata plus each file's `sha256-1m` digest. An incremental
export hard-links files unchanged since the previous generation, so every tree is complete
on its own but costs only what changed.

Entries read from a manifest are untrusted: paths must be relative without `.`/`..`/NUL,
and every object below a tree is reached through real directories opened with O_NOFOLLOW,
so nothing is read or written outside the tree. Linux only (uses /proc/self/fd).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from gfs_backup.copy import Progress, copy_file, digest_file
from gfs_backup.treeentry import KINDS, TreeEntry, entry_list_problems

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a file replaced by a fifo meanwhile must not hang the open
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_NO_XATTRS = (errno.ENOTSUP, errno.EOPNOTSUPP)
_VANISHED = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)
_LINK_FALLBACK = (*_VANISHED, *_NO_XATTRS, errno.EMLINK, errno.EXDEV, errno.EPERM)
_KIND_OF = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
}


@dataclass(frozen=True)
class TreeExport:
    """What `export_tree` did; `skipped` holds "relative/path (reason)" lines for a warning."""

    entries: list[TreeEntry]
    copied_files: int
    linked_files: int
    copied_bytes: int  # data bytes actually copied (holes excluded)
    skipped: list[str]


def export_tree(
    source: Path,
    dest: Path,
    previous: tuple[Path, Mapping[str, TreeEntry]] | None = None,
    progress: Progress | None = None,
) -> TreeExport:
    """Mirror `source` into the new directory `dest` (must not exist; its parent must).

    Stays on `source`'s filesystem and never follows symlinks; sockets, devices, fifos,
    mount points and files that vanish or keep changing while read are skipped and listed.
    With `previous` (an earlier tree and its entries by path), unchanged files are
    hard-linked from it. OSError (ENOSPC, EIO) propagates; the caller removes `dest`.
    """
    found, skipped = _scan(source)
    os.mkdir(dest, 0o700)
    with _Dirs(dest) as out:
        exporter = _Exporter(source, out, previous, progress, skipped)
        try:
            entries = exporter.run(found)
        finally:
            exporter.close()
    return TreeExport(
        entries, exporter.copied_files, exporter.linked_files, exporter.copied_bytes, skipped
    )


def restore_tree(
    tree: Path, entries: Sequence[TreeEntry], dest: Path, progress: Progress | None = None
) -> None:
    """Recreate `entries` from `tree` under `dest` (absent or empty), then verify it.

    Raises ValueError listing every problem if an entry is unsafe or invalid, or if the
    restored tree differs from `entries`; FileExistsError if `dest` is not empty.
    """
    ordered = sorted(entries, key=lambda entry: entry.path)
    problems = entry_list_problems(ordered)
    if problems:
        raise ValueError("unsafe or invalid manifest entries:\n" + "\n".join(problems))
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(errno.EEXIST, "restore destination is not empty", str(dest))
    dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _Dirs(tree) as source, _Dirs(dest) as out:
        for entry in ordered:
            if entry.kind == "dir":
                parent, name = out.parent(entry.path)
                os.mkdir(name, 0o700, dir_fd=parent)
            elif entry.kind == "symlink":
                _make_symlink(out, entry, xattrs_optional=False)
            else:
                problems += _restore_file(source, out, entry, progress)
        for entry in ordered:  # after all contents: creating them changes the mtime
            if entry.kind == "dir":
                _apply_metadata(out, entry, xattrs_optional=False)
    problems += verify_tree(dest, ordered, full=True)
    if problems:
        raise ValueError(f"restored tree {dest} differs from its manifest:\n" + "\n".join(problems))


def verify_tree(
    tree: Path,
    entries: Sequence[TreeEntry],
    progress: Progress | None = None,
    *,
    full: bool = False,
) -> list[str]:
    """Re-read `tree` and compare it with `entries`: one line per problem, [] if it matches.

    Checks kind, mode, owners, file size, mtime and digest, symlink targets; objects missing
    on disk or not in `entries`. `full` also compares xattrs and the mtimes of directories
    and symlinks (as `restore_tree` does). Unsafe entries are reported, never opened.
    """
    problems = entry_list_problems(entries)
    if problems or not tree.is_dir():
        return problems or [f"{tree}: the tree directory is missing"]
    on_disk = _lstat_tree(tree)
    with _Dirs(tree) as dirs:
        for entry in sorted(entries, key=lambda entry: entry.path):
            st = on_disk.pop(entry.path, None)
            if st is None:
                problems.append(f"{entry.path}: missing")
                continue
            try:
                found = _compare(dirs, entry, st, progress, full)
            except OSError as exc:
                found = [f"cannot read: {exc.strerror}"]
            problems += [f"{entry.path}: {problem}" for problem in found]
    problems += [f"{path}: not in the manifest" for path in sorted(on_disk)]
    return problems


class _Dirs:
    """An open tree root; parents of paths below it, reached without following symlinks."""

    def __init__(self, root: Path) -> None:
        self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._head = ""
        self._fd = -1

    def parent(self, path: str) -> tuple[int, str]:
        """(fd of the parent directory, last component) of relative `path`; cached."""
        head, _, name = path.rpartition("/")
        if not head:
            return self.root_fd, name
        if head != self._head or self._fd < 0:
            self._forget()
            self._fd = _open_dir(self.root_fd, head)
            self._head = head
        return self._fd, name

    def proc_path(self, path: str) -> str:
        """A path naming `path` through its already opened parent directory."""
        parent, name = self.parent(path)
        return f"/proc/self/fd/{parent}/{name}"

    def _forget(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> _Dirs:
        return self

    def __exit__(self, *_: object) -> None:
        self._forget()
        os.close(self.root_fd)


class _Exporter:
    """The second pass of `export_tree`: create what `_scan` found, counting the work."""

    def __init__(
        self,
        source: Path,
        out: _Dirs,
        previous: tuple[Path, Mapping[str, TreeEntry]] | None,
        progress: Progress | None,
        skipped: list[str],
    ) -> None:
        self.source, self.out, self.progress, self.skipped = source, out, progress, skipped
        self.previous: _Dirs | None = None
        self.previous_entries: Mapping[str, TreeEntry] = previous[1] if previous else {}
        if previous:
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                self.previous = _Dirs(previous[0])  # gone: copy everything
        self.copied_files = self.linked_files = self.copied_bytes = 0

    def close(self) -> None:
        if self.previous is not None:
            self.previous.__exit__(None, None, None)

    def run(self, found: dict[str, TreeEntry | None]) -> list[TreeEntry]:
        entries: list[TreeEntry] = []
        for path in sorted(found):
            entry = found[path]
            if entry is None:
                entry = self._file(path)
            elif entry.kind == "dir":
                parent, name = self.out.parent(path)
                os.mkdir(name, 0o700, dir_fd=parent)
            else:
                _make_symlink(self.out, entry, xattrs_optional=True)
            if entry is not None:
                entries.append(entry)
        for entry in entries:  # after all contents: creating them changes the mtime
            if entry.kind == "dir":
                _apply_metadata(self.out, entry, xattrs_optional=True)
        return entries

    def _file(self, path: str) -> TreeEntry | None:
        try:
            fd = os.open(self.source / path, _READ_FLAGS)
        except OSError as exc:
            if exc.errno not in _VANISHED:
                raise
            self.skipped.append(f"{path} (vanished while reading)")
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                self.skipped.append(f"{path} (changed type while reading)")
                return None
            entry = _entry_from_stat(path, "file", st, xattrs=_read_xattrs(fd))
            return self._link_previous(entry) or self._copy(fd, entry)
        finally:
            os.close(fd)

    def _link_previous(self, entry: TreeEntry) -> TreeEntry | None:
        old = self.previous_entries.get(entry.path)
        if self.previous is None or old is None or old.digest is None:
            return None
        linked = replace(entry, digest=old.digest)
        if linked != old:
            return None
        try:
            old_parent, old_name = self.previous.parent(old.path)
            if not _matches(os.stat(old_name, dir_fd=old_parent, follow_symlinks=False), old):
                return None  # the previous tree was modified: do not propagate that
            parent, name = self.out.parent(entry.path)
            os.link(old_name, name, src_dir_fd=old_parent, dst_dir_fd=parent, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in _LINK_FALLBACK:
                return None
            raise
        self.linked_files += 1
        return linked

    def _copy(self, fd: int, entry: TreeEntry) -> TreeEntry | None:
        parent, name = self.out.parent(entry.path)
        for _attempt in range(3):
            try:
                copied = copy_file(
                    Path(f"/proc/self/fd/{fd}"),
                    Path(f"/proc/self/fd/{parent}/{name}"),
                    self.progress,
                )
            except OSError:
                _unlink_if_present(name, parent)
                now = _entry_from_stat(entry.path, "file", os.fstat(fd), xattrs=entry.xattrs)
                if now == entry:  # a real error, not a file shrinking under us
                    raise
                entry = now
                continue
            self.copied_files += 1
            self.copied_bytes += copied.data_bytes
            # the mtime from before the copy: a file changing meanwhile is copied again next time
            entry = replace(entry, size=copied.size, digest=copied.digest)
            _apply_metadata(self.out, entry, xattrs_optional=True)
            return entry
        self.skipped.append(f"{entry.path} (kept changing while being read)")
        return None


def _scan(source: Path) -> tuple[dict[str, TreeEntry | None], list[str]]:
    """Everything below `source` on its filesystem: dirs and symlinks as entries, files None."""
    device = os.stat(source).st_dev
    found: dict[str, TreeEntry | None] = {}
    skipped: list[str] = []
    pending = [""]
    while pending:
        folder = pending.pop()
        try:
            with os.scandir(source / folder) as listing:
                names = [child.name for child in listing]
        except OSError as exc:
            if not folder or exc.errno not in _VANISHED:
                raise
            del found[folder]
            skipped.append(f"{folder} (vanished while reading)")
            continue
        for name in names:
            path = f"{folder}/{name}" if folder else name
            try:
                st = os.lstat(source / path)
                kind = _KIND_OF.get(stat.S_IFMT(st.st_mode), "special file")
                if st.st_dev != device:
                    skipped.append(f"{path} (other filesystem)")
                elif kind == "file":
                    found[path] = None
                elif kind in KINDS:
                    target = os.readlink(source / path) if kind == "symlink" else None
                    xattrs = _read_xattrs(str(source / path))
                    found[path] = _entry_from_stat(path, kind, st, target=target, xattrs=xattrs)
                    if kind == "dir":
                        pending.append(path)
                else:
                    skipped.append(f"{path} ({kind})")
            except FileNotFoundError:
                skipped.append(f"{path} (vanished while reading)")
    return found, skipped


def _lstat_tree(tree: Path) -> dict[str, os.stat_result]:
    """Every object below `tree` by relative path, never descending into symlinks."""
    found: dict[str, os.stat_result] = {}
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
    dirs: _Dirs, entry: TreeEntry, st: os.stat_result, progress: Progress | None, full: bool
) -> list[str]:
    kind = _KIND_OF.get(stat.S_IFMT(st.st_mode), "special file")
    if kind != entry.kind:
        return [f"is a {kind}, expected a {entry.kind}"]
    checks: list[tuple[str, object, object]] = [
        ("mode", oct(entry.mode), oct(st.st_mode & 0o7777)),
        ("uid", entry.uid, st.st_uid),
        ("gid", entry.gid, st.st_gid),
    ]
    if kind == "file" or full:
        checks.append(("mtime_ns", entry.mtime_ns, st.st_mtime_ns))
    if kind == "file":
        checks.append(("size", entry.size, st.st_size))
    problems = [
        f"{name} is {found}, expected {wanted}" for name, wanted, found in checks if found != wanted
    ]
    parent, name = dirs.parent(entry.path)
    if kind == "symlink" and (target := os.readlink(name, dir_fd=parent)) != entry.target:
        problems.append(f"symlink target is {target!r}, expected {entry.target!r}")
    if kind == "file" and entry.size == st.st_size:
        fd = os.open(name, _READ_FLAGS, dir_fd=parent)
        try:
            digest = digest_file(Path(f"/proc/self/fd/{fd}"), progress).digest
        finally:
            os.close(fd)
        if digest != entry.digest:
            problems.append(f"content differs: sha256-1m {digest}, expected {entry.digest}")
    if full and (xattrs := _read_xattrs(dirs.proc_path(entry.path))) != entry.xattrs:
        problems.append(
            f"xattrs are {sorted(xattrs)}, expected {sorted(entry.xattrs)} (or their values differ)"
        )
    return problems


def _restore_file(
    source: _Dirs, out: _Dirs, entry: TreeEntry, progress: Progress | None
) -> list[str]:
    try:
        parent, name = source.parent(entry.path)
        fd = os.open(name, _READ_FLAGS, dir_fd=parent)
    except OSError as exc:
        return [f"{entry.path}: cannot read it in the backup tree: {exc.strerror}"]
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return [f"{entry.path}: not a regular file in the backup tree"]
        parent, name = out.parent(entry.path)
        copy_file(Path(f"/proc/self/fd/{fd}"), Path(f"/proc/self/fd/{parent}/{name}"), progress)
    finally:
        os.close(fd)
    _apply_metadata(out, entry, xattrs_optional=False)
    return []


def _make_symlink(out: _Dirs, entry: TreeEntry, *, xattrs_optional: bool) -> None:
    assert entry.target is not None  # checked by _entry_problems or set by _scan
    parent, name = out.parent(entry.path)
    os.symlink(entry.target, name, dir_fd=parent)
    _apply_metadata(out, entry, xattrs_optional=xattrs_optional)


def _apply_metadata(out: _Dirs, entry: TreeEntry, *, xattrs_optional: bool) -> None:
    """Owners, xattrs, mode, mtime of an object just created; chown first (it clears setuid
    and capabilities). `xattrs_optional`: a target filesystem without xattrs is fine."""
    parent, name = out.parent(entry.path)
    times = (entry.mtime_ns, entry.mtime_ns)
    if entry.kind == "symlink":
        os.chown(name, entry.uid, entry.gid, dir_fd=parent, follow_symlinks=False)
        _write_xattrs(out.proc_path(entry.path), entry.xattrs, xattrs_optional)
        os.utime(name, ns=times, dir_fd=parent, follow_symlinks=False)
        return
    flags = _DIR_FLAGS if entry.kind == "dir" else os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(name, flags, dir_fd=parent)
    try:
        os.fchown(fd, entry.uid, entry.gid)
        _write_xattrs(fd, entry.xattrs, xattrs_optional)
        os.fchmod(fd, entry.mode)
        os.utime(fd, ns=times)
    finally:
        os.close(fd)


def _read_xattrs(target: int | str) -> dict[str, str]:
    """Xattrs of an fd or (not followed) path, values base64; {} if unsupported."""
    follow = isinstance(target, int)
    try:
        names = os.listxattr(target, follow_symlinks=follow)
    except OSError as exc:
        if exc.errno in _NO_XATTRS:
            return {}
        raise
    xattrs: dict[str, str] = {}
    for name in sorted(names):
        try:
            value = os.getxattr(target, name, follow_symlinks=follow)
        except OSError as exc:
            if exc.errno == errno.ENODATA:  # removed since listed
                continue
            raise
        xattrs[name] = base64.b64encode(value).decode("ascii")
    return xattrs


def _write_xattrs(target: int | str, xattrs: Mapping[str, str], optional: bool) -> None:
    for name, value in sorted(xattrs.items()):
        try:
            os.setxattr(
                target, name, base64.b64decode(value), follow_symlinks=isinstance(target, int)
            )
        except OSError as exc:
            if not (optional and exc.errno in _NO_XATTRS):
                raise


def _open_dir(root_fd: int, path: str) -> int:
    """Open directory `path` below `root_fd` through real directories only."""
    fd = os.dup(root_fd)
    try:
        for part in path.split("/"):
            child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _unlink_if_present(name: str, parent: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=parent)


def _entry_from_stat(
    path: str,
    kind: str,
    st: os.stat_result,
    *,
    target: str | None = None,
    xattrs: dict[str, str] | None = None,
) -> TreeEntry:
    mode, size = st.st_mode & 0o7777, st.st_size if kind == "file" else 0
    owner, xattrs = (st.st_uid, st.st_gid), xattrs or {}
    return TreeEntry(path, kind, mode, *owner, st.st_mtime_ns, size, target=target, xattrs=xattrs)


def _matches(st: os.stat_result, entry: TreeEntry) -> bool:
    """Whether a previous tree's file still has its entry's metadata (xattrs not re-read)."""
    now = _entry_from_stat(entry.path, "file", st, xattrs=entry.xattrs)
    return stat.S_ISREG(st.st_mode) and replace(now, digest=entry.digest) == entry

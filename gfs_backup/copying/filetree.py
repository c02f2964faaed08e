"""A data directory exported as a plain file tree, hard-linked to a base generation.

A generation's tree is readable without gfs: directories, regular files (sparse stays
sparse), symlinks and hard links among them, with owners, modes, ns mtimes and xattrs. Its
manifest entries (`TreeEntry`) record the same metadata, each file's `sha256-1m` digest,
the source's ctime and inode, hard-link groups, the root directory itself, and fifos and
device nodes (which only the manifest holds). Restore and verify: treerestore.

Change detection (what makes a file "unchanged", so hard-linked from the base generation
instead of read): size, mtime, ctime, inode, mode, owners and xattrs all equal to what the
base recorded, the base passed its verify, and the base's scan did not see the file within
the timestamp granularity of its start (the "racy timestamp" rule of git: a file changed
in the same clock tick as the scan may change again without its times moving). Anything
else is read again; a rehash (`Base.rehash`) reads every file and reports content that
changed behind unchanged metadata. Size and mtime alone are not enough: `cp -p`, `rsync
-t`, `tar x` and `touch -d` rewrite content and set an old mtime, and only ctime shows it.

Live sources (no snapshot): size, mtime and ctime are compared before and after reading a
file; one that changed is read again, and if it changes again it is stored and marked
`changed`, never presented as a consistent copy.

Durability: files are not fsynced one by one; one syncfs of the target at the end writes
back all data and metadata (thousands of fsyncs cost more than the copy of small files).
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from gfs_backup.copying.copy import Progress, copy_open_file, digest_open_file
from gfs_backup.copying.treeentry import ROOT, SPECIAL_KINDS, TreeEntry
from gfs_backup.copying.treeio import (
    READ_FLAGS,
    VANISHED,
    WRITE_FLAGS,
    Dirs,
    apply_fd_metadata,
    apply_metadata,
    entry_from_stat,
    kind_of,
    read_xattrs,
    syncfs,
    unlink_if_present,
)
from gfs_backup.tools.mounts import mount_of, read_mounts

_LINK_FALLBACK = (*VANISHED, errno.EMLINK, errno.EXDEV, errno.EPERM)
# Timestamp granularity: nanosecond filesystems stamp with the kernel's coarse clock (one
# tick, at most 10 ms at HZ=100); filesystems whose times are whole seconds (ext4 with
# 128-byte inodes, FAT with 2 s mtimes, many NFS servers) are judged at 2 s.
FINE_GRANULARITY_NS = 10_000_000
COARSE_GRANULARITY_NS = 2_000_000_000
COARSE_FILESYSTEMS = ("vfat", "msdos", "exfat", "fat")


def scan_clock_ns() -> int:
    """The kernel's real-time clock, which stamps inodes (never a test's frozen clock)."""
    return time.clock_gettime_ns(time.CLOCK_REALTIME)


@dataclass(frozen=True)
class Base:
    """The generation a new export may take unchanged files over from.

    `racy_from_ns`: entries whose mtime or ctime are at or after it were recorded in the
    same clock tick as the base's scan started and are read again. `rehash`: read every
    file anyway and compare it with the base (content changed behind unchanged metadata
    is stored and reported)."""

    tree: Path
    entries: Mapping[str, TreeEntry]
    racy_from_ns: int
    rehash: bool = False


@dataclass(frozen=True)
class TreeExport:
    """What `export_tree` did. `skipped`: "path (reason)" lines; `warnings`: files stored
    but worth a human's look (changed while read, changed behind unchanged metadata)."""

    entries: list[TreeEntry]
    copied_files: int
    linked_files: int
    copied_bytes: int  # data bytes actually copied (holes excluded)
    skipped: list[str]
    scan_started_ns: int
    granularity_ns: int
    warnings: list[str] = field(default_factory=list)
    rehashed_files: int = 0
    changed_behind_metadata: list[str] = field(default_factory=list)  # found by a rehash
    copied: set[str] = field(default_factory=set)  # paths whose data this export wrote


def export_tree(
    source: Path,
    dest: Path,
    base: Base | None = None,
    progress: Progress | None = None,
    *,
    scan_started_ns: int | None = None,
    exclude: frozenset[str] = frozenset(),
) -> TreeExport:
    """Mirror `source` into the new directory `dest` (must not exist; its parent must).

    Stays on `source`'s filesystem and never follows symlinks; sockets, mount points and
    files that vanish are skipped and listed. `scan_started_ns` (kernel clock): when the
    source's state was taken (before its snapshot), default now. `exclude`: relative
    paths left out in silence (gfs's own snapshot directory). With `base`, unchanged
    files are hard-linked from it. Everything is on stable storage when this returns.
    OSError (ENOSPC, EIO) propagates; the caller removes `dest`.
    """
    started = scan_clock_ns() if scan_started_ns is None else scan_started_ns
    found, skipped = _scan(source, exclude)
    os.mkdir(dest, 0o700)
    with Dirs(source) as src, Dirs(dest) as out:
        exporter = _Exporter(src, out, base, progress, skipped)
        try:
            entries = exporter.run(found)
        finally:
            exporter.close()
        syncfs(out.root_fd)
    return TreeExport(
        entries,
        exporter.copied_files,
        exporter.linked_files,
        exporter.copied_bytes,
        skipped,
        started,
        _granularity(source, entries),
        exporter.warnings,
        exporter.rehashed_files,
        exporter.changed_behind_metadata,
        exporter.copied,
    )


def _granularity(source: Path, entries: list[TreeEntry]) -> int:
    """The source filesystem's timestamp granularity: coarse for FAT, or when no time seen
    has a sub-second part (a filesystem that stores whole seconds)."""
    with contextlib.suppress(OSError, ValueError):
        if mount_of(source, read_mounts()).fstype in COARSE_FILESYSTEMS:
            return COARSE_GRANULARITY_NS
    subsecond = any(entry.mtime_ns % 10**9 or entry.ctime_ns % 10**9 for entry in entries)
    return FINE_GRANULARITY_NS if subsecond else COARSE_GRANULARITY_NS


@dataclass
class _Found:
    """What the scan saw of one object: its lstat, and for non-files their entry."""

    st: os.stat_result
    entry: TreeEntry | None  # None for regular files: read when exported


class _Exporter:
    """The second pass of `export_tree`: create what `_scan` found, counting the work."""

    def __init__(
        self,
        source: Dirs,
        out: Dirs,
        base: Base | None,
        progress: Progress | None,
        skipped: list[str],
    ) -> None:
        self.source, self.out, self.progress, self.skipped = source, out, progress, skipped
        self.base = base
        self.base_dirs: Dirs | None = None
        if base is not None:
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                self.base_dirs = Dirs(base.tree)  # gone: copy everything
        self.copied_files = self.linked_files = self.copied_bytes = self.rehashed_files = 0
        self.warnings: list[str] = []
        self.changed_behind_metadata: list[str] = []
        self.copied: set[str] = set()
        self.first_name: dict[int, TreeEntry] = {}  # inode -> first exported name

    def close(self) -> None:
        if self.base_dirs is not None:
            self.base_dirs.close()

    def run(self, found: dict[str, _Found]) -> list[TreeEntry]:
        entries: list[TreeEntry] = []
        for path in sorted(found):
            seen = found[path]
            linkable = seen.st.st_nlink > 1 and kind_of(seen.st) != "dir"
            entry = self._hard_link(path, seen) if linkable else None
            if entry is None:
                entry = self._export(path, seen)
                if entry is not None and linkable:
                    self.first_name.setdefault(entry.ino, entry)
            if entry is not None:
                entries.append(entry)
        for entry in entries:  # after all contents: creating them changes the mtime
            if entry.kind == "dir":
                apply_metadata(self.out, entry, xattrs_optional=True)
        return entries

    def _export(self, path: str, seen: _Found) -> TreeEntry | None:
        entry = seen.entry
        if entry is None:
            return self._file(path)
        if entry.kind == "dir" and path != ROOT:
            parent, name = self.out.parent(path)
            os.mkdir(name, 0o700, dir_fd=parent)
        elif entry.kind == "symlink":
            assert entry.target is not None
            parent, name = self.out.parent(path)
            os.symlink(entry.target, name, dir_fd=parent)
            apply_metadata(self.out, entry, xattrs_optional=True)
        return entry  # fifos and device nodes: in the manifest only

    def _hard_link(self, path: str, seen: _Found) -> TreeEntry | None:
        """Another name of an inode already exported: linked to its first name, if the
        name still is that inode (a live tree may have replaced it since the scan)."""
        first = self.first_name.get(seen.st.st_ino)
        if first is None:
            return None
        try:
            if self.source.lstat(path).st_ino != first.ino:
                return None
            if first.kind not in SPECIAL_KINDS:
                old_parent, old_name = self.out.parent(first.path)
                old_fd = os.dup(old_parent)  # parent() may close it for the new path
                try:
                    parent, name = self.out.parent(path)
                    os.link(
                        old_name, name, src_dir_fd=old_fd, dst_dir_fd=parent, follow_symlinks=False
                    )
                finally:
                    os.close(old_fd)
        except OSError as exc:
            if exc.errno in VANISHED:
                return None
            raise
        return replace(first, path=path, link=first.path)

    def _file(self, path: str) -> TreeEntry | None:
        try:
            parent, name = self.source.parent(path)
            fd = os.open(name, READ_FLAGS, dir_fd=parent)
        except OSError as exc:
            if exc.errno not in VANISHED:
                raise
            self.skipped.append(f"{path} (vanished while reading)")
            return None
        try:
            st = os.fstat(fd)
            if kind_of(st) != "file":
                self.skipped.append(f"{path} (changed type while reading)")
                return None
            entry = entry_from_stat(path, "file", st, xattrs=read_xattrs(fd))
            old = self._unchanged(entry)
            if old is not None and self.base is not None and self.base.rehash:
                return self._rehash(fd, entry, old)
            if old is not None and self._link_base(old):
                return old
            return self._copy(fd, entry)
        finally:
            os.close(fd)

    def _unchanged(self, entry: TreeEntry) -> TreeEntry | None:
        """The base's entry of this file if the file's metadata says it did not change."""
        base = self.base
        old = base.entries.get(entry.path) if base is not None else None
        if base is None or old is None or old.digest is None or not old.ino:
            return None  # no base, new file, or recorded without ctime and inode
        if replace(entry, digest=old.digest) != old:
            return None  # size, times, inode, owners, mode, xattrs, link group, changed
        if max(old.mtime_ns, old.ctime_ns) >= base.racy_from_ns:
            return None  # changed in the tick of the base's scan: its times prove nothing
        return old

    def _link_base(self, old: TreeEntry) -> bool:
        if self.base_dirs is None:
            return False
        try:
            base_st = self.base_dirs.lstat(old.path)
            if not _stored_as(base_st, old):
                return False  # the base tree was modified: do not propagate that
            old_parent, old_name = self.base_dirs.parent(old.path)
            parent, name = self.out.parent(old.path)
            os.link(old_name, name, src_dir_fd=old_parent, dst_dir_fd=parent, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in _LINK_FALLBACK:
                return False
            raise
        self.linked_files += 1
        return True

    def _rehash(self, fd: int, entry: TreeEntry, old: TreeEntry) -> TreeEntry | None:
        """Read a file whose metadata says unchanged: same content -> link, else store."""
        self.rehashed_files += 1
        digest = digest_open_file(fd, self.progress).digest
        if digest == old.digest and self._link_base(old):
            return old
        if digest != old.digest:
            self.changed_behind_metadata.append(entry.path)
            self.warnings.append(
                f"{entry.path}: content changed behind unchanged size, times and inode "
                "(found by the periodic rehash; stored anew)"
            )
        return self._copy(fd, entry)

    def _copy(self, fd: int, entry: TreeEntry) -> TreeEntry | None:
        """Copy, compare size and times before and after; once more on a change; a file
        that changes again is stored marked `changed`."""
        parent, name = self.out.parent(entry.path)
        for attempt in range(3):
            if attempt:
                entry = entry_from_stat(entry.path, "file", os.fstat(fd), xattrs=entry.xattrs)
            out = os.open(name, WRITE_FLAGS, 0o600, dir_fd=parent)
            try:
                copied = copy_open_file(fd, out, self.progress, sync=False)
                stable = _same_state(os.fstat(fd), entry)
                if stable or attempt:
                    entry = replace(entry, size=copied.size, digest=copied.digest)
                    entry = replace(entry, changed=not stable)
                    apply_fd_metadata(out, entry, xattrs_optional=True)
            except OSError:
                os.close(out)
                unlink_if_present(name, parent)
                if _same_state(os.fstat(fd), entry):  # a real error, not a moving file
                    raise
                continue
            os.close(out)
            if not stable and not attempt:
                unlink_if_present(name, parent)
                continue
            self.copied_files += 1
            self.copied_bytes += copied.data_bytes
            self.copied.add(entry.path)
            if entry.changed:  # the stat from before the read: the next export reads it again
                self.warnings.append(
                    f"{entry.path}: changed while being read, twice: stored as read and "
                    "marked changed-during-backup"
                )
            return entry
        self.skipped.append(f"{entry.path} (kept changing size while being read)")
        return None


def _same_state(st: os.stat_result, entry: TreeEntry) -> bool:
    now = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    return now == (entry.size, entry.mtime_ns, entry.ctime_ns, entry.ino)


def _stored_as(st: os.stat_result, entry: TreeEntry) -> bool:
    """Whether a base tree's file still has its entry's mode, owners, size and mtime."""
    found = (st.st_mode & 0o7777, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns)
    wanted = (entry.mode, entry.uid, entry.gid, entry.size, entry.mtime_ns)
    return kind_of(st) == "file" and found == wanted


def _scan(source: Path, exclude: frozenset[str]) -> tuple[dict[str, _Found], list[str]]:
    """Everything below `source` on its filesystem (and `source` itself, as `.`) but the
    paths in `exclude`."""
    root = os.lstat(source)
    root_entry = entry_from_stat(ROOT, "dir", root, xattrs=read_xattrs(str(source)))
    found = {ROOT: _Found(root, root_entry)}
    skipped: list[str] = []
    pending = [""]
    while pending:
        folder = pending.pop()
        try:
            with os.scandir(source / folder) as listing:
                names = [child.name for child in listing]
        except OSError as exc:
            if not folder or exc.errno not in VANISHED:
                raise
            del found[folder]
            skipped.append(f"{folder} (vanished while reading)")
            continue
        for name in names:
            path = f"{folder}/{name}" if folder else name
            if path in exclude:
                continue
            try:
                st = os.lstat(source / path)
                kind = kind_of(st)
                if st.st_dev != root.st_dev:
                    skipped.append(f"{path} (other filesystem)")
                elif kind == "file":
                    found[path] = _Found(st, None)
                elif kind in ("dir", "symlink", *SPECIAL_KINDS):
                    target = os.readlink(source / path) if kind == "symlink" else None
                    xattrs = read_xattrs(str(source / path))
                    entry = entry_from_stat(path, kind, st, target=target, xattrs=xattrs)
                    found[path] = _Found(st, entry)
                    if kind == "dir":
                        pending.append(path)
                else:
                    skipped.append(f"{path} ({kind})")
            except FileNotFoundError:
                skipped.append(f"{path} (vanished while reading)")
    return found, skipped

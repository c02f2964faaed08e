"""Low-level I/O on file trees, shared by export (filetree) and restore/verify (treerestore).

Every object below a tree root is reached through real directories opened with O_NOFOLLOW
relative to the root, so a hostile path or a symlink swapped in never leads outside the
tree. Linux only (uses /proc/self/fd and syncfs).
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import errno
import os
import stat
from collections.abc import Mapping

from gfs_backup.copying.treeentry import ROOT, TreeEntry

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a file replaced by a fifo meanwhile must not hang the open
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
NO_XATTRS = (errno.ENOTSUP, errno.EOPNOTSUPP)
VANISHED = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)
KIND_OF = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "char",
    stat.S_IFBLK: "block",
}
FORMAT_OF = {kind: fmt for fmt, kind in KIND_OF.items()}


def kind_of(st: os.stat_result) -> str:
    return KIND_OF.get(stat.S_IFMT(st.st_mode), "special file")


class Dirs:
    """An open tree root; parents of paths below it, reached without following symlinks."""

    def __init__(self, root: os.PathLike[str] | str) -> None:
        self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._head = ""
        self._fd = -1

    def parent(self, path: str) -> tuple[int, str]:
        """(fd of the parent directory, last component) of relative `path`; cached.
        The root entry `.` is (root fd, ".")."""
        head, _, name = path.rpartition("/")
        if not head:
            return self.root_fd, name
        if head != self._head or self._fd < 0:
            self._forget()
            self._fd = open_dir(self.root_fd, head)
            self._head = head
        return self._fd, name

    def proc_path(self, path: str) -> str:
        """A path naming `path` through its already opened parent directory."""
        parent, name = self.parent(path)
        return f"/proc/self/fd/{parent}/{name}"

    def lstat(self, path: str) -> os.stat_result:
        parent, name = self.parent(path)
        return os.stat(name, dir_fd=parent, follow_symlinks=False)

    def _forget(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Dirs:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._forget()
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1


def open_dir(root_fd: int, path: str) -> int:
    """Open directory `path` below `root_fd` through real directories only."""
    fd = os.dup(root_fd)
    try:
        for part in path.split("/"):
            child = os.open(part, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def entry_from_stat(
    path: str,
    kind: str,
    st: os.stat_result,
    *,
    target: str | None = None,
    xattrs: dict[str, str] | None = None,
) -> TreeEntry:
    """The manifest entry of an object of the source (ctime and inode included)."""
    size = st.st_size if kind == "file" else 0
    rdev = st.st_rdev if kind in ("char", "block") else 0
    return TreeEntry(
        path,
        kind,
        st.st_mode & 0o7777,
        st.st_uid,
        st.st_gid,
        st.st_mtime_ns,
        size,
        target=target,
        xattrs=xattrs or {},
        ctime_ns=st.st_ctime_ns,
        ino=st.st_ino,
        rdev=rdev,
    )


def apply_metadata(out: Dirs, entry: TreeEntry, *, xattrs_optional: bool) -> None:
    """Owners, xattrs, mode, mtime of an object just created; chown first (it clears setuid
    and capabilities), the mode after the xattrs (an ACL's mask is the mode's group bits).
    `xattrs_optional`: a target filesystem without (some) xattrs is fine."""
    parent, name = out.parent(entry.path)
    times = (entry.mtime_ns, entry.mtime_ns)
    if entry.kind not in ("file", "dir"):  # symlinks, fifos, device nodes: by name
        os.chown(name, entry.uid, entry.gid, dir_fd=parent, follow_symlinks=False)
        write_xattrs(out.proc_path(entry.path), entry.xattrs, xattrs_optional)
        if entry.kind != "symlink":  # Linux has no lchmod; a symlink's mode is 0777
            os.chmod(name, entry.mode, dir_fd=parent)
        os.utime(name, ns=times, dir_fd=parent, follow_symlinks=False)
        return
    flags = DIR_FLAGS if entry.kind == "dir" else os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(name, flags, dir_fd=parent)
    try:
        apply_fd_metadata(fd, entry, xattrs_optional=xattrs_optional)
    finally:
        os.close(fd)


def apply_fd_metadata(fd: int, entry: TreeEntry, *, xattrs_optional: bool) -> None:
    """`apply_metadata` on an open file or directory."""
    os.fchown(fd, entry.uid, entry.gid)
    write_xattrs(fd, entry.xattrs, xattrs_optional)
    os.fchmod(fd, entry.mode)
    os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))


def read_xattrs(target: int | str) -> dict[str, str]:
    """Xattrs of an fd or (not followed) path, values base64; {} if unsupported."""
    follow = isinstance(target, int)
    try:
        names = os.listxattr(target, follow_symlinks=follow)
    except OSError as exc:
        if exc.errno in NO_XATTRS:
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


def write_xattrs(target: int | str, xattrs: Mapping[str, str], optional: bool) -> None:
    """Set each xattr; with `optional`, names the filesystem refuses (an NFS target keeps
    only user.*) are left out: the manifest holds them."""
    for name, value in sorted(xattrs.items()):
        try:
            os.setxattr(
                target, name, base64.b64decode(value), follow_symlinks=isinstance(target, int)
            )
        except OSError as exc:
            if not (optional and exc.errno in (*NO_XATTRS, errno.EPERM, errno.EACCES)):
                raise


def unlink_if_present(name: str, parent: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=parent)


_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(fd: int) -> None:
    """Write back everything the filesystem of `fd` holds dirty (data and metadata) and wait:
    one call instead of an fsync per file and directory. OSError on a write-back error."""
    if _libc.syncfs(fd) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"syncfs: {os.strerror(code)}")


def is_root(path: str) -> bool:
    return path == ROOT

"""The filesystem of the host a job reads: this machine, or a remote host over SSH.

btrfs jobs take, list and delete their snapshots there, and restores stage there. On a
remote host every operation is one argv command through the job's SSH runner (no shell
string holds a path); creating gfs's snapshot directory keeps its parent's times with a
few lines of Python there (python3 is already what gfs needs on a remote host).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Protocol

from gfs_backup.backends.base import JobContext
from gfs_backup.core.config import LOCAL_HOST, Job
from gfs_backup.core.errors import GfsError
from gfs_backup.tools.btrfs import SUBVOLUME_ROOT_INODE, is_subvolume_root
from gfs_backup.transport.runner import Command, LocalRunner, Runner

QUIET_MKDIR = r"""
import os, sys
folder = sys.argv[1]
parent = os.stat(os.path.dirname(folder))
os.mkdir(folder, 0o700)
os.utime(os.path.dirname(folder), ns=(parent.st_atime_ns, parent.st_mtime_ns))
"""


# Subvolumes at or directly in a leftover are deleted before the tree (rm cannot).
REMOVE_LEFTOVER = r"""
for p in "$1" "$1"/*; do
    if [ "$(stat -f -c %T -- "$p" 2>/dev/null)" = btrfs ] &&
       [ "$(stat -c %i -- "$p" 2>/dev/null)" = 256 ]; then
        btrfs subvolume delete -- "$p" >/dev/null
    fi
done
rm -rf -- "$1"
"""


class SourceHost(Protocol):
    name: str

    def exists(self, path: Path) -> bool: ...

    def is_dir(self, path: Path) -> bool: ...

    def names(self, folder: Path) -> list[str]:
        """The entries of a directory ([] when it does not exist)."""
        ...

    def is_subvolume_root(self, path: Path) -> bool: ...

    def make_quiet_dir(self, folder: Path) -> None:
        """Create `folder` (mode 0700), keeping its parent's times."""
        ...

    def make_dir(self, folder: Path) -> None: ...

    def remove_dir(self, folder: Path) -> None:
        """Remove an empty directory gfs made (a missing one is fine)."""
        ...

    def rename(self, source: Path, destination: Path) -> None:
        """Rename; an error if `destination` exists."""
        ...

    def remove_leftover(self, path: Path) -> None:
        """Remove a dot-named leftover of gfs (a restore's staging): btrfs subvolumes at
        or directly in it first, then the tree. A missing path is fine."""
        ...


class LocalHost:
    name = LOCAL_HOST

    def exists(self, path: Path) -> bool:
        return path.exists()

    def is_dir(self, path: Path) -> bool:
        return path.is_dir()

    def names(self, folder: Path) -> list[str]:
        return sorted(entry.name for entry in folder.iterdir()) if folder.is_dir() else []

    def is_subvolume_root(self, path: Path) -> bool:
        return is_subvolume_root(path)

    def make_quiet_dir(self, folder: Path) -> None:
        parent = os.stat(folder.parent)
        folder.mkdir(mode=0o700)
        os.utime(folder.parent, ns=(parent.st_atime_ns, parent.st_mtime_ns))

    def make_dir(self, folder: Path) -> None:
        folder.mkdir(mode=0o700)

    def remove_dir(self, folder: Path) -> None:
        shutil.rmtree(folder, ignore_errors=True)

    def rename(self, source: Path, destination: Path) -> None:
        if destination.exists() or destination.is_symlink():
            raise FileExistsError(17, "File exists", str(destination))
        source.rename(destination)

    def remove_leftover(self, path: Path) -> None:
        raise NotImplementedError("local leftovers: actions/reconcile.py remove_leftover")


class RemoteHost:
    """A job's remote host, through its SSH runner."""

    def __init__(self, name: str, runner: Runner) -> None:
        self.name = name
        self.runner = runner

    def _run(self, argv: tuple[str, ...], mutating: bool = False) -> tuple[int, str, str]:
        done = self.runner.run(Command(argv, mutating=mutating), check=False)
        return done.returncode, done.stdout, done.stderr

    def _must(self, argv: tuple[str, ...], mutating: bool = False) -> str:
        code, out, err = self._run(argv, mutating)
        if code != 0:
            raise GfsError(f"host {self.name}: {argv[0]} failed: {' '.join(err.split())[-300:]}")
        return out

    def exists(self, path: Path) -> bool:
        return self._run(("test", "-e", str(path)))[0] == 0

    def is_dir(self, path: Path) -> bool:
        return self._run(("test", "-d", str(path)))[0] == 0

    def names(self, folder: Path) -> list[str]:
        if not self.is_dir(folder):
            return []
        out = self._must(
            ("find", str(folder), "-mindepth", "1", "-maxdepth", "1", "-printf", "%f\\0")
        )
        return sorted(name for name in out.split("\0") if name)

    def is_subvolume_root(self, path: Path) -> bool:
        code, out, _err = self._run(("stat", "-f", "-c", "%T", "--", str(path)))
        if code != 0 or out.strip() != "btrfs":
            return False
        code, out, _err = self._run(("stat", "-c", "%i", "--", str(path)))
        return code == 0 and out.strip() == str(SUBVOLUME_ROOT_INODE)

    def make_quiet_dir(self, folder: Path) -> None:
        self._must(("python3", "-c", QUIET_MKDIR, str(folder)), mutating=True)

    def make_dir(self, folder: Path) -> None:
        self._must(("mkdir", "-m", "700", "--", str(folder)), mutating=True)

    def remove_dir(self, folder: Path) -> None:
        self._run(("rmdir", "--", str(folder)), mutating=True)

    def rename(self, source: Path, destination: Path) -> None:
        if self.exists(destination):
            raise FileExistsError(17, "File exists", str(destination))
        self._must(("mv", "-T", "--no-clobber", "--", str(source), str(destination)), True)

    def remove_leftover(self, path: Path) -> None:
        if not path.name.startswith(".") or not path.is_absolute() or ".." in path.parts:
            raise GfsError(f"internal: refusing to remove {path} on host {self.name}")
        self._must(("sh", "-c", REMOVE_LEFTOVER, "sh", str(path)), mutating=True)


# What of a remote job runs on its host rather than here: restores (into a path on that
# host) and drills (restored and checked there); a drill of a VM or volume streams the
# remote target's data here and boots or checks it here.
RESTORED_ON_HOST = ("btrfs", "files", "libvirt")
DRILLED_ON_HOST = ("files",)


def runs_on_host(job: Job, action: str) -> bool:
    """Whether `action` ("restore" or "drill") of `job` runs on the job's remote host."""
    if job.host == LOCAL_HOST:
        return False
    return job.kind in (RESTORED_ON_HOST if action == "restore" else DRILLED_ON_HOST)


def source_host(ctx: JobContext) -> SourceHost:
    """Where the context's runner works: the job's remote host through its SSH runner,
    else this machine (also for a remote job's drill, which restores here)."""
    if ctx.job.host == LOCAL_HOST or isinstance(ctx.runner, LocalRunner):
        return LocalHost()
    return RemoteHost(ctx.job.host, ctx.runner)

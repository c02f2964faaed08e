"""File operations on a target, here (`LocalFS`) or on the host that mounts it (`RemoteFS`).

The catalog, the generation lifecycle and manifests use only this small interface, so a
target that only a remote host mounts (`[target.X] host = "kvm2"`) works like a local one.
`RemoteFS` runs coreutils commands through the host's runner, argv lists only (scripts are
constants that take their paths as positional parameters), each bounded by the target's
`io_timeout`: a hard NFS mount whose server stopped answering fails the operation with
TargetIOError instead of hanging gfs.
"""

from __future__ import annotations

import errno
import grp
import hashlib
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO, Protocol, cast

from gfs_backup.copying.copy import Progress, copy_stream, digest_file
from gfs_backup.copying.digest import ALGORITHM
from gfs_backup.copying.hostcopy import CopyOutput, make_file_digest_command
from gfs_backup.copying.hostimage import ScriptOutput, make_digest_command
from gfs_backup.core.errors import ExitCode, GfsError
from gfs_backup.tools.mounts import Mount, parse_mountinfo, read_mounts
from gfs_backup.transport.runner import Command, CommandError, Runner

WHOLE_FILE_SHA256 = "sha256"  # whole-file sha256, as `sha256sum` computes it
DEFAULT_IO_TIMEOUT = 600.0
STREAM_TIMEOUT = 24 * 3600.0


class TargetIOError(GfsError):
    """A target operation failed or the target stopped answering (NFS server down?)."""

    exit_code = ExitCode.FAILED


class TargetStalled(TargetIOError):
    """The target stopped answering within its io_timeout: more I/O there would hang too."""


@dataclass(frozen=True)
class Entry:
    """A directory entry: `kind` is "d" (directory), "f" (file) or "l" (symlink)."""

    name: str
    kind: str


@dataclass(frozen=True)
class FileDigest:
    size: int
    digest: str


class TargetFS(Protocol):
    """The operations gfs needs on a target's filesystem; paths as the target's host sees them."""

    host: str  # "local" or the [hosts.NAME] that mounts the target
    io_timeout: float  # seconds an operation (or an export without progress) may take

    def is_dir(self, path: Path) -> bool: ...

    def exists(self, path: Path) -> bool: ...

    def entries(self, path: Path) -> list[Entry]:
        """The entries of a directory, sorted by name; [] when it does not exist."""
        ...

    def read_text(self, path: Path) -> str:
        """A small file's text; FileNotFoundError when missing, OSError when unreadable."""
        ...

    def write_file(self, path: Path, data: bytes) -> None:
        """Write durably: a temporary name, fsynced, renamed over `path`, directory synced."""
        ...

    def make_dir(self, path: Path, mode: int) -> None:
        """Create `path` (its parents if needed); an error if it exists."""
        ...

    def chmod(self, path: Path, mode: int) -> None: ...

    def share_with_group(self, path: Path, group: str) -> None:
        """Give the tree `path` to `group`, readable by it (g+r files, g+rx directories)."""
        ...

    def rename(self, source: Path, destination: Path) -> None:
        """Rename within one directory tree and sync the destination's directory."""
        ...

    def remove_tree(self, path: Path) -> None:
        """Remove a tree (read-only bits included); a missing path is fine."""
        ...

    def mounts(self) -> list[Mount]:
        """The mount table of the target's host."""
        ...

    def realpath(self, path: Path) -> str: ...

    def file_digest(self, path: Path, algorithm: str) -> FileDigest:
        """Size and checksum of a file (FileNotFoundError when missing)."""
        ...

    def open_read(self, path: Path) -> AbstractContextManager[IO[bytes]]:
        """A file's bytes as a stream (a restore reads the image through it)."""
        ...


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_tree(path: Path) -> None:
    """Remove a directory tree here (read-only bits included); a missing path is fine."""
    if not path.exists() and not path.is_symlink():
        return

    def make_writable(function: object, name: str, _exc: object) -> None:
        os.chmod(os.path.dirname(name), 0o700)
        if os.path.isdir(name) and not os.path.islink(name):
            shutil.rmtree(name)
        else:
            os.unlink(name)

    shutil.rmtree(path, onerror=make_writable)


def sha256_file(path: Path) -> FileDigest:
    """Whole-file sha256 of a file here."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as reader:
        while block := reader.read(1 << 20):
            digest.update(block)
            size += len(block)
    return FileDigest(size, digest.hexdigest())


class LocalFS:
    """The target is mounted on the machine gfs runs on."""

    host = "local"
    io_timeout = DEFAULT_IO_TIMEOUT  # not enforced here: local I/O is the kernel's

    def is_dir(self, path: Path) -> bool:
        return path.is_dir()

    def exists(self, path: Path) -> bool:
        return path.exists()

    def entries(self, path: Path) -> list[Entry]:
        if not path.is_dir():
            return []
        found = []
        for entry in sorted(path.iterdir()):
            kind = "l" if entry.is_symlink() else "d" if entry.is_dir() else "f"
            found.append(Entry(entry.name, kind))
        return found

    def read_text(self, path: Path) -> str:
        return path.read_text(encoding="utf-8")

    def write_file(self, path: Path, data: bytes) -> None:
        temporary = path.parent / f".{path.name}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temporary, path)
        fsync_dir(path.parent)

    def make_dir(self, path: Path, mode: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir(mode=mode)

    def chmod(self, path: Path, mode: int) -> None:
        os.chmod(path, mode)

    def share_with_group(self, path: Path, group: str) -> None:
        gid = grp.getgrnam(group).gr_gid
        for directory, _dirs, files in os.walk(path):
            for name, bits in [(directory, 0o050), *((f"{directory}/{f}", 0o040) for f in files)]:
                os.chown(name, -1, gid, follow_symlinks=False)
                os.chmod(name, stat.S_IMODE(os.lstat(name).st_mode) | bits)

    def rename(self, source: Path, destination: Path) -> None:
        os.rename(source, destination)
        fsync_dir(destination.parent)

    def remove_tree(self, path: Path) -> None:
        remove_tree(path)

    def mounts(self) -> list[Mount]:
        return read_mounts()

    def realpath(self, path: Path) -> str:
        return os.path.realpath(path)

    def file_digest(self, path: Path, algorithm: str) -> FileDigest:
        if algorithm == WHOLE_FILE_SHA256:
            return sha256_file(path)
        if algorithm != ALGORITHM:
            raise TargetIOError(f"{path}: unknown checksum algorithm {algorithm!r}")
        result = digest_file(path)
        return FileDigest(result.size, result.digest)

    def open_read(self, path: Path) -> AbstractContextManager[IO[bytes]]:
        return path.open("rb")


LOCAL_FS = LocalFS()

# Constant scripts: their input comes only as positional parameters ("$1", ...).
LIST_SCRIPT = (
    "cd -- \"$1\" 2>/dev/null || exit 0; find . -mindepth 1 -maxdepth 1 -printf '%y %P\\0'"
)
WRITE_SCRIPT = 'cat >"$1" && sync -- "$1" && mv -f -- "$1" "$2" && sync -- "$3"'
RENAME_SCRIPT = 'mv -T -- "$1" "$2" && sync -- "$3"'


def _sh(script: str, *args: str) -> tuple[str, ...]:
    return ("sh", "-c", script, "sh", *args)


class RemoteFS:
    """The target is mounted on a remote host; every operation is a command run there."""

    def __init__(self, runner: Runner, target: str, root: Path, io_timeout: float) -> None:
        self.runner = runner
        self.host = runner.host
        self.target = target
        self.root = root
        self.io_timeout = io_timeout

    def _where(self, path: Path) -> str:
        return f"target {self.target} ({path} on host {self.host})"

    def _run(self, argv: tuple[str, ...], path: Path, mutating: bool = False) -> str:
        """Run, return stdout; TargetIOError on a timeout (the target stopped answering)."""
        command = Command(argv, mutating=mutating, timeout=self.io_timeout)
        try:
            done = self.runner.run(command, check=False)
        except CommandError as exc:
            raise self.failure(path, str(exc)) from None
        if done.returncode != 0:
            if "No such file or directory" in done.stderr:
                raise FileNotFoundError(2, "No such file or directory", str(path))
            message = " ".join(done.stderr.split())[-300:]
            raise TargetIOError(
                f"{self._where(path)}: {argv[0]} failed (exit status {done.returncode}): {message}"
            )
        return done.stdout

    def failure(self, path: Path, detail: str) -> TargetIOError:
        """The error for an operation that did not finish in time or lost its connection."""
        if "timed out" in detail:
            return TargetStalled(
                f"{self._where(path)} stopped answering: no result within "
                f"{self.io_timeout:.0f} s (io_timeout; NFS server down or unreachable?); "
                "nothing was published, the next run cleans up"
            )
        return TargetIOError(f"{self._where(path)}: {detail}")

    def _test(self, flag: str, path: Path) -> bool:
        command = Command(("test", flag, str(path)), timeout=self.io_timeout)
        try:
            done = self.runner.run(command, check=False)
        except CommandError as exc:
            raise self.failure(path, str(exc)) from None
        return done.returncode == 0

    def is_dir(self, path: Path) -> bool:
        return self._test("-d", path)

    def exists(self, path: Path) -> bool:
        return self._test("-e", path)

    def entries(self, path: Path) -> list[Entry]:
        return parse_find_entries(self._run(_sh(LIST_SCRIPT, str(path)), path))

    def read_text(self, path: Path) -> str:
        return self._run(("cat", "--", str(path)), path)

    def write_file(self, path: Path, data: bytes) -> None:
        self._inside(path)
        temporary = path.parent / f".{path.name}.tmp"
        command = Command(
            _sh(WRITE_SCRIPT, str(temporary), str(path), str(path.parent)),
            mutating=True,
            timeout=self.io_timeout,
        )
        try:
            with self.runner.writing(command) as stream:
                stream.write(data)
        except CommandError as exc:
            raise self.failure(path, str(exc)) from None

    def make_dir(self, path: Path, mode: int) -> None:
        self._inside(path)
        self._run(("mkdir", "-p", "--", str(path.parent)), path, mutating=True)
        self._run(("mkdir", "-m", f"{mode:o}", "--", str(path)), path, mutating=True)

    def chmod(self, path: Path, mode: int) -> None:
        self._inside(path)
        self._run(("chmod", f"{mode:o}", "--", str(path)), path, mutating=True)

    def share_with_group(self, path: Path, group: str) -> None:
        self._inside(path)
        self._run(("chgrp", "-R", "--", group, str(path)), path, mutating=True)
        self._run(("chmod", "-R", "g+rX", "--", str(path)), path, mutating=True)

    def rename(self, source: Path, destination: Path) -> None:
        self._inside(source)
        self._inside(destination)
        argv = _sh(RENAME_SCRIPT, str(source), str(destination), str(destination.parent))
        self._run(argv, source, mutating=True)

    def remove_tree(self, path: Path) -> None:
        self._inside(path)
        self._run(("rm", "-rf", "--", str(path)), path, mutating=True)

    def mounts(self) -> list[Mount]:
        text = self._run(("cat", "/proc/self/mountinfo"), Path("/proc/self/mountinfo"))
        try:
            return parse_mountinfo(text)
        except ValueError as exc:
            raise TargetIOError(f"host {self.host}: /proc/self/mountinfo: {exc}") from None

    def realpath(self, path: Path) -> str:
        return self._run(("realpath", "-m", "--", str(path)), path).rstrip("\n")

    def file_digest(self, path: Path, algorithm: str) -> FileDigest:
        if algorithm not in (WHOLE_FILE_SHA256, ALGORITHM):
            raise TargetIOError(
                f"{self._where(path)}: checksums of kind {algorithm!r} cannot be computed on "
                f"the remote host (only {WHOLE_FILE_SHA256!r} and {ALGORITHM!r})"
            )
        if not self.exists(path):
            raise FileNotFoundError(2, "No such file or directory", str(path))
        if algorithm == ALGORITHM:
            return self._block_digest(path)
        command = make_file_digest_command(str(path), STREAM_TIMEOUT, self.io_timeout)
        output = CopyOutput()
        self._follow(command, output.feed, path, lambda: "; ".join(output.failures()[-3:]))
        result = output.result()
        if result is None or output.failures():
            why = "; ".join(output.failures()[-3:]) or "no checksum in the output"
            raise OSError(errno.EIO, why, str(path))  # verify reports it as unreadable
        return FileDigest(result.size, result.digest)

    def _follow(
        self, command: Command, feed: Callable[[bytes], int], path: Path, why: Callable[[], str]
    ) -> None:
        """Run a checksum command on the host, its output fed as it comes; a stalled or
        failed command is an OSError naming `path` (`why`: what its output said)."""
        try:
            with self.runner.reading(command) as stream:
                while chunk := stream.read(1 << 12):
                    feed(chunk)
        except CommandError as exc:
            if "idle timeout" in str(exc) or "timed out" in str(exc):
                raise self.failure(path, "timed out") from None
            reason = why() or " ".join(str(exc).split())[-300:]
            raise OSError(errno.EIO, reason, str(path)) from None

    def _block_digest(self, path: Path) -> FileDigest:
        """sha256-1m computed on the host (python3 there: copying/hostimage.py)."""
        command = make_digest_command(str(path), STREAM_TIMEOUT, self.io_timeout)
        output = ScriptOutput()
        self._follow(command, output.feed, path, lambda: "")
        found = (output.result() or "").split()
        if len(found) != 2 or not found[0].isdigit():
            raise OSError(errno.EIO, "no checksum in the output", str(path))
        return FileDigest(int(found[0]), found[1])

    @contextmanager
    def open_read(self, path: Path) -> Iterator[IO[bytes]]:
        command = Command(
            ("cat", "--", str(path)), timeout=STREAM_TIMEOUT, idle_timeout=self.io_timeout
        )
        with self.runner.reading(command) as stream:
            yield stream

    def _inside(self, path: Path) -> None:
        """Mutations only below the target's root, never the root or a job directory's
        parent itself: a bug elsewhere must not turn into `rm -rf /`."""
        if path.is_absolute() and self.root in path.parents and ".." not in path.parts:
            return
        raise TargetIOError(f"internal: {path} is not inside target {self.target} ({self.root})")


def parse_find_entries(text: str) -> list[Entry]:
    """`find -printf '%y %P\\0'` output: NUL-terminated "TYPE NAME" records, sorted."""
    found = []
    for record in text.split("\0"):
        if not record:
            continue
        kind, _, name = record.partition(" ")
        if name and "/" not in name:
            found.append(Entry(name, kind if kind in ("d", "l") else "f"))
    return sorted(found, key=lambda entry: entry.name)


def fetch_file(
    fs: TargetFS, path: Path, algorithm: str, to: Path, progress: Progress | None = None
) -> FileDigest:
    """A file of a target (here or on the host that mounts it), streamed to the new file
    `to` here (sparse, fsynced): its size and checksum by `algorithm`, of what was written."""
    with fs.open_read(path) as stream:
        result = copy_stream(cast(BinaryIO, stream), to, progress)
    if algorithm == WHOLE_FILE_SHA256:
        return sha256_file(to)
    return FileDigest(result.size, result.digest)

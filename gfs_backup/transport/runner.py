"""The one place that runs external commands (argv lists only, never a shell).

Commands that change something are marked `mutating`; in dry-run the runner does not run
them, it logs what it would run. Failures become typed errors with the command, exit status
and the end of its stderr.
"""

from __future__ import annotations

import ctypes
import logging
import shlex
import signal
import subprocess
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from gfs_backup.core.errors import ExitCode, GfsError

log = logging.getLogger("gfs.runner")
DEFAULT_TIMEOUT = 600.0
STDERR_TAIL = 400
SHOWN_ARGUMENT = 300


@dataclass(frozen=True)
class Command:
    """An argv list and what it does; `timeout` in seconds (None = no limit).

    `idle_timeout`: a stream read from a remote host (SSHRunner.reading) that brings no
    data for this many seconds fails, even while the host itself still answers (a command
    stuck on a hard NFS mount).
    """

    argv: tuple[str, ...]
    mutating: bool = False
    timeout: float | None = DEFAULT_TIMEOUT
    idle_timeout: float | None = None

    def __str__(self) -> str:
        """The command line as a human reads it in logs and errors: an argument longer than
        SHOWN_ARGUMENT (a host script, its encoded request) is shown as its size."""
        return shlex.join(
            arg if len(arg) <= SHOWN_ARGUMENT else f"<{len(arg)} characters>" for arg in self.argv
        )


@dataclass(frozen=True)
class Completed:
    command: Command
    returncode: int
    stdout: str
    stderr: str


class CommandError(GfsError):
    """A command failed, timed out or could not be started."""

    exit_code = ExitCode.FAILED

    def __init__(self, command: Command, message: str) -> None:
        self.command = command
        super().__init__(f"{command.argv[0]}: {message} (command: {command})")


class Runner(Protocol):
    """Runs commands on one host (LocalRunner here, SSHRunner in ssh.py) with one contract."""

    host: str
    dry_run: bool

    def run(self, command: Command, check: bool = True) -> Completed: ...

    def reading(self, command: Command) -> AbstractContextManager[IO[bytes]]: ...

    def writing(self, command: Command) -> AbstractContextManager[IO[bytes]]: ...


def _tail(data: bytes | str | None) -> str:
    text = data.decode(errors="replace") if isinstance(data, bytes) else (data or "")
    text = " ".join(text.split())
    return text[-STDERR_TAIL:]


def skipped_in_dry_run(dry_run: bool, command: Command) -> bool:
    """True (and logged) when `command` mutates and the runner is in dry-run."""
    if dry_run and command.mutating:
        log.info("dry-run: would run %s", command)
        return True
    return False


def refuse_streaming_in_dry_run(dry_run: bool, command: Command) -> None:
    """Streams feed real data: a mutating one in dry-run is a bug in the caller."""
    if dry_run and command.mutating:
        raise GfsError(f"internal: streaming {command} in dry-run")


def timed_out(command: Command, where: str = "") -> CommandError:
    """The error for a command stopped at its timeout; `where` prefixes the message."""
    return CommandError(command, f"{where}timed out after {command.timeout:.0f} s")


def check_exit_status(
    command: Command, returncode: int, stderr: bytes | str | None, where: str = ""
) -> None:
    """Raise CommandError with the end of stderr unless `returncode` is 0."""
    if returncode != 0:
        raise CommandError(command, f"{where}exit status {returncode}: {_tail(stderr)}")


class LocalRunner:
    """Runs commands on this host with subprocess."""

    host = "local"

    def __init__(self, dry_run: bool = False) -> None:
        self.dry_run = dry_run

    def run(self, command: Command, check: bool = True) -> Completed:
        """Run to completion and capture output; raise CommandError if it fails and `check`."""
        if skipped_in_dry_run(self.dry_run, command):
            return Completed(command, 0, "", "")
        log.debug("running %s", command)
        try:
            done = subprocess.run(
                command.argv,
                capture_output=True,
                text=True,
                timeout=command.timeout,
                stdin=subprocess.DEVNULL,
                check=False,
            )
        except FileNotFoundError:
            raise CommandError(command, "not installed (command not found)") from None
        except subprocess.TimeoutExpired:
            raise timed_out(command) from None
        if check:
            check_exit_status(command, done.returncode, done.stderr)
        return Completed(command, done.returncode, done.stdout, done.stderr)

    def spawn(
        self, command: Command, output: Path, env: dict[str, str], cwd: Path
    ) -> subprocess.Popen[bytes]:
        """Start `command` in the background in `cwd` (e.g. a drill's QEMU), stdout and
        stderr to the file `output`. The caller ends it by its PID; if gfs dies first, the
        kernel kills it (PR_SET_PDEATHSIG), so it never outlives gfs."""
        if self.dry_run and command.mutating:
            raise GfsError(f"internal: starting {command} in dry-run")
        log.debug("starting %s", command)
        with output.open("wb") as sink:
            try:
                return subprocess.Popen(
                    command.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=cwd,
                    preexec_fn=_die_with_parent,
                )
            except FileNotFoundError:
                raise CommandError(command, "not installed (command not found)") from None

    @contextmanager
    def reading(self, command: Command) -> Iterator[IO[bytes]]:
        """Run `command` and yield its stdout as a binary stream (e.g. `btrfs send`)."""
        with self._streaming(command, stdout=True) as (process, stream):
            yield stream
        del process

    @contextmanager
    def writing(self, command: Command) -> Iterator[IO[bytes]]:
        """Run `command` and yield its stdin as a binary stream (e.g. `btrfs receive`)."""
        with self._streaming(command, stdout=False) as (process, stream):
            yield stream
        del process

    @contextmanager
    def _streaming(
        self,
        command: Command,
        stdout: bool,
    ) -> Iterator[tuple[subprocess.Popen[bytes], IO[bytes]]]:
        refuse_streaming_in_dry_run(self.dry_run, command)
        log.debug("streaming %s", command)
        try:
            process = subprocess.Popen(
                command.argv,
                stdin=subprocess.DEVNULL if stdout else subprocess.PIPE,
                stdout=subprocess.PIPE if stdout else subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        except FileNotFoundError:
            raise CommandError(command, "not installed (command not found)") from None
        stream = process.stdout if stdout else process.stdin
        assert stream is not None
        try:
            yield process, stream
        except BaseException:
            process.kill()
            process.wait()
            raise
        finally:
            if not stream.closed:
                stream.close()
            # communicate() must not touch the stream we closed.
            if stdout:
                process.stdout = None
            else:
                process.stdin = None
        try:
            _, err = process.communicate(timeout=command.timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise timed_out(command) from None
        check_exit_status(command, process.returncode, err)


PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the process that started it dies."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

"""One run of a job at a time: an flock on state_dir/locks/JOB.lock."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gfs_backup.core.errors import ExitCode, GfsError


class LockHeld(GfsError):
    exit_code = ExitCode.LOCKED


@contextmanager
def job_lock(state_dir: Path, job: str, wait: bool) -> Iterator[None]:
    """Hold the job's lock; wait for it or raise LockHeld. Released when the process dies."""
    folder = state_dir / "locks"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(folder / f"{job}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise LockHeld(
                f"job {job}: another gfs run holds its lock "
                f"({folder / (job + '.lock')}); use --wait to wait for it"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)

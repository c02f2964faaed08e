"""Terminal progress (bytes, rate, ETA) and the stderr log for timers and journald."""

from __future__ import annotations

import logging
import os
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path

import click

from gfs_backup.ops.journal import JournalHandler, journal_available

_active: list[TerminalProgress] = []  # the bar on screen, ended before a log line


class _LineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """stderr log lines that never run into a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        for bar in _active:
            bar.finish()
        super().emit(record)


def setup_logging(debug: bool) -> None:
    """One line per step on stderr (no timestamps: journald adds them); when stderr is
    the journal (systemd sets JOURNAL_STREAM to its device:inode), journald's native
    protocol instead, with SYSLOG_IDENTIFIER=gfs and GFS_JOB=<job> on a job's lines."""
    handler: logging.Handler
    if _stderr_is_journal() and journal_available():
        handler = JournalHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = _LineHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("gfs: %(message)s"))
    root = logging.getLogger("gfs")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    root.propagate = False


def _stderr_is_journal() -> bool:
    """systemd's documented test: JOURNAL_STREAM holds stderr's device:inode."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        found = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{found.st_dev}:{found.st_ino}"


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{count:.0f} B"
        count /= 1024
    return f"{count:.1f} TiB"


class TerminalProgress:
    """A progress line on a terminal, redrawn at most 4 times a second."""

    def __init__(self, label: str, total: int | None = None) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.started = time.monotonic()
        self._drawn = 0.0

    def __call__(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if now - self._drawn >= 0.25:
            self._drawn = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self.started, 1e-6)
        rate = self.done / elapsed
        line = f"{self.label}: {_size(self.done)} at {_size(rate)}/s"
        if self.total and rate > 0:
            left = max(self.total - self.done, 0) / rate
            line += (
                f", {100 * self.done / self.total:.0f}%, ETA {int(left) // 60}:{int(left) % 60:02d}"
            )
        click.echo(f"\r{line}\033[K", nl=False, err=True)

    def finish(self) -> None:
        """End the bar's line (it is drawn anew on the next update)."""
        if self._drawn:
            click.echo("", err=True)
            self._drawn = 0.0


def progress_for(
    label: str,
    total: Callable[[], int | None] | None = None,
) -> TerminalProgress | None:
    """A progress bar when stderr is a terminal, else None (logs only).

    `total` estimates the bytes to come (for the ETA); it is called only on a terminal.
    """
    if not sys.stderr.isatty():
        return None
    bar = TerminalProgress(label, total() if total is not None else None)
    _active[:] = [bar]
    return bar


def allocated_bytes(roots: list[Path]) -> int:
    """Bytes allocated by the regular files below `roots` (holes excluded): an estimate of
    what an export reads, for the ETA."""
    total = 0
    for root in roots:
        device = root.stat().st_dev
        for folder, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if os.lstat(os.path.join(folder, d)).st_dev == device]
            for name in files:
                info = os.lstat(os.path.join(folder, name))
                if stat.S_ISREG(info.st_mode):
                    total += info.st_blocks * 512
    return total

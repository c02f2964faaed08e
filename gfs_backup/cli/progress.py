"""Terminal progress (bytes, rate, ETA) and the stderr log for timers and journald."""

from __future__ import annotations

import logging
import sys
import time

import click


def setup_logging(debug: bool) -> None:
    """One line per step on stderr, journald-friendly (no timestamps: journald adds them)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("gfs: %(message)s"))
    root = logging.getLogger("gfs")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    root.propagate = False


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
        if self._drawn:
            click.echo("", err=True)


def progress_for(label: str, total: int | None = None) -> TerminalProgress | None:
    """A progress bar when stderr is a terminal, else None (logs only)."""
    return TerminalProgress(label, total) if sys.stderr.isatty() else None

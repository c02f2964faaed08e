"""Helpers every lab benchmark uses: run a command, evict a file from the page cache,
allocated bytes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def sh(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def evict(path: Path) -> None:
    """Drops `path` from the page cache (only this file: other work on the host keeps its)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512

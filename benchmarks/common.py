"""Helpers every lab benchmark uses: run a command, evict a file from the page cache,
allocated bytes, and the teardown of a libvirt lab benchmark."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import libvirt

    from tests.lab.daemons import LibvirtDaemons
    from tests.lab.domains import DomainFactory


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


def run_quietly(argv: tuple[str, ...]) -> None:
    subprocess.run(argv, capture_output=True, check=False)


def lab_teardown(
    factory: DomainFactory | None,
    conn: libvirt.virConnect | None,
    cleanups: Sequence[tuple[str, ...]],
    daemons: LibvirtDaemons | None,
    workdir: Path,
    undo: Callable[[tuple[str, ...]], None] = run_quietly,
) -> None:
    """What a libvirt lab benchmark made, removed: its domains, its connection, then each
    of `cleanups` (umount, losetup -d: run by `undo`) newest first, the lab daemons it
    started, and its work directory."""
    if factory is not None:
        factory.cleanup()
    if conn is not None:
        conn.close()
    for argv in reversed(cleanups):
        undo(argv)
    if daemons is not None:
        daemons.stop()
    shutil.rmtree(workdir, ignore_errors=True)

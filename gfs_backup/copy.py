"""Copying data to a target with its checksum computed in the same pass.

Holes in the source are skipped (SEEK_DATA/SEEK_HOLE) and all-zero blocks are written as
holes, so sparse data stays sparse and costs time in proportion to its real data. Every
copy is fsynced before it returns. Errors (ENOSPC, EIO) propagate as OSError; the caller
removes the partial output.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from gfs_backup.digest import BLOCK, ZERO_BLOCK, BlockDigest

Progress = Callable[[int], None]  # called with the number of bytes just processed
CHUNK = 4 * BLOCK


@dataclass(frozen=True)
class CopyResult:
    """`size`: logical bytes; `data_bytes`: bytes read (holes excluded); `digest`: sha256-1m."""

    size: int
    data_bytes: int
    digest: str


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) of the data regions of an open file; the whole file if unsupported."""
    extents: list[tuple[int, int]] = []
    offset = 0
    try:
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole remains
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            extents.append((start, min(end, size) - start))
            offset = end
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return [(0, size)] if size else []
        raise
    return extents


def copy_file(source: Path, destination: Path, progress: Progress | None = None) -> CopyResult:
    """Copy a regular file to a new file `destination` (must not exist), sparse, fsynced."""
    with source.open("rb") as reader:
        size = os.fstat(reader.fileno()).st_size
        extents = data_extents(reader.fileno(), size)
        with _create(destination) as writer:
            digest, data = _copy_extents(reader, writer, extents, size, progress)
            writer.truncate(size)
            _sync(writer)
    return CopyResult(size, data, digest.hexdigest())


def copy_stream(reader: BinaryIO, destination: Path,
                progress: Progress | None = None) -> CopyResult:
    """Copy a non-seekable stream (e.g. `btrfs send` output) to a new file, fsynced."""
    digest = BlockDigest()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    position = 0
    with _create(destination) as writer:
        while True:
            count = _read_full(reader, view)
            if count == 0:
                break
            digest.update(view[:count])
            _write_sparse(writer, view[:count], position)
            position += count
            if progress is not None:
                progress(count)
        writer.truncate(position)
        _sync(writer)
    return CopyResult(position, position, digest.hexdigest())


def digest_file(path: Path, progress: Progress | None = None) -> CopyResult:
    """Checksum a file as `copy_file` would, reading only its data regions."""
    with path.open("rb") as reader:
        size = os.fstat(reader.fileno()).st_size
        extents = data_extents(reader.fileno(), size)
        digest, data = _copy_extents(reader, None, extents, size, progress)
    return CopyResult(size, data, digest.hexdigest())


def _copy_extents(reader: BinaryIO, writer: BinaryIO | None, extents: list[tuple[int, int]],
                  size: int, progress: Progress | None) -> tuple[BlockDigest, int]:
    digest = BlockDigest()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    position = 0
    data = 0
    for start, length in extents:
        if start > position:
            digest.update_zeros(start - position)
        reader.seek(start)
        remaining = length
        offset = start
        while remaining:
            count = reader.readinto(view[: min(CHUNK, remaining)])
            if not count:
                raise OSError(errno.EIO, f"file shrank while being read at offset {offset}")
            digest.update(view[:count])
            if writer is not None:
                _write_sparse(writer, view[:count], offset)
            offset += count
            remaining -= count
            data += count
            if progress is not None:
                progress(count)
        position = start + length
    if size > position:
        digest.update_zeros(size - position)
    return digest, data


def _write_sparse(writer: BinaryIO, chunk: memoryview, offset: int) -> None:
    """Write `chunk` at `offset`, leaving all-zero whole blocks as holes."""
    for start in range(0, len(chunk), BLOCK):
        block = chunk[start : start + BLOCK]
        if len(block) == BLOCK and block == ZERO_BLOCK:
            continue
        writer.seek(offset + start)
        writer.write(block)


def _read_full(reader: BinaryIO, view: memoryview) -> int:
    filled = 0
    while filled < len(view):
        chunk = reader.read(len(view) - filled)
        if not chunk:
            break
        view[filled : filled + len(chunk)] = chunk
        filled += len(chunk)
    return filled


def _create(path: Path) -> BinaryIO:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    return os.fdopen(fd, "wb")


def _sync(writer: BinaryIO) -> None:
    writer.flush()
    os.fsync(writer.fileno())

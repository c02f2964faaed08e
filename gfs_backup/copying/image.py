"""Disk images as sparse raw files with a digest per MiB, written whole or patched.

A VM disk generation is a sparse raw file (`disks/<target>.raw`) plus the sha256 of each of
its 1 MiB blocks (`blocks/<target>.sha256-1m`, 32 bytes per block, in order). The image's
checksum is `sha256-1m` (copying/digest.py): sha256 over exactly that list, so it covers the
guest-visible content and any tool can recompute it from the image alone.

`write_image` reads the blocks a plan names from a source (an NBD export of the disk) and
writes them into the image, hashing in the same pass and reading every written block back
from the target's storage while the copy goes on (copy.py's read-back). A full capture
writes a new file; an incremental one first clones the previous generation's image
(`clone_file`: FICLONE, else copy_file_range, else a plain copy) and then writes only the
changed blocks, punching the ones that became zero, so the result is again one complete,
standalone image. The digests of the blocks not read are the previous generation's.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import random
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from gfs_backup.copying.copy import (
    ALIGN,
    CHUNK,
    Progress,
    ReadAhead,
    Writer,
    copy_file,
    data_extents,
    hash_blocks,
    new_buffer,
    write_in_background,
    zero_block_digests,
)
from gfs_backup.copying.digest import BLOCK, BlockDigest, block_digests_of

DIGEST_SIZE = 32
FICLONE = 0x40049409  # _IOW(0x94, 9, int), linux/fs.h
FS_IOC_FIEMAP = 0xC020660B
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_SHARED = 0x2000
SAMPLE_FRACTION = 0.01  # unchanged blocks re-read by an incremental: at least 1% ...
SAMPLE_MIN_BLOCKS = 64  # ... and at least 64 MiB (all of them when there are fewer)
SAMPLE_BATCH = 8  # sampled blocks read, then hashed at once


class BlockSource(Protocol):
    """Where a disk's content is read from (an NBD export): its size and `read_into`."""

    size: int

    def read_into(self, buffer: memoryview, offset: int) -> None:
        """Fill `buffer` with the bytes at `offset` (OSError on failure)."""
        ...


@dataclass(frozen=True)
class Span:
    """Blocks [start, end) (byte offsets, whole blocks except at the disk's end) the image
    must take from the source; `zero`: known to read as zeros (not read, punched)."""

    start: int
    end: int
    zero: bool = False


@dataclass
class ImageResult:
    size: int
    digest: str  # sha256-1m of the image's content
    digests: list[bytes]  # per block
    bytes_read: int  # from the source
    bytes_written: int  # non-zero data written to the image
    zeroed: int  # bytes punched (or written as zeros) in a cloned image


def block_count(size: int) -> int:
    return -(-size // BLOCK)


def digest_of(digests: Sequence[bytes]) -> str:
    """The `sha256-1m` of content whose block digests are `digests`."""
    outer = hashlib.sha256()
    for start in range(0, len(digests), 4096):
        outer.update(b"".join(digests[start : start + 4096]))
    return outer.hexdigest()


def write_digests(path: Path, digests: Sequence[bytes]) -> None:
    """The per-block digests, fsynced; a new file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        data = b"".join(digests)
        done = 0
        while done < len(data):
            done += os.write(fd, data[done:])
        os.fsync(fd)
    finally:
        os.close(fd)


def read_digests(path: Path, size: int) -> list[bytes]:
    """The per-block digests stored for an image of `size` bytes. OSError (EINVAL) when the
    file does not hold one digest per block."""
    data = path.read_bytes()
    if len(data) != block_count(size) * DIGEST_SIZE:
        raise OSError(errno.EINVAL, f"{path}: {len(data)} bytes, not one digest per MiB")
    return [data[i : i + DIGEST_SIZE] for i in range(0, len(data), DIGEST_SIZE)]


def spans_of(extents: Sequence[tuple[int, int]], size: int) -> list[Span]:
    """(offset, length) extents widened to whole blocks and merged, as Spans."""
    spans: list[Span] = []
    for offset, length in sorted(extents):
        if length <= 0:
            continue
        first = offset - offset % BLOCK
        last = min(size, -(-(offset + length) // BLOCK) * BLOCK)
        if spans and first <= spans[-1].end:
            spans[-1] = Span(spans[-1].start, max(last, spans[-1].end))
        elif first < last:
            spans.append(Span(first, last))
    return spans


def split_zero(spans: Sequence[Span], zero_extents: Sequence[tuple[int, int]]) -> list[Span]:
    """`spans` with every whole block inside a zero extent marked zero (not read)."""
    zero_blocks: set[int] = set()
    for offset, length in zero_extents:
        first = -(-offset // BLOCK)
        last = (offset + length) // BLOCK
        zero_blocks.update(range(first, last))
    result: list[Span] = []
    for span in spans:
        position = span.start
        while position < span.end:
            zero = position // BLOCK in zero_blocks and position + BLOCK <= span.end
            end = position
            while end < span.end and (end // BLOCK in zero_blocks) == zero:
                end = min(span.end, end + BLOCK)
            if not zero:  # a partial last block is read, never assumed
                end = max(end, position + 1)
            end = min(span.end, -(-end // BLOCK) * BLOCK)
            if result and result[-1].zero == zero and result[-1].end == position:
                result[-1] = Span(result[-1].start, end, zero)
            else:
                result.append(Span(position, end, zero))
            position = end
    return result


def write_image(
    source: BlockSource,
    destination: Path,
    spans: Sequence[Span],
    base: list[bytes] | None,
    progress: Progress | None = None,
) -> ImageResult:
    """Write the blocks of `spans` from `source` into `destination`, reading each one back
    from storage as it goes. `base` None: `destination` is a new file and every block
    outside `spans` is a hole. Otherwise `destination` is an existing copy (a clone) of an
    image whose block digests are `base`: blocks outside `spans` keep it; blocks of
    `spans` that are zero are punched. OSError (EIO) when a block reads back wrong."""
    size = source.size
    digests = zero_block_digests(size) if base is None else list(base)
    if len(digests) != block_count(size):
        raise ValueError("the base's digests do not cover the disk")
    jobs = [
        (start, min(CHUNK, span.end - start))
        for span in spans
        if not span.zero
        for start in range(span.start, span.end, CHUNK)
    ]
    pending = iter(jobs)
    bytes_read = 0

    def fill(buffer: memoryview) -> tuple[int, int] | None:
        nonlocal bytes_read
        job = next(pending, None)
        if job is None:
            return None
        offset, length = job
        source.read_into(buffer[:length], offset)
        bytes_read += length
        return job

    zeroed = 0
    writer = Writer(destination, verify=True, patch=base is not None)
    with writer:
        writer.presize(size)
        for span in spans:
            if span.zero:
                zeroed += writer.zero_range(span.start, span.end - span.start)
                first = span.start // BLOCK
                digests[first : block_count(span.end)] = zero_block_digests(span.end - span.start)
        with (
            ReadAhead(fill, CHUNK, buffers=writer.buffers) as chunks,
            write_in_background(writer) as write,
        ):
            for chunk in chunks:
                blocks = hash_blocks(BlockDigest(), chunk.data)
                first = chunk.offset // BLOCK
                digests[first : first + len(blocks.digests)] = blocks.digests
                write(chunk, blocks, [(0, len(chunk.data))])
                if progress is not None:
                    progress(len(chunk.data))
        writer.finish(size)
    return ImageResult(
        size, digest_of(digests), digests, bytes_read, writer.written_bytes, zeroed + writer.zeroed
    )


def clone_file(source: Path, destination: Path) -> str:
    """A copy of `source` at the new path `destination` that shares its blocks where the
    filesystem can: "clone" (FICLONE: btrfs, XFS with reflink, NFS 4.2 CLONE),
    "server-copy" (copy_file_range: an NFS 4.2 server-side COPY, an in-kernel copy or
    reflink elsewhere), else "full-write" (read and written here). Sparse either way."""
    with open(source, "rb") as reader:
        fd = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.ioctl(fd, FICLONE, reader.fileno())
                os.fsync(fd)
                return "clone"
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY):
                    raise
            size = os.fstat(reader.fileno()).st_size
            try:
                _copy_range(reader.fileno(), fd, size)
                os.fsync(fd)
                return "server-copy"
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOSYS):
                    raise
        finally:
            os.close(fd)
    destination.unlink()
    copy_file(source, destination)
    return "full-write"


def _copy_range(reader: int, writer: int, size: int) -> None:
    """copy_file_range over the data extents only (it may fill holes), size kept."""
    os.ftruncate(writer, size)
    for offset, length in data_extents(reader, size):
        done = 0
        while done < length:
            count = os.copy_file_range(reader, writer, length - done, offset + done, offset + done)
            if count == 0:
                raise OSError(errno.EIO, "copy_file_range: the source shrank")
            done += count


def sample_blocks(count: int, excluded: set[int], rng: random.Random) -> list[int]:
    """Random block indexes outside `excluded`: SAMPLE_FRACTION of them, at least
    SAMPLE_MIN_BLOCKS (all when fewer), sorted."""
    candidates = [index for index in range(count) if index not in excluded]
    wanted = max(SAMPLE_MIN_BLOCKS, int(len(candidates) * SAMPLE_FRACTION + 0.999))
    if wanted >= len(candidates):
        return candidates
    return sorted(rng.sample(candidates, wanted))


def differing_blocks(
    read: Callable[[memoryview, int], None], size: int, indexes: Sequence[int], want: list[bytes]
) -> list[int]:
    """The blocks among `indexes` whose content (read with `read(buffer, offset)`) does not
    have the digest in `want`. Read SAMPLE_BATCH at a time, hashed by the pool."""
    buffer = new_buffer(SAMPLE_BATCH * BLOCK + ALIGN)
    wrong = []
    for first in range(0, len(indexes), SAMPLE_BATCH):
        batch = indexes[first : first + SAMPLE_BATCH]
        views = []
        for slot, index in enumerate(batch):
            view = buffer[slot * BLOCK : slot * BLOCK + min(BLOCK, size - index * BLOCK)]
            read(view, index * BLOCK)
            views.append(view)
        for index, found in zip(batch, block_digests_of(views), strict=True):
            if found != want[index]:
                wrong.append(index)
    return wrong


def storage_reader(path: Path) -> Callable[[], tuple[Callable[[memoryview, int], None], int]]:
    """A factory for (read(buffer, offset), fd) reading `path` from its storage (O_DIRECT
    where allowed, else with the range's cached pages dropped first)."""

    def opened() -> tuple[Callable[[memoryview, int], None], int]:
        try:
            fd, direct = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            fd, direct = os.open(path, os.O_RDONLY | os.O_CLOEXEC), False
        scratch = new_buffer(BLOCK + ALIGN)

        def read(view: memoryview, offset: int) -> None:
            if not direct:
                with contextlib.suppress(OSError):
                    os.posix_fadvise(fd, offset, len(view), os.POSIX_FADV_DONTNEED)
            aligned = -(-len(view) // ALIGN) * ALIGN
            target = scratch[:aligned]
            done = 0
            while done < aligned:
                count = os.preadv(fd, [target[done:]], offset + done)
                if count == 0:
                    break
                done += count
            if done < len(view):
                target[done : len(view)] = bytes(len(view) - done)
            view[:] = target[: len(view)]

        return read, fd

    return opened


def check_stored_blocks(path: Path, indexes: Sequence[int], want: list[bytes]) -> list[int]:
    """`differing_blocks` of the image at `path`, read from its storage."""
    read, fd = storage_reader(path)()
    try:
        return differing_blocks(read, os.fstat(fd).st_size, indexes, want)
    finally:
        os.close(fd)


def unshared_bytes(path: Path) -> int | None:
    """Bytes of `path`'s extents that no other file shares (FIEMAP without the SHARED flag):
    the space this file alone takes. None where FIEMAP is not offered (NFS)."""
    count = 256
    header = struct.Struct("=QQIIII")  # start, length, flags, mapped, count, reserved
    extent = struct.Struct("=QQQQQIIII")  # logical, physical, length, 2 reserved, flags, 3
    total = 0
    start = 0
    try:
        with open(path, "rb") as reader:
            while True:
                buffer = bytearray(header.size + count * extent.size)
                header.pack_into(buffer, 0, start, (1 << 64) - 1 - start, 0, 0, count, 0)
                fcntl.ioctl(reader.fileno(), FS_IOC_FIEMAP, buffer)
                mapped = header.unpack_from(buffer, 0)[3]
                if mapped == 0:
                    return total
                last = False
                for index in range(mapped):
                    logical, _physical, length, _r1, _r2, flags, *_ = extent.unpack_from(
                        buffer, header.size + index * extent.size
                    )
                    if not flags & FIEMAP_EXTENT_SHARED:
                        total += length
                    start = logical + length
                    last = bool(flags & FIEMAP_EXTENT_LAST)
                if last:
                    return total
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
            return None
        raise

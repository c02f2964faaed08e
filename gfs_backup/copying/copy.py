"""Copying data to a target with its checksum computed in the same pass.

Holes in the source are skipped (SEEK_DATA/SEEK_HOLE) and all-zero blocks are written as
holes, so sparse data stays sparse and costs time in proportion to its real data. Every
copy is fsynced before it returns. Errors (ENOSPC, EIO) propagate as OSError; the caller
removes the partial output.

How it is fast: a pipeline of three threads over a few reused CHUNK buffers. One reads
chunk n+2 (`os.preadv` on the raw descriptor, or `readinto` from the stream), the calling
thread hashes chunk n+1 and tests its blocks for zeros, one writes chunk n (`os.pwrite`
of the non-zero runs). Reading, hashing and writing release the GIL, so they overlap on
several cores; Python runs once per block, not per byte. A file whose data fits in one
chunk is done in the calling thread, without threads. The zero test is a memcmp that
stops at the first non-zero byte. Every WRITEBACK bytes the writer starts the kernel's
writeback of what it wrote (`POSIX_FADV_DONTNEED`, which does not wait) and drops the
window written back before from the page cache: writing the target overlaps reading the
source, the final fsync has little left to do, and a big export does not flood the
page cache with dirty pages.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import fcntl
import functools
import hashlib
import io
import itertools
import mmap
import os
import queue
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

from gfs_backup.copying.digest import (
    BLOCK,
    ZERO_BLOCK_DIGEST,
    BlockDigest,
    block_digests_of,
)

Progress = Callable[[int], None]  # called with the number of bytes just processed
CHUNK = 8 * BLOCK  # bytes per read; a multiple of BLOCK
SMALL = 256 << 10  # files up to this size are read in one call, without threads
BUFFERS = 8  # chunks in flight at most: being read, hashed, written, and slack
# A verified copy keeps each written chunk until it is read back and compared (memcmp, not
# a second sha256), so it needs more buffers: up to VERIFY_BUFFERS (128 MiB), and its
# writeback window is at most a quarter of them (see `_Writer.write_nonzero`).
VERIFY_BUFFERS = 16
WRITEBACK = 128 * BLOCK  # start writeback of the target every this many bytes
PIPE_SIZE = BLOCK  # pipe capacity asked for when copying from a pipe
ALIGN = 4096  # O_DIRECT reads: offsets, lengths and buffers aligned to this


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
            if start >= size:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            extents.append((start, min(end, size) - start))
            offset = end
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return [(0, size)] if size else []
        raise
    return extents


def copy_file(
    source: Path,
    destination: Path,
    progress: Progress | None = None,
    *,
    sync: bool = True,
    verify: bool = False,
) -> CopyResult:
    """Copy a regular file to a new file `destination` (must not exist), sparse, fsynced
    (without `sync` the caller makes it durable: one syncfs after many small files).
    `verify`: every written block is read back from storage while the copy goes on (see
    `_ReadBack`); OSError(EIO) if one differs."""
    with _open_read(source) as reader, _Writer(destination, sync, verify=verify) as writer:
        return _read_fd(reader, writer, progress)


def copy_open_file(
    reader: int, writer: int, progress: Progress | None = None, *, sync: bool = True
) -> CopyResult:
    """`copy_file` between open descriptors: `reader` a regular file, `writer` a new empty
    file opened for writing. Neither is closed."""
    with _Writer.adopt(writer, sync) as output:
        return _read_fd(reader, output, progress)


def copy_stream(
    reader: BinaryIO,
    destination: Path,
    progress: Progress | None = None,
    *,
    verify: bool = False,
) -> CopyResult:
    """Copy a non-seekable stream (e.g. `btrfs send` output) to a new file, fsynced;
    `verify` as for `copy_file`."""
    _enlarge_pipe(reader)
    digest = BlockDigest()
    position = 0

    def fill(buffer: memoryview) -> tuple[int, int] | None:
        nonlocal position
        count = _read_full(reader, buffer)
        if count == 0:
            return None
        position += count
        return position - count, count

    with _Writer(destination, verify=verify) as writer:
        with (
            _ReadAhead(fill, CHUNK, buffers=writer.buffers) as chunks,
            _background(writer) as write,
        ):
            for chunk in chunks:
                write(chunk, _hash_blocks(digest, chunk.data), [(0, len(chunk.data))])
                if progress is not None:
                    progress(len(chunk.data))
        writer.finish(position)
    return CopyResult(position, position, digest.hexdigest())


def digest_file(
    path: Path, progress: Progress | None = None, *, uncached: bool = False
) -> CopyResult:
    """Checksum a file as `copy_file` would, reading only its data regions. `uncached`:
    from the storage, not this host's page cache (its clean pages are dropped first: a
    verify must see what the disk or the NFS server holds)."""
    with _open_read(path) as reader:
        return digest_open_file(reader, progress, uncached=uncached)


def digest_open_file(
    fd: int, progress: Progress | None = None, *, uncached: bool = False
) -> CopyResult:
    """`digest_file` of an open regular file (not closed)."""
    if uncached:
        with contextlib.suppress(OSError):  # only advice; dirty pages stay (sync first)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return _read_fd(fd, None, progress)


def digest_and_punch_zeros(path: Path, progress: Progress | None = None) -> CopyResult:
    """`digest_file`, and every all-zero block that takes space on disk is deallocated
    (`fallocate` PUNCH_HOLE, size kept). The content, so the checksum, stays the same; the
    file then takes only its data's space. For images written by a program that writes
    zeros as data (QEMU's backup job of a raw block device). A filesystem that cannot punch
    holes leaves the file as it is. Returns the digest of the (unchanged) content."""
    with _open_read(path) as reader, _HolePuncher(path) as puncher:
        return _read_fd(reader, puncher, progress)


def _read_fd(reader: int, writer: _Writer | None, progress: Progress | None) -> CopyResult:
    """Read the data regions of `reader`, hash every block, and hand the chunks to
    `writer` (none: only the digest), then finish it (truncate to size, fsync)."""
    size = os.fstat(reader).st_size
    if writer is not None:
        writer.presize(size)
    if size <= SMALL:
        digest, data = _copy_small(reader, writer, size, progress)
    else:
        with contextlib.suppress(OSError):  # only advice: larger readahead
            os.posix_fadvise(reader, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        extents = data_extents(reader, size)
        digest, data = _copy_extents(reader, writer, extents, size, progress)
    if writer is not None:
        writer.finish(size)
    return CopyResult(size, data, digest.hexdigest())


def _copy_small(
    reader: int, writer: _Writer | None, size: int, progress: Progress | None
) -> tuple[BlockDigest, int]:
    """A small file in one read, in this thread: no buffers, threads or extent maps (a tree
    of many small files costs its system calls, not Python's setup per file)."""
    data = os.pread(reader, size, 0) if size else b""
    if len(data) != size:
        raise OSError(errno.EIO, f"file shrank while being read at offset {len(data)}")
    digest = BlockDigest()
    view = memoryview(data)
    blocks = _hash_blocks(digest, view)
    if writer is not None and size:
        writer.write_nonzero(view, 0, blocks, [(0, size)])
    if progress is not None and size:
        progress(size)
    return digest, size


def _copy_extents(
    reader: int,
    writer: _Writer | None,
    extents: list[tuple[int, int]],
    size: int,
    progress: Progress | None,
) -> tuple[BlockDigest, int]:
    """Read the blocks holding data, hash every block, write the non-zero data."""
    digest = BlockDigest()
    spans = _block_spans(extents, size)
    jobs = [
        (start, min(CHUNK, end - start))
        for span_start, end in spans
        for start in range(span_start, end, CHUNK)
    ]
    pending = iter(jobs)
    # One chunk (a small file) is read, hashed and written in the calling thread.
    threaded = len(jobs) > 1
    buffer_size = max((length for _start, length in jobs), default=0)
    hashed = 0  # digest covers [0, hashed)
    data = 0
    next_extent = 0  # first extent that may overlap the chunk being processed

    def fill(buffer: memoryview) -> tuple[int, int] | None:
        job = next(pending, None)
        if job is None:
            return None
        offset, length = job
        _pread_all(reader, buffer[:length], offset)
        return job

    with (
        _ReadAhead(fill, buffer_size, threaded, writer.buffers if writer else BUFFERS) as chunks,
        _background(writer, threaded) as write,
    ):
        for chunk in chunks:
            if chunk.offset > hashed:
                digest.update_zeros(chunk.offset - hashed)
            blocks = _hash_blocks(digest, chunk.data)
            hashed = chunk.offset + len(chunk.data)
            ranges, next_extent = _ranges_in(extents, next_extent, chunk.offset, hashed)
            count = sum(end - start for start, end in ranges)
            data += count
            write(chunk, blocks, ranges)
            if progress is not None and count:
                progress(count)
    if size > hashed:
        digest.update_zeros(size - hashed)
    # Reading ahead may have read all before a truncation: check the size once more.
    if os.fstat(reader).st_size < size:
        raise OSError(errno.EIO, "file shrank while being read")
    return digest, data


class _Blocks(NamedTuple):
    """The blocks of a chunk: which are all zero, and the sha256 of each (zero blocks:
    ZERO_BLOCK_DIGEST; the last block of the data may be partial)."""

    zero: list[bool]
    digests: list[bytes]


def _hash_blocks(digest: BlockDigest, chunk: memoryview) -> _Blocks:
    """Feed `chunk` (starting at a block boundary) to `digest`; its blocks' zero flags and
    digests (non-zero blocks hashed by a pool of threads, see `block_digests_of`)."""
    blocks = [chunk[start : start + BLOCK] for start in range(0, len(chunk), BLOCK)]
    digests = block_digests_of(blocks)
    for block, block_digest in zip(blocks, digests, strict=True):
        if len(block) == BLOCK:
            digest.add_block(block_digest)
        else:
            digest.update(block)  # only the last block of the data is partial
    zero = [
        len(block) == BLOCK and found == ZERO_BLOCK_DIGEST
        for block, found in zip(blocks, digests, strict=True)
    ]
    return _Blocks(zero, digests)


def _block_spans(extents: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """The extents widened to whole blocks and merged: (start, end) pairs, end <= size."""
    spans: list[tuple[int, int]] = []
    for start, length in extents:
        first = start - start % BLOCK
        last = min(size, -(-(start + length) // BLOCK) * BLOCK)
        if spans and first <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(last, spans[-1][1]))
        else:
            spans.append((first, last))
    return spans


def _ranges_in(
    extents: list[tuple[int, int]], index: int, start: int, end: int
) -> tuple[list[tuple[int, int]], int]:
    """Parts of the extents inside [start, end), relative to start; the next extent index."""
    ranges = []
    while index < len(extents):
        offset, length = extents[index]
        if offset >= end:
            break
        low, high = max(offset, start), min(offset + length, end)
        if low < high:
            ranges.append((low - start, high - start))
        if offset + length > end:
            break
        index += 1
    return ranges, index


@dataclass
class _Chunk:
    """Data read at `offset` into a pooled buffer; `release` hands the buffer back."""

    offset: int
    data: memoryview
    release: Callable[[], None]


class _ReadAhead:
    """The chunks `fill` reads, in order, in up to BUFFERS pooled buffers of `size` bytes.

    `fill(buffer)` fills the start of a free buffer and returns (offset, length), or None
    at the end. Each chunk must be released once used. If `threaded`, a background thread
    reads ahead, waiting for a released buffer when all are in use; errors in `fill` are
    raised to the consumer; leaving the `with` block stops and joins the thread. Otherwise
    `fill` runs when the next chunk is asked for, into a single buffer.
    """

    def __init__(
        self,
        fill: Callable[[memoryview], tuple[int, int] | None],
        size: int,
        threaded: bool = True,
        buffers: int = BUFFERS,
    ) -> None:
        self._fill = fill
        self._size = size
        self._threaded = threaded
        self._buffers = buffers
        self._allocated = 0
        self._free: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()
        self._filled: queue.SimpleQueue[_Chunk | BaseException | None] = queue.SimpleQueue()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="gfs-read", daemon=True)

    def __enter__(self) -> Iterator[_Chunk]:
        if not self._threaded:
            return self._inline()
        self._thread.start()
        return self._chunks()

    def __exit__(self, *exc: object) -> None:
        if self._threaded:
            self._stop = True
            self._free.put(None)  # wakes the reader if it waits for a buffer
            self._thread.join()

    def _inline(self) -> Iterator[_Chunk]:
        buffer = _new_buffer(self._size)
        while (job := self._fill(buffer)) is not None:
            offset, length = job
            yield _Chunk(offset, buffer[:length], _nothing)

    def _chunks(self) -> Iterator[_Chunk]:
        while (item := self._filled.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item

    def _run(self) -> None:
        try:
            while not self._stop and (buffer := self._take()) is not None:
                job = self._fill(buffer)
                if job is None:
                    break
                offset, length = job
                release = functools.partial(self._free.put, buffer)
                self._filled.put(_Chunk(offset, buffer[:length], release))
            self._filled.put(None)
        except BaseException as exc:  # handed over to the consuming thread
            self._filled.put(exc)

    def _take(self) -> memoryview | None:
        """A free buffer: a released one, a new one while fewer than allowed exist, or wait."""
        if self._free.empty() and self._allocated < self._buffers:
            self._allocated += 1
            return _new_buffer(self._size)
        return self._free.get()


def _new_buffer(size: int) -> memoryview:
    # Anonymous memory: page-aligned, and untouched pages cost nothing (no memset).
    return memoryview(mmap.mmap(-1, max(size, mmap.PAGESIZE)))


def _nothing() -> None:
    pass


WriteJob = Callable[[_Chunk, _Blocks, list[tuple[int, int]]], None]


@contextlib.contextmanager
def _background(writer: _Writer | None, threaded: bool = True) -> Iterator[WriteJob]:
    """`write(chunk, blocks, ranges)`: `writer.write_nonzero`, then chunk.release().

    If `threaded`, in a background thread, so that writing overlaps hashing the next chunk;
    the first write error is then raised by the next `write` call or on leaving the `with`
    block, and later chunks are released unwritten. A verifying writer then keeps the chunk
    and releases it once it has read it back. Without a writer: only release.
    """
    if writer is None or not threaded:

        def write_now(chunk: _Chunk, blocks: _Blocks, ranges: list[tuple[int, int]]) -> None:
            try:
                if writer is not None:
                    writer.write_nonzero(chunk.data, chunk.offset, blocks, ranges)
            finally:
                chunk.release()

        yield write_now
        return
    jobs: queue.SimpleQueue[tuple[_Chunk, _Blocks, list[tuple[int, int]]] | None]
    jobs = queue.SimpleQueue()
    errors: list[BaseException] = []

    def run() -> None:
        while (job := jobs.get()) is not None:
            chunk, blocks, ranges = job
            kept = False
            try:
                if not errors:
                    kept = writer.write_nonzero(
                        chunk.data, chunk.offset, blocks, ranges, chunk.release
                    )
            except BaseException as exc:  # raised in the submitting thread
                errors.append(exc)
            finally:
                if not kept:
                    chunk.release()

    def write(chunk: _Chunk, blocks: _Blocks, ranges: list[tuple[int, int]]) -> None:
        if errors:
            chunk.release()
            raise errors[0]
        jobs.put((chunk, blocks, ranges))

    thread = threading.Thread(target=run, name="gfs-write", daemon=True)
    thread.start()
    try:
        yield write
    finally:
        jobs.put(None)
        thread.join()
    if errors:
        raise errors[0]


class _Writer:
    """A new file written at given offsets, skipping zero blocks, with early writeback;
    with `verify`, every written block is read back from storage (see `_ReadBack`)."""

    def __init__(
        self,
        path: Path | None,
        sync: bool = True,
        fd: int = -1,
        verify: bool = False,
        patch: bool = False,
    ) -> None:
        if path is not None:
            flags = os.O_WRONLY | os.O_CLOEXEC | (0 if patch else os.O_CREAT | os.O_EXCL)
            fd = os.open(path, flags, 0o600)
        self.fd = fd
        # `patch`: the file holds data already (a clone): zero blocks are punched, not skipped.
        self._patch = patch
        self._can_punch = True
        self.written_bytes = 0  # non-zero data written
        self.zeroed = 0  # bytes of zero blocks punched (or written as zeros) in a patch
        self._owned = path is not None
        self._sync = sync
        self._flushed = 0  # writeback started for [0, _flushed)
        self._dropped = 0  # [0, _dropped) dropped from the page cache (if written back)
        self._written = 0  # highest offset written
        self._kept = 0  # chunks kept for the read-back since writeback last started
        self._readback = _ReadBack(fd) if verify else None

    @property
    def buffers(self) -> int:
        """How many chunk buffers a pipeline feeding this writer should allow."""
        return BUFFERS if self._readback is None else VERIFY_BUFFERS

    @classmethod
    def adopt(cls, fd: int, sync: bool = True) -> _Writer:
        """A writer of an open, empty file that the caller closes."""
        return cls(None, sync, fd)

    def __enter__(self) -> _Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._readback is not None:
            self._readback.close()
        if self._owned:
            os.close(self.fd)

    def write_nonzero(
        self,
        chunk: memoryview,
        offset: int,
        blocks: _Blocks,
        ranges: list[tuple[int, int]],
        release: Callable[[], None] | None = None,
    ) -> bool:
        """Write the parts of `ranges` (relative to `chunk`) that are not in a zero block.
        With a `release` and a read-back, `chunk` is kept until it is read back and
        compared, then released: True (the caller must not release or reuse it)."""
        zero = blocks.zero
        for start, end in ranges:
            position = start
            while position < end:
                block_end = min(end, (position // BLOCK + 1) * BLOCK)
                if zero[position // BLOCK]:
                    if self._patch:
                        self.zeroed += self._zero(offset + position, block_end - position)
                    position = block_end
                    continue
                run_end = block_end
                while run_end < end and not zero[run_end // BLOCK]:
                    run_end = min(end, run_end + BLOCK)
                _pwrite_all(self.fd, chunk[position:run_end], offset + position)
                self.written_bytes += run_end - position
                position = run_end
        kept = False
        if self._readback is not None:
            kept = self._readback.expect(offset, len(chunk), blocks.digests, chunk, release)
        self._kept += kept
        self._written = max(self._written, offset + len(chunk))
        # Kept chunks wait for the window after theirs: a window of at most a quarter of the
        # buffers keeps fewer than all of them waiting (else the reader would wait forever).
        if self._written - self._flushed >= WRITEBACK or self._kept >= VERIFY_BUFFERS // 4:
            # Starts writeback of [_flushed, _written) without waiting for it, and drops the
            # pages of the window before, written back by now, from the page cache.
            with contextlib.suppress(OSError):  # only advice
                start, length = self._dropped, self._written - self._dropped
                os.posix_fadvise(self.fd, start, length, os.POSIX_FADV_DONTNEED)
            self._dropped, self._flushed = self._flushed, self._written
            self._kept = 0
            if self._readback is not None:  # the window written back before: read it back
                self._readback.check_before(self._dropped)
        return kept

    def presize(self, size: int) -> None:
        """Give a new file its final size before any write: XFS then allocates only what
        is written (grown by writes past its end, it preallocates and keeps the holes
        between data runs: measured 8 GiB allocated for a 4 GiB-data sparse image)."""
        if not self._patch and os.fstat(self.fd).st_size < size:
            os.ftruncate(self.fd, size)

    def zero_range(self, offset: int, length: int) -> int:
        """Make [offset, offset+length) of a patched file read as zeros (a hole where the
        filesystem can punch one); the read-back checks it. Returns `length`."""
        done = self._zero(offset, length)
        if self._readback is not None:
            self._readback.expect(offset, length, zero_block_digests(length), None, None)
        return done

    def _zero(self, offset: int, length: int) -> int:
        if self._can_punch:
            fallocate = _libc().fallocate
            if fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
                code = ctypes.get_errno()
                if code not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise OSError(code, os.strerror(code))
                self._can_punch = False
            else:
                return length
        for start in range(offset, offset + length, BLOCK):  # no holes here: write zeros
            count = min(BLOCK, offset + length - start)
            _pwrite_all(self.fd, memoryview(_ZERO_CHUNK)[:count], start)
        return length

    def finish(self, size: int) -> None:
        os.ftruncate(self.fd, size)
        if self._sync:
            os.fsync(self.fd)
        if self._readback is not None:
            self._readback.finish()


class _Expected(NamedTuple):
    """A block written and not yet read back: its digest, and the data written where the
    writer kept its chunk (`release` set on the chunk's last block)."""

    offset: int
    length: int
    digest: bytes
    data: memoryview | None
    release: Callable[[], None] | None


class _ReadBack:
    """Reads back what a `_Writer` wrote, from the target's storage, pipelined with the copy.

    A thread re-reads each window a writeback window behind the writer, with O_DIRECT (the
    kernel writes dirty pages of the range first, then reads the device; on NFS the read
    goes to the server, never this host's page cache), and compares every block with what
    was written: byte for byte (memcmp) with the chunk the writer kept, else (a small file,
    a punched range) by its sha256 with the digest computed when the block was read from
    the source. Where O_DIRECT is refused (tmpfs on old kernels) the range's clean pages are
    dropped before reading. `finish` (after the writer's fsync) checks the rest and raises
    OSError(EIO) naming the first offset that differs.
    """

    def __init__(self, fd: int) -> None:
        path = f"/proc/self/fd/{fd}"
        try:
            self.fd, self.direct = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.fd, self.direct = os.open(path, os.O_RDONLY | os.O_CLOEXEC), False
        # The kept blocks written and not yet checked, in order: the writer appends, the
        # checker pops what it checked (memory follows the lag only).
        self.expected: collections.deque[_Expected] = collections.deque()
        # Blocks that hold no buffer (a punched range, a small file's one chunk): in any
        # order (an image's zero ranges come before its data), checked at the end; they
        # must never stand in the way of kept chunks waiting for their window.
        self.deferred: list[_Expected] = []
        self.problems: list[str] = []
        self._lock = threading.Lock()  # `expected` against the drop after a problem
        self._windows: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._buffer = _new_buffer(CHUNK + ALIGN)
        self._thread = threading.Thread(target=self._run, name="gfs-readback", daemon=True)
        self._thread.start()

    def expect(
        self,
        offset: int,
        length: int,
        digests: list[bytes],
        data: memoryview | None,
        release: Callable[[], None] | None,
    ) -> bool:
        """The blocks of a chunk written at `offset` (called in the writing thread). With
        `data` and `release`, the chunk is kept and released once compared: True."""
        keep = data is not None and release is not None
        with self._lock:
            if self.problems:  # nothing is checked any more: keep nothing
                keep = False
            queue = self.expected.append if keep else self.deferred.append
            for index, block_digest in enumerate(digests):
                start = index * BLOCK
                count = min(BLOCK, length - start)
                last = index == len(digests) - 1
                queue(
                    _Expected(
                        offset + start,
                        count,
                        block_digest,
                        data[start : start + count] if keep and data is not None else None,
                        release if keep and last else None,
                    )
                )
        return keep

    def check_before(self, end: int) -> None:
        """Queue the re-read of the expected blocks that end at or before `end`."""
        self._windows.put(end)

    def finish(self) -> None:
        self._windows.put(None)
        self._thread.join()
        if self.problems:
            raise OSError(errno.EIO, self.problems[0])

    def close(self) -> None:
        if self._thread.is_alive():
            self._windows.put(None)
            self._thread.join()
        self._drop_all()
        os.close(self.fd)

    def _run(self) -> None:
        try:
            while (end := self._windows.get()) is not None:
                self._check(end)
            self._check(None)
            with self._lock:
                self.expected.extend(sorted(self.deferred, key=lambda block: block.offset))
                self.deferred.clear()
            self._check(None)
        except OSError as exc:
            self._fail(f"cannot read back what was written: {exc.strerror}")

    def _fail(self, problem: str) -> None:
        """Record `problem`, and hand back every kept chunk: the copy runs to its end (its
        reader must not wait for buffers), and `finish` raises."""
        with self._lock:
            self.problems.append(problem)
        self._drop_all()

    def _drop_all(self) -> None:
        with self._lock:
            while self.expected:
                release = self.expected.popleft().release
                if release is not None:
                    release()

    def _check(self, end: int | None) -> None:
        """Re-read and compare the expected blocks below `end` (None: all of them)."""
        while not self.problems and self.expected:
            run = self._run_from(end)
            if not run:
                return
            first, last = run[0].offset, run[-1].offset + run[-1].length
            stored = self._read(first, last - first)
            hashed = [block for block in run if block.data is None]
            found = iter(
                block_digests_of(
                    [stored[b.offset - first : b.offset - first + b.length] for b in hashed]
                )
            )
            for block in run:
                read = stored[block.offset - first : block.offset - first + block.length]
                same = _same(read, block.data) if block.data is not None else None
                if same is None:
                    same = next(found) == block.digest
                if not same:
                    self._fail(
                        f"the target's copy differs from the data written at offset "
                        f"{block.offset} (read back from its storage)"
                    )
                    return
            for _checked in run:
                release = self.expected.popleft().release
                if release is not None:
                    release()

    def _run_from(self, end: int | None) -> list[_Expected]:
        """The first contiguous expected blocks below `end`, at most CHUNK bytes."""
        run: list[_Expected] = []
        for block in itertools.islice(self.expected, CHUNK // BLOCK):
            if end is not None and block.offset + block.length > end:
                break
            if run and block.offset != run[-1].offset + run[-1].length:
                break
            run.append(block)
        return run

    def _read(self, offset: int, length: int) -> memoryview:
        """`length` bytes at `offset` from storage; what lies past the end reads as zeros
        (the writer extends the file to its size when it finishes)."""
        if not self.direct:
            with contextlib.suppress(OSError):
                os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_DONTNEED)
        aligned = -(-length // ALIGN) * ALIGN
        view = self._buffer[:aligned]
        done = 0
        while done < length:
            count = os.preadv(self.fd, [view[done:]], offset + done)
            if count == 0:
                break
            done += count
        if done < length:
            view[done:length] = bytes(length - done)
        return view[:length]


def _same(first: memoryview, second: memoryview) -> bool:
    """Whether two equally long writable buffers hold the same bytes: libc's memcmp (about
    30 times faster than hashing them; Python compares memoryviews item by item)."""
    if len(first) != len(second):
        return False
    if not first:
        return True
    left = (ctypes.c_char * len(first)).from_buffer(first)
    right = (ctypes.c_char * len(second)).from_buffer(second)
    return int(_libc().memcmp(left, right, len(first))) == 0


FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_ZERO_CHUNK = bytes(BLOCK)


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)
    libc.memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
    libc.memcmp.restype = ctypes.c_int
    return libc


def zero_block_digests(length: int) -> list[bytes]:
    """The block digests of `length` zero bytes (from a block boundary)."""
    whole, rest = divmod(length, BLOCK)
    return [ZERO_BLOCK_DIGEST] * whole + ([hashlib.sha256(bytes(rest)).digest()] if rest else [])


class _HolePuncher(_Writer):
    """Not a writer: deallocates the zero blocks inside the data ranges of an existing file."""

    def __init__(self, path: Path) -> None:
        # Not super().__init__(): that creates a new file; this one exists.
        self.fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        self._owned = True
        self._patch = True  # the file exists with its size
        self._readback = None
        self._supported = True

    def write_nonzero(
        self,
        chunk: memoryview,
        offset: int,
        blocks: _Blocks,
        ranges: list[tuple[int, int]],
        release: Callable[[], None] | None = None,
    ) -> bool:
        zero = blocks.zero
        for start, end in ranges:
            for block in range(start // BLOCK, -(-end // BLOCK)):
                if zero[block] and self._supported:
                    low, high = max(start, block * BLOCK), min(end, (block + 1) * BLOCK)
                    self._punch(offset + low, high - low)
        return False

    def _punch(self, offset: int, length: int) -> None:
        mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        if _libc().fallocate(self.fd, mode, offset, length) != 0:
            code = ctypes.get_errno()
            if code in (errno.EOPNOTSUPP, errno.ENOSYS):
                self._supported = False  # this filesystem keeps the zeros
                return
            raise OSError(code, os.strerror(code))

    def finish(self, size: int) -> None:
        os.fsync(self.fd)


@contextlib.contextmanager
def _open_read(path: Path) -> Iterator[int]:
    """A read-only descriptor of the regular file `path`."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        yield fd
    finally:
        os.close(fd)


def _pread_all(fd: int, buffer: memoryview, offset: int) -> None:
    done = 0
    while done < len(buffer):
        count = os.preadv(fd, [buffer[done:]], offset + done)
        if count == 0:
            raise OSError(errno.EIO, f"file shrank while being read at offset {offset + done}")
        done += count


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def _read_full(reader: BinaryIO, view: memoryview) -> int:
    """Fill `view` from `reader`; short only at the end of the stream."""
    filled = 0
    while filled < len(view):
        if isinstance(reader, io.BufferedIOBase | io.RawIOBase):
            read = reader.readinto(view[filled:])  # no copy through a bytes object
            if read is None:  # not the end: a non-blocking stream without data
                raise BlockingIOError(errno.EAGAIN, "copy_stream needs a blocking stream")
            count = read
        else:
            data = reader.read(len(view) - filled)
            count = len(data)
            view[filled : filled + count] = data
        if not count:
            break
        filled += count
    return filled


def _enlarge_pipe(reader: BinaryIO) -> None:
    """Ask for a larger pipe buffer: fewer, larger reads and writes on both ends."""
    try:
        fd = reader.fileno()
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except (OSError, AttributeError, ValueError):  # io.UnsupportedOperation is an OSError
        pass


# The pipeline's parts, for other writers of the same kind (copying/image.py).
ReadAhead = _ReadAhead
Writer = _Writer
hash_blocks = _hash_blocks
new_buffer = _new_buffer
write_in_background = _background

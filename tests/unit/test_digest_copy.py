"""sha256-1m digests and the sparse one-pass copy (gfs_backup.copying: digest, copy)."""

from __future__ import annotations

import errno
import hashlib
import io
import itertools
import os
import random
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gfs_backup.copying import copy, digest
from gfs_backup.copying.copy import (
    CopyResult,
    copy_file,
    copy_stream,
    data_extents,
    digest_file,
)
from gfs_backup.copying.digest import ALGORITHM, BLOCK, ZERO_BLOCK, ZERO_BLOCK_DIGEST, BlockDigest

pytestmark = pytest.mark.unit

KiB, MiB = 1 << 10, 1 << 20
# A layout is a list of (kind, length): "r" random bytes, "z" written zeros, "h" a hole.
Layout = list[tuple[str, int]]


def reference(data: bytes) -> str:
    """The definition: sha256 over the sha256 of each 1 MiB block (as digest.py's one-liner)."""
    blocks = (data[start : start + BLOCK] for start in range(0, len(data), BLOCK))
    return hashlib.sha256(b"".join(hashlib.sha256(block).digest() for block in blocks)).hexdigest()


def content(layout: Layout, seed: int = 1) -> bytes:
    rnd = random.Random(seed)
    return b"".join(rnd.randbytes(n) if kind == "r" else bytes(n) for kind, n in layout)


def write_layout(path: Path, layout: Layout, seed: int = 1) -> bytes:
    """Write `layout` to a new file (holes left unwritten); its content."""
    data = content(layout, seed)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        offset = 0
        for kind, length in layout:
            if kind != "h":
                os.pwrite(fd, data[offset : offset + length], offset)
            offset += length
        os.ftruncate(fd, offset)
    finally:
        os.close(fd)
    return data


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def require_sparse_files(path: Path) -> None:
    probe = path.parent / f"{path.name}.probe"
    with probe.open("wb") as file:
        file.truncate(64 * MiB)
    if allocated(probe) > MiB:
        pytest.fail(
            f"{path.parent} does not keep files sparse: run the tests on ext4, btrfs or tmpfs"
        )
    probe.unlink()


@pytest.fixture(params=[copy.CHUNK, 2 * BLOCK], ids=["chunk-default", "chunk-2MiB"])
def chunk_size(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Run with the real chunk size and with a small one (many chunks, few buffers)."""
    size = int(request.param)
    if size < copy.CHUNK:
        monkeypatch.setattr(copy, "CHUNK", size)
        monkeypatch.setattr(copy, "BUFFERS", 2)
    return size


@pytest.fixture
def no_leaked_threads() -> Iterator[None]:
    """No thread a copy started outlives it (the hashing pool is one per process, bounded)."""
    before = set(threading.enumerate())
    yield
    left = set(threading.enumerate()) - before
    assert {thread for thread in left if not thread.name.startswith("gfs-hash")} == set()


# The digest


SIZES = [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK, 5 * BLOCK + 12345]
LAYOUTS: dict[str, Layout] = {
    "random-zero-random": [("r", BLOCK + 7), ("z", 2 * BLOCK), ("r", 3)],
    "zero-blocks": [("z", 3 * BLOCK)],
    "zeros-unaligned": [("r", 100), ("z", 3 * BLOCK + 5), ("r", BLOCK - 1), ("z", 10)],
    "zero-tail": [("r", BLOCK), ("z", BLOCK - 1)],
    "random-4MiB": [("r", 4 * BLOCK)],
}
FEEDS = [1 << 30, 4093, BLOCK - 1, BLOCK + 3, 3 * BLOCK + 5]


def test_the_constants() -> None:
    assert ALGORITHM == "sha256-1m"
    assert BLOCK == 1 << 20
    assert not any(ZERO_BLOCK)
    assert len(ZERO_BLOCK) == BLOCK
    assert hashlib.sha256(ZERO_BLOCK).digest() == ZERO_BLOCK_DIGEST
    assert reference(b"") == hashlib.sha256(b"").hexdigest()


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("feed", [1 << 30, 4093, BLOCK + 3])
def test_digest_of_random_data_equals_the_definition(size: int, feed: int) -> None:
    data = random.Random(size).randbytes(size)
    block_digest = BlockDigest()
    for start in range(0, size, feed):
        block_digest.update(data[start : start + feed])
    assert block_digest.size == size
    assert block_digest.hexdigest() == reference(data)


@pytest.mark.parametrize("size", SIZES)
def test_zeros_as_data_or_as_a_hole_digest_alike(size: int) -> None:
    as_data, as_hole = BlockDigest(), BlockDigest()
    as_data.update(bytes(size))
    as_hole.update_zeros(size)
    assert as_data.hexdigest() == as_hole.hexdigest() == reference(bytes(size))
    assert as_data.size == as_hole.size == size


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("feed", FEEDS)
@pytest.mark.parametrize("zeros_as_holes", [False, True], ids=["zeros-as-data", "update_zeros"])
def test_digest_of_mixed_data_in_odd_pieces(
    layout: Layout, feed: int, zeros_as_holes: bool
) -> None:
    data = content(layout)
    block_digest = BlockDigest()
    offset = 0
    for kind, length in layout:
        if kind == "z" and zeros_as_holes:
            block_digest.update_zeros(length)
        else:
            for start in range(offset, offset + length, feed):
                block_digest.update(memoryview(data)[start : min(start + feed, offset + length)])
        offset += length
    assert block_digest.hexdigest() == reference(data)


def test_digest_fed_byte_by_byte_across_block_boundaries() -> None:
    data = random.Random(2).randbytes(2 * BLOCK + 100)
    block_digest = BlockDigest()
    cuts = [0, BLOCK - 5, BLOCK + 5, 2 * BLOCK - 3, 2 * BLOCK + 3, len(data)]
    for start, end in itertools.pairwise(cuts):
        if end - start <= 10:
            for offset in range(start, end):
                block_digest.update(data[offset : offset + 1])
        else:
            block_digest.update(data[start:end])
    assert block_digest.hexdigest() == reference(data)
    zeros = BlockDigest()
    for _ in range(BLOCK // 4096 + 3):
        zeros.update_zeros(4095)
        zeros.update(b"\0")
    assert zeros.hexdigest() == reference(bytes(4096 * (BLOCK // 4096 + 3)))


def test_hexdigest_does_not_end_the_digest() -> None:
    data = random.Random(3).randbytes(BLOCK + 10)
    block_digest = BlockDigest()
    block_digest.update(data[:100])
    assert block_digest.hexdigest() == reference(data[:100])
    block_digest.update(data[100:])
    assert block_digest.hexdigest() == reference(data)


def test_a_long_hole_is_cheap_and_right() -> None:
    block_digest = BlockDigest()
    block_digest.update(b"x")
    block_digest.update_zeros(10_000 * BLOCK)  # 10 GB: only digests of digests
    expected = hashlib.sha256(
        hashlib.sha256(b"x" + bytes(BLOCK - 1)).digest()
        + ZERO_BLOCK_DIGEST * 9_999
        + hashlib.sha256(bytes(1)).digest()
    ).hexdigest()
    assert block_digest.hexdigest() == expected


@settings(max_examples=30, deadline=None)
@given(
    pieces=st.lists(
        st.tuples(st.sampled_from("rz"), st.integers(0, 3 * BLOCK), st.booleans()), max_size=5
    ),
    feed=st.integers(512, 2 * BLOCK),
)
def test_digest_equals_the_definition_for_any_feeding(
    pieces: list[tuple[str, int, bool]], feed: int
) -> None:
    layout = [(kind, length) for kind, length, _hole in pieces]
    data = content(layout)
    block_digest = BlockDigest()
    offset = 0
    for kind, length, hole in pieces:
        if kind == "z" and hole:
            block_digest.update_zeros(length)
        else:
            for start in range(offset, offset + length, feed):
                block_digest.update(data[start : min(start + feed, offset + length)])
        offset += length
    assert block_digest.hexdigest() == reference(data)


def test_the_documented_one_liner_is_the_definition(tmp_path: Path) -> None:
    assert digest.__doc__ is not None
    match = re.search(r"python3 -c '(.*?)' FILE", digest.__doc__, re.DOTALL)
    assert match, "the docstring shows a one-liner"
    path = tmp_path / "data"
    data = write_layout(path, [("r", BLOCK + 5), ("z", BLOCK), ("h", 2 * BLOCK), ("r", 9)])
    result = subprocess.run(
        [sys.executable, "-c", match.group(1), str(path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == reference(data) == digest_file(path).digest


@pytest.mark.parametrize(
    "data",
    [b"", b"\0", bytes(BLOCK), bytes(3 * BLOCK + 1), b"\0" * 5 + b"\1", bytes(BLOCK) + b"\1"],
)
def test_is_zero(data: bytes) -> None:
    assert digest.is_zero(data) == (data.count(0) == len(data))
    assert digest.is_zero(memoryview(data)) == digest.is_zero(bytearray(data))


# Copies

FILES: dict[str, Layout] = {
    "empty": [],
    "one-byte": [("r", 1)],
    "block-minus-one": [("r", BLOCK - 1)],
    "block": [("r", BLOCK)],
    "block-plus-one": [("r", BLOCK + 1)],
    "mixed": [
        ("r", 3 * BLOCK + 4 * KiB),
        ("h", 5 * BLOCK - 4 * KiB),
        ("z", 2 * BLOCK),
        ("r", 64 * KiB),
        ("z", BLOCK + 8 * KiB),
        ("h", 3 * BLOCK + 12 * KiB),
        ("r", 4 * KiB),
        ("h", 20 * BLOCK + 100),
    ],
    "holes-in-blocks": [("h", 4 * KiB), ("r", 8 * KiB), ("h", BLOCK), ("r", 4 * KiB), ("h", 5)],
    "only-a-hole": [("h", 9 * BLOCK + 1)],
    "random-17MiB": [("r", 17 * BLOCK + 3)],
}


def data_length(layout: Layout) -> int:
    return sum(length for kind, length in layout if kind != "h")


@pytest.mark.parametrize("layout", FILES.values(), ids=FILES.keys())
def test_copy_file_is_identical_and_digested(
    tmp_path: Path, layout: Layout, chunk_size: int, no_leaked_threads: None
) -> None:
    source, target = tmp_path / "source", tmp_path / "target"
    data = write_layout(source, layout)
    done: list[int] = []
    result = copy_file(source, target, done.append)
    assert target.read_bytes() == data
    assert result.size == len(data)
    assert result.digest == reference(data) == digest_file(source).digest
    assert result.data_bytes == sum(done) == digest_file(source).data_bytes
    assert result.data_bytes <= len(data)
    assert os.stat(target).st_mode & 0o777 == 0o600


@pytest.mark.parametrize("layout", FILES.values(), ids=FILES.keys())
def test_copy_stream_is_identical_and_digested(
    tmp_path: Path, layout: Layout, chunk_size: int, no_leaked_threads: None
) -> None:
    target = tmp_path / "target"
    data = content(layout)
    done: list[int] = []
    result = copy_stream(cast(BinaryIO, io.BytesIO(data)), target, done.append)
    assert target.read_bytes() == data
    assert result.size == result.data_bytes == sum(done) == len(data)
    assert result.digest == reference(data)


def test_copy_stream_from_a_pipe(tmp_path: Path, no_leaked_threads: None) -> None:
    source, target = tmp_path / "source", tmp_path / "target"
    data = write_layout(source, FILES["mixed"])
    with subprocess.Popen(["cat", str(source)], stdout=subprocess.PIPE) as cat:
        result = copy_stream(cast(BinaryIO, cat.stdout), target)
    assert cat.returncode == 0
    assert target.read_bytes() == data
    assert result.digest == reference(data) == copy_file(source, tmp_path / "copy").digest


def test_copy_stream_reads_a_file_object_without_readinto(tmp_path: Path) -> None:
    class Chunks:
        """Only `read`, returning at most 1000 bytes."""

        def __init__(self, data: bytes) -> None:
            self.data = io.BytesIO(data)

        def read(self, size: int) -> bytes:
            return self.data.read(min(size, 1000))

    data = content([("r", BLOCK + 1234)])
    result = copy_stream(cast(BinaryIO, Chunks(data)), tmp_path / "target")
    assert (tmp_path / "target").read_bytes() == data
    assert result.digest == reference(data)


def test_a_big_hole_stays_sparse(tmp_path: Path, no_leaked_threads: None) -> None:
    require_sparse_files(tmp_path / "source")
    source = tmp_path / "source"
    layout: Layout = [("h", 50 * MiB), ("r", MiB), ("z", 8 * MiB), ("h", 90 * MiB), ("r", 1)]
    write_layout(source, layout)
    source_digest = digest_file(source)
    assert source_digest.data_bytes < 12 * MiB  # 1 MiB data, 8 MiB written zeros, 1 byte

    copied = copy_file(source, tmp_path / "copied")
    assert copied.digest == source_digest.digest
    assert copied.size == os.stat(tmp_path / "copied").st_size == 149 * MiB + 1
    assert copied.data_bytes == source_digest.data_bytes
    assert allocated(tmp_path / "copied") <= MiB + 64 * KiB  # the zeros became holes too

    with source.open("rb") as stream:
        streamed = copy_stream(cast(BinaryIO, stream), tmp_path / "streamed")
    assert streamed.digest == source_digest.digest
    assert streamed.size == streamed.data_bytes == 149 * MiB + 1
    assert allocated(tmp_path / "streamed") <= MiB + 64 * KiB


@pytest.mark.parametrize(
    "layout",
    [
        [("r", MiB), ("z", 8 * MiB), ("r", 5), ("z", 3 * MiB + 7)],
        [("z", 2 * MiB), ("h", 4 * MiB), ("r", MiB + 3), ("z", MiB - 3)],
    ],
    ids=["zeros-written", "zeros-and-holes"],
)
def test_written_zero_blocks_are_punched_out_and_the_content_kept(
    tmp_path: Path, layout: Layout, chunk_size: int, no_leaked_threads: None
) -> None:
    image = tmp_path / "image"
    require_sparse_files(image)
    data = write_layout(image, layout)
    before = allocated(image)
    result = copy.digest_and_punch_zeros(image)
    assert image.read_bytes() == data  # content (and size) unchanged
    assert result.digest == reference(data) == digest_file(image).digest
    assert result.size == len(data)
    data_blocks = sum(1 for start in range(0, len(data), BLOCK) if any(data[start : start + BLOCK]))
    assert allocated(image) <= data_blocks * BLOCK + 64 * KiB < before


def test_holes_within_blocks_stay_holes(tmp_path: Path) -> None:
    """Only data regions are written, not whole 1 MiB blocks around them."""
    require_sparse_files(tmp_path / "source")
    source = tmp_path / "source"
    layout: Layout = []
    for _ in range(16):  # 4 KiB of data every MiB
        layout += [("r", 4 * KiB), ("h", BLOCK - 4 * KiB)]
    data = write_layout(source, layout)
    result = copy_file(source, tmp_path / "target")
    assert (tmp_path / "target").read_bytes() == data
    assert result.data_bytes == 16 * 4 * KiB
    assert allocated(tmp_path / "target") <= allocated(source) + 64 * KiB


def test_data_extents_and_data_bytes_exclude_holes(tmp_path: Path) -> None:
    require_sparse_files(tmp_path / "source")
    source = tmp_path / "source"
    layout: Layout = [("h", 8 * MiB), ("r", 2 * MiB), ("h", 8 * MiB), ("z", MiB), ("h", 3)]
    write_layout(source, layout)
    fd = os.open(source, os.O_RDONLY)
    try:
        extents = data_extents(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    assert extents == [(8 * MiB, 2 * MiB), (18 * MiB, MiB)]
    assert digest_file(source).data_bytes == 3 * MiB
    assert copy_file(source, tmp_path / "target").data_bytes == 3 * MiB


@pytest.mark.parametrize("how", ["copy_file", "copy_stream"])
def test_the_destination_must_not_exist(tmp_path: Path, how: str) -> None:
    source, target = tmp_path / "source", tmp_path / "target"
    write_layout(source, [("r", 10)])
    target.write_bytes(b"keep me")
    with pytest.raises(FileExistsError):
        if how == "copy_file":
            copy_file(source, target)
        else:
            copy_stream(cast(BinaryIO, io.BytesIO(b"new")), target)
    assert target.read_bytes() == b"keep me"


@pytest.mark.parametrize("how", ["copy_file", "copy_stream"])
def test_the_copy_is_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    source, target = tmp_path / "source", tmp_path / "target"
    write_layout(source, [("r", 3 * BLOCK)])
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        assert os.path.samefile(f"/proc/self/fd/{fd}", target)
        assert os.fstat(fd).st_size == 3 * BLOCK  # after the last write
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    if how == "copy_file":
        copy_file(source, target)
    else:
        copy_stream(cast(BinaryIO, io.BytesIO(source.read_bytes())), target)
    assert len(synced) == 1


def test_copy_file_wants_a_regular_file(tmp_path: Path) -> None:
    with pytest.raises(OSError) as raised:
        copy_file(tmp_path, tmp_path / "target")
    assert raised.value.errno == errno.EINVAL


def test_a_read_error_propagates(tmp_path: Path, no_leaked_threads: None) -> None:
    class Failing(io.RawIOBase):
        def __init__(self) -> None:
            self.given = 0

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
            if self.given >= 3 * BLOCK:
                raise OSError(errno.EIO, "bad sector")
            count = min(len(buffer), 64 * KiB)
            buffer[:count] = bytes(range(256)) * (count // 256)
            self.given += count
            return count

    with pytest.raises(OSError) as raised:
        copy_stream(cast(BinaryIO, Failing()), tmp_path / "target")
    assert raised.value.errno == errno.EIO


def test_a_shrinking_file_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "source"
    write_layout(source, [("r", 3 * BLOCK)])
    real_extents = copy.data_extents

    def extents_then_shrink(fd: int, size: int) -> list[tuple[int, int]]:
        extents = real_extents(fd, size)
        os.truncate(source, BLOCK)
        return extents

    monkeypatch.setattr(copy, "data_extents", extents_then_shrink)
    with pytest.raises(OSError) as raised:
        copy_file(source, tmp_path / "target")
    assert raised.value.errno == errno.EIO


def test_a_non_blocking_stream_is_refused(tmp_path: Path) -> None:
    class WouldBlock(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, buffer: memoryview) -> int | None:  # type: ignore[override]
            return None  # no data now: not the end of the stream

    with pytest.raises(BlockingIOError):
        copy_stream(cast(BinaryIO, WouldBlock()), tmp_path / "target")


@pytest.mark.parametrize("how", ["copy_file", "digest_file"])
def test_a_file_shrinking_after_it_was_read_ahead_is_an_error(
    tmp_path: Path, how: str, chunk_size: int, no_leaked_threads: None
) -> None:
    source = tmp_path / "source"
    write_layout(source, [("r", 4 * chunk_size)])

    def shrink(count: int) -> None:  # after the first chunk: the others may be read already
        os.truncate(source, BLOCK)

    with pytest.raises(OSError) as raised:
        if how == "copy_file":
            copy_file(source, tmp_path / "target", shrink)
        else:
            digest_file(source, shrink)
    assert raised.value.errno == errno.EIO


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs mounted for the test (root only)."""
    if os.geteuid() != 0:
        pytest.fail("mounting a tmpfs needs root: run ./scripts/test as root")
    mountpoint = tmp_path / "tiny"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode:
        pytest.fail(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


@pytest.mark.parametrize("size", [6 * MiB, 20 * MiB])  # fails in the last chunk, or before
@pytest.mark.parametrize("how", ["copy_file", "copy_stream"])
def test_enospc_propagates(
    tmp_path: Path,
    tiny_tmpfs: Path,
    how: str,
    size: int,
    chunk_size: int,
    no_leaked_threads: None,
) -> None:
    source, target = tmp_path / "source", tiny_tmpfs / "target"
    write_layout(source, [("r", size)])
    with pytest.raises(OSError) as raised:
        if how == "copy_file":
            copy_file(source, target)
        else:
            with source.open("rb") as stream:
                copy_stream(cast(BinaryIO, stream), target)
    assert raised.value.errno == errno.ENOSPC
    # The partial output (sized up front, sparse) is the caller's to remove.
    assert os.stat(target).st_blocks * 512 <= 4 * MiB


# Read-back verification, pipelined with the copy


def verified_copy(how: str, source: Path, target: Path) -> CopyResult:
    """copy_file or copy_stream of `source` with the read-back."""
    if how == "file":
        return copy_file(source, target, verify=True)
    with source.open("rb") as stream:
        return copy_stream(cast(BinaryIO, stream), target, verify=True)


@pytest.mark.parametrize("layout", FILES.values(), ids=FILES.keys())
@pytest.mark.parametrize("how", ["file", "stream"])
def test_a_verified_copy_reads_everything_back(
    tmp_path: Path, layout: Layout, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(copy, "WRITEBACK", 2 * BLOCK)  # many read-back windows
    source, target = tmp_path / "source", tmp_path / "target"
    data = write_layout(source, layout)
    checked: list[int] = []
    real = copy._ReadBack._read

    def counted(self: copy._ReadBack, offset: int, length: int) -> memoryview:
        checked.append(length)
        return real(self, offset, length)

    monkeypatch.setattr(copy._ReadBack, "_read", counted)
    result = verified_copy(how, source, target)
    assert target.read_bytes() == data
    assert result.digest == reference(data)
    written = len(data)  # a stream is written whole; a file: the blocks holding its data
    if how == "file":
        fd = os.open(source, os.O_RDONLY)
        try:
            spans = copy._block_spans(data_extents(fd, len(data)), len(data))
        finally:
            os.close(fd)
        written = sum(end - start for start, end in spans)
    assert sum(checked) == written  # every written block read back, once


@pytest.mark.parametrize("how", ["file", "stream"])
def test_a_verified_copy_compares_kept_chunks_with_few_buffers(
    tmp_path: Path, how: str, monkeypatch: pytest.MonkeyPatch, no_leaked_threads: None
) -> None:
    """A chunk stays with the read-back until compared byte for byte (memcmp), never
    hashed again; with many more chunks than buffers, and scattered small chunks (the
    offset window then hardly moves), the copy neither waits forever nor mixes chunks."""
    monkeypatch.setattr(copy, "CHUNK", BLOCK)
    monkeypatch.setattr(copy, "VERIFY_BUFFERS", 4)
    layout: Layout = [("r", 9 * BLOCK)]
    for _ in range(12):  # 1 MiB of data, then a hole: a chunk each, far apart
        layout += [("r", BLOCK), ("h", 3 * BLOCK)]
    source, target = tmp_path / "source", tmp_path / "target"
    data = write_layout(source, layout)
    compared: list[int] = []
    hashed: list[int] = []
    real_same, real_digests = copy._same, copy.block_digests_of

    def same(first: memoryview, second: memoryview) -> bool:
        compared.append(len(first))
        return real_same(first, second)

    def digests(blocks: list[memoryview]) -> list[bytes]:
        if threading.current_thread().name == "gfs-readback":
            hashed.extend(len(block) for block in blocks)
        return real_digests(blocks)

    monkeypatch.setattr(copy, "_same", same)
    monkeypatch.setattr(copy, "block_digests_of", digests)
    result = verified_copy(how, source, target)
    assert target.read_bytes() == data
    assert result.digest == reference(data)
    written = 21 * BLOCK if how == "file" else len(data)
    assert sum(compared) == written
    assert sum(hashed) == 0


@pytest.mark.parametrize("how", ["file", "stream"])
def test_a_long_verified_copy_with_a_bad_early_block_ends_and_fails(
    tmp_path: Path, how: str, monkeypatch: pytest.MonkeyPatch, no_leaked_threads: None
) -> None:
    """The read-back finds block 1 wrong while most of the copy is still to come: the copy
    runs to its end (no buffer stays kept) and fails naming the block."""
    monkeypatch.setattr(copy, "CHUNK", BLOCK)
    monkeypatch.setattr(copy, "VERIFY_BUFFERS", 4)
    source, target = tmp_path / "source", tmp_path / "target"
    write_layout(source, [("r", 24 * BLOCK)])
    real_write = copy._pwrite_all

    def flip_in_block_one(fd: int, chunk: memoryview, offset: int) -> None:
        if offset <= BLOCK < offset + len(chunk):
            damaged = bytearray(chunk)
            damaged[BLOCK - offset + 17] ^= 0x01
            chunk = memoryview(damaged)
        real_write(fd, chunk, offset)

    monkeypatch.setattr(copy, "_pwrite_all", flip_in_block_one)
    done = threading.Event()

    def run() -> None:
        try:
            with pytest.raises(OSError, match=f"differs from the data written at offset {BLOCK}"):
                if how == "file":
                    copy_file(source, target, verify=True)
                else:
                    with source.open("rb") as stream:
                        copy_stream(cast(BinaryIO, stream), target, verify=True)
            done.set()
        except BaseException:
            pass

    worker = threading.Thread(target=run, name="test-copy")
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "the copy waits forever for a buffer"
    assert done.is_set()


@pytest.mark.parametrize("how", ["file", "stream"])
def test_a_verified_copy_fails_when_the_target_holds_other_bytes(
    tmp_path: Path, how: str, monkeypatch: pytest.MonkeyPatch, no_leaked_threads: None
) -> None:
    """What reaches the storage is not what was read (a bad disk, cable or NFS server):
    the read-back from storage names the first block that differs."""
    monkeypatch.setattr(copy, "WRITEBACK", 2 * BLOCK)
    source, target = tmp_path / "source", tmp_path / "target"
    data = write_layout(source, [("r", 7 * BLOCK + 100)])
    real_write = copy._pwrite_all

    def flip_in_block_five(fd: int, chunk: memoryview, offset: int) -> None:
        if offset <= 5 * BLOCK < offset + len(chunk):
            damaged = bytearray(chunk)
            damaged[5 * BLOCK - offset] ^= 0xFF
            chunk = memoryview(damaged)
        real_write(fd, chunk, offset)

    monkeypatch.setattr(copy, "_pwrite_all", flip_in_block_five)
    with pytest.raises(OSError, match=f"differs from the data written at offset {5 * BLOCK}"):
        if how == "file":
            copy_file(source, target, verify=True)
        else:
            with source.open("rb") as stream:
                copy_stream(cast(BinaryIO, stream), target, verify=True)
    assert target.read_bytes() != data

"""Export throughput benchmark: `python benchmarks/export.py [--repeat N] [--workdir DIR]`.

Run as root (it makes loop devices, file systems and mounts; it drops the page cache).
It builds, in a fresh temporary directory on disk, a loop-backed btrfs source and a
separate loop-backed ext4 target (both image files sparse, loop devices with direct I/O so
the host file's page cache does not serve reads). The source gets a subvolume with a 2 GiB
file mixing random data (40%), written zeros (30%) and holes (30%) in seeded pieces of
64 KiB to 64 MiB, a subvolume with a 2 GiB sparse file holding 100 MiB of data, and a
subvolume with a tree of 100,000 files of 4 KiB; all are snapshotted read-only. Then, on
the same data, each measurement runs `--repeat` times (page cache dropped before every
run so it reads from the device, as a nightly run finds it; the median counts):

  a  cp --sparse=always FILE TARGET; sync; re-read     baseline for c
  b  btrfs send SNAPSHOT > TARGET; sync; re-read       baseline for d
  c  gfs files export of the 2 GiB file, as `gfs run` does it: export_tree (copy with
     sha256-1m in the same pass, one syncfs), then verify_tree (every file re-read from
     the target's storage: its pages are dropped from the page cache first)
  d  btrfs send | gfs copy_stream, then the verify re-read of the stream (uncached)
  e  gfs copy_file of the sparse file                  time and space must follow its data
  f  cp --sparse=always of the sparse file             for reference
  g  cp -a TREE TARGET; sync; re-read                  baseline for h
  h  gfs files export of the 100,000-file tree, as c

Baselines are timed in two parts: the tool plus `sync`, and the re-read of its copy with
the page cache dropped (`cat` of every file), since gfs verifies and the plain tools do
not. A warm-up pass of all comes first, not counted: it checks every output's content
against sha256-1m computed here without gfs. Rounds run in rotated order. Goals (exit 1 if
one is missed): c and d within 1.1x of their baseline with its re-read and within 1.5x of
the baseline without it; h within 2x of g with its re-read; the sparse copy's time and
space follow its data. Exit 2 if it cannot run. Everything it made (mounts, loop devices,
images) is removed on exit, also on Ctrl-C or SIGTERM. Standard library and gfs_backup.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, BinaryIO, cast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's gfs first
from gfs_backup.copying.copy import copy_file, copy_stream, digest_file
from gfs_backup.copying.filetree import export_tree
from gfs_backup.copying.treerestore import verify_tree

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
FILE_SIZE = 2 * GiB
SHARES = (("random", 0.4), ("zero", 0.3), ("hole", 0.3))
PIECE = 64 * KiB  # pieces are 64 KiB * 2**k, k in 0..10: not all aligned to 1 MiB
SPARSE_DATA, SPARSE_PIECES = 100 * MiB, 50
SOURCE_IMAGE = 6 * GiB
TARGET_IMAGE = 4 * GiB
TREE_FILES, TREE_FILE_SIZE, TREE_FANOUT = 100_000, 4 * KiB, 1000
SEED = 20260101
WITH_REREAD = 1.10  # gfs (export + verify) vs the plain tool + sync + re-read
WITHOUT_REREAD = 1.50  # gfs (export + verify) vs the plain tool + sync
TREE_LIMIT = 2.0  # gfs tree export vs cp -a + sync + re-read
SPARSE_SPACE_SLACK = 1.05  # allocated <= data * this + 1 MiB
# The sparse file's 50 scattered pieces are read at random, not in one sequential sweep, so
# its data rate may be below c's; reading its 2 GiB of holes would take it below ~15%.
SPARSE_RATE_FLOOR = 1 / 3  # data rate of the sparse copy >= this share of c's data rate
TOOLS = ("losetup", "mkfs.btrfs", "mkfs.ext4", "btrfs", "mount", "umount", "cp", "cat", "find")


class Abort(Exception):
    """The benchmark cannot run here."""


@dataclass
class Sample:
    seconds: float  # the command and a sync of the output (gfs: with its verify)
    unsynced: float  # the command alone
    allocated: int  # st_blocks * 512 of the output
    digest: str | None = None  # what gfs computed
    reread: float = 0.0  # baselines: re-reading the output with the page cache dropped


@dataclass
class Measurement:
    key: str
    label: str
    logical: int  # logical bytes exported
    data: int  # bytes that had to be read: data extents, or the send stream
    samples: list[Sample] = field(default_factory=list)

    reread: bool = False  # a baseline whose output is re-read after the sync

    @property
    def median(self) -> float:
        return statistics.median(sample.seconds for sample in self.samples)

    @property
    def median_with_reread(self) -> float:
        return statistics.median(sample.seconds + sample.reread for sample in self.samples)

    @property
    def median_sample(self) -> Sample:
        ordered = sorted(self.samples, key=lambda sample: sample.seconds)
        return ordered[len(ordered) // 2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (best)")
    parser.add_argument(
        "--workdir", type=Path, default=Path("/var/tmp"), help="where the images go (on disk)"
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _terminate)
    cleanup = contextlib.ExitStack()
    try:
        return run(cleanup, args.workdir, max(1, args.repeat))
    except Abort as exc:
        print(f"export benchmark: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nexport benchmark: interrupted, cleaning up", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the cleanup finish
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        cleanup.close()


def run(cleanup: contextlib.ExitStack, workdir: Path, repeat: int) -> int:
    if os.geteuid() != 0:
        raise Abort("must run as root (loop devices, mounts, drop_caches)")
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        raise Abort(f"missing tools: {', '.join(missing)} (apt-get install btrfs-progs)")
    if _fs_type(workdir) == "tmpfs":
        print(f"warning: {workdir} is tmpfs: the images live in RAM", file=sys.stderr)

    root = Path(tempfile.mkdtemp(prefix=f"gfs-export-bench-{os.getpid()}-", dir=workdir))
    cleanup.callback(shutil.rmtree, root, ignore_errors=True)
    source = _loop_filesystem(cleanup, root, "source", SOURCE_IMAGE, ["mkfs.btrfs", "-q", "-f"])
    target = _loop_filesystem(cleanup, root, "target", TARGET_IMAGE, ["mkfs.ext4", "-q", "-F"])

    print(f"preparing test data in {root} ...", flush=True)
    started = time.perf_counter()
    mixed_snapshot = _subvolume_with(source, "mixed", _write_mixed)
    sparse_snapshot = _subvolume_with(source, "sparse", _write_sparse)
    tree_snapshot = _subvolume_with(source, "tree", _write_tree)
    mixed, sparse = mixed_snapshot / "file.img", sparse_snapshot / "file.img"
    tree = tree_snapshot / "file.img"
    with mixed.open("rb") as file:
        expected_file, _size = _reference(file)
    with sparse.open("rb") as file:
        expected_sparse, _size = _reference(file)
    expected_stream, stream_size = _send_reference(mixed_snapshot)
    mixed_data, sparse_data = _data_bytes(mixed), _data_bytes(sparse)
    tree_bytes = TREE_FILES * TREE_FILE_SIZE
    print(f"  done in {time.perf_counter() - started:.1f} s", flush=True)

    measurements = [
        Measurement("a", "cp --sparse=always", FILE_SIZE, mixed_data, reread=True),
        Measurement("b", "btrfs send > file", FILE_SIZE, stream_size, reread=True),
        Measurement("c", "gfs files export + verify", FILE_SIZE, mixed_data),
        Measurement("d", "send | gfs copy_stream + verify", FILE_SIZE, stream_size),
        Measurement("e", "gfs copy_file, sparse file", FILE_SIZE, sparse_data),
        Measurement("f", "cp --sparse=always, sparse", FILE_SIZE, sparse_data),
        Measurement("g", "cp -a, 100k files", tree_bytes, tree_bytes, reread=True),
        Measurement("h", "gfs files export + verify, 100k", tree_bytes, tree_bytes),
    ]
    actions: dict[str, Callable[[Path], str | None]] = {
        "a": lambda out: _cp(mixed, out),
        "b": lambda out: _send_to_file(mixed_snapshot, out),
        "c": lambda out: _gfs_files_export(mixed_snapshot, out),
        "d": lambda out: _send_to_gfs(mixed_snapshot, out),
        "e": lambda out: copy_file(sparse, out).digest,
        "f": lambda out: _cp(sparse, out),
        "g": lambda out: _cp_tree(tree, out),
        "h": lambda out: _gfs_files_export(tree, out),
    }
    expected = {"a": expected_file, "c": expected_file, "e": expected_sparse}
    expected |= {"f": expected_sparse, "b": expected_stream, "d": expected_stream}
    print("warm-up (not counted), checking every output's content:", end="", flush=True)
    for measurement in measurements:
        out = target / f"{measurement.key}.out"
        sample = _timed(actions[measurement.key], out, measurement.reread)
        print(f" {measurement.key} {sample.seconds:.2f}s", end="", flush=True)
        if measurement.key in expected:
            _check_digest(measurement, out, sample, expected[measurement.key])
        _remove(out)
    print(flush=True)
    cpu_before = _cpu_times()
    for round_number in range(repeat):
        print(f"round {round_number + 1}/{repeat}:", end="", flush=True)
        turn = round_number % len(measurements)  # each round in another order
        for measurement in measurements[turn:] + measurements[:turn]:
            out = target / f"{measurement.key}.out"
            sample = _timed(actions[measurement.key], out, measurement.reread)
            measurement.samples.append(sample)
            print(f" {measurement.key} {sample.seconds + sample.reread:.2f}s", end="", flush=True)
            _remove(out)
        print(flush=True)
    return _report(measurements, _machine_load(cpu_before))


def _drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _timed(action: Callable[[Path], str | None], out: Path, reread: bool) -> Sample:
    """Run `action(out)` from a cold page cache, then sync; with `reread`, time reading the
    output back with the page cache dropped (what gfs's verify does) separately."""
    _drop_caches()
    started = time.perf_counter()
    digest = action(out)
    done = time.perf_counter()
    os.sync()
    synced = time.perf_counter()
    reread_seconds = 0.0
    if reread:
        _drop_caches()
        begin = time.perf_counter()
        _run("sh", "-c", 'find "$1" -type f -exec cat {} + >/dev/null', "-", str(out))
        reread_seconds = time.perf_counter() - begin
    blocks = sum(path.lstat().st_blocks for path in _files(out))
    return Sample(synced - started, done - started, blocks * 512, digest, reread_seconds)


def _files(out: Path) -> list[Path]:
    if not out.is_dir():
        return [out]
    return [Path(folder, name) for folder, _dirs, names in os.walk(out) for name in names]


def _remove(out: Path) -> None:
    if out.is_dir():
        shutil.rmtree(out)
    else:
        out.unlink()


def _check_digest(measurement: Measurement, out: Path, sample: Sample, expected: str) -> None:
    found = digest_file(out / "file.img" if out.is_dir() else out).digest
    if found != expected or sample.digest not in (None, expected):
        raise RuntimeError(
            f"{measurement.label}: output digest {found}, gfs said {sample.digest}, "
            f"expected {expected}"
        )


def _report(measurements: list[Measurement], load: str) -> int:
    by_key = {measurement.key: measurement for measurement in measurements}
    print()
    print(
        f"{platform.node()}: Linux {platform.release()}, {os.cpu_count()} CPUs, "
        f"sha256 {_sha256_rate() / 1e6:.0f} MB/s on one core; {load}"
    )
    print(
        "source btrfs, target ext4, both on loop devices (direct I/O) on image files; page "
        f"cache dropped before each run; median of {len(measurements[0].samples)} runs; "
        "times include a sync of the output (gfs: and its verify re-read)"
    )
    header = (
        f"{'':2}{'export':34}{'s':>7}{'+reread':>8}{'no sync':>8}{'MB/s':>7}{'data':>8}"
        f"{'alloc MiB':>10}  runs (s)"
    )
    print(header)
    print("-" * len(header))
    for m in measurements:
        median = m.median_sample
        runs = " ".join(f"{sample.seconds + sample.reread:.2f}" for sample in m.samples)
        total = m.median_with_reread
        reread = f"{total:8.2f}" if m.reread else f"{'':8}"
        print(
            f"{m.key:2}{m.label:34}{m.median:7.2f}{reread}{median.unsynced:8.2f}"
            f"{m.logical / m.median / 1e6:7.0f}{m.data / MiB:7.0f}M"
            f"{median.allocated / MiB:10.0f}  {runs}"
        )
    print()

    failures = []
    rules = (
        ("c", "a", "files export, 2 GiB file", WITH_REREAD, WITHOUT_REREAD),
        ("d", "b", "btrfs stream export", WITH_REREAD, WITHOUT_REREAD),
        ("h", "g", "files export, 100k files", TREE_LIMIT, None),
    )
    for gfs, base, what, with_limit, without_limit in rules:
        checks = [("with re-read", by_key[base].median_with_reread, with_limit)]
        if without_limit is not None:
            checks.append(("tool + sync only", by_key[base].median, without_limit))
        for name, baseline, limit in checks:
            ratio = by_key[gfs].median / baseline
            verdict = "ok" if ratio <= limit else "FAIL"
            print(
                f"{what:26} {gfs} vs {base} ({name}): {ratio:.2f}x (limit {limit:.2f}x): {verdict}"
            )
            if ratio > limit:
                failures.append(f"{what} vs {name}")

    sparse, mixed, sparse_cp = by_key["e"], by_key["a"], by_key["f"]
    sparse_sample = sparse.median_sample
    space_limit = sparse.data * SPARSE_SPACE_SLACK + MiB
    rate_ratio = (sparse.data / sparse.median) / (mixed.data / mixed.median)
    space_ok = sparse_sample.allocated <= space_limit
    rate_ok = rate_ratio >= SPARSE_RATE_FLOOR
    print(
        f"{'sparse file (e)':26} {sparse.data / MiB:.0f} MiB of data in 2 GiB: "
        f"{sparse.median:.2f} s, {sparse_sample.allocated / MiB:.1f} MiB allocated "
        f"(limit {space_limit / MiB:.0f}): {'ok' if space_ok else 'FAIL'}; data rate "
        f"{rate_ratio * 100:.0f}% of cp's (a, floor {SPARSE_RATE_FLOOR * 100:.0f}%): "
        f"{'ok' if rate_ok else 'FAIL'}; vs cp (f): "
        f"{(sparse.median / sparse_cp.median - 1) * 100:+.0f}% time"
    )
    if not space_ok:
        failures.append("sparse space")
    if not rate_ok:
        failures.append("sparse time")
    if failures:
        print(f"goal not met: {', '.join(failures)}")
        return 1
    print("all goals met")
    return 0


# Test data


def _write_mixed(path: Path) -> None:
    """FILE_SIZE bytes in shuffled pieces of random data, written zeros and holes."""
    rnd = random.Random(SEED)
    pieces: list[tuple[str, int]] = []
    for kind, share in SHARES:
        left = int(FILE_SIZE * share) // PIECE * PIECE
        while left:
            size = min(left, PIECE << rnd.randrange(11))
            pieces.append((kind, size))
            left -= size
    rnd.shuffle(pieces)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        offset = 0
        for kind, size in pieces:
            if kind != "hole":
                _write_run(fd, offset, size, rnd if kind == "random" else None)
            offset += size
        os.ftruncate(fd, FILE_SIZE)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_sparse(path: Path) -> None:
    """FILE_SIZE bytes, SPARSE_DATA of them random data in spread pieces, the rest holes."""
    rnd = random.Random(SEED + 1)
    piece, stride = SPARSE_DATA // SPARSE_PIECES, FILE_SIZE // SPARSE_PIECES
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for index in range(SPARSE_PIECES):
            jitter = rnd.randrange((stride - piece) // (4 * KiB)) * 4 * KiB
            _write_run(fd, index * stride + jitter, piece, rnd)
        os.ftruncate(fd, FILE_SIZE)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_run(fd: int, offset: int, size: int, rnd: random.Random | None) -> None:
    zeros = bytes(8 * MiB)
    end = offset + size
    while offset < end:
        count = min(8 * MiB, end - offset)
        data = rnd.randbytes(count) if rnd is not None else memoryview(zeros)[:count]
        offset += os.pwrite(fd, data, offset)


def _write_tree(path: Path) -> None:
    """A directory of TREE_FILES random files of TREE_FILE_SIZE, TREE_FANOUT per folder."""
    rnd = random.Random(SEED + 2)
    for index in range(TREE_FILES):
        folder = path / f"d{index // TREE_FANOUT:03d}"
        if index % TREE_FANOUT == 0:
            folder.mkdir(parents=True)
        (folder / f"f{index % TREE_FANOUT:04d}").write_bytes(rnd.randbytes(TREE_FILE_SIZE))


def _subvolume_with(mountpoint: Path, name: str, write: Callable[[Path], None]) -> Path:
    """A read-only snapshot of a new subvolume holding `file.img` made by `write` (for
    the tree: a directory of that name)."""
    subvolume, snapshot = mountpoint / name, mountpoint / f"{name}@snapshot"
    _run("btrfs", "subvolume", "create", str(subvolume))
    write(subvolume / "file.img")
    _run("btrfs", "subvolume", "snapshot", "-r", str(subvolume), str(snapshot))
    return snapshot


def _data_bytes(path: Path) -> int:
    return digest_file(path).data_bytes


def _reference(stream: IO[bytes]) -> tuple[str, int]:
    """sha256-1m by its definition (digest.py's one-liner), without gfs; and the size."""
    outer = hashlib.sha256()
    size = 0
    while block := stream.read(MiB):  # a full MiB unless at the end, also from a pipe
        outer.update(hashlib.sha256(block).digest())
        size += len(block)
    return outer.hexdigest(), size


def _send_reference(snapshot: Path) -> tuple[str, int]:
    """_reference of the `btrfs send` stream of `snapshot`."""
    with subprocess.Popen(["btrfs", "send", "-q", str(snapshot)], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        result = _reference(proc.stdout)
    if proc.returncode:
        raise RuntimeError(f"btrfs send {snapshot} failed ({proc.returncode})")
    return result


# The measured actions


def _cp(source: Path, out: Path) -> None:
    _run("cp", "--sparse=always", str(source), str(out))


def _cp_tree(source: Path, out: Path) -> None:
    _run("cp", "-a", str(source), str(out))


def _gfs_files_export(source: Path, out: Path) -> str | None:
    """What `gfs run` does for a files job: export the tree, then verify it (re-read)."""
    exported = export_tree(source, out)
    problems = verify_tree(out, exported.entries)
    if problems:
        raise RuntimeError(f"gfs export of {source} does not verify: {problems[:3]}")
    files = [entry for entry in exported.entries if entry.kind == "file"]
    return files[0].digest if len(files) == 1 else None


def _send_to_file(snapshot: Path, out: Path) -> None:
    with out.open("xb") as stream:
        _run("btrfs", "send", "-q", str(snapshot), stdout=stream)


def _send_to_gfs(snapshot: Path, out: Path) -> str:
    with subprocess.Popen(["btrfs", "send", "-q", str(snapshot)], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        try:
            digest = copy_stream(cast(BinaryIO, proc.stdout), out).digest
        except BaseException:
            proc.kill()
            raise
    if proc.returncode:
        raise RuntimeError(f"btrfs send {snapshot} failed ({proc.returncode})")
    if digest_file(out, uncached=True).digest != digest:  # the export's verify
        raise RuntimeError(f"gfs copy of the stream of {snapshot} does not verify")
    return digest


# Setup helpers


def _loop_filesystem(
    cleanup: contextlib.ExitStack, root: Path, name: str, size: int, mkfs: list[str]
) -> Path:
    """A file system of `mkfs` on a sparse image under `root`, mounted at root/name."""
    image, mountpoint = root / f"{name}.img", root / name
    with image.open("xb") as file:
        file.truncate(size)
    device = _run("losetup", "--find", "--show", "--direct-io=on", str(image)).strip()
    cleanup.callback(_run, "losetup", "--detach", device)
    _run(*mkfs, device)
    mountpoint.mkdir()
    _run("mount", device, str(mountpoint))
    cleanup.callback(_umount, mountpoint)
    return mountpoint


def _umount(mountpoint: Path) -> None:
    for _attempt in range(10):
        if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode == 0:
            return
        time.sleep(0.5)
    _run("umount", "--lazy", str(mountpoint))


def _run(*command: str, stdout: int | BinaryIO = subprocess.PIPE) -> str:
    """Run `command`; its output (unless sent to `stdout`); RuntimeError if it fails."""
    result = subprocess.run(command, stdout=stdout, stderr=subprocess.PIPE, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()}")
    return result.stdout or ""


def _fs_type(path: Path) -> str:
    return _run("stat", "--file-system", "--format=%T", str(path)).strip()


def _cpu_times() -> list[int]:
    with open("/proc/stat") as stat:
        return [int(field) for field in stat.readline().split()[1:]]


def _machine_load(before: list[int]) -> str:
    """Load average and CPU steal (host contention) since `before`, for the record."""
    delta = [now - then for now, then in zip(_cpu_times(), before, strict=True)]
    steal = delta[7] / max(1, sum(delta))  # user nice system idle iowait irq softirq steal
    return f"load average {os.getloadavg()[0]:.1f}, CPU steal {steal * 100:.0f}% during the runs"


def _sha256_rate() -> float:
    block = random.Random(SEED).randbytes(MiB)
    started = time.perf_counter()
    for _ in range(256):
        hashlib.sha256(block).digest()
    return 256 * MiB / (time.perf_counter() - started)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())

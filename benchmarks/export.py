"""Export throughput benchmark: `python benchmarks/export.py [--repeat N] [--workdir DIR]`.

Run as root (it makes loop devices, file systems and mounts; it drops the page cache).
It builds, in a fresh temporary directory on disk, a loop-backed btrfs source and a
separate loop-backed ext4 target (both image files sparse, loop devices with direct I/O so
the host file's page cache does not serve reads). The source gets a subvolume with a 2 GiB
file mixing random data (40%), written zeros (30%) and holes (30%) in seeded pieces of
64 KiB to 64 MiB, and a second subvolume with a 2 GiB sparse file holding 100 MiB of data;
both are snapshotted read-only. Then, on the same data, each measurement is run `--repeat`
times (page cache dropped before every run so it reads from the device; the best run
counts):

  a  cp --sparse=always FILE TARGET          baseline for c
  b  btrfs send SNAPSHOT > TARGET            baseline for d
  c  gfs copy_file(FILE, TARGET)             sparse copy + sha256-1m in one pass
  d  btrfs send SNAPSHOT | gfs copy_stream   the real btrfs export path
  e  gfs copy_file of the sparse file        time and space must follow its 100 MiB
  f  cp --sparse=always of the sparse file   for reference

A warm-up pass of all six comes first, not counted: it checks every output's content
(digest_file of it, and the digest gfs returned) against sha256-1m computed here without
gfs, from the source file or the `btrfs send` stream. Rounds then run in rotated order.
gfs fsyncs what it writes, so each baseline's time includes an fsync of its output too
(also shown without it). Prints a table; exits 1 if copy_file is more
than 10% slower than cp, copy_stream more than 10% slower than `btrfs send > file`, or
the sparse copy's time or space does not follow its data; 2 if it cannot run. Everything
it made (mounts, loop devices, images) is removed on exit, also on Ctrl-C or SIGTERM.
Standard library and gfs_backup only.
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
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, BinaryIO, cast

try:
    from gfs_backup.copy import copy_file, copy_stream, digest_file
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from gfs_backup.copy import copy_file, copy_stream, digest_file

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
FILE_SIZE = 2 * GiB
SHARES = (("random", 0.4), ("zero", 0.3), ("hole", 0.3))
PIECE = 64 * KiB  # pieces are 64 KiB * 2**k, k in 0..10: not all aligned to 1 MiB
SPARSE_DATA, SPARSE_PIECES = 100 * MiB, 50
SOURCE_IMAGE = TARGET_IMAGE = 4 * GiB
SEED = 20260101
TOLERANCE = 0.10  # gfs may be at most this much slower than its baseline
SPARSE_SPACE_SLACK = 1.05  # allocated <= data * this + 1 MiB
# The sparse file's 50 scattered pieces are read at random, not in one sequential sweep, so
# its data rate may be below c's; reading its 2 GiB of holes would take it below ~15%.
SPARSE_RATE_FLOOR = 1 / 3  # data rate of the sparse copy >= this share of c's data rate
TOOLS = ("losetup", "mkfs.btrfs", "mkfs.ext4", "btrfs", "mount", "umount", "cp")


class Abort(Exception):
    """The benchmark cannot run here."""


@dataclass
class Sample:
    seconds: float  # including an fsync of the output
    unsynced: float  # the command alone
    allocated: int  # st_blocks * 512 of the output
    digest: str | None = None  # what gfs computed


@dataclass
class Measurement:
    key: str
    label: str
    logical: int  # logical bytes exported
    data: int  # bytes that had to be read: data extents, or the send stream
    samples: list[Sample] = field(default_factory=list)

    @property
    def best(self) -> Sample:
        return min(self.samples, key=lambda sample: sample.seconds)


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
    mixed, sparse = mixed_snapshot / "file.img", sparse_snapshot / "file.img"
    with mixed.open("rb") as file:
        expected_file, _size = _reference(file)
    with sparse.open("rb") as file:
        expected_sparse, _size = _reference(file)
    expected_stream, stream_size = _send_reference(mixed_snapshot)
    mixed_data, sparse_data = _data_bytes(mixed), _data_bytes(sparse)
    print(f"  done in {time.perf_counter() - started:.1f} s", flush=True)

    measurements = [
        Measurement("a", "cp --sparse=always", FILE_SIZE, mixed_data),
        Measurement("b", "btrfs send > file", FILE_SIZE, stream_size),
        Measurement("c", "gfs copy_file", FILE_SIZE, mixed_data),
        Measurement("d", "btrfs send | gfs copy_stream", FILE_SIZE, stream_size),
        Measurement("e", "gfs copy_file, sparse file", FILE_SIZE, sparse_data),
        Measurement("f", "cp --sparse=always, sparse", FILE_SIZE, sparse_data),
    ]
    actions: dict[str, Callable[[Path], str | None]] = {
        "a": lambda out: _cp(mixed, out),
        "b": lambda out: _send_to_file(mixed_snapshot, out),
        "c": lambda out: copy_file(mixed, out).digest,
        "d": lambda out: _send_to_gfs(mixed_snapshot, out),
        "e": lambda out: copy_file(sparse, out).digest,
        "f": lambda out: _cp(sparse, out),
    }
    expected = {"a": expected_file, "c": expected_file, "e": expected_sparse}
    expected |= {"f": expected_sparse, "b": expected_stream, "d": expected_stream}
    print("warm-up (not counted), checking every output's content:", end="", flush=True)
    for measurement in measurements:
        out = target / f"{measurement.key}.out"
        sample = _timed(actions[measurement.key], out)
        print(f" {measurement.key} {sample.seconds:.2f}s", end="", flush=True)
        _check_digest(measurement, out, sample, expected[measurement.key])
        out.unlink()
    print(flush=True)
    cpu_before = _cpu_times()
    for round_number in range(repeat):
        print(f"round {round_number + 1}/{repeat}:", end="", flush=True)
        turn = round_number % len(measurements)  # each round in another order
        for measurement in measurements[turn:] + measurements[:turn]:
            out = target / f"{measurement.key}.out"
            sample = _timed(actions[measurement.key], out)
            measurement.samples.append(sample)
            print(f" {measurement.key} {sample.seconds:.2f}s", end="", flush=True)
            out.unlink()
        print(flush=True)
    return _report(measurements, _machine_load(cpu_before))


def _timed(action: Callable[[Path], str | None], out: Path) -> Sample:
    """Run `action(out)` from a cold page cache; fsync `out` after it."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    started = time.perf_counter()
    digest = action(out)
    done = time.perf_counter()
    fd = os.open(out, os.O_RDONLY)
    try:
        os.fsync(fd)
        blocks = os.fstat(fd).st_blocks
    finally:
        os.close(fd)
    return Sample(time.perf_counter() - started, done - started, blocks * 512, digest)


def _check_digest(measurement: Measurement, out: Path, sample: Sample, expected: str) -> None:
    found = digest_file(out).digest
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
        f"cache dropped before each run; best of {len(measurements[0].samples)} runs; all "
        "times include an fsync of the output"
    )
    header = (
        f"{'':2}{'export of a 2 GiB file':31}{'s':>7}{'no fsync':>9}{'MB/s':>8}{'data':>8}"
        f"{'data MB/s':>10}{'alloc MiB':>10}  runs (s)"
    )
    print(header)
    print("-" * len(header))
    for m in measurements:
        best = m.best
        runs = " ".join(f"{sample.seconds:.2f}" for sample in m.samples)
        print(
            f"{m.key:2}{m.label:31}{best.seconds:7.2f}{best.unsynced:9.2f}"
            f"{m.logical / best.seconds / 1e6:8.0f}{m.data / MiB:7.0f}M"
            f"{m.data / best.seconds / 1e6:10.0f}{best.allocated / MiB:10.0f}  {runs}"
        )
    print()

    failures = []
    for gfs, base, what in (("c", "a", "copy_file vs cp"), ("d", "b", "copy_stream vs send")):
        ratio = by_key[gfs].best.seconds / by_key[base].best.seconds - 1
        verdict = "ok" if ratio <= TOLERANCE else "FAIL"
        slower = "slower" if ratio > 0 else "faster"
        print(
            f"{what:22} {gfs} vs {base}: gfs {abs(ratio) * 100:5.1f}% {slower} "
            f"(limit {TOLERANCE * 100:.0f}% slower): {verdict}"
        )
        if ratio > TOLERANCE:
            failures.append(what)
    fastest_gfs = min(by_key["c"].best.seconds, by_key["d"].best.seconds)
    fastest_base = min(by_key["a"].best.seconds, by_key["b"].best.seconds)
    print(
        f"{'fastest gfs export':22} vs fastest baseline: "
        f"{(fastest_gfs / fastest_base - 1) * 100:+.1f}% (informational)"
    )

    sparse, mixed, sparse_cp = by_key["e"], by_key["c"], by_key["f"]
    space_limit = sparse.data * SPARSE_SPACE_SLACK + MiB
    rate_ratio = (sparse.data / sparse.best.seconds) / (mixed.data / mixed.best.seconds)
    space_ok = sparse.best.allocated <= space_limit
    rate_ok = rate_ratio >= SPARSE_RATE_FLOOR
    print(
        f"{'sparse file (e)':22} {sparse.data / MiB:.0f} MiB of data in 2 GiB: "
        f"{sparse.best.seconds:.2f} s, {sparse.best.allocated / MiB:.1f} MiB allocated "
        f"(limit {space_limit / MiB:.0f}): {'ok' if space_ok else 'FAIL'}; data rate "
        f"{rate_ratio * 100:.0f}% of c's (floor {SPARSE_RATE_FLOOR * 100:.0f}%): "
        f"{'ok' if rate_ok else 'FAIL'}; vs cp (f): "
        f"{(sparse.best.seconds / sparse_cp.best.seconds - 1) * 100:+.0f}% time"
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


def _subvolume_with(mountpoint: Path, name: str, write: Callable[[Path], None]) -> Path:
    """A read-only snapshot of a new subvolume holding `file.img` made by `write`."""
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

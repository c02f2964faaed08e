"""Benchmark of changed-block capture: `sudo .venv/bin/python benchmarks/incremental.py`.

Runs as root from the repo root on a machine prepared by scripts/lab-setup (~5 min on 2
cores). It starts the lab's libvirt daemons, builds the lab guest and makes an 8 GiB qcow2
disk holding 4 GiB of random data (256 chunks of 16 MiB at a 32 MiB stride, the rest
sparse). An idle TCG domain runs from it. The target is a loop-backed XFS with reflink on a
sparse 40 GiB image file under /var/tmp, mounted before the domain starts (no generation is
pruned during the benchmark, and on XFS a full image may take twice its data: the holes
between the data runs are allocated by XFS's speculative preallocation past EOF as the file
grows; the benchmark prints the image's allocation). Before every timed round: `sync` and
`echo 3 > /proc/sys/vm/drop_caches`. Medians of 3 rounds:

(a) gfs full: a job with `incremental = false`, `gfs run --force` (wall time of the
    subprocess); from the new generation's manifest `source.capture`: bytes_read,
    bytes_written (the bytes sent to the target), new_bytes (FIEMAP: not shared with another
    file); and the target filesystem's used space before and after (statvfs);
(b) baseline, interleaved with (a): `qemu-img convert -U -O qcow2` of the source image to
    the target (read while the idle guest runs, hence -U), then fsync + sync of its output
    ("convert + sync"), then the page cache dropped and the output read back in full
    ("convert + sync + re-read");
(c) gfs incremental with 1% of the data changed before each round (41 MiB: 1 MiB writes at
    random MiBs inside the data chunks, made through QEMU itself with HMP `qemu-io` so the
    dirty bitmaps see them), by a second job (incremental, the default) on the same target
    whose first run, a full read, is not counted; each round must be an incremental made by
    cloning the base's image (capture mode "incremental", disks.vda.path "clone");
(d) the same with 10% of the data changed (410 MiB).

Goals (the numbers and baselines from the same run): an incremental with 1% change takes
under 10% of the full's time and of its new space on the target, and is still a full,
verified generation (`gfs verify` of the incremental job reads every generation at the end);
the full is within 1.1x of convert + sync + re-read and within 1.5x of convert + sync.
It exits 1 if a goal is missed or a round was not what it should be, 2 if it cannot run.
Everything (domains, mounts, loop devices, files) is removed again in `finally`, also on
Ctrl-C.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import libvirt  # noqa: E402
import libvirt_qemu  # noqa: E402

from benchmarks.common import allocated, lab_teardown, run_quietly, sh  # noqa: E402
from tests.lab.daemons import start_libvirt_daemons  # noqa: E402
from tests.lab.domains import DomainFactory, reap_stale_domains  # noqa: E402
from tests.lab.guest import BOOT_MARKER, build_guest_image  # noqa: E402

GIB = 1 << 30
MIB = 1 << 20
DISK_SIZE = 8 * GIB
CHUNK = 16 * MIB
CHUNKS = 256  # 256 x 16 MiB = 4 GiB of data
STRIDE = DISK_SIZE // CHUNKS  # 32 MiB: each chunk followed by 16 MiB of hole
DATA = CHUNKS * CHUNK
TARGET_IMAGE_SIZE = 40 * GIB
# Free space needed in /var/tmp: the source (4 GiB, 8 GiB sparse raw while it is made) and
# what the target image may fill (3 fulls of up to 8 GiB, the baseline's 4 GiB, the
# incremental job's first full and its rounds).
NEEDED_FREE = 46 * GIB
ROUNDS = 3
CHANGES = (("1%", 0.01), ("10%", 0.10))
TIME_GOAL = 0.10  # incremental 1% / full, wall time
SPACE_GOAL = 0.10  # incremental 1% / full, new space on the target
WITH_REREAD = 1.10  # full / (convert + sync + re-read)
WITHOUT_REREAD = 1.50  # full / (convert + sync)
DRIVE = "/machine/peripheral/virtio-disk0/virtio-backend"  # the lab domain's vda
READ_BUFFER = 8 * MIB
# keep-last 10: no generation is pruned during the benchmark (a prune would free space
# inside a measured round).
POLICY = """
[job.policy]
semantics = "restic"
timezone = "UTC"
schedule = "daily"
[job.policy.retention]
keep-last = 10
"""


@dataclass
class GfsSample:
    seconds: float
    bytes_read: int
    bytes_written: int
    new_bytes: int | None
    space: int  # used space of the target filesystem after - before (statvfs)
    mode: str
    path: str
    reason: str
    verify: str  # the generation's own verify record: result (scope)
    generation: str
    allocated: int  # st_blocks of disks/vda.raw
    log: str  # gfs's stderr


@dataclass
class BaseSample:
    convert: float
    sync: float  # convert + fsync + sync
    reread: float  # the re-read alone
    allocated: int
    space: int

    @property
    def total(self) -> float:
        return self.sync + self.reread


@dataclass
class Results:
    full: list[GfsSample] = field(default_factory=list)
    base: list[BaseSample] = field(default_factory=list)
    incremental: dict[str, list[GfsSample]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def drop_caches() -> None:
    """`sync` and `echo 3 > /proc/sys/vm/drop_caches`: every round reads from storage."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def used(path: Path, settle: float = 60.0) -> int:
    """Used bytes of the filesystem holding `path`, once settled: after a sync (delayed
    allocation) and until two readings 0.5 s apart agree (XFS frees the blocks of a deleted
    file in the background, e.g. the baseline's output, seconds later), at most `settle` s."""
    os.sync()
    deadline = time.monotonic() + settle
    info = os.statvfs(path)
    while True:
        time.sleep(0.5)
        again = os.statvfs(path)
        if again.f_bfree == info.f_bfree or time.monotonic() > deadline:
            return (again.f_blocks - again.f_bfree) * again.f_frsize
        info = again


def data_mibs() -> list[int]:
    """The MiB indices of the disk that hold data (inside the chunks)."""
    per_chunk = CHUNK // MIB
    return [index * (STRIDE // MIB) + mib for index in range(CHUNKS) for mib in range(per_chunk)]


def make_source(workdir: Path) -> Path:
    """An 8 GiB qcow2 with 4 GiB of random data in 256 chunks spread over the disk."""
    raw = workdir / "source.raw"
    with raw.open("wb") as out:
        out.truncate(DISK_SIZE)
        for index in range(CHUNKS):
            out.seek(index * STRIDE)
            out.write(os.urandom(CHUNK))
    image = workdir / "source.qcow2"
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(image))
    raw.unlink()
    return image


def write_config(directory: Path, target: Path, job: str, domain: str, extra: str = "") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    scratch = directory / "scratch"  # gfs's NBD socket directory: removed with the workdir
    scratch.mkdir(exist_ok=True)
    config = directory / "gfs.toml"
    config.write_text(
        f"state_dir = {json.dumps(str(directory / 'state'))}\n"
        f"[target.usb]\npath = {json.dumps(str(target))}\nrequire_nfs = false\n"
        f'[[job]]\nname = {json.dumps(job)}\nkind = "libvirt"\n'
        f"domain = {json.dumps(domain)}\nscratch_dir = {json.dumps(str(scratch))}\n"
        f"{extra}{POLICY}",
        encoding="utf-8",
    )
    return config


def run_gfs(config: Path) -> tuple[float, str]:
    """`gfs run --force`: its wall time and log (stderr)."""
    argv = [sys.executable, "-m", "gfs_backup", "run", "--force", "--config", str(config)]
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, check=False)
    elapsed = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"gfs run failed ({done.returncode}):\n{done.stderr}")
    return elapsed, done.stderr


def generations(target: Path, job: str) -> set[Path]:
    return {manifest.parent for manifest in (target / job).glob("*/manifest.json")}


def gfs_round(config: Path, target: Path, job: str) -> GfsSample:
    """One timed `gfs run --force` from a cold page cache; what its manifest says."""
    before = generations(target, job)
    drop_caches()
    space_before = used(target)
    seconds, log = run_gfs(config)
    space = used(target) - space_before
    new = sorted(generations(target, job) - before)
    if len(new) != 1:
        raise RuntimeError(f"expected one new generation of {job}, found {new}")
    manifest: dict[str, Any] = json.loads((new[0] / "manifest.json").read_text())
    capture = manifest["source"]["capture"]
    records = manifest.get("verify") or [{}]
    verify = f"{records[-1].get('result', 'none')} ({records[-1].get('scope', 'full')})"
    return GfsSample(
        seconds=seconds,
        bytes_read=int(capture["bytes_read"]),
        bytes_written=int(capture["bytes_written"]),
        new_bytes=None if capture.get("new_bytes") is None else int(capture["new_bytes"]),
        space=space,
        mode=str(capture["mode"]),
        path=str(capture["disks"]["vda"]["path"]),
        reason=str(capture.get("reason", "")),
        verify=verify,
        generation=str(manifest["generation"]),
        allocated=allocated(new[0] / "disks" / "vda.raw"),
        log=log,
    )


def read_all(path: Path) -> None:
    """Reads `path` to the end (the re-read of a copy: data to /dev/null)."""
    buffer = bytearray(READ_BUFFER)
    with path.open("rb", buffering=0) as handle:
        while handle.readinto(buffer):
            pass


def baseline_round(source: Path, target: Path) -> BaseSample:
    """`qemu-img convert` from a cold page cache, fsync + sync, then a cold re-read."""
    output = target / "baseline.qcow2"
    drop_caches()
    space_before = used(target)
    started = time.monotonic()
    sh("qemu-img", "convert", "-U", "-O", "qcow2", str(source), str(output))
    converted = time.monotonic() - started
    fd = os.open(output, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.sync()
    synced = time.monotonic() - started
    drop_caches()
    started = time.monotonic()
    read_all(output)
    reread = time.monotonic() - started
    sample = BaseSample(converted, synced, reread, allocated(output), used(target) - space_before)
    output.unlink()
    os.sync()
    return sample


class DiskChanger:
    """Changes whole MiBs inside the data chunks of a running domain's vda through QEMU
    (HMP `qemu-io` on the drive), so its dirty bitmaps see every write."""

    def __init__(self, domain: libvirt.virDomain, seed: int) -> None:
        self.domain = domain
        self.rng = random.Random(seed)
        self.mibs = data_mibs()

    def _hmp(self, command: str) -> None:
        out = libvirt_qemu.qemuMonitorCommand(
            self.domain,
            f'qemu-io -d {DRIVE} "{command}"',
            libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP,
        )
        if "error" in out.lower() or "fail" in out.lower():
            raise RuntimeError(f"qemu-io {command!r}: {out.strip()}")

    def change(self, count: int) -> int:
        """Writes a new pattern over `count` distinct data MiBs; the bytes written."""
        for mib in sorted(self.rng.sample(self.mibs, count)):
            self._hmp(f"write -P {self.rng.randrange(1, 255)} {mib * MIB} {MIB}")
        self._hmp("flush")
        return count * MIB


def mount_target(workdir: Path, cleanups: list[tuple[str, ...]]) -> Path:
    """A loop-backed XFS with reflink of TARGET_IMAGE_SIZE (sparse image file)."""
    image = workdir / "target.img"
    with image.open("wb") as out:
        out.truncate(TARGET_IMAGE_SIZE)
    device = sh("losetup", "--find", "--show", "--direct-io=on", str(image)).strip()
    cleanups.append(("losetup", "-d", device))
    sh("mkfs.xfs", "-q", "-f", "-m", "reflink=1", device)
    point = workdir / "target"
    point.mkdir()
    sh("mount", device, str(point))
    cleanups.append(("umount", str(point)))
    return point


def umount(point: str) -> None:
    for _attempt in range(10):
        if subprocess.run(["umount", point], capture_output=True, check=False).returncode == 0:
            return
        time.sleep(0.5)
    subprocess.run(["umount", "--lazy", point], capture_output=True, check=False)


def check_round(results: Results, label: str, sample: GfsSample, mode: str, path: str) -> None:
    if sample.mode != mode or sample.path != path:
        results.problems.append(
            f"{label} {sample.generation}: capture mode {sample.mode!r}, path {sample.path!r} "
            f"(expected {mode!r}, {path!r}); reason: {sample.reason or '-'}"
        )
    if not sample.verify.startswith("ok"):
        results.problems.append(f"{label} {sample.generation}: its verify: {sample.verify}")


def show(label: str, sample: GfsSample) -> None:
    print(
        f"  {label}: {sample.seconds:.2f} s, {sample.mode} ({sample.path}), "
        f"read {mib(sample.bytes_read)}, sent {mib(sample.bytes_written)}, "
        f"new {mib(sample.new_bytes)}, fs +{mib(sample.space)}, verify {sample.verify}",
        flush=True,
    )


def mib(size: int | float | None) -> str:
    return "-" if size is None else f"{size / MIB:.1f} MiB"


def median(values: list[float] | list[int]) -> float:
    return float(statistics.median(values))


def median_new(samples: list[GfsSample]) -> float | None:
    known = [s.new_bytes for s in samples if s.new_bytes is not None]
    return median(known) if len(known) == len(samples) else None


def measure(
    results: Results,
    factory: DomainFactory,
    source: Path,
    target: Path,
    workdir: Path,
) -> str:
    """Rounds (a)-(d); returns the incremental job's config (for its verify)."""
    vm = factory(action="idle", disk=source)
    vm.wait_for(BOOT_MARKER, 300)
    print(f"domain {vm.name} up; source {source} ({mib(allocated(source))} allocated)")
    print(
        f"target: loop-backed XFS (reflink) on a sparse {TARGET_IMAGE_SIZE // GIB} GiB image; "
        "page cache dropped before every round\n",
        flush=True,
    )
    full_config = write_config(
        workdir / "cfg-full", target, "full", vm.name, "incremental = false\n"
    )
    print(f"(a) gfs full (incremental = false) and (b) qemu-img convert, {ROUNDS} rounds")
    for round_ in range(ROUNDS):
        order = ("full", "base") if round_ % 2 == 0 else ("base", "full")
        for what in order:
            if what == "full":
                sample = gfs_round(full_config, target, "full")
                results.full.append(sample)
                check_round(results, "full", sample, "full", "new")
                show(f"round {round_ + 1} gfs full", sample)
            else:
                base = baseline_round(source, target)
                results.base.append(base)
                print(
                    f"  round {round_ + 1} convert {base.convert:.2f} s, + sync {base.sync:.2f} s, "
                    f"+ re-read {base.total:.2f} s, allocated {mib(base.allocated)}",
                    flush=True,
                )

    inc_config = write_config(workdir / "cfg-inc", target, "inc", vm.name)
    first = gfs_round(inc_config, target, "inc")
    show("incremental job's first run (a full read, not counted)", first)
    changer = DiskChanger(vm.domain, seed=20261206)
    for label, fraction in CHANGES:
        count = round(DATA / MIB * fraction)
        print(f"({'c' if label == '1%' else 'd'}) gfs incremental, {label} changed ({count} MiB)")
        samples = results.incremental.setdefault(label, [])
        for round_ in range(ROUNDS):
            changer.change(count)
            sample = gfs_round(inc_config, target, "inc")
            samples.append(sample)
            check_round(results, f"incremental {label}", sample, "incremental", "clone")
            show(f"round {round_ + 1}", sample)
    return str(inc_config)


def verify(config: str) -> tuple[bool, float, str]:
    """`gfs verify` of every generation: whether all passed, its wall time, its report."""
    argv = [sys.executable, "-m", "gfs_backup", "verify", "--config", config]
    drop_caches()
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, check=False)
    elapsed = time.monotonic() - started
    ok = done.returncode == 0
    return ok, elapsed, (done.stdout if ok else done.stdout + done.stderr).strip()


def cpu_times() -> list[int]:
    with open("/proc/stat") as stat:
        return [int(field) for field in stat.readline().split()[1:]]


def machine_load(before: list[int]) -> str:
    """Load average and CPU steal since `before`, for the record."""
    delta = [now - then for now, then in zip(cpu_times(), before, strict=True)]
    steal = delta[7] / max(1, sum(delta))  # user nice system idle iowait irq softirq steal
    busy = 1 - (delta[3] + delta[4]) / max(1, sum(delta))
    return (
        f"{os.cpu_count()} cores, {busy:.0%} busy, CPU steal {steal:.0%} during the rounds, "
        f"load average {os.getloadavg()[0]:.1f} at the end"
    )


def sha256_rate() -> float:
    """Bytes per second one core hashes (sha256 of 1 MiB blocks), for the record."""
    block = os.urandom(MIB)
    started = time.monotonic()
    for _ in range(256):
        hashlib.sha256(block).digest()
    return 256 * MIB / (time.monotonic() - started)


def report(results: Results, verified: tuple[bool, float, str], load: str) -> bool:
    """The table and the goal lines; whether every goal was met."""
    full = median([s.seconds for s in results.full])
    convert = median([b.convert for b in results.base])
    synced = median([b.sync for b in results.base])
    reread = median([b.total for b in results.base])
    print(
        f"\nmedians of {ROUNDS} rounds; read = bytes read from the source disk, "
        "sent = written to the target, new = FIEMAP bytes not shared, fs = statvfs delta"
    )
    header = f"{'measurement':<32} {'seconds':>8} {'read':>12} {'sent':>12} {'new':>12} {'fs':>12}"
    print(header)
    print("-" * len(header))

    def row(label: str, samples: list[GfsSample]) -> None:
        print(
            f"{label:<32} {median([s.seconds for s in samples]):8.2f} "
            f"{mib(median([s.bytes_read for s in samples])):>12} "
            f"{mib(median([s.bytes_written for s in samples])):>12} "
            f"{mib(median_new(samples)):>12} {mib(median([s.space for s in samples])):>12}"
        )

    row("gfs full (incremental = false)", results.full)
    base_alloc = median([b.allocated for b in results.base])
    base_space = median([b.space for b in results.base])
    for label, seconds in (
        ("qemu-img convert", convert),
        ("convert + sync", synced),
        ("convert + sync + re-read", reread),
    ):
        print(
            f"{label:<32} {seconds:8.2f} {'-':>12} {mib(base_alloc):>12} "
            f"{mib(base_alloc):>12} {mib(base_space):>12}"
        )
    for label, samples in results.incremental.items():
        row(f"gfs incremental, {label} changed", samples)
    print("\nwall times per round:")
    print(f"  gfs full: {', '.join(f'{s.seconds:.2f}' for s in results.full)} s")
    print(f"  convert + sync: {', '.join(f'{b.sync:.2f}' for b in results.base)} s")
    print(f"  convert + sync + re-read: {', '.join(f'{b.total:.2f}' for b in results.base)} s")
    for label, samples in results.incremental.items():
        print(f"  incremental {label}: {', '.join(f'{s.seconds:.2f}' for s in samples)} s")

    inc = results.incremental["1%"]
    inc_time = median([s.seconds for s in inc])
    full_space = median([s.space for s in results.full])
    inc_space = median([s.space for s in inc])
    full_new, inc_new = median_new(results.full), median_new(inc)
    goals: list[tuple[str, bool]] = []
    ratio = inc_time / full
    goals.append(
        (
            f"incremental 1% time < {TIME_GOAL:.0%} of full: {inc_time:.2f} s / {full:.2f} s "
            f"= {ratio:.1%}",
            ratio < TIME_GOAL,
        )
    )
    ratio = inc_space / full_space
    text = (
        f"incremental 1% new space < {SPACE_GOAL:.0%} of full's (statvfs): "
        f"{mib(inc_space)} / {mib(full_space)} = {ratio:.1%}"
    )
    if full_new and inc_new is not None:
        text += f" (FIEMAP new_bytes: {mib(inc_new)} / {mib(full_new)} = {inc_new / full_new:.1%})"
    text += f" (incremental 1% / the {DATA // GIB} GiB of data: {inc_space / DATA:.1%})"
    goals.append((text, ratio < SPACE_GOAL))
    ratio = full / reread
    goals.append(
        (
            f"full / (convert + sync + re-read) <= {WITH_REREAD}: {full:.2f} / {reread:.2f} "
            f"= {ratio:.2f}",
            ratio <= WITH_REREAD,
        )
    )
    ratio = full / synced
    goals.append(
        (
            f"full / (convert + sync) <= {WITHOUT_REREAD}: {full:.2f} / {synced:.2f} = {ratio:.2f}",
            ratio <= WITHOUT_REREAD,
        )
    )
    whole = all(s.mode == "incremental" and s.verify.startswith("ok") for s in inc)
    goals.append(
        (
            "incremental 1% a complete, verified generation (incremental, its own verify ok, "
            "`gfs verify` of every generation ok)",
            whole and verified[0],
        )
    )
    print(f"\nmachine: {load}")
    rate = sha256_rate()
    print(
        f"sha256 on one core: {rate / 1e6:.0f} MB/s ({DATA / rate:.1f} s for the "
        f"{DATA // GIB} GiB of data)"
    )
    print(f"full / convert alone: {full / convert:.2f} (for the record, no goal)")
    image = median([s.allocated for s in results.full])
    print(
        f"full image disks/vda.raw: {mib(image)} allocated for {mib(DATA)} of data "
        f"(the baseline's qcow2: {mib(base_alloc)})"
    )
    print("goals:")
    for text, met in goals:
        print(f"  {text}: {'yes' if met else 'no'}")
    ok, seconds, output = verified
    print(
        f"\ngfs verify of the incremental job ({seconds:.1f} s): "
        f"{'every generation verified' if ok else 'FAILED'}"
    )
    for line in output.splitlines():
        print(f"  {line}")
    for label, samples in (("full", results.full), ("incremental 1%", inc)):
        print(f"\ngfs's log of the last {label} round:")
        for line in samples[-1].log.splitlines():
            print(f"  {line}")
    if results.problems:
        print("\nrounds that were not what they should be:")
        for problem in results.problems:
            print(f"  {problem}")
    return all(met for _text, met in goals) and not results.problems


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main() -> int:
    if os.geteuid() != 0:
        print("run as root (libvirt lab, loop devices, mounts, drop_caches)", file=sys.stderr)
        return 2
    missing = [tool for tool in ("qemu-img", "mkfs.xfs", "losetup") if not shutil.which(tool)]
    if missing:
        print(f"missing tools: {', '.join(missing)}", file=sys.stderr)
        return 2
    free = shutil.disk_usage("/var/tmp").free
    if free < NEEDED_FREE:
        print(
            f"/var/tmp has {free / GIB:.1f} GiB free, needs {NEEDED_FREE // GIB}", file=sys.stderr
        )
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    workdir = Path(tempfile.mkdtemp(prefix="gfs-inc-bench-", dir="/var/tmp"))
    cleanups: list[tuple[str, ...]] = []
    daemons = conn = factory = None
    try:
        daemons = start_libvirt_daemons()
        conn = libvirt.open(daemons.uri)
        reap_stale_domains(conn)
        image = build_guest_image(workdir / "guest")
        print(f"making the source: {DISK_SIZE // GIB} GiB qcow2, {DATA // GIB} GiB of data ...")
        started = time.monotonic()
        source = make_source(workdir)
        print(f"  done in {time.monotonic() - started:.1f} s", flush=True)
        target = mount_target(workdir, cleanups)
        factory = DomainFactory(conn, image, workdir / "lab")
        results = Results()
        before = cpu_times()
        config = measure(results, factory, source, target, workdir)
        load = machine_load(before)
        verified = verify(config)
        return 0 if report(results, verified, load) else 1
    except KeyboardInterrupt:
        print("\nincremental benchmark: interrupted, cleaning up", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the cleanup finish
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        lab_teardown(factory, conn, cleanups, daemons, workdir, undo)


def undo(argv: tuple[str, ...]) -> None:
    """A cleanup command: `umount` by `umount` (it waits for a busy mount), others run."""
    if argv[0] == "umount":
        umount(argv[1])
    else:
        run_quietly(argv)


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark of the libvirt export: `sudo .venv/bin/python benchmarks/vm_export.py`.

Runs as root from the repo root on a machine prepared by scripts/lab-setup. It starts the lab's
libvirt daemons, builds the lab guest and makes a 4 GiB qcow2 disk holding 1 GiB of random
data (64 chunks of 16 MiB spread over the disk, the rest sparse). The target is a loop-backed
ext4 filesystem (a sparse image file on the root disk), mounted before the domain starts.
An idle TCG domain boots from that disk; then, with the domain running:

(a) `gfs run --force` of the domain (wall time of the subprocess; allocated bytes
    st_blocks*512 and apparent size of disks/vda.raw);
(b) baseline `qemu-img convert -U -O qcow2` of the same source image (read while the idle
    guest runs, hence -U) to the same target filesystem, with and without a final fsync
    (gfs fsyncs its copy, so "convert + fsync" is the fair comparison);
(c) with a second domain running qemu-ga on an ext2 guest filesystem, `quiesce = "required"`:
    source.frozen_seconds from the generation's manifest.json (goal: < 1 s).

The source image is evicted from the page cache before (a) and (b). Everything is removed
again in `finally`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import libvirt  # noqa: E402

from benchmarks.common import allocated, evict, lab_teardown, sh  # noqa: E402
from tests.lab.daemons import start_libvirt_daemons  # noqa: E402
from tests.lab.domains import DomainFactory, reap_stale_domains  # noqa: E402
from tests.lab.guest import BOOT_MARKER, PATTERN_WRITTEN, build_guest_image  # noqa: E402

GIB = 1 << 30
MIB = 1 << 20
DISK_SIZE = 4 * GIB
CHUNK = 16 * MIB
CHUNKS = 64  # 64 x 16 MiB = 1 GiB of data
TARGET_IMAGE_SIZE = 6 * GIB
WITHIN = 0.15
POLICY = """
[job.policy]
semantics = "restic"
timezone = "UTC"
schedule = "daily"
[job.policy.retention]
keep-last = 3
"""


def make_source(workdir: Path) -> Path:
    """A 4 GiB qcow2 with 1 GiB of random data in 64 chunks spread over the disk."""
    raw = workdir / "source.raw"
    stride = DISK_SIZE // CHUNKS
    with raw.open("wb") as out:
        out.truncate(DISK_SIZE)
        for index in range(CHUNKS):
            out.seek(index * stride)
            out.write(os.urandom(CHUNK))
    image = workdir / "source.qcow2"
    sh("qemu-img", "convert", "-O", "qcow2", str(raw), str(image))
    raw.unlink()
    return image


def write_config(directory: Path, target: Path, job: str, domain: str, extra: str = "") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "gfs.toml"
    config.write_text(
        f"state_dir = {json.dumps(str(directory / 'state'))}\n"
        f"[target.usb]\npath = {json.dumps(str(target))}\nrequire_nfs = false\n"
        f'[[job]]\nname = {json.dumps(job)}\nkind = "libvirt"\n'
        f"domain = {json.dumps(domain)}\n{extra}{POLICY}",
        encoding="utf-8",
    )
    return config


def run_gfs(config: Path) -> float:
    argv = [sys.executable, "-m", "gfs_backup", "run", "--force", "--config", str(config)]
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, check=False)
    elapsed = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"gfs run failed ({done.returncode}):\n{done.stderr}")
    return elapsed


def generation_dir(target: Path, job: str) -> Path:
    manifests = sorted((target / job).glob("*/manifest.json"))
    if len(manifests) != 1:
        raise RuntimeError(f"expected one generation of {job}, found {manifests}")
    return manifests[0].parent


def baseline(source: Path, output: Path) -> tuple[float, float]:
    """Seconds of `qemu-img convert` alone and including an fsync of the output."""
    started = time.monotonic()
    sh("qemu-img", "convert", "-U", "-O", "qcow2", str(source), str(output))
    converted = time.monotonic() - started
    fd = os.open(output, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return converted, time.monotonic() - started


def mount_target(workdir: Path, cleanups: list[tuple[str, ...]]) -> Path:
    """A loop-backed ext4 filesystem of TARGET_IMAGE_SIZE (sparse image file)."""
    image = workdir / "target.img"
    with image.open("wb") as out:
        out.truncate(TARGET_IMAGE_SIZE)
    device = sh("losetup", "--find", "--show", str(image)).strip()
    cleanups.append(("losetup", "-d", device))
    sh("mkfs.ext4", "-q", "-F", device)
    point = workdir / "target"
    point.mkdir()
    sh("mount", device, str(point))
    cleanups.append(("umount", str(point)))
    return point


def quiesce_run(factory: DomainFactory, target: Path, workdir: Path) -> float:
    vm = factory(action="write-pattern", after="idle", agent=True, layout="fs", tag="q1")
    vm.wait_for(f"{PATTERN_WRITTEN} tag=q1", 300)
    vm.wait_for_agent(120)
    config = write_config(workdir / "cfg-q", target, "vmq", vm.name, 'quiesce = "required"\n')
    run_gfs(config)
    manifest = json.loads((generation_dir(target, "vmq") / "manifest.json").read_text())
    return float(manifest["source"]["frozen_seconds"])


def fmt_gib(size: int) -> str:
    return f"{size / GIB:.3f} GiB"


def report(gfs_seconds: float, gfs_file: Path, base: tuple[float, float], base_file: Path) -> None:
    rows = [
        ("gfs run --force", gfs_seconds, gfs_file),
        ("qemu-img convert", base[0], base_file),
        ("qemu-img convert + fsync", base[1], base_file),
    ]
    print(f"{'measurement':<26} {'seconds':>8} {'allocated':>12} {'apparent':>12}")
    for label, seconds, path in rows:
        info = path.stat()
        print(
            f"{label:<26} {seconds:8.2f} {fmt_gib(allocated(path)):>12} {fmt_gib(info.st_size):>12}"
        )
    for label, seconds in (("convert", base[0]), ("convert + fsync", base[1])):
        ratio = gfs_seconds / seconds
        verdict = "yes" if ratio <= 1 + WITHIN else "no"
        print(f"ratio gfs / {label}: {ratio:.2f} (within {WITHIN:.0%}: {verdict})")
    gfs_alloc = allocated(gfs_file)
    sparse = "yes" if gfs_alloc < 1.25 * GIB else "no"
    print(
        f"sparse regions not written (gfs allocated {fmt_gib(gfs_alloc)} "
        f"for {CHUNKS * CHUNK // MIB} MiB of data on a {DISK_SIZE // GIB} GiB disk): {sparse}"
    )


def main() -> int:
    if os.geteuid() != 0:
        print("run as root (libvirt lab, loop devices, mounts)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="gfs-vm-bench-", dir="/var/tmp"))
    cleanups: list[tuple[str, ...]] = []
    daemons = conn = factory = None
    try:
        daemons = start_libvirt_daemons()
        conn = libvirt.open(daemons.uri)
        reap_stale_domains(conn)
        image = build_guest_image(workdir / "guest")
        source = make_source(workdir)
        target = mount_target(workdir, cleanups)
        factory = DomainFactory(conn, image, workdir / "lab")
        vm = factory(action="idle", disk=source)
        vm.wait_for(BOOT_MARKER, 300)
        print(f"domain {vm.name} up; source {source} ({fmt_gib(allocated(source))} allocated)")
        print("target: loop-backed ext4 (sparse 6 GiB image on the root disk)")
        print("baseline reads the image while the idle domain runs (qemu-img -U)\n")

        config = write_config(workdir / "cfg-a", target, "vm", vm.name)
        evict(source)
        gfs_seconds = run_gfs(config)
        gfs_file = generation_dir(target, "vm") / "disks" / "vda.raw"

        base_file = target / "baseline.qcow2"
        evict(source)
        base = baseline(source, base_file)
        report(gfs_seconds, gfs_file, base, base_file)

        if image.has_agent:
            frozen = quiesce_run(factory, target, workdir)
            verdict = "yes" if frozen < 1.0 else "no"
            print(f"quiesce required: frozen_seconds {frozen:.3f} (goal < 1 s: {verdict})")
        else:
            print("quiesce: skipped, no qemu-ga in the guest image")
        return 0
    finally:
        lab_teardown(factory, conn, cleanups, daemons, workdir)


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark of restore drills: `sudo .venv/bin/python benchmarks/drill.py [ROUNDS]`.

Runs as root from the repo root on a machine prepared by scripts/lab-setup. It starts the lab's
libvirt daemons, builds the lab guest, and makes its disk: a qcow2 of `--disk-gib` (4) GiB
holding `--data-gib` (1) GiB of data (qemu-io writes), the lab's pattern on top; an idle TCG
domain (direct kernel boot) runs from it and `gfs run` backs it up to a tmpfs target (the
generation: a sparse raw image, as big as the disk, holding its data). Then,
ROUNDS times (default 3), alternating, the page cache dropped before each
(`sync; echo 3 > /proc/sys/vm/drop_caches`):

(a) baseline: a plain boot of the generation's image with plain QEMU (TCG, snapshot mode,
    the same kernel, initrd and command line, serial console to a file), from starting
    QEMU until the console shows the guest's boot marker; QEMU is then killed;
(b) the copy-then-boot drill gfs did before: `cp --sparse=always` of the image into
    scratch, then the plain boot of the copy: time to the boot marker and scratch bytes
    (the copy's allocation);
(c) `gfs drill vm --json` (console check on the same marker), booting straight from the
    image (an overlay in scratch) while the image's checksum is read in parallel: the
    boot check's time to the marker (from QEMU's start), the whole command's wall time
    (Python start, qemu-img check, boot, the checksum read's end, cleanup, manifest) and
    the scratch directory's largest size while it ran (sampled every 50 ms).

Goals: (c)'s time to the boot marker within 1.3x of (a), and its scratch under 5% of the
disk's size. It exits 1 if a goal is missed. Everything is removed again in `finally`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import libvirt  # noqa: E402

from benchmarks.common import allocated, sh  # noqa: E402
from tests.lab.daemons import start_libvirt_daemons  # noqa: E402
from tests.lab.domains import DomainFactory, reap_stale_domains  # noqa: E402
from tests.lab.guest import BOOT_MARKER, GuestImage, build_guest_image  # noqa: E402

BOOT_GOAL = 1.3
SCRATCH_GOAL = 0.05
POLICY = f"""
[job.policy]
semantics = "restic"
timezone = "UTC"
schedule = "daily"
[job.policy.retention]
keep-last = 3
[job.policy.drill]
console = "{BOOT_MARKER}"
timeout = 300
"""


def gfs(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "gfs_backup", *args]
    return subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, check=False)


def plain_boot(image: GuestImage, disk: Path, cmdline: str, workdir: Path) -> float:
    """Seconds from starting plain QEMU until the console shows BOOT_MARKER."""
    console = workdir / "plain-console.log"
    console.unlink(missing_ok=True)
    argv = [
        "qemu-system-x86_64",
        "-machine",
        "pc,accel=tcg",
        "-m",
        "256",
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        f"file:{console}",
        "-kernel",
        str(image.kernel),
        "-initrd",
        str(image.initrd),
        "-append",
        cmdline,
        "-drive",
        f"file={disk},format={'raw' if disk.suffix == '.raw' else 'qcow2'},if=virtio,snapshot=on",
    ]
    started = time.monotonic()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while BOOT_MARKER not in (console.read_text(errors="replace") if console.exists() else ""):
            if process.poll() is not None or time.monotonic() - started > 300:
                raise RuntimeError("plain QEMU did not reach the boot marker")
            time.sleep(0.05)
        return time.monotonic() - started
    finally:
        process.kill()
        process.wait()


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def tree_bytes(root: Path) -> int:
    """Allocated bytes under `root` (files appearing and vanishing while it runs)."""
    total = 0
    for directory, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(directory, name)).st_blocks * 512
    return total


def drill(config: Path, scratch: Path) -> tuple[float, float, int]:
    """`gfs drill vm --json`: its boot check's seconds to the marker, the command's wall
    seconds, the scratch directory's largest size meanwhile."""
    largest = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal largest
        while not stop.is_set():
            largest = max(largest, tree_bytes(scratch))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.monotonic()
    try:
        done = gfs("drill", "vm", "--config", str(config), "--json")
    finally:
        stop.set()
        sampler.join()
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"gfs drill failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    checks = {c["name"]: c for c in json.loads(done.stdout)["checks"]}
    return float(checks["boot"]["duration_s"]), wall, largest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rounds", nargs="?", type=int, default=3)
    parser.add_argument("--disk-gib", type=int, default=4)
    parser.add_argument("--data-gib", type=int, default=1)
    options = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="gfs-drill-bench-", dir="/var/tmp"))
    target = workdir / "target"
    mounted = False
    daemons = conn = factory = None
    try:
        daemons = start_libvirt_daemons()
        conn = libvirt.open(daemons.uri)
        reap_stale_domains(conn)
        image = build_guest_image(workdir / "guest")
        target.mkdir()
        room = f"{options.disk_gib + 2}g"  # sparse: holds the data only
        sh("mount", "-t", "tmpfs", "-o", f"size={room}", "gfs-drill-bench", str(target))
        mounted = True
        source = workdir / "source.qcow2"
        sh("qemu-img", "create", "-q", "-f", "qcow2", str(source), f"{options.disk_gib}G")
        for start in range(options.data_gib * 4):  # 256 MiB writes at a 512 MiB stride
            offset = (64 << 20) + start * (512 << 20) % ((options.disk_gib << 30) - (320 << 20))
            sh(
                "qemu-io",
                "-f",
                "qcow2",
                "-c",
                f"write -P {start % 250 + 1} {offset} 256M",
                str(source),
            )
        factory = DomainFactory(conn, image, workdir / "lab")
        vm = factory(action="write-pattern", after="idle", tag="bench", disk=source)
        vm.wait_for(BOOT_MARKER, 300)
        vm.wait_for("GFS-PATTERN-WRITTEN", 300)
        scratch = workdir / "scratch"
        scratch.mkdir()
        config = workdir / "gfs.toml"
        config.write_text(
            f"state_dir = {json.dumps(str(workdir / 'state'))}\n"
            f"[target.t]\npath = {json.dumps(str(target))}\nrequire_nfs = false\n"
            f'[[job]]\nname = "vm"\nkind = "libvirt"\ndomain = {json.dumps(vm.name)}\n'
            f"scratch_dir = {json.dumps(str(scratch))}\n{POLICY}",
            encoding="utf-8",
        )
        done = gfs("run", "--config", str(config))
        if done.returncode != 0:
            raise RuntimeError(f"gfs run failed:\n{done.stderr}")
        disk = next(target.glob("vm/*/disks/vda.*"))
        size = disk.stat().st_size
        print(
            f"domain {vm.name} backed up: {disk} ({size / (1 << 30):.1f} GiB, "
            f"{allocated(disk) / (1 << 30):.2f} GiB allocated); page cache dropped before each"
        )
        print(
            f"{'round':<6} {'plain boot s':>13} {'copy+boot s':>12} {'copy scratch':>13} "
            f"{'drill boot s':>13} {'drill wall s':>13} {'drill scratch':>14}"
        )
        plain, copied, copy_bytes, boots, walls, scratch_bytes = [], [], [], [], [], []
        for index in range(options.rounds):
            drop_caches()
            plain.append(plain_boot(image, disk, vm.spec.cmdline, workdir))
            drop_caches()
            copy = scratch / f"copy{disk.suffix}"
            started = time.monotonic()
            sh("cp", "--sparse=always", str(disk), str(copy))
            copied.append(
                time.monotonic() - started + plain_boot(image, copy, vm.spec.cmdline, workdir)
            )
            copy_bytes.append(allocated(copy))
            copy.unlink()
            drop_caches()
            boot, wall, largest = drill(config, scratch)
            boots.append(boot)
            walls.append(wall)
            scratch_bytes.append(largest)
            print(
                f"{index + 1:<6} {plain[-1]:13.2f} {copied[-1]:12.2f} "
                f"{copy_bytes[-1] / (1 << 20):10.0f} MiB {boot:13.2f} {wall:13.2f} "
                f"{largest / (1 << 20):11.1f} MiB"
            )
        median = statistics.median
        base, ours = median(plain), median(boots)
        used = max(scratch_bytes)
        print(
            f"median {base:13.2f} {median(copied):12.2f} {median(copy_bytes) / (1 << 20):10.0f} "
            f"MiB {ours:13.2f} {median(walls):13.2f} {median(scratch_bytes) / (1 << 20):11.1f} MiB"
        )
        boot_ok = ours / base <= BOOT_GOAL
        scratch_ok = used / size < SCRATCH_GOAL
        print(
            f"drill boot / plain boot: {ours / base:.2f} (at most {BOOT_GOAL}: "
            f"{'yes' if boot_ok else 'no'}); drill scratch / disk size: {used / size:.2%} "
            f"(under {SCRATCH_GOAL:.0%}: {'yes' if scratch_ok else 'no'})"
        )
        return 0 if boot_ok and scratch_ok else 1
    finally:
        if factory is not None:
            factory.cleanup()
        if conn is not None:
            conn.close()
        if mounted:
            subprocess.run(["umount", str(target)], capture_output=True, check=False)
        if daemons is not None:
            daemons.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark of restore drills: `sudo .venv/bin/python benchmarks/drill.py [ROUNDS]`.

Runs as root from the repo root on a machine prepared by scripts/lab-setup. It starts the lab's
libvirt daemons, builds the lab guest, boots an idle TCG domain (direct kernel boot, a 64 MiB
qcow2 disk holding the lab's data pattern) and backs it up with `gfs run` to a tmpfs target.
Then, ROUNDS times (default 3), alternating:

(a) baseline: a plain boot of the same image with plain QEMU (TCG, the generation's
    disks/vda.qcow2 in snapshot mode, the same kernel, initrd and command line, serial
    console to a file), from starting QEMU until the console shows the guest's boot
    marker; QEMU is then killed;
(b) `gfs drill vm` in a subprocess (console check on the same marker): wall time of the
    whole command (Python start, checksummed copy of the disk into the scratch
    directory, qemu-img check, boot, kill, cleanup, manifest and state writes).

Prints each round, the medians and the ratio drill / plain boot (goal: at most 2).
Everything is removed again in `finally`.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import libvirt  # noqa: E402

from benchmarks.common import sh  # noqa: E402
from tests.lab.daemons import start_libvirt_daemons  # noqa: E402
from tests.lab.domains import DomainFactory, reap_stale_domains  # noqa: E402
from tests.lab.guest import BOOT_MARKER, GuestImage, build_guest_image  # noqa: E402

GOAL = 2.0
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
        f"file={disk},format=qcow2,if=virtio,snapshot=on",
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


def drill(config: Path) -> tuple[float, float]:
    """Wall seconds of `gfs drill vm --json` and the drill's own duration_s."""
    started = time.monotonic()
    done = gfs("drill", "vm", "--config", str(config), "--json")
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"gfs drill failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return wall, float(json.loads(done.stdout)["duration_s"])


def main() -> int:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
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
        sh("mount", "-t", "tmpfs", "-o", "size=512m", "gfs-drill-bench", str(target))
        mounted = True
        factory = DomainFactory(conn, image, workdir / "lab")
        vm = factory(action="write-pattern", after="idle", tag="bench")
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
        disk = next(target.glob("vm/*/disks/vda.qcow2"))
        print(f"domain {vm.name} backed up: {disk} ({disk.stat().st_size:,d} bytes)")
        print(f"{'round':<6} {'plain boot s':>13} {'gfs drill s':>12} {'(drill own s)':>14}")
        plain, walls, owns = [], [], []
        for index in range(rounds):
            plain.append(plain_boot(image, disk, vm.spec.cmdline, workdir))
            wall, own = drill(config)
            walls.append(wall)
            owns.append(own)
            print(f"{index + 1:<6} {plain[-1]:13.2f} {wall:12.2f} {own:14.2f}")
        base, ours = statistics.median(plain), statistics.median(walls)
        ratio = ours / base
        print(f"median  {base:12.2f} {ours:12.2f} {statistics.median(owns):14.2f}")
        verdict = "yes" if ratio <= GOAL else "no"
        print(f"ratio gfs drill / plain boot: {ratio:.2f} (at most {GOAL:.0f}: {verdict})")
        return 0
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

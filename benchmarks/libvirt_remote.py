"""A VM on a remote host against `qemu-img convert` run on that host:
`.venv/bin/python benchmarks/libvirt_remote.py [--rounds N]`.

Runs as root from the repo root on a machine prepared by scripts/lab-setup. The "remote
host" is this machine reached through a real OpenSSH sshd on 127.0.0.1 (as in
tests/system/test_libvirt_remote.py): gfs talks to its libvirt through virt-ssh-helper on
its own SSH connection, and every command of the job (qemu-img check, the checksums read
back from the target) runs over SSH. The nested lab host has no libvirt, so a second
machine is not part of this measurement: what it shows is gfs's cost over the plain tool
on the same host and target.

Setup (as benchmarks/vm_export.py): the lab guest boots an idle TCG domain from a 4 GiB
qcow2 holding 1 GiB of random data (64 chunks of 16 MiB spread over the disk, the rest
sparse); the target is a loop-backed ext4 filesystem (a sparse 6 GiB image under /var/tmp)
that "the host" mounts. Then `--rounds` times (default 3), the order rotated each round,
the page cache dropped (`echo 3 > /proc/sys/vm/drop_caches`) before every measurement, as
a nightly run finds it:

  gfs          `gfs run --force` of a libvirt job with `host = ...` (wall time of the
               subprocess: connect, libvirt through the tunnel, push-mode backup written by
               QEMU into the target, qemu-img check and sha256-1m of the image read back
               from the target on the host, boot files copied and checked, manifest);
  convert      `qemu-img convert -U -O qcow2 SOURCE TARGET/FILE && sync FILE` run on the
               host through OpenSSH's client (what an admin's script would run there);
  convert+read the same, then `sha256sum FILE` there after dropping the cache (the copy
               read back once, as gfs verifies its own).

Prints every round, the medians and the ratios gfs / convert and gfs / convert+read.
About 5 minutes. Everything it made is removed on exit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import libvirt  # noqa: E402

from benchmarks.common import allocated, lab_teardown, sh  # noqa: E402
from benchmarks.vm_export import POLICY, make_source, mount_target  # noqa: E402
from tests.lab.daemons import start_libvirt_daemons  # noqa: E402
from tests.lab.domains import DomainFactory, reap_stale_domains  # noqa: E402
from tests.lab.guest import BOOT_MARKER, build_guest_image  # noqa: E402
from tests.system.sshd import Sshd, start_sshd, stop  # noqa: E402

GIB = 1 << 30


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def write_config(workdir: Path, server: Sshd, target: Path, domain: str) -> Path:
    config = workdir / "gfs.toml"
    config.write_text(
        f"state_dir = {json.dumps(str(workdir / 'state'))}\n"
        + server.config_table("kvm2")
        + f'[target.nas]\npath = {json.dumps(str(target))}\nhost = "kvm2"\nrequire_nfs = false\n'
        f'[[job]]\nname = "vm"\nkind = "libvirt"\nhost = "kvm2"\ntarget = "nas"\n'
        f"domain = {json.dumps(domain)}\n{POLICY}",
        encoding="utf-8",
    )
    return config


def on_host(server: Sshd, *argv: str) -> None:
    """`argv` run on the host by OpenSSH's client (its default cipher)."""
    ssh = (
        "ssh",
        "-i",
        str(server.client_key),
        "-p",
        str(server.port),
        "-o",
        f"UserKnownHostsFile={server.known_hosts}",
        "-o",
        "BatchMode=yes",
        "root@127.0.0.1",
    )
    sh(*ssh, "--", *argv)


def timed(step: Callable[[], object]) -> float:
    drop_caches()
    started = time.monotonic()
    step()
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    rounds = parser.parse_args().rounds
    if os.geteuid() != 0:
        print("run as root (libvirt lab, sshd, loop devices, mounts)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="gfs-remote-vm-bench-", dir="/var/tmp"))
    cleanups: list[tuple[str, ...]] = []
    daemons = conn = factory = server = None
    try:
        daemons = start_libvirt_daemons()
        conn = libvirt.open(daemons.uri)
        reap_stale_domains(conn)
        image = build_guest_image(workdir / "guest")
        source = make_source(workdir)
        target = mount_target(workdir, cleanups)
        server = start_sshd(workdir / "sshd")
        server.trust()
        factory = DomainFactory(conn, image, workdir / "lab")
        vm = factory(action="idle", disk=source)
        vm.wait_for(BOOT_MARKER, 300)
        config = write_config(workdir, server, target, vm.name)
        print(f"domain {vm.name} up; {source} ({allocated(source) / GIB:.2f} GiB allocated)")
        print("host: this machine through sshd on 127.0.0.1; target: loop-backed ext4\n")
        gfs_argv = [sys.executable, "-m", "gfs_backup", "run", "--force", "--config", str(config)]

        def gfs() -> None:
            done = subprocess.run(gfs_argv, capture_output=True, text=True, cwd=ROOT, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"gfs run failed ({done.returncode}):\n{done.stderr}")

        copy = target / "convert.qcow2"

        def convert() -> None:
            copy.unlink(missing_ok=True)
            on_host(server, "qemu-img", "convert", "-U", "-O", "qcow2", str(source), str(copy))
            on_host(server, "sync", str(copy))

        def convert_read() -> None:
            convert()
            drop_caches()
            on_host(server, "sha256sum", str(copy))

        steps: list[tuple[str, Callable[[], None]]] = [
            ("gfs", gfs),
            ("convert", convert),
            ("convert+read", convert_read),
        ]
        results: dict[str, list[float]] = {name: [] for name, _ in steps}
        for index in range(rounds):
            order = steps[index % len(steps) :] + steps[: index % len(steps)]
            line = []
            for name, step in order:
                seconds = timed(step)
                results[name].append(seconds)
                line.append(f"{name} {seconds:.1f} s")
            print(f"round {index + 1}: " + ", ".join(line))
        medians = {name: statistics.median(values) for name, values in results.items()}
        print()
        for name, value in medians.items():
            print(f"median {name:<13} {value:7.1f} s")
        print(f"ratio gfs / convert:      {medians['gfs'] / medians['convert']:.2f}")
        print(f"ratio gfs / convert+read: {medians['gfs'] / medians['convert+read']:.2f}")
        newest = max((target / "vm").glob("*/disks/vda.qcow2"))
        print(
            f"allocated: gfs {allocated(newest) / GIB:.2f} GiB, "
            f"convert {allocated(copy) / GIB:.2f} GiB"
        )
        return 0
    finally:
        if server is not None:
            stop(server)
        lab_teardown(factory, conn, cleanups, daemons, workdir)


if __name__ == "__main__":
    sys.exit(main())

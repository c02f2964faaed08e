"""LVM export on its own host to the NFS target it mounts, against `dd` there:
`.venv/bin/python benchmarks/lvm_export_nfs.py [--size MIB] [--rounds N]`.

Runs as root from the repo root on a machine prepared by scripts/lab-setup. It boots the
lab's nested remote KVM host (tests/lab/remote_host.py: QEMU TCG, real LVM, the kernel NFS
server and its NFSv4.2 mount at NFS_MOUNT), makes a `--size` MiB LV (default 256) of seeded
random data (~60%) and written zeros (see benchmarks/lvm_export.py), one classic snapshot
of it for the baselines, and then, `--rounds` times (default 3), in an order rotated every
round:

  dd           in the guest, `dd if=SNAPSHOT of=NFS/FILE bs=1M iflag=direct conv=fsync`:
               the plain copy onto the NFS mount (every block written, no checksum);
  dd sparse    the same with conv=sparse,fsync (zero blocks skipped, as gfs does);
  gfs          `gfs run --force` of an lvm job on that host whose target is that NFS mount
               (host = "lab"): gfs's own snapshot, its one pipeline on the host
               (dd | tee | sparse dd, sha256sum of the stream), fsync, the default
               verify-after-export (sha256sum re-reading the image from NFS), lvremove.
               Reported: the copy's time as gfs logs it ("copied N bytes ... in S s") and
               the whole run's wall time.

Prints every round, the medians, MiB/s, the ratio gfs copy / dd sparse and gfs copy / dd,
and exits 1 if the copy is more than 10% slower than `dd sparse`, 2 if it cannot run.
Everything it started or made is removed on exit, also on failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path
from typing import cast

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.lvm_export import (  # noqa: E402
    JOB,
    Abort,
    Lab,
    guest,
    lab_config,
    rate,
    snapshot_device,
    timed_gfs,
    with_lab,
)
from tests.lab.remote_host import RemoteHost  # noqa: E402
from tests.lab.remote_image import NFS_MOUNT, VG_NAME  # noqa: E402

DD_TIME_RE = re.compile(r"copied, ([0-9.]+) s")
COPIED_RE = re.compile(r"copied (\d+) bytes \((\d+) allocated\) on host lab in ([0-9.]+) s")
GOAL = 1.10


def dd_to_nfs(lab: Lab, sparse: bool) -> float:
    """Seconds GNU dd reports for copying the snapshot onto the NFS mount (with fsync)."""
    host = cast(RemoteHost, lab.host)
    output = f"{NFS_MOUNT}/bench-dd.raw"
    conv = "sparse,fsync" if sparse else "fsync"
    try:
        out = guest(
            host,
            ["dd", f"if={snapshot_device(lab)}", f"of={output}", "bs=1M", "iflag=direct",
             f"conv={conv}"],
            timeout=1800,
        )  # fmt: skip
    finally:
        host.run(["rm", "-f", output])
    found = DD_TIME_RE.search(out)
    if found is None:
        raise Abort(f"no time in dd's output: {out.strip()}")
    return float(found.group(1))


def write_config(lab: Lab, directory: Path) -> Path:
    target = f'[target.nas]\npath = "{NFS_MOUNT}"\nhost = "lab"\n'
    job = f'name = "{JOB}"\nkind = "lvm"\nhost = "lab"\ntarget = "nas"\n'
    job += f"volume = {json.dumps(f'{VG_NAME}/{lab.volume}')}\n"
    return lab_config(lab, directory, target, job)


def gfs_run(config: Path) -> tuple[float, float, int, int]:
    """`gfs run --force`: (wall seconds, copy seconds, bytes, bytes allocated)."""
    seconds, stderr = timed_gfs(config)
    found = COPIED_RE.search(stderr)
    if found is None:
        raise Abort(f"no 'copied' line in gfs's log:\n{stderr}")
    return seconds, float(found.group(3)), int(found.group(1)), int(found.group(2))


def measure(lab: Lab, rounds: int) -> int:
    """`rounds` rounds of dd, dd sparse and gfs; prints them and the medians; 0 if the goal
    is met, else 1."""
    host = cast(RemoteHost, lab.host)
    lab.cleanups.append(lambda: host.run(["rm", "-rf", f"{NFS_MOUNT}/{JOB}"]))
    config = write_config(lab, lab.workdir)
    size = lab.size_mib << 20
    times: dict[str, list[float]] = {"dd": [], "dd sparse": [], "gfs copy": [], "gfs run": []}
    allocated = 0
    for index in range(rounds):
        order = ["dd", "dd sparse", "gfs"]
        for name in order[index % 3 :] + order[: index % 3]:
            if name == "gfs":
                wall, copy, copied, allocated = gfs_run(config)
                if copied != size:
                    raise Abort(f"gfs copied {copied} bytes of {size}")
                times["gfs copy"].append(copy)
                times["gfs run"].append(wall)
            else:
                times[name].append(dd_to_nfs(lab, sparse=name == "dd sparse"))
        print(f"round {index + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()))
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"\nmedians of {rounds} rounds, {lab.size_mib} MiB LV, {lab.data_mib} MiB data:")
    for name, seconds in medians.items():
        print(f"  {name:10s} {seconds:6.1f} s  {rate(size, seconds)}")
    print(f"  gfs wrote {allocated >> 20} MiB allocated of {lab.size_mib} MiB")
    to_sparse = medians["gfs copy"] / medians["dd sparse"]
    to_plain = medians["gfs copy"] / medians["dd"]
    print(f"  gfs copy / dd sparse = {to_sparse:.2f}, gfs copy / dd = {to_plain:.2f}")
    met = to_sparse <= GOAL
    print(f"goal (gfs copy within 10% of dd sparse): {'met' if met else 'NOT met'}")
    return 0 if met else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256, help="LV size in MiB (default 256)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument(
        "--cpus", type=int, default=1, help="the guest's vCPUs (default 1, as the tests)"
    )
    args = parser.parse_args()
    print(f"guest: {args.cpus} vCPU(s)")
    return with_lab(
        "lvm_export_nfs", args.size, args.cpus, lambda lab: measure(lab, max(1, args.rounds))
    )


if __name__ == "__main__":
    sys.exit(main())

"""A files job on its own host, into the NFS target it mounts, against cp and rsync there:
`.venv/bin/python benchmarks/files_remote.py [--files N] [--mib M] [--rounds R]`.

Runs as root from the repo root on a machine prepared by scripts/lab-setup. It boots the
lab's nested remote KVM host (tests/lab/remote_host.py: QEMU TCG, real LVM, btrfs, the
kernel NFS server and its NFSv4.2 mount at NFS_MOUNT), makes a btrfs filesystem on an LV
holding a tree of `--files` files (default 2000) of `--mib` MiB of seeded random data in all
(default 128; sizes from 1 KiB to 4 MiB, 20 directories), and then, `--rounds` times
(default 3), with this machine's and the guest's page cache dropped before every step:

  cp -a        `cp -a TREE NFS/copy && sync` in the guest: the plain full copy (no checksum,
               nothing read back);
  rsync full   `rsync -a TREE/ NFS/first/ && sync`: the same with rsync (the base of the
               incremental below);
  gfs full     `gfs run --force` of a files job of that host (host = "lab") into that NFS
               mount, its first generation: snapshot, every file read, its sha256-1m computed,
               written, synced and read back from the server (the default
               verify_after_export), the manifest written;
  (1% of the files are then rewritten with their old size and mtime)
  rsync link   `rsync -a --link-dest=PREVIOUS TREE NFS/next && sync`: the usual hard-linked
               incremental (it trusts size and mtime, so it misses those rewrites: its
               copied count is printed);
  gfs incr     `gfs run --force` again: unchanged files hard-linked to the first
               generation, the changed ones found by their ctime, read and written.

Prints every round, the medians and the ratios gfs full / cp -a and gfs incr / rsync link.
Exit 0 when it ran (the numbers are the result: TCG in a nested guest, so compare ratios,
not absolute speeds), 2 if it cannot run. Everything it made is removed on exit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import cast

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.lvm_export import Lab, guest, lab_config, sh, timed_gfs, with_lab  # noqa: E402
from tests.lab.remote_host import RemoteHost  # noqa: E402
from tests.lab.remote_image import NFS_MOUNT, VG_NAME  # noqa: E402

JOB = "benchfiles"
MOUNT = "/srv/benchtree"
TREE = f"{MOUNT}/vol/tree"
DROP_CACHES = "sync && echo 3 >/proc/sys/vm/drop_caches"
# One python3 program on the host writes the tree (seeded: the same tree every run).
MAKE_TREE = r"""
import os, random, sys
root, count, total, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed)
weights = [rng.lognormvariate(0, 1.5) for _ in range(count)]
scale = total / sum(weights)
for i, weight in enumerate(weights):
    folder = os.path.join(root, "d%02d" % (i % 20))
    os.makedirs(folder, exist_ok=True)
    size = max(1024, min(4 << 20, int(weight * scale)))
    with open(os.path.join(folder, "f%05d" % i), "wb") as out:
        out.write(rng.randbytes(size))
"""
# Rewrite 1% of the files in place: same size, other bytes, the old mtime put back.
REWRITE = r"""
import os, random, sys
root, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)
for path in rng.sample(paths, max(1, len(paths) // 100)):
    st = os.stat(path)
    with open(path, "r+b") as out:
        out.write(rng.randbytes(min(st.st_size, 4096)))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
print(len(paths) // 100 or 1)
"""


def host_of(lab: Lab) -> RemoteHost:
    return cast(RemoteHost, lab.host)


def make_tree(lab: Lab, files: int, mib: int) -> None:
    host = host_of(lab)
    name = f"benchtree{uuid.uuid4().hex[:6]}"
    guest(
        host, ["lvcreate", "-q", "-y", "-Zy", "-Wy", "-L", f"{mib * 2 + 256}m", "-n", name, VG_NAME]
    )
    lab.cleanups.append(lambda: host.run(["lvremove", "-f", f"{VG_NAME}/{name}"]))
    guest(host, ["mkfs.btrfs", "-q", "-f", f"/dev/{VG_NAME}/{name}"])
    guest(host, ["mkdir", "-p", MOUNT])
    guest(host, ["mount", f"/dev/{VG_NAME}/{name}", MOUNT])
    lab.cleanups.append(lambda: host.run(["umount", MOUNT]))
    lab.cleanups.append(
        lambda: host.run(
            ["sh", "-c", f"btrfs subvolume delete {MOUNT}/vol/.gfs-snapshots/* || true"]
        )
    )
    guest(host, ["btrfs", "subvolume", "create", f"{MOUNT}/vol"])
    started = time.monotonic()
    guest(host, ["python3", "-c", MAKE_TREE, TREE, str(files), str(mib << 20), "7"], timeout=1800)
    print(f"tree {TREE}: {files} files, {mib} MiB (made in {time.monotonic() - started:.0f} s)")


def write_config(lab: Lab) -> Path:
    target = f'[target.nas]\npath = "{NFS_MOUNT}"\nhost = "lab"\n'
    job = f'name = "{JOB}"\nkind = "files"\nhost = "lab"\npath = "{TREE}"\n'
    return lab_config(lab, lab.workdir, target, job)


def drop_caches(lab: Lab) -> None:
    """As a nightly run finds them: this machine's page cache (the guest's disk images) and
    the guest's (its files, and the NFS client's and server's pages)."""
    sh("sh", "-c", DROP_CACHES)
    guest(host_of(lab), ["sh", "-c", DROP_CACHES])


def timed_in_guest(lab: Lab, script: str) -> float:
    drop_caches(lab)
    started = time.monotonic()
    guest(host_of(lab), ["sh", "-c", script], timeout=3600)
    return time.monotonic() - started


def gfs_run(lab: Lab, config: Path) -> tuple[float, dict[str, object]]:
    """`gfs run --force`: wall seconds, and the new generation's manifest `source`."""
    drop_caches(lab)
    seconds, _ = timed_gfs(config)
    listed = subprocess.run(
        [sys.executable, "-m", "gfs_backup", "list", "--json", "--config", str(config)],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    newest = json.loads(listed.stdout)["jobs"][0]["generations"][-1]
    manifest = json.loads(guest(host_of(lab), ["cat", f"{newest['path']}/manifest.json"]))
    time.sleep(1.1)  # one generation id per second
    return seconds, manifest["source"]


def rsync_copied(output: str) -> int:
    return sum(1 for line in output.splitlines() if line.startswith(">f"))


def one_round(lab: Lab, config: Path, index: int) -> dict[str, float]:
    host = host_of(lab)
    copy, first, second = f"{NFS_MOUNT}/bench-cp", f"{NFS_MOUNT}/bench-r1", f"{NFS_MOUNT}/bench-r2"
    clean = f"rm -rf {copy} {first} {second} {NFS_MOUNT}/{JOB}"
    guest(host, ["sh", "-c", clean], timeout=1800)
    seconds: dict[str, float] = {}
    seconds["cp -a"] = timed_in_guest(lab, f"cp -a {TREE} {copy} && sync")
    guest(host, ["rm", "-rf", copy], timeout=1800)
    seconds["gfs full"], full = gfs_run(lab, config)
    seconds["rsync full"] = timed_in_guest(lab, f"rsync -a {TREE}/ {first}/ && sync")
    changed = int(guest(host, ["python3", "-c", REWRITE, TREE, str(index)]).split()[0])
    drop_caches(lab)
    started = time.monotonic()
    out = guest(
        host,
        ["sh", "-c", f"rsync -a -i --link-dest={first} {TREE}/ {second}/ && sync"],
        timeout=3600,
    )
    seconds["rsync link"] = time.monotonic() - started
    seconds["gfs incr"], incr = gfs_run(lab, config)
    print(
        f"round {index + 1}: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items())
        + f"; {changed} files rewritten (same size, old mtime): rsync copied "
        f"{rsync_copied(out)}, gfs copied {incr['copied_files']} and linked "
        f"{incr['linked_files']} (full: copied {full['copied_files']})",
        flush=True,
    )  # fmt: skip
    guest(host, ["sh", "-c", clean], timeout=1800)
    return seconds


def measure(lab: Lab, files: int, mib: int, rounds: int) -> int:
    make_tree(lab, files, mib)
    config = write_config(lab)
    lab.cleanups.append(lambda: host_of(lab).run(["rm", "-rf", f"{NFS_MOUNT}/{JOB}"]))
    results = [one_round(lab, config, index) for index in range(rounds)]
    medians = {name: statistics.median(r[name] for r in results) for name in results[0]}
    print(f"\nmedians of {rounds} rounds, {files} files, {mib} MiB:")
    for name, value in medians.items():
        print(f"  {name:11s} {value:6.1f} s")
    print(f"  gfs full / cp -a = {medians['gfs full'] / medians['cp -a']:.2f}")
    print(f"  gfs full / rsync full = {medians['gfs full'] / medians['rsync full']:.2f}")
    print(f"  gfs incr / rsync link = {medians['gfs incr'] / medians['rsync link']:.2f}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=2000, help="files in the tree (2000)")
    parser.add_argument("--mib", type=int, default=128, help="MiB of data in all (128)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, medians count (3)")
    args = parser.parse_args()
    return with_lab(
        "files_remote",
        16,
        1,
        lambda lab: measure(lab, max(1, args.files), max(1, args.mib), max(1, args.rounds)),
    )


if __name__ == "__main__":
    sys.exit(main())

"""Changed-block capture of running domains against a real libvirtd (pull mode, checkpoints).

The guest idles; the test changes known blocks of its disk through QEMU itself (HMP
`qemu-io` on the running drive, so the dirty bitmaps see every write, zero-write and
discard) and applies the same changes to a shadow raw file: the disk as it was at each
backup. The judge is `qemu-img compare` of each generation, alone, against its shadow.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu
import pytest

from tests.lab.domains import LabDomain, remove_domain
from tests.lab.fixtures import guest_image, libvirt_conn, libvirt_daemon, make_domain
from tests.system.conftest import Mounter
from tests.system.helpers import assert_same_image, gfs_subprocess, listing, write_config

pytestmark = [pytest.mark.system, pytest.mark.slow]
__all__ = ["guest_image", "libvirt_conn", "libvirt_daemon", "make_domain"]

MIB = 1 << 20
DISK_MIB = 256
KEEP = """
[job.policy]
semantics = "restic"
timezone = "UTC"
schedule = "daily"
[job.policy.retention]
keep-last = 10
"""
DRIVE = "/machine/peripheral/virtio-disk0/virtio-backend"  # the lab domain's vda


class ShadowedDisk:
    """A running domain's qcow2 disk and a raw file holding what it should contain."""

    def __init__(self, domain: libvirt.virDomain, shadow: Path) -> None:
        self.domain = domain
        self.shadow = shadow

    def _hmp(self, command: str) -> None:
        out = libvirt_qemu.qemuMonitorCommand(
            self.domain,
            f'qemu-io -d {DRIVE} "{command}"',
            libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP,
        )
        assert "error" not in out.lower() and "fail" not in out.lower(), out

    def write(self, offset: int, length: int, pattern: int) -> None:
        self._hmp(f"write -P {pattern} {offset} {length}")
        self._shadow(offset, bytes([pattern]) * length)

    def zero(self, offset: int, length: int) -> None:
        self._hmp(f"write -z {offset} {length}")
        self._shadow(offset, bytes(length))

    def discard(self, offset: int, length: int) -> None:
        """A guest discard (whole 64 KiB clusters: the qcow2 then reads zeros there)."""
        self._hmp(f"discard {offset} {length}")
        self._shadow(offset, bytes(length))

    def flush(self) -> None:
        self._hmp("flush")

    def _shadow(self, offset: int, data: bytes) -> None:
        with self.shadow.open("r+b") as handle:
            handle.seek(offset)
            handle.write(data)

    def snapshot(self, path: Path) -> Path:
        shutil.copyfile(self.shadow, path)
        return path

    def churn(self, seed: int) -> int:
        """Scattered small writes, one large rewrite, a discard and a zero-write; the MiBs
        they touch (at most)."""
        rng = random.Random(seed)
        for _ in range(20):
            self.write(rng.randrange(0, DISK_MIB * MIB - 4096, 4096), 4096, rng.randrange(1, 255))
        start = rng.randrange(0, 80) * MIB
        self.write(start, 24 * MIB, rng.randrange(1, 255))  # one large rewrite
        self.discard(160 * MIB + rng.randrange(0, 16) * MIB, 8 * MIB)
        self.zero(rng.randrange(100, 150) * MIB, MIB)
        return 20 + 24 + 8 + 1


def make_data_disk(folder: Path) -> tuple[Path, Path]:
    """A qcow2 of DISK_MIB with random data in two regions, and its raw shadow."""
    shadow = folder / "shadow.raw"
    with shadow.open("wb") as handle:
        handle.truncate(DISK_MIB * MIB)
        handle.write(os.urandom(96 * MIB))
        handle.seek(160 * MIB)
        handle.write(os.urandom(32 * MIB))
    disk = folder / "disk.qcow2"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(shadow), str(disk)], check=True
    )
    return disk, shadow


@pytest.fixture
def shadowed(make_domain: Any, tmp_path: Path) -> Iterator[tuple[LabDomain, ShadowedDisk]]:
    disk, shadow = make_data_disk(tmp_path)
    vm: LabDomain = make_domain(action="idle", disk=disk)
    vm.wait_for("GFS-GUEST-UP")
    yield vm, ShadowedDisk(vm.domain, shadow)


def run(config: Path) -> dict[str, Any]:
    """`gfs run --force`; the new generation's manifest (with its path)."""
    done = gfs_subprocess("run", "--force", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    generations = listing(_run_json(config))
    manifest = json.loads((Path(generations[-1]["path"]) / "manifest.json").read_text())
    manifest["path"] = generations[-1]["path"]
    manifest["log"] = done.stderr
    return manifest


def _run_json(config: Path) -> Any:
    class Result:
        def __init__(self, out: str) -> None:
            self.output = out
            self.stdout = out
            self.exit_code = 0

    done = gfs_subprocess("list", "--config", str(config), "--json")
    assert done.returncode == 0, done.stderr
    return Result(done.stdout)


def image_of(manifest: dict[str, Any]) -> Path:
    return Path(manifest["path"]) / "disks" / "vda.raw"


def checkpoints(domain: libvirt.virDomain) -> list[str]:
    return sorted(c.getName() for c in domain.listAllCheckpoints(0))


@pytest.mark.parametrize("kind", ["btrfs", "xfs"])
def test_incremental_generations_are_complete_images_that_restore_alone(
    shadowed: tuple[LabDomain, ShadowedDisk],
    mounts: Mounter,
    tmp_path: Path,
    libvirt_conn: libvirt.virConnect,
    kind: str,
) -> None:
    vm, disk = shadowed
    target = mounts("tgt", kind=kind, size_mb=1024)
    config = write_config(tmp_path, target, "vm", "libvirt", "domain", Path(vm.name), KEEP)

    first = run(config)
    capture = first["source"]["capture"]
    assert (capture["mode"], capture["base"]) == ("full", None)
    assert "first run" in capture["reason"]
    assert capture["bytes_read"] == 128 * MIB  # the data only: holes are not read
    refs = [disk.snapshot(tmp_path / "ref1.raw")]
    assert_same_image(image_of(first), refs[0])
    assert checkpoints(vm.domain) == [f"gfs-vm--{first['generation']}"]

    manifests = [first]
    for round_ in (2, 3):
        touched = disk.churn(seed=round_)
        manifest = run(config)
        capture = manifest["source"]["capture"]
        assert capture["mode"] == "incremental", manifest["log"]
        assert capture["base"] == manifests[-1]["generation"]
        assert capture["disks"]["vda"]["path"] == "clone"  # reflink: no data copied
        assert capture["bytes_read"] <= touched * MIB  # only what changed
        assert capture["new_bytes"] <= touched * MIB  # the rest is shared with the base
        assert manifest["verify"][-1]["scope"] == "changed+sample"
        assert "changes since" in manifest["log"]
        refs.append(disk.snapshot(tmp_path / f"ref{round_}.raw"))
        assert_same_image(image_of(manifest), refs[-1])
        manifests.append(manifest)
        # Only the base's checkpoint and the new one are kept (each is a bitmap that
        # every guest write updates).
        assert checkpoints(vm.domain) == sorted(
            f"gfs-vm--{m['generation']}" for m in manifests[-2:]
        )

    verify = gfs_subprocess("verify", "--config", str(config))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    # Each generation stands alone: delete the ones before it and compare it.
    for index, manifest in enumerate(manifests):
        for older in manifests[:index]:
            shutil.rmtree(older["path"], ignore_errors=True)
        assert_same_image(image_of(manifest), refs[index])
    info = subprocess.run(
        ["qemu-img", "info", "--output=json", str(image_of(manifests[-1]))],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(info.stdout)["format"] == "raw"  # what QEMU boots, probed alone
    restored = tmp_path / "restored"
    name = f"{vm.name}-inc"
    done = gfs_subprocess(
        "restore", "vm", "--config", str(config), "--to", str(restored), "--as-domain", name
    )
    try:
        assert done.returncode == 0, done.stderr
        assert_same_image(restored / f"{name}-vda.raw", refs[-1])
    finally:
        remove_domain(libvirt_conn.lookupByName(name))


def test_what_makes_a_base_untrustworthy_makes_a_full_read_that_never_inherits_damage(
    shadowed: tuple[LabDomain, ShadowedDisk],
    mounts: Mounter,
    tmp_path: Path,
    libvirt_conn: libvirt.virConnect,
) -> None:
    vm, disk = shadowed
    # No reflink: the base is copied; each generation also holds the 18 MiB kernel + initrd.
    target = mounts("tgt", kind="ext4", size_mb=1536)
    config = write_config(tmp_path, target, "vm", "libvirt", "domain", Path(vm.name), KEEP)
    run(config)

    # An incremental on ext4 copies the base (copy_file_range), then patches it.
    disk.churn(seed=11)
    second = run(config)
    assert second["source"]["capture"]["mode"] == "incremental", second["log"]
    assert second["source"]["capture"]["disks"]["vda"]["path"] in ("server-copy", "full-write")
    assert_same_image(image_of(second), disk.snapshot(tmp_path / "ref2.raw"))

    # 1. The checkpoint is deleted behind gfs's back.
    vm.domain.checkpointLookupByName(f"gfs-vm--{second['generation']}").delete(0)
    disk.churn(seed=12)
    third = run(config)
    capture = third["source"]["capture"]
    assert capture["mode"] == "full"
    assert "is missing" in capture["reason"], capture
    assert_same_image(image_of(third), disk.snapshot(tmp_path / "ref3.raw"))

    # 2. The base is damaged on the share, in blocks the guest did not change: the
    # sample finds it, the disk is read in full, the damage is not inherited.
    with image_of(third).open("r+b") as handle:
        for mib in range(0, DISK_MIB, 2):
            handle.seek(mib * MIB + 1000)
            handle.write(b"\xa5")
    disk.churn(seed=13)
    fourth = run(config)
    capture = fourth["source"]["capture"]
    assert capture["mode"] == "full", capture
    assert "is damaged on the target" in capture["reason"]
    assert any("damaged on the target" in line for line in fourth["warnings"])
    assert_same_image(image_of(fourth), disk.snapshot(tmp_path / "ref4.raw"))

    # 3. QEMU is killed: its bitmaps are inconsistent at the next start; libvirt refuses
    # the checkpoint, gfs reads everything in the same run.
    disk.flush()  # the guest's data is on disk; the bitmaps are not stored
    qemu_pid = int(Path(f"/run/libvirt/qemu/{vm.name}.pid").read_text())
    os.kill(qemu_pid, signal.SIGKILL)
    for _ in range(100):
        if not vm.domain.isActive():
            break
        time.sleep(0.1)
    vm.domain.create()  # QEMU serves the disk at once: no need to wait for the guest
    disk.churn(seed=14)
    fifth = run(config)
    capture = fifth["source"]["capture"]
    assert capture["mode"] == "full", capture
    assert "cannot use the base's checkpoint" in capture["reason"], capture
    assert_same_image(image_of(fifth), disk.snapshot(tmp_path / "ref5.raw"))

    # 4. The disk changes behind QEMU's back (its bitmap cannot know): the sample read
    # from the disk differs from the base where the bitmap says nothing changed.
    sixth_base = run(config)
    assert sixth_base["source"]["capture"]["mode"] == "incremental", sixth_base["log"]
    vm.domain.destroy()  # SIGTERM: QEMU stores its bitmaps and exits
    rewrite_behind_qemu(Path(vm.spec.disk), disk)
    vm.domain.create()
    seventh = run(config)
    capture = seventh["source"]["capture"]
    assert capture["mode"] == "full", capture
    assert "rolled back or replaced" in capture["reason"], capture
    assert_same_image(image_of(seventh), disk.snapshot(tmp_path / "ref7.raw"))

    # Every generation is whole; the damaged one fails its verify and only it.
    verify = gfs_subprocess("verify", "--config", str(config))
    assert verify.returncode != 0
    assert verify.stdout.count("FAILED") == 1, verify.stdout
    assert f"vm {third['generation']}: FAILED" in verify.stdout, verify.stdout


def rewrite_behind_qemu(image: Path, disk: ShadowedDisk) -> None:
    """Overwrite a byte in every data cluster of the shut-off qcow2 through the file itself,
    as a restore of an older copy would, leaving its bitmaps as they were."""
    mapped = json.loads(
        subprocess.run(
            ["qemu-img", "map", "--output=json", "-f", "qcow2", str(image)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    with image.open("r+b") as handle:
        for extent in mapped:
            if not extent.get("data") or "offset" not in extent:
                continue
            for delta in range(0, extent["length"], MIB):
                handle.seek(extent["offset"] + delta + 7)
                old = handle.read(1)
                handle.seek(extent["offset"] + delta + 7)
                handle.write(bytes([old[0] ^ 0xFF]))
                disk._shadow(extent["start"] + delta + 7, bytes([old[0] ^ 0xFF]))


def age_last_full_read(manifest: dict[str, Any], days: int) -> None:
    """Pretend the generation's chain was last read in full `days` ago (full_every)."""
    path = Path(manifest["path"]) / "manifest.json"
    data = json.loads(path.read_text())
    data["source"]["capture"]["last_full_at"] = "2026-01-01T00:00:00Z" if days else None
    path.write_text(json.dumps(data))


def test_a_killed_run_leaves_no_checkpoint_and_the_periodic_full_read_checks_the_bitmap(
    shadowed: tuple[LabDomain, ShadowedDisk], mounts: Mounter, tmp_path: Path
) -> None:
    vm, disk = shadowed
    target = mounts("tgt", kind="btrfs", size_mb=1024)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    extra = f"scratch_dir = {json.dumps(str(scratch))}\n"
    config = write_config(tmp_path, target, "vm", "libvirt", "domain", Path(vm.name), KEEP, extra)
    first = run(config)

    # Killed right after libvirt made the new checkpoint: the next run deletes it, aborts
    # the job, and builds on the generation the checkpoint it keeps belongs to.
    disk.churn(seed=21)
    args = ("run", "--force", "--config", str(config))
    killed = gfs_subprocess(*args, env={"GFS_CRASH_AT": "mid-export"})
    assert killed.returncode == -9, killed.stderr
    assert len(checkpoints(vm.domain)) == 2  # the base's and the orphan
    second = run(config)
    assert "of an interrupted run" in second["log"], second["log"]
    assert second["source"]["capture"]["mode"] == "incremental"
    assert second["source"]["capture"]["base"] == first["generation"]
    assert checkpoints(vm.domain) == sorted(f"gfs-vm--{m['generation']}" for m in (first, second))
    assert_same_image(image_of(second), disk.snapshot(tmp_path / "ref2.raw"))
    assert not list(scratch.iterdir())  # its NBD socket and scratch directory went too

    # Killed with every byte written, before publishing: its checkpoint belongs to no
    # generation; the next run deletes it and builds on the published one.
    disk.churn(seed=25)
    killed = gfs_subprocess(*args, env={"GFS_CRASH_AT": "before-publish"})
    assert killed.returncode == -9, killed.stderr
    healed = run(config)
    assert healed["source"]["capture"]["mode"] == "incremental", healed["log"]
    assert healed["source"]["capture"]["base"] == second["generation"]
    assert checkpoints(vm.domain) == sorted(f"gfs-vm--{m['generation']}" for m in (second, healed))
    assert_same_image(image_of(healed), disk.snapshot(tmp_path / "ref2b.raw"))
    second = healed

    # full_every: a full read, checked against the base and the bitmap: no alarm.
    age_last_full_read(second, 40)
    disk.churn(seed=22)
    third = run(config)
    capture = third["source"]["capture"]
    assert (capture["mode"], "alarm" in capture) == ("full", False), capture
    assert "full_every" in capture["reason"]
    assert_same_image(image_of(third), disk.snapshot(tmp_path / "ref3.raw"))

    # The disk changes where its bitmap cannot see; the periodic full read says so.
    vm.domain.destroy()
    rewrite_behind_qemu(Path(vm.spec.disk), disk)
    vm.domain.create()
    age_last_full_read(third, 40)
    fourth = run(config)
    capture = fourth["source"]["capture"]
    assert capture["mode"] == "full" and "vda" in capture["alarm"], capture
    assert any("dirty-tracking alarm" in line for line in fourth["warnings"])
    assert_same_image(image_of(fourth), disk.snapshot(tmp_path / "ref4.raw"))
    status = gfs_subprocess("status", "--config", str(config))
    assert "dirty-tracking alarm" in status.stdout + status.stderr
    listed = gfs_subprocess("list", "--config", str(config)).stdout
    assert f"incremental from {first['generation']}: read " in listed, listed
    assert "full: read " in listed

    # The disk grows (virsh blockresize): its base image no longer fits, a full read.
    vm.domain.blockResize("vda", (DISK_MIB + 64) * MIB, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
    with disk.shadow.open("r+b") as handle:
        handle.truncate((DISK_MIB + 64) * MIB)
    grown = run(config)
    capture = grown["source"]["capture"]
    assert capture["mode"] == "full" and "was resized" in capture["reason"], capture
    assert_same_image(image_of(grown), disk.snapshot(tmp_path / "ref5.raw"))

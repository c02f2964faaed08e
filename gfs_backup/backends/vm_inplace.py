"""Restoring a VM generation over the disks of its own, shut-off domain.

Each disk is written in the format the domain's definition gives it (qcow2 or raw):
- a file disk is converted into a temporary file next to it (journaled, dot-named),
  compared with the stored image, given the old file's owner and mode, fsynced, and
  renamed over the old file only if the domain is still shut off: a failure at any point
  leaves the old disk as it was;
- a block device (an LV, a raw partition) cannot be swapped, so the image is written onto
  it with `qemu-img convert -n`; QEMU's image locking keeps the domain from starting while
  qemu-img holds the device, and the device must be at least the image's size.
Every written disk is compared with the stored image by `qemu-img compare`. A domain of a
remote host is restored on that host: the same steps as commands through the job's SSH
runner (HostDisks), from the generation on the target that host mounts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gfs_backup.backends.base import JobContext
from gfs_backup.core.config import LOCAL_HOST
from gfs_backup.core.errors import ExitCode, GfsError
from gfs_backup.target.catalog import Stored
from gfs_backup.target.manifest import DataFile, fsync_dir
from gfs_backup.tools.domainxml import Disk, parse_disks
from gfs_backup.tools.virt import Connection
from gfs_backup.transport.runner import Command, Runner

WRITE_TIMEOUT = 24 * 3600.0
TEMP_MARK = ".gfs-restore-r"
JOURNAL_ACTION = "restore-temp"


class InPlaceRefused(GfsError):
    """The domain's disks cannot be overwritten now (running, missing, too small...)."""

    exit_code = ExitCode.FAILED


@dataclass(frozen=True)
class DiskWrite:
    """One stored image and the domain disk it goes over."""

    image: Path
    disk: Disk


def image_options(path: str, driver: str, size: int | None = None) -> str:
    """A `--image-opts` string; commas in the path are doubled, as QEMU's option syntax
    wants. `size` limits a raw view to the first `size` bytes (a larger block device)."""
    limit = f",size={size}" if size is not None else ""
    return f"driver={driver}{limit},file.filename={path.replace(',', ',,')}"


def image_format(image: Path | str) -> str:
    """The format of a stored disk image: raw (`.raw`, gfs's pull-mode captures) or qcow2
    (push mode, the snapshot method, gfs before changed-block capture)."""
    return "raw" if str(image).endswith(".raw") else "qcow2"


def make_write_command(image: Path, destination: Path, disk_format: str, existing: bool) -> Command:
    """qemu-img convert of a stored image to `destination` in `disk_format`;
    `existing` (-n) writes onto a device that is there already instead of creating a file."""
    onto = ("-n",) if existing else ()
    return Command(
        (
            "qemu-img",
            "convert",
            *onto,
            "-f",
            image_format(image),
            "-O",
            disk_format,
            str(image),
            str(destination),
        ),
        mutating=True,
        timeout=WRITE_TIMEOUT,
    )


def make_compare_command(image: Path, written: str, disk_format: str, size: int | None) -> Command:
    """qemu-img compare of the stored image with what was written (its first `size`
    bytes for a block device larger than the image)."""
    return Command(
        (
            "qemu-img",
            "compare",
            "--image-opts",
            image_options(str(image), image_format(image)),
            image_options(written, disk_format, size),
        ),
        timeout=WRITE_TIMEOUT,
    )


def make_info_command(image: Path) -> Command:
    return Command(("qemu-img", "info", "--output=json", "-f", image_format(image), str(image)))


def parse_virtual_size(info_json: str) -> int:
    """The virtual size from `qemu-img info --output=json`. Raises ValueError."""
    data: Any = json.loads(info_json)
    size = data.get("virtual-size") if isinstance(data, dict) else None
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"qemu-img info gave no virtual size: {info_json[:200]!r}")
    return size


def temp_path(disk: Path, run_id: int) -> Path:
    return disk.with_name(f".{disk.name}{TEMP_MARK}{run_id}")


def is_restore_temp(path: Path) -> bool:
    return path.name.startswith(".") and TEMP_MARK in path.name


DISKS = "disks"  # a VM generation's disk images: disks/<target>.raw (or .qcow2)
NVRAM = "nvram"  # and its UEFI variable store, if it has one: nvram/VARS.fd
BOOT = "boot"  # and the host-side kernel and initrd it boots directly: boot/kernel, boot/initrd


def disk_files(stored: Stored) -> list[DataFile]:
    """The disk images of a VM generation (not its NVRAM)."""
    return [data for data in stored.manifest.files if data.path.startswith(f"{DISKS}/")]


def boot_file(stored: Stored, name: str) -> DataFile | None:
    """The copy of the domain's host-side `kernel` or `initrd` saved with the generation."""
    return next((d for d in stored.manifest.files if d.path == f"{BOOT}/{name}"), None)


def nvram_file(stored: Stored) -> DataFile | None:
    """The UEFI variable store saved with a VM generation, if any."""
    return next((d for d in stored.manifest.files if d.path.startswith(f"{NVRAM}/")), None)


def plan_writes(job: str, stored: Stored, domain_xml: str) -> list[DiskWrite]:
    """Pair each stored disk image with the domain's disk of the same target name.
    Raises InPlaceRefused when the domain has no such disk or it is not a local disk."""
    disks = {disk.target: disk for disk in parse_disks(domain_xml)}
    writes = []
    for data in disk_files(stored):
        target = Path(data.path).stem
        disk = disks.get(target)
        if disk is None:
            raise InPlaceRefused(
                f"job {job}: the domain has no disk {target} any more (disks: "
                f"{', '.join(disks) or 'none'}); restore to a new domain with --to DIR"
            )
        if disk.source_type not in ("file", "block") or not disk.source:
            raise InPlaceRefused(
                f"job {job}: disk {target} is a {disk.source_type} disk: gfs restores over "
                "file and block device disks only"
            )
        if disk.format not in ("raw", "qcow2"):
            raise InPlaceRefused(
                f"job {job}: disk {target} has format {disk.format}: gfs writes raw or qcow2"
            )
        writes.append(DiskWrite(stored.path / data.path, disk))
    return writes


def block_device_size(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


class LocalDisks:
    """The file operations of an in-place restore on this machine."""

    def is_dir(self, path: Path) -> bool:
        return path.is_dir()

    def is_block_device(self, path: Path) -> bool:
        return path.is_block_device()

    def size(self, device: Path) -> int:
        return block_device_size(device)

    def take_over_metadata(self, new: Path, old: Path) -> None:
        _take_over_metadata(new, old)

    def fsync(self, path: Path) -> None:
        _fsync(path)

    def replace(self, temp: Path, destination: Path) -> None:
        os.replace(temp, destination)
        fsync_dir(destination.parent)

    def remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)


class HostDisks:
    """The same operations on a remote host, each one argv command through its runner."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def _test(self, flag: str, path: Path) -> bool:
        return self.runner.run(Command(("test", flag, str(path))), check=False).returncode == 0

    def is_dir(self, path: Path) -> bool:
        return self._test("-d", path)

    def is_block_device(self, path: Path) -> bool:
        return self._test("-b", path)

    def size(self, device: Path) -> int:
        out = self.runner.run(Command(("blockdev", "--getsize64", str(device)))).stdout
        return int(out.strip())

    def take_over_metadata(self, new: Path, old: Path) -> None:
        if not self._test("-e", old):
            self.runner.run(Command(("chmod", "600", "--", str(new)), mutating=True))
            return
        for tool in ("chown", "chmod"):
            reference = f"--reference={old}"
            self.runner.run(Command((tool, reference, "--", str(new)), mutating=True))

    def fsync(self, path: Path) -> None:
        self.runner.run(Command(("sync", "--", str(path)), mutating=True))

    def replace(self, temp: Path, destination: Path) -> None:
        self.runner.run(Command(("mv", "-f", "-T", "--", str(temp), str(destination)), True))
        self.runner.run(Command(("sync", "--", str(destination.parent)), mutating=True))

    def remove(self, path: Path) -> None:
        self.runner.run(Command(("rm", "-f", "--", str(path)), mutating=True), check=False)


def disks_of(ctx: JobContext) -> LocalDisks | HostDisks:
    """Where the job's domain's disks are: this machine, or the job's remote host."""
    return LocalDisks() if ctx.job.host == LOCAL_HOST else HostDisks(ctx.runner)


class InPlaceRestore:
    """Writes the checked images of a generation over the disks of the shut-off domain."""

    def __init__(self, ctx: JobContext, connection: Connection, domain: Any) -> None:
        self.ctx = ctx
        self.connection = connection
        self.domain = domain
        self.name = str(domain.name())
        self.disks = disks_of(ctx)

    def refuse_if_running(self, what: str) -> None:
        if self.connection.is_running(self.domain):
            raise InPlaceRefused(
                f"job {self.ctx.job.name}: domain {self.name} is running{what}: shut it "
                f"down first (virsh shutdown {self.name}); gfs writes over the disks of a "
                "shut-off domain only"
            )

    def run(self, writes: list[DiskWrite]) -> list[str]:
        """Write every disk; the paths written, in order."""
        self.refuse_if_running("")
        for write in writes:
            if write.disk.source_type == "block":
                self._onto_device(write)
            else:
                self._over_file(write)
            self.ctx.log.info(
                "job %s: %s: disk %s restored over %s",
                self.ctx.job.name,
                self.name,
                write.disk.target,
                write.disk.source,
            )
        return [write.disk.source for write in writes]

    def _over_file(self, write: DiskWrite) -> None:
        destination = Path(write.disk.source)
        if not self.disks.is_dir(destination.parent):
            raise InPlaceRefused(
                f"job {self.ctx.job.name}: the directory of disk {write.disk.target} "
                f"({destination.parent}) does not exist: create it, or restore with --to DIR"
            )
        temp = temp_path(destination, self.ctx.run_id)
        entry = self.ctx.state.journal(
            self.ctx.run_id, self.ctx.job.name, JOURNAL_ACTION, str(temp)
        )
        try:
            runner = self.ctx.runner
            runner.run(make_write_command(write.image, temp, write.disk.format, False))
            self._compare(runner, write, str(temp), None)
            self.disks.take_over_metadata(temp, destination)
            self.disks.fsync(temp)
            self.refuse_if_running(" (it was started during the restore; its disk is unchanged)")
            self.disks.replace(temp, destination)
        finally:
            self.disks.remove(temp)
            self.ctx.state.done(entry)

    def _onto_device(self, write: DiskWrite) -> None:
        device = Path(write.disk.source)
        if not self.disks.is_block_device(device):
            raise InPlaceRefused(
                f"job {self.ctx.job.name}: disk {write.disk.target} is defined as the block "
                f"device {device}, which does not exist: create it (e.g. lvcreate) first"
            )
        runner = self.ctx.runner
        needed = parse_virtual_size(runner.run(make_info_command(write.image)).stdout)
        have = self.disks.size(device)
        if have < needed:
            raise InPlaceRefused(
                f"job {self.ctx.job.name}: block device {device} holds {have} bytes, the "
                f"backup of disk {write.disk.target} needs {needed}: grow it first"
            )
        self.refuse_if_running("")
        runner.run(make_write_command(write.image, device, write.disk.format, True))
        self._compare(runner, write, str(device), needed if have > needed else None)

    def _compare(self, runner: Runner, write: DiskWrite, written: str, size: int | None) -> None:
        done = runner.run(
            make_compare_command(write.image, written, write.disk.format, size), check=False
        )
        if done.returncode != 0:
            detail = " ".join((done.stdout + done.stderr).split())[-300:]
            raise GfsError(
                f"job {self.ctx.job.name}: disk {write.disk.target} as written to {written} "
                f"differs from the backup: {detail}"
            )


def _take_over_metadata(new: Path, old: Path) -> None:
    """The new disk file gets the old one's owner and mode (libvirt/QEMU access)."""
    try:
        info = old.stat()
    except FileNotFoundError:
        os.chmod(new, 0o600)
        return
    os.chown(new, info.st_uid, info.st_gid)
    os.chmod(new, info.st_mode & 0o7777)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

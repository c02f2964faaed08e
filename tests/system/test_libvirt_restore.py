"""Restoring VM generations over the disks of their own domain (file and block device
disks), and VMs whose disk is a raw block device, against a real libvirtd."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import libvirt_qemu
import pytest

from tests.conftest import RunGfs
from tests.lab.domains import LabDomain
from tests.lab.fixtures import guest_image, libvirt_conn, libvirt_daemon, make_domain
from tests.system.conftest import Mounter
from tests.system.helpers import gfs_subprocess, listing, write_config
from tests.system.test_libvirt import (
    DAILY,
    boot_restored,
    restore_as_domain,
    restored_domains,
    serial_log,
)

pytestmark = [pytest.mark.system, pytest.mark.slow]
__all__ = ["guest_image", "libvirt_conn", "libvirt_daemon", "make_domain", "restored_domains"]

DISK_MIB = 64


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as data:
        for block in iter(lambda: data.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[Path]:
    """A raw block device (a loop device on a sparse file), detached at the end."""
    backing = tmp_path / "blockdisk.img"
    with backing.open("wb") as image:
        image.truncate(DISK_MIB << 20)
    device = subprocess.run(
        ["losetup", "--find", "--show", str(backing)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        yield Path(device)
    finally:
        subprocess.run(["losetup", "-d", device], capture_output=True, check=False)


def restore_over(config: Path) -> subprocess.CompletedProcess[str]:
    return gfs_subprocess("restore", "vm", "--config", str(config), "--over-original")


def test_a_shut_off_domain_gets_its_lost_disk_back_over_the_original(
    make_domain: object,
    mounts: Mounter,
    tmp_path: Path,
    run_gfs: RunGfs,
    libvirt_conn: libvirt.virConnect,
) -> None:
    vm: LabDomain = make_domain(action="write-pattern", tag="inp1")  # type: ignore[operator]
    vm.wait_for("GFS-PATTERN-WRITTEN tag=inp1")
    vm.wait_shutoff()
    target = mounts("tgt", kind="tmpfs", size_mb=512)
    config = write_config(tmp_path, target, "vm", "libvirt", "domain", Path(vm.name), DAILY)
    assert run_gfs("run", "--config", str(config)).exit_code == 0
    os.chmod(vm.disk, 0o640)
    subprocess.run(  # the disk is lost: an empty image in its place
        ["qemu-img", "create", "-q", "-f", "qcow2", str(vm.disk), f"{DISK_MIB}M"], check=True
    )
    os.chmod(vm.disk, 0o640)
    lost = sha256_of(vm.disk)

    neither = run_gfs("restore", "vm", "--config", str(config))
    assert neither.exit_code == 2
    assert "give exactly one of --to PATH and --over-original" in neither.output

    restored = restore_over(config)
    assert restored.returncode == 0, restored.stderr
    assert "over the disks of its domain" in restored.stdout
    assert sha256_of(vm.disk) != lost
    assert vm.disk.stat().st_mode & 0o777 == 0o640  # the old file's mode is kept
    assert [p.name for p in vm.disk.parent.iterdir() if ".gfs-restore-" in p.name] == []
    check = subprocess.run(["qemu-img", "check", str(vm.disk)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    console = boot_restored(libvirt_conn, vm.name, tmp_path, "inp1")  # the domain itself
    assert "GFS-PATTERN-OK tag=inp1" in console

    vm.wait_shutoff()
    vm.domain.create()  # running again: its disks must not be touched
    before = sha256_of(vm.disk)
    refused = restore_over(config)
    assert refused.returncode == 5, refused.stderr
    assert f"domain {vm.name} is running: shut it down first" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    vm.domain.destroy()
    assert sha256_of(vm.disk) == before


def test_a_domain_on_a_raw_block_device_is_backed_up_sparse_and_restored_onto_it(
    make_domain: object,
    mounts: Mounter,
    tmp_path: Path,
    run_gfs: RunGfs,
    libvirt_conn: libvirt.virConnect,
    loop_device: Path,
) -> None:
    target = mounts("tgt", kind="tmpfs", size_mb=512)
    vm: LabDomain = make_domain(  # type: ignore[operator]
        action="churn", tag="blk1", disk=loop_device
    )
    vm.wait_for("GFS-PATTERN-WRITTEN tag=blk1")
    vm.wait_for("GFS-CHURN 50")
    config = write_config(tmp_path, target, "vm", "libvirt", "domain", Path(vm.name), DAILY)
    result = run_gfs("run", "--config", str(config))
    assert result.exit_code == 0, result.output
    (generation,) = listing(run_gfs("list", "--config", str(config), "--json"))
    manifest = json.loads((Path(generation["path"]) / "manifest.json").read_text())
    (disk,) = manifest["source"]["disks"]
    assert (disk["type"], disk["source"], disk["format"]) == ("block", str(loop_device), "raw")
    image = Path(generation["path"]) / "disks" / "vda.raw"
    allocated = image.stat().st_blocks * 512
    assert allocated < (DISK_MIB << 20) // 2, allocated  # zero regions were not written

    running = restore_over(config)
    assert running.returncode == 5
    assert "is running: shut it down first" in running.stderr

    vm.domain.destroy()
    with loop_device.open("r+b") as device:  # the volume's data is lost
        device.write(bytes(16 << 20))
        os.fsync(device.fileno())
    restored = restore_over(config)
    assert restored.returncode == 0, restored.stderr
    assert f"disk vda restored over {loop_device}" in restored.stderr
    console = boot_restored(libvirt_conn, vm.name, tmp_path, "blk1")
    assert "GFS-PATTERN-OK tag=blk1" in console


def test_over_original_is_refused_for_jobs_that_are_not_vms(
    mounts: Mounter, tmp_path: Path, run_gfs: RunGfs
) -> None:
    target = mounts("tgt", kind="tmpfs", size_mb=32)
    source = tmp_path / "data"
    source.mkdir()
    config = write_config(tmp_path, target, "vm", "files", "path", source, DAILY)
    result = run_gfs("restore", "vm", "--config", str(config), "--over-original")
    assert result.exit_code == 3
    assert "--over-original is for libvirt jobs" in result.output


def agent_answers(domain: libvirt.virDomain, timeout: float = 90.0) -> bool:
    """Whether qemu-ga in the domain answers guest-ping within `timeout` (its channel works)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            libvirt_qemu.qemuAgentCommand(domain, '{"execute": "guest-ping"}', 5, 0)
            return True
        except libvirt.libvirtError:
            time.sleep(1)
    return False


def test_a_domain_restored_as_a_new_one_starts_beside_its_running_original(
    make_domain: object,
    mounts: Mounter,
    tmp_path: Path,
    run_gfs: RunGfs,
    libvirt_conn: libvirt.virConnect,
    restored_domains: list[str],
) -> None:
    """A UEFI domain with a serial log file, the guest agent's channel and an NVRAM."""
    target = mounts("tgt", kind="tmpfs", size_mb=512)
    vm: LabDomain = make_domain(  # type: ignore[operator]
        action="churn", tag="side1", agent=True, uefi=True
    )
    vm.wait_for("GFS-PATTERN-WRITTEN tag=side1", timeout=240)
    config = write_config(tmp_path, target, "vm", "libvirt", "domain", Path(vm.name), DAILY)
    assert run_gfs("run", "--config", str(config)).exit_code == 0
    (generation,) = listing(run_gfs("list", "--config", str(config), "--json"))
    manifest = json.loads((Path(generation["path"]) / "manifest.json").read_text())
    assert "nvram/VARS.fd" in [data["path"] for data in manifest["files"]]

    new_name = f"{vm.name}-beside"
    folder = tmp_path / "beside"
    new = restore_as_domain(run_gfs, config, libvirt_conn, restored_domains, folder, new_name)
    definition = new.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    original = vm.domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    nvram = folder / f"{new_name}-VARS.fd"
    assert "<nvram template=" in definition and str(nvram) in definition
    assert nvram.read_bytes() == (Path(generation["path"]) / "nvram/VARS.fd").read_bytes()
    assert str(vm.console_log) not in definition
    assert str(vm.console_log) in original
    assert f"restored by gfs from domain {vm.name}, generation {generation['id']}" in definition

    console = boot_restored(libvirt_conn, new_name, tmp_path, "side1", after="idle")
    assert "GFS-PATTERN-OK tag=side1" in console
    assert vm.is_active() and new.isActive()
    assert serial_log(new).parent == folder
    assert agent_answers(new), "the restored domain's guest agent does not answer"
    assert agent_answers(vm.domain), "the original's guest agent stopped answering"

"""libvirt jobs by the snapshot method (no backup API): overlay, copy, commit and pivot back,
and recovery of a domain left on a gfs overlay, against a real libvirtd."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import libvirt
import pytest

from tests.conftest import RunGfs
from tests.lab.domains import LabDomain
from tests.lab.fixtures import guest_image, libvirt_conn, libvirt_daemon, make_domain
from tests.system.conftest import Mounter
from tests.system.helpers import gfs_subprocess, listing, write_config
from tests.system.test_libvirt import DAILY, restore_and_boot, restored_domains

pytestmark = [pytest.mark.system, pytest.mark.slow]
__all__ = ["guest_image", "libvirt_conn", "libvirt_daemon", "make_domain", "restored_domains"]

SNAPSHOT = 'method = "snapshot"\n'
CHURN_BLOCK = re.compile(rb"GFS-CHURN (\d{12})")


def disk_sources(conn: libvirt.virConnect, name: str, inactive: bool = False) -> list[str]:
    flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
    xml = conn.lookupByName(name).XMLDesc(flags)
    return re.findall(
        r"<disk type='file' device='disk'>\s*<driver[^>]*/>\s*<source file='([^']+)'", xml
    )


def leftovers(disk: Path) -> list[str]:
    return sorted(p.name for p in disk.parent.iterdir() if ".gfs-overlay-" in p.name)


def newest_churn_on_disk(disk: Path, tmp_path: Path) -> int:
    """The highest churn counter the guest's writes left in the (unused) image."""
    raw = tmp_path / "inspect.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(disk), str(raw)], check=True)
    with raw.open("rb") as image:
        image.seek(4 << 20)
        found = [int(n) for n in CHURN_BLOCK.findall(image.read(1 << 20))]
    raw.unlink()
    return max(found, default=0)


def console_churn(vm: LabDomain) -> int:
    counts = [int(n) for n in re.findall(r"^GFS-CHURN (\d+)\s*$", vm.console(), re.MULTILINE)]
    return max(counts, default=0)


def test_snapshot_method_backs_up_a_running_domain_and_puts_it_back_on_its_disk(
    make_domain: object,
    mounts: Mounter,
    tmp_path: Path,
    run_gfs: RunGfs,
    libvirt_conn: libvirt.virConnect,
    restored_domains: list[str],
) -> None:
    target = mounts("tgt", kind="tmpfs", size_mb=512)
    vm: LabDomain = make_domain(action="churn", tag="snap1")  # type: ignore[operator]
    vm.wait_for("GFS-CHURN 100")
    config = write_config(
        tmp_path, target, "vm", "libvirt", "domain", Path(vm.name), DAILY, extra=SNAPSHOT
    )
    result = run_gfs("run", "--config", str(config))
    assert result.exit_code == 0, result.output
    assert "by snapshot" in result.stderr
    assert disk_sources(libvirt_conn, vm.name) == [str(vm.disk)]
    assert disk_sources(libvirt_conn, vm.name, inactive=True) == [str(vm.disk)]
    assert leftovers(vm.disk) == []
    assert not libvirt_conn.lookupByName(vm.name).blockJobInfo("vda", 0)
    before = console_churn(vm)
    vm.wait_for(f"GFS-CHURN {before + 100}")  # the guest writes on, to its own disk
    (generation,) = listing(run_gfs("list", "--config", str(config), "--json"))
    source = json.loads((Path(generation["path"]) / "manifest.json").read_text())["source"]
    assert source["method"] == "snapshot"
    assert source["consistency"] == "crash-consistent"
    check = run_gfs("check", "--config", str(config))
    assert "overlay" not in check.output, check.output
    console = restore_and_boot(
        run_gfs, config, libvirt_conn, restored_domains, tmp_path, f"{vm.name}-r", "snap1"
    )
    assert "GFS-PATTERN-OK tag=snap1" in console


@pytest.mark.parametrize("point", ["after-overlay", "mid-commit"])
def test_a_domain_left_on_a_gfs_overlay_is_reported_and_committed_back_by_the_next_run(
    point: str,
    make_domain: object,
    mounts: Mounter,
    tmp_path: Path,
    libvirt_conn: libvirt.virConnect,
) -> None:
    target = mounts("tgt", kind="tmpfs", size_mb=512)
    vm: LabDomain = make_domain(action="churn", tag="k2")  # type: ignore[operator]
    vm.wait_for("GFS-CHURN 100")
    config = write_config(
        tmp_path, target, "vm", "libvirt", "domain", Path(vm.name), DAILY, extra=SNAPSHOT
    )
    args = ("run", "--force", "--config", str(config))
    killed = gfs_subprocess(*args, env={"GFS_CRASH_AT": point})
    assert killed.returncode == -9, killed.stderr
    (overlay,) = disk_sources(libvirt_conn, vm.name)
    assert ".gfs-overlay-vm-r" in overlay and Path(overlay).is_file()
    if point == "mid-commit":
        assert libvirt_conn.lookupByName(vm.name).blockJobInfo("vda", 0)  # commit job left
    check = gfs_subprocess("check", "--config", str(config))
    assert check.returncode == 7, check.stderr
    assert f"domain {vm.name} runs on the gfs overlay {overlay}" in check.stdout
    written_on_overlay = console_churn(vm) + 100
    vm.wait_for(f"GFS-CHURN {written_on_overlay}")  # these writes go to the overlay only
    healed = gfs_subprocess(*args)
    assert healed.returncode == 0, healed.stderr
    assert "is on its own disk again" in healed.stderr
    assert disk_sources(libvirt_conn, vm.name) == [str(vm.disk)]
    assert disk_sources(libvirt_conn, vm.name, inactive=True) == [str(vm.disk)]
    assert leftovers(vm.disk) == []
    assert vm.is_active()
    assert "overlay" not in gfs_subprocess("check", "--config", str(config)).stdout
    vm.domain.destroy()
    assert newest_churn_on_disk(vm.disk, tmp_path) >= written_on_overlay  # nothing lost


def test_a_domain_shut_off_while_on_a_gfs_overlay_is_committed_offline(
    make_domain: object,
    mounts: Mounter,
    tmp_path: Path,
    libvirt_conn: libvirt.virConnect,
) -> None:
    target = mounts("tgt", kind="tmpfs", size_mb=512)
    vm: LabDomain = make_domain(action="churn", tag="k3")  # type: ignore[operator]
    vm.wait_for("GFS-CHURN 100")
    config = write_config(
        tmp_path, target, "vm", "libvirt", "domain", Path(vm.name), DAILY, extra=SNAPSHOT
    )
    args = ("run", "--force", "--config", str(config))
    killed = gfs_subprocess(*args, env={"GFS_CRASH_AT": "after-overlay"})
    assert killed.returncode == -9, killed.stderr
    written_on_overlay = console_churn(vm) + 100
    vm.wait_for(f"GFS-CHURN {written_on_overlay}")
    vm.domain.destroy()
    (overlay,) = disk_sources(libvirt_conn, vm.name, inactive=True)
    assert ".gfs-overlay-" in overlay
    check = gfs_subprocess("check", "--config", str(config))
    assert f"domain {vm.name} is defined with the gfs overlay {overlay}" in check.stdout
    healed = gfs_subprocess(*args)
    assert healed.returncode == 0, healed.stderr
    assert "committed" in healed.stderr
    assert disk_sources(libvirt_conn, vm.name, inactive=True) == [str(vm.disk)]
    assert leftovers(vm.disk) == []
    assert newest_churn_on_disk(vm.disk, tmp_path) >= written_on_overlay
    (generation,) = listing_of(config)
    assert generation["state"] == "shut off"


def listing_of(config: Path) -> list[dict[str, object]]:
    done = gfs_subprocess("list", "--config", str(config), "--json")
    assert done.returncode == 0, done.stderr
    (job,) = json.loads(done.stdout)["jobs"]
    generations: list[dict[str, object]] = job["generations"]
    for generation in generations:
        manifest = json.loads((Path(str(generation["path"])) / "manifest.json").read_text())
        generation["state"] = manifest["source"]["state"]
    return generations

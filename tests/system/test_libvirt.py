"""libvirt jobs against a real libvirtd with TCG domains booted from the lab guest."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from tests.conftest import RunGfs
from tests.lab.domains import LabDomain, remove_domain
from tests.lab.fixtures import guest_image, libvirt_conn, libvirt_daemon, make_domain
from tests.system.conftest import Mounter
from tests.system.helpers import gfs_subprocess, listing, write_config

pytestmark = [pytest.mark.system, pytest.mark.slow]
__all__ = ["guest_image", "libvirt_conn", "libvirt_daemon", "make_domain"]

DAILY = """
[job.policy]
semantics = "restic"
timezone = "UTC"
schedule = "daily"
[job.policy.retention]
keep-last = 3
"""


@pytest.fixture
def restored_domains(libvirt_conn: libvirt.virConnect) -> Iterator[list[str]]:
    """Names of domains a test restored; destroyed and undefined at the end."""
    names: list[str] = []
    yield names
    for name in names:
        with contextlib.suppress(libvirt.libvirtError):
            remove_domain(libvirt_conn.lookupByName(name))


def serial_log(domain: libvirt.virDomain) -> Path:
    """The file the domain's serial console writes to."""
    source = ET.fromstring(domain.XMLDesc(0)).find("./devices/serial/source")
    assert source is not None and source.get("path"), "the domain has no serial log file"
    return Path(source.get("path", ""))


def boot_restored(
    conn: libvirt.virConnect, name: str, tmp_path: Path, tag: str, after: str = "poweroff"
) -> str:
    """Start the restored domain as a pattern checker (its own console log, which gfs's
    restore chose, is read), then `after` (poweroff, idle); return its console."""
    domain = conn.lookupByName(name)
    xml = domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    xml = re.sub(r"gfs\.action=[^\s<]+", "gfs.action=check-pattern", xml)
    xml = re.sub(r" ?gfs\.after=[^\s<]+", "", xml)
    xml = re.sub(r"gfs\.tag=[^\s<]+", f"gfs.tag={tag} gfs.after={after}", xml)
    domain = conn.defineXML(xml)
    log = serial_log(domain)
    domain.create()
    for _ in range(600):
        text = log.read_text(errors="replace") if log.exists() else ""
        if "GFS-PATTERN-OK" in text or "GFS-PATTERN-BAD" in text:
            return text
        time.sleep(0.2)
    raise AssertionError(f"restored domain {name} printed no pattern result")


def restore_and_boot(
    run_gfs: RunGfs,
    config: Path,
    conn: libvirt.virConnect,
    restored_domains: list[str],
    tmp_path: Path,
    name: str,
    tag: str,
) -> str:
    """`gfs restore vm --to DIR --as-domain NAME`, then boot the new domain as a pattern
    checker; its console."""
    restore_as_domain(run_gfs, config, conn, restored_domains, tmp_path / "r", name)
    return boot_restored(conn, name, tmp_path, tag)


def restore_as_domain(
    run_gfs: RunGfs,
    config: Path,
    conn: libvirt.virConnect,
    restored_domains: list[str],
    folder: Path,
    name: str,
) -> libvirt.virDomain:
    """`gfs restore vm --to FOLDER --as-domain NAME` (removed at the test's end): the new
    domain, defined and not started."""
    restored_domains.append(name)
    result = run_gfs(
        "restore", "vm", "--config", str(config), "--to", str(folder), "--as-domain", name
    )
    assert result.exit_code == 0, result.output
    return conn.lookupByName(name)


def test_running_domain_is_backed_up_while_it_writes_and_restores_to_a_new_domain(
    make_domain: object,
    mounts: Mounter,
    tmp_path: Path,
    run_gfs: RunGfs,
    libvirt_conn: libvirt.virConnect,
    restored_domains: list[str],
) -> None:
    target = mounts("tgt", kind="tmpfs", size_mb=512)  # mounted before QEMU starts, as NFS is
    vm: LabDomain = make_domain(action="churn", tag="live1")  # type: ignore[operator]
    vm.wait_for("GFS-PATTERN-WRITTEN tag=live1")
    vm.wait_for("GFS-CHURN 100")  # the guest is rewriting its disk right now
    config = write_config(tmp_path, target, "vm", "libvirt", "domain", Path(vm.name), DAILY)
    result = run_gfs("run", "--config", str(config))
    assert result.exit_code == 0, result.output
    assert vm.is_active()
    (generation,) = listing(run_gfs("list", "--config", str(config), "--json"))
    manifest = json.loads((Path(generation["path"]) / "manifest.json").read_text())
    assert manifest["source"]["state"] == "running"
    assert manifest["source"]["consistency"] == "crash-consistent"
    assert f"<name>{vm.name}</name>" in manifest["source"]["xml"]
    assert [f["path"] for f in manifest["files"]] == [
        "disks/vda.raw",
        "blocks/vda.sha256-1m",
        "boot/kernel",  # the lab domain boots a host-side kernel and initrd: saved too
        "boot/initrd",
    ]
    boot = Path(generation["path"]) / "boot"
    assert (boot / "kernel").read_bytes() == Path(vm.spec.image.kernel).read_bytes()
    assert manifest["source"]["capture"]["mode"] == "full"
    assert not libvirt_conn.lookupByName(vm.name).jobStats().get("type")  # no job left
    new_name = f"{vm.name}-r"
    disks = tmp_path / "restored-disks"
    new = restore_as_domain(run_gfs, config, libvirt_conn, restored_domains, disks, new_name)
    assert new.UUIDString() != libvirt_conn.lookupByName(vm.name).UUIDString()
    assert str(disks / f"{new_name}-vda.raw") in new.XMLDesc(0)
    assert "<interface" not in new.XMLDesc(0)
    console = boot_restored(libvirt_conn, new_name, tmp_path, "live1")
    assert "GFS-PATTERN-OK tag=live1" in console


def test_shut_off_domain_is_copied_and_restores(
    make_domain: object,
    mounts: Mounter,
    tmp_path: Path,
    run_gfs: RunGfs,
    libvirt_conn: libvirt.virConnect,
    restored_domains: list[str],
) -> None:
    vm: LabDomain = make_domain(action="write-pattern", tag="off1")  # type: ignore[operator]
    vm.wait_for("GFS-PATTERN-WRITTEN tag=off1")
    vm.wait_shutoff()
    target = mounts("tgt", kind="tmpfs", size_mb=512)
    config = write_config(tmp_path, target, "vm", "libvirt", "domain", Path(vm.name), DAILY)
    result = run_gfs("run", "--config", str(config))
    assert result.exit_code == 0, result.output
    (generation,) = listing(run_gfs("list", "--config", str(config), "--json"))
    manifest = json.loads((Path(generation["path"]) / "manifest.json").read_text())
    assert manifest["source"]["state"] == "shut off"
    capture = manifest["source"]["capture"]  # read whole through qemu-nbd, no checkpoint
    assert (manifest["source"]["method"], capture["mode"]) == ("qemu-nbd", "full")
    assert "shut off" in capture["reason"] and capture["checkpoint"] is None
    assert not vm.domain.listAllCheckpoints(0)
    assert run_gfs("verify", "--config", str(config)).exit_code == 0
    console = restore_and_boot(
        run_gfs, config, libvirt_conn, restored_domains, tmp_path, f"{vm.name}-r", "off1"
    )
    assert "GFS-PATTERN-OK tag=off1" in console


def test_missing_domain_fails_clearly(
    mounts: Mounter, tmp_path: Path, run_gfs: RunGfs, libvirt_daemon: object
) -> None:
    target = mounts("tgt", kind="tmpfs", size_mb=32)
    config = write_config(tmp_path, target, "vm", "libvirt", "domain", Path("gfs-test-nope"), DAILY)
    result = run_gfs("run", "--config", str(config))
    assert result.exit_code == 5
    assert "domain 'gfs-test-nope' does not exist" in result.stderr


def test_run_killed_during_a_backup_is_cleaned_up_by_the_next(
    make_domain: object, mounts: Mounter, tmp_path: Path, libvirt_conn: libvirt.virConnect
) -> None:
    target = mounts("tgt", kind="tmpfs", size_mb=512)
    vm: LabDomain = make_domain(action="churn", tag="k1")  # type: ignore[operator]
    vm.wait_for("GFS-CHURN 100")
    config = write_config(tmp_path, target, "vm", "libvirt", "domain", Path(vm.name), DAILY)
    args = ("run", "--force", "--config", str(config))
    killed = gfs_subprocess(*args, env={"GFS_CRASH_AT": "mid-export"})
    assert killed.returncode == -9, killed.stderr
    assert any(p.name.startswith(".partial-") for p in (target / "vm").iterdir())
    healed = gfs_subprocess(*args)
    assert healed.returncode == 0, healed.stderr
    assert "reconcile" in healed.stderr
    assert [p.name for p in (target / "vm").iterdir() if p.name.startswith(".")] == []
    assert not libvirt_conn.lookupByName(vm.name).jobStats().get("type")
    assert vm.is_active()
    assert gfs_subprocess("verify", "--config", str(config)).returncode == 0


def test_quiesce_freezes_the_guest_briefly_or_fails_clearly(
    make_domain: object, mounts: Mounter, tmp_path: Path, run_gfs: RunGfs
) -> None:
    target = mounts("tgt", kind="tmpfs", size_mb=512)
    with_agent: LabDomain = make_domain(action="churn", tag="q1", agent=True)  # type: ignore[operator]
    with_agent.wait_for("GFS-AGENT-UP")
    with_agent.wait_for("GFS-CHURN 100")
    config = write_config(
        tmp_path,
        target,
        "vm",
        "libvirt",
        "domain",
        Path(with_agent.name),
        DAILY,
        extra='quiesce = "required"\n',
    )
    result = run_gfs("run", "--config", str(config))
    assert result.exit_code == 0, result.output
    assert "guest frozen" in result.stderr
    (generation,) = listing(run_gfs("list", "--config", str(config), "--json"))
    source = json.loads((Path(generation["path"]) / "manifest.json").read_text())["source"]
    assert source["consistency"] == "application-consistent"
    assert 0 < source["frozen_seconds"] < 1.0
    without: LabDomain = make_domain(action="churn", tag="q2")  # type: ignore[operator]
    without.wait_for("GFS-CHURN 100")
    other = tmp_path / "other"
    other.mkdir()
    config = write_config(
        other,
        target,
        "vm2",
        "libvirt",
        "domain",
        Path(without.name),
        DAILY,
        extra='quiesce = "required"\n',
    )
    failed = run_gfs("run", "--config", str(config))
    assert failed.exit_code == 5
    assert 'quiesce = "required" but the guest agent' in failed.stderr
    assert without.is_active()


def test_target_full_during_a_vm_backup(
    make_domain: object, mounts: Mounter, tmp_path: Path, run_gfs: RunGfs
) -> None:
    target = mounts("tgt", kind="tmpfs", size_mb=16)
    raw = tmp_path / "data.raw"
    raw.write_bytes(os.urandom(48 << 20))
    disk = tmp_path / "full.qcow2"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(disk)], check=True
    )
    vm: LabDomain = make_domain(action="idle", disk=disk)  # type: ignore[operator]
    vm.wait_for("GFS-GUEST-UP")
    config = write_config(tmp_path, target, "vm", "libvirt", "domain", Path(vm.name), DAILY)
    result = run_gfs("run", "--config", str(config))
    assert result.exit_code == 5
    assert "is full (no space left on device)" in result.stderr
    assert [p.name for p in (target / "vm").iterdir()] == []  # the partial export is gone
    assert vm.is_active()


NETWORK_DISK = """<disk type='network' device='disk'><driver name='qemu' type='raw'/>
  <source protocol='nbd' name='export'><host name='127.0.0.1' port='10809'/></source>
  <target dev='vda' bus='virtio'/></disk>"""
POOL_DISK = """<disk type='volume' device='disk'><driver name='qemu' type='qcow2'/>
  <source pool='default' volume='web.qcow2'/><target dev='vda' bus='virtio'/></disk>"""
DIR_DISK = """<disk type='dir' device='disk'><driver name='qemu' type='fat'/>
  <source dir='/srv'/><target dev='vda' bus='virtio'/><readonly/></disk>"""


def file_disk(path: Path, kind: str = "file") -> str:
    attribute = "dev" if kind == "block" else "file"
    return f"""<disk type='{kind}' device='disk'><driver name='qemu' type='raw'/>
  <source {attribute}='{path}'/><target dev='vda' bus='virtio'/></disk>"""


@pytest.mark.parametrize(
    "case",
    ["network", "pool volume", "directory", "missing file", "not a block device", "on the target"],
)
def test_disks_gfs_cannot_or_must_not_copy_are_refused(
    case: str, mounts: Mounter, tmp_path: Path, libvirt_conn: libvirt.virConnect
) -> None:
    target = mounts("tgt", kind="tmpfs", size_mb=16)
    plain_file = tmp_path / "plain.img"
    plain_file.write_bytes(bytes(1 << 20))
    on_target = target / "vm.img"
    on_target.write_bytes(bytes(1 << 20))
    disk, message = {
        "network": (  # left out by default: then nothing is left
            NETWORK_DISK,
            "has no disk to back up (vda: a nbd network disk)",
        ),
        "pool volume": (
            POOL_DISK,
            "disk vda is a volume disk (web.qcow2): gfs backs up file and block device disks only",
        ),
        "directory": (
            DIR_DISK,
            "disk vda is a dir disk (no path): gfs backs up file and block device disks only",
        ),
        "missing file": (
            file_disk(tmp_path / "gone.img"),
            f"disk vda should be an image "
            f"file but {tmp_path / 'gone.img'} does not exist: fix the domain's "
            "definition, or name the disks to back up with disks = [...]",
        ),
        "not a block device": (
            file_disk(plain_file, "block"),
            f"disk vda should be a block device but {plain_file} is something else",
        ),
        "on the target": (
            file_disk(on_target),
            f"is on the same filesystem as the source {on_target}",
        ),
    }[case]
    name = f"gfs-test-{os.getpid()}-odd-{case.replace(' ', '-')}"
    domain = libvirt_conn.defineXML(
        f"""<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>
      <os><type arch='x86_64'>hvm</type></os><devices>{disk}</devices></domain>"""
    )
    try:
        config = write_config(tmp_path, target, "vm", "libvirt", "domain", Path(name), DAILY)
        result = gfs_subprocess("run", "--config", str(config))
        assert result.returncode == 5, result.stderr
        assert message in result.stderr
        assert "Traceback" not in result.stderr
        assert sorted(p.name for p in target.iterdir()) == ["vm.img"]  # nothing written
    finally:
        domain.undefine()


def test_domain_destroyed_in_the_middle_of_its_backup(
    make_domain: object,
    mounts: Mounter,
    tmp_path: Path,
    run_gfs: RunGfs,
    libvirt_conn: libvirt.virConnect,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    target = mounts("tgt", kind="tmpfs", size_mb=512)
    vm: LabDomain = make_domain(action="churn", tag="d1")  # type: ignore[operator]
    vm.wait_for("GFS-CHURN 100")

    def pull_the_plug(point: str) -> None:
        if point == "mid-export":  # right after backupBegin: the job is running
            libvirt_conn.lookupByName(vm.name).destroy()

    monkeypatch.setattr("gfs_backup.backends.libvirt.crash_point", pull_the_plug)
    config = write_config(tmp_path, target, "vm", "libvirt", "domain", Path(vm.name), DAILY)
    result = run_gfs("run", "--config", str(config))
    assert result.exit_code == 5
    assert f"domain {vm.name} stopped during its backup: no generation was made" in (result.stderr)
    assert [p.name for p in (target / "vm").iterdir()] == []
    assert not vm.is_active()


@pytest.mark.parametrize("quiesce", ["auto", "required"])
def test_a_hanging_guest_freeze_times_out_and_the_guest_is_thawed(
    quiesce: str, make_domain: object, mounts: Mounter, tmp_path: Path
) -> None:
    target = mounts("tgt", kind="tmpfs", size_mb=512)
    vm: LabDomain = make_domain(  # type: ignore[operator]
        action="churn", tag="h1", agent=True, layout="fs", freeze_hang=25
    )
    vm.wait_for_agent()
    vm.wait_for("GFS-CHURN 100")
    config = write_config(
        tmp_path,
        target,
        "vm",
        "libvirt",
        "domain",
        Path(vm.name),
        DAILY,
        extra=f'quiesce = "{quiesce}"\n',
    )
    started = time.monotonic()
    result = gfs_subprocess("run", "--config", str(config))
    elapsed = time.monotonic() - started
    assert elapsed < 90, f"gfs waited {elapsed:.0f} s for a hanging freeze"
    assert "could not freeze the filesystems" in result.stderr
    if quiesce == "required":
        assert result.returncode == 5, result.stderr
        assert [p.name for p in (target / "vm").iterdir()] == []
    else:
        assert result.returncode == 0, result.stderr
        assert "backing up crash-consistent" in result.stderr
        (generation,) = [p for p in (target / "vm").iterdir()]
        source = json.loads((generation / "manifest.json").read_text())["source"]
        assert source["consistency"] == "crash-consistent"
        assert "could not freeze" in source["quiesce_failed"]
    # libvirt keeps the agent marked unresponsive after the timed-out freeze, so gfs
    # cannot thaw what the guest froze late: it must say so, loudly, with the fix.
    assert f"the guest may stay frozen: check it now (virsh domfsthaw {vm.name})" in result.stderr
    assert vm.is_active()


def test_a_domain_named_with_shell_metacharacters_is_backed_up_and_restored(
    make_domain: object,
    mounts: Mounter,
    tmp_path: Path,
    run_gfs: RunGfs,
    libvirt_conn: libvirt.virConnect,
    restored_domains: list[str],
) -> None:
    marker = Path.cwd() / "gfs-pwned"  # where a command run by a shell would create it
    hostile = "-x;touch gfs-pwned $(touch gfs-pwned) `touch gfs-pwned` 'q\" &|<>*?"
    target = mounts("tgt", kind="tmpfs", size_mb=512)
    vm: LabDomain = make_domain(  # type: ignore[operator]
        action="write-pattern", tag="meta1", after="idle", name_suffix=hostile
    )
    vm.wait_for("GFS-PATTERN-WRITTEN tag=meta1")
    config = write_config(tmp_path, target, "vm", "libvirt", "domain", Path(vm.name), DAILY)
    result = run_gfs("run", "--config", str(config))
    assert result.exit_code == 0, result.output
    (generation,) = listing(run_gfs("list", "--config", str(config), "--json"))
    manifest = json.loads((Path(generation["path"]) / "manifest.json").read_text())
    assert manifest["source"]["domain"] == vm.name
    console = restore_and_boot(
        run_gfs, config, libvirt_conn, restored_domains, tmp_path, f"{vm.name}-r", "meta1"
    )
    assert "GFS-PATTERN-OK tag=meta1" in console
    assert not marker.exists()


def test_several_vms_at_once_one_failing_is_a_partial_failure(
    make_domain: object, mounts: Mounter, tmp_path: Path, run_gfs: RunGfs
) -> None:
    target = mounts("tgt", kind="tmpfs", size_mb=512)
    first: LabDomain = make_domain(action="idle")  # type: ignore[operator]
    second: LabDomain = make_domain(action="write-pattern", tag="many")  # type: ignore[operator]
    second.wait_for("GFS-PATTERN-WRITTEN tag=many")
    second.wait_shutoff()
    first.wait_for("GFS-GUEST-UP")
    config = write_config(tmp_path, target, "vm1", "libvirt", "domain", Path(first.name), DAILY)
    for job, domain in (("vm2", second.name), ("gone", "gfs-test-no-such-domain")):
        config.write_text(
            config.read_text()
            + f'[[job]]\nname = "{job}"\nkind = "libvirt"\ndomain = {json.dumps(domain)}\n'
            + DAILY
        )
    config.write_text("concurrency = 3\n" + config.read_text())
    result = run_gfs("run", "--config", str(config), "--json")
    assert result.exit_code == 4, result.output
    outcomes = {job["job"]: job for job in json.loads(result.stdout)["jobs"]}
    assert outcomes["vm1"]["status"] == outcomes["vm2"]["status"] == "ok"
    assert outcomes["gone"]["status"] == "failed"
    assert "domain 'gfs-test-no-such-domain' does not exist" in outcomes["gone"]["message"]
    for job in ("vm1", "vm2"):
        (generation,) = listing(run_gfs("list", job, "--config", str(config), "--json"))
        verify = run_gfs("verify", job, "--generation", generation["id"], "--config", str(config))
        assert verify.exit_code == 0, verify.output
    assert first.is_active()

"""libvirt jobs on a remote host: the host is this machine reached through a real OpenSSH
sshd on 127.0.0.1 (tests/system/sshd.py), with its real libvirtd and TCG lab domains. gfs
opens libvirt through `virt-ssh-helper` on its own SSH connection (transport/virttunnel.py),
QEMU writes the backup into the target "that host" mounts, and checksums, checks, copies and
restores run there through SSH commands. The backups are judged by `qemu-img compare`
against the source disk and by booting the restored domain.

What this cannot show: a second machine. The nested lab guest has no libvirt (see
docs/lvm-and-remote-hosts.md); every command here still crosses SSH, which is what makes a
job remote for gfs.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import tempfile
from pathlib import Path

import libvirt
import pytest

from tests.conftest import RunGfs
from tests.lab.domains import LabDomain
from tests.lab.fixtures import guest_image, libvirt_conn, libvirt_daemon, make_domain
from tests.system.conftest import Mounter
from tests.system.helpers import compare_images, gfs_subprocess, listing
from tests.system.sshd import Sshd, sshd
from tests.system.test_libvirt import DAILY, boot_restored, restored_domains

pytestmark = [pytest.mark.system, pytest.mark.slow]
__all__ = [
    "guest_image",
    "libvirt_conn",
    "libvirt_daemon",
    "make_domain",
    "restored_domains",
    "sshd",
]

# The lab guest boots from the saved kernel with its command line: it writes its pattern
# again (into the drill's overlay) and prints this.
DRILL = '[job.policy.drill]\nconsole = "GFS-PATTERN-WRITTEN tag=rl1"\ntimeout = 300\n'
TRAFFIC = re.compile(r"host kvm2: (\d+) bytes of command output received")


def remote_config(tmp_path: Path, server: Sshd, target: Path, domain: str) -> Path:
    config = tmp_path / "gfs.toml"
    config.write_text(
        f"state_dir = {json.dumps(str(tmp_path / 'state'))}\n"
        # the hosts are this machine: its domains are the remote jobs', not uncovered ones
        '[coverage]\nignore = ["gfs-test-*"]\n'
        + server.config_table("kvm2")
        + f'[target.nas]\npath = {json.dumps(str(target))}\nhost = "kvm2"\nrequire_nfs = false\n'
        f'[[job]]\nname = "vm"\nkind = "libvirt"\nhost = "kvm2"\ntarget = "nas"\n'
        f"domain = {json.dumps(domain)}\nscratch_dir = {json.dumps(str(tmp_path))}\n{DAILY}"
        f"{DRILL}",
        encoding="utf-8",
    )
    return config


def manifest_of(run_gfs: RunGfs, config: Path) -> tuple[Path, dict[str, object]]:
    newest = listing(run_gfs("list", "--config", str(config), "--json"))[-1]
    path = Path(newest["path"])
    return path, json.loads((path / "manifest.json").read_text())


def test_running_domain_of_a_remote_host_is_backed_up_there_and_restores_there(
    make_domain: object,
    mounts: Mounter,
    tmp_path: Path,
    run_gfs: RunGfs,
    sshd: Sshd,
    libvirt_conn: libvirt.virConnect,
    restored_domains: list[str],
) -> None:
    target = mounts("tgt", kind="tmpfs", size_mb=512)
    vm: LabDomain = make_domain(action="write-pattern", tag="rl1", after="idle")  # type: ignore[operator]
    vm.wait_for("GFS-PATTERN-WRITTEN tag=rl1")
    sshd.trust()
    config = remote_config(tmp_path, sshd, target, vm.name)

    result = run_gfs("run", "--config", str(config))
    assert result.exit_code == 0, result.output
    generation, manifest = manifest_of(run_gfs, config)
    source = manifest["source"]
    assert isinstance(source, dict)
    assert (source["host"], source["state"], source["method"]) == ("kvm2", "running", "backup-api")
    assert source["uri"] == "qemu:///system"  # as the host names it
    files = manifest["files"]
    assert isinstance(files, list)
    assert [f["path"] for f in files] == ["disks/vda.qcow2", "boot/kernel", "boot/initrd"]
    judged = compare_images(vm.disk, generation / "disks" / "vda.qcow2")
    assert judged.returncode == 0, judged.stdout + judged.stderr
    assert (generation / "boot" / "kernel").read_bytes() == Path(vm.spec.image.kernel).read_bytes()
    assert not libvirt_conn.lookupByName(vm.name).jobStats().get("type")  # no job left
    traffic = [int(n) for n in TRAFFIC.findall(result.stderr)]
    assert traffic and max(traffic) < vm.disk.stat().st_size // 4, result.stderr  # not the disk

    assert run_gfs("verify", "--config", str(config)).exit_code == 0
    checked = run_gfs("check", "--config", str(config))  # 7: a warning, tmpfs is not NFS
    assert checked.exit_code == 7 and "vm: libvirt on kvm2 -> nas" in checked.output
    assert checked.output.count("warning:") == 1 and "not NFS" in checked.output
    hosts = run_gfs("hosts", "check", "--config", str(config))
    assert hosts.exit_code == 0, hosts.output
    assert re.search(r"^kvm2: ok; libvirt \d+\.\d+\.\d+ at qemu:///system$", hosts.output, re.M)
    status = run_gfs("status", "--config", str(config))
    assert status.exit_code == 0 and f"{generation.name} kvm2" in status.stdout, status.output
    drilled = run_gfs("drill", "vm", "--config", str(config))  # streamed here, booted here
    assert drilled.exit_code == 0, drilled.output
    assert f"{generation.name}: drill passed" in drilled.stdout, drilled.stdout
    assert "console matched /GFS-PATTERN-WRITTEN tag=rl1/" in drilled.stdout
    record = json.loads((generation / "manifest.json").read_text())["drills"][-1]
    assert record["outcome"] == "pass", record
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".gfs-drill")] == []
    refused = run_gfs("restore", "vm", "--config", str(config), "--over-original")
    assert refused.exit_code != 0, refused.output  # the domain runs: its disk is left alone
    assert f"domain {vm.name} is running: shut it down first" in refused.output, refused.output
    assert compare_images(vm.disk, generation / "disks" / "vda.qcow2").returncode == 0

    new_name = f"{vm.name}-r"
    restored_domains.append(new_name)
    folder = tmp_path / "restored"
    done = run_gfs(
        "restore", "vm", "--config", str(config), "--to", str(folder), "--as-domain", new_name
    )
    assert done.exit_code == 0, done.output
    assert "on host kvm2" in done.output + done.stderr
    restored_disk = folder / f"{new_name}-vda.qcow2"
    judged = compare_images(vm.disk, restored_disk)
    assert judged.returncode == 0, judged.stdout + judged.stderr
    assert str(restored_disk) in libvirt_conn.lookupByName(new_name).XMLDesc(0)
    assert "GFS-PATTERN-OK tag=rl1" in boot_restored(libvirt_conn, new_name, tmp_path, "rl1")
    again = run_gfs("restore", "vm", "--config", str(config), "--to", str(folder))
    assert again.exit_code != 0 and "already exists" in again.output

    image = generation / "disks" / "vda.qcow2"
    with image.open("r+b") as handle:  # a bit flipped inside the data, size unchanged
        handle.seek(image.stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0x40]))
    damaged = run_gfs("verify", "--config", str(config))
    assert damaged.exit_code != 0 and "disks/vda.qcow2" in damaged.output + damaged.stderr
    bad = run_gfs("drill", "vm", "--config", str(config))
    assert bad.exit_code != 0 and "disks/vda.qcow2" in bad.output, bad.output


def test_remote_host_key_checked_a_killed_run_cleaned_up_there_and_shut_off_copied(
    make_domain: object,
    mounts: Mounter,
    tmp_path: Path,
    sshd: Sshd,
    libvirt_conn: libvirt.virConnect,
) -> None:
    target = mounts("tgt", kind="tmpfs", size_mb=512)
    vm: LabDomain = make_domain(action="churn", tag="rl2")  # type: ignore[operator]
    vm.wait_for("GFS-CHURN 100")
    config = remote_config(tmp_path, sshd, target, vm.name)
    args = ("run", "--force", "--config", str(config))

    untrusted = gfs_subprocess(*args)  # the host's key is not in gfs's known_hosts
    assert untrusted.returncode != 0
    assert "host key" in untrusted.stderr and "gfs hosts" in untrusted.stderr, untrusted.stderr
    assert not (target / "vm").exists() or not any((target / "vm").iterdir())

    sshd.trust()
    killed = gfs_subprocess(*args, env={"GFS_CRASH_AT": "mid-export"})
    assert killed.returncode == -9, killed.stderr
    assert any(p.name.startswith(".partial-") for p in (target / "vm").iterdir())
    healed = gfs_subprocess(*args)  # reconciles through the host's libvirt: job, partial
    assert healed.returncode == 0, healed.stderr
    assert "reconcile" in healed.stderr
    for tunnel in Path(tempfile.gettempdir()).glob("gfs-virt-*"):  # the killed run's is gone
        with socket.socket(socket.AF_UNIX) as probe:
            probe.connect(str(tunnel / "libvirt.sock"))  # any left is a live gfs's
    assert [p.name for p in (target / "vm").iterdir() if p.name.startswith(".")] == []
    assert not libvirt_conn.lookupByName(vm.name).jobStats().get("type")
    assert vm.is_active()

    vm.domain.destroy()
    copied = gfs_subprocess(*args)
    assert copied.returncode == 0, copied.stderr
    newest = max((target / "vm").iterdir(), key=lambda p: p.name)
    source = json.loads((newest / "manifest.json").read_text())["source"]
    assert (source["state"], source["method"], source["host"]) == ("shut off", "qemu-img", "kvm2")
    judged = compare_images(vm.disk, newest / "disks" / "vda.qcow2")
    assert judged.returncode == 0, judged.stdout + judged.stderr
    assert gfs_subprocess("verify", "--config", str(config)).returncode == 0

    # Over the original, on the host: the domain is shut off, its disk lost its content.
    os.chmod(vm.disk, 0o640)
    before = vm.disk.stat()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(vm.disk), "64M"], check=True)
    assert compare_images(vm.disk, newest / "disks" / "vda.qcow2").returncode != 0  # the judge
    restored = gfs_subprocess("restore", "vm", "--config", str(config), "--over-original")
    assert restored.returncode == 0, restored.stderr
    assert "on host kvm2" in restored.stdout + restored.stderr
    judged = compare_images(vm.disk, newest / "disks" / "vda.qcow2")
    assert judged.returncode == 0, judged.stdout + judged.stderr
    after = vm.disk.stat()
    assert (after.st_mode, after.st_uid, after.st_gid) == (
        before.st_mode,
        before.st_uid,
        before.st_gid,
    )
    assert after.st_ino != before.st_ino  # written beside, renamed over
    assert [p.name for p in vm.disk.parent.iterdir() if ".gfs-restore-r" in p.name] == []

"""Restore drills end to end: a real libvirt domain backed up by gfs, drilled in an isolated
QEMU (TCG); files and btrfs generations restored and checked; corrupted copies fail."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import libvirt
import pytest

from gfs_backup.tools.accel import runs_guest_code
from tests.conftest import RunGfs
from tests.lab.domains import LabDomain
from tests.lab.fixtures import guest_image, libvirt_conn, libvirt_daemon, make_domain
from tests.system.conftest import Mounter, make_subvolume, subvolumes_below
from tests.system.helpers import listing, write_config

pytestmark = [pytest.mark.system, pytest.mark.slow]
__all__ = ["guest_image", "libvirt_conn", "libvirt_daemon", "make_domain"]


def policy(drill: str = "") -> str:
    return f"""
[job.policy]
semantics = "restic"
timezone = "UTC"
schedule = "daily"
[job.policy.retention]
keep-last = 3
[job.policy.drill]
{drill}
"""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains `text` (a drill's QEMU names its scratch files)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if text.encode() in cmdline:
            found.append(int(entry.name))
    return found


def drills(generation: dict[str, Any]) -> list[dict[str, Any]]:
    manifest = json.loads((Path(generation["path"]) / "manifest.json").read_text())
    result: list[dict[str, Any]] = manifest["drills"]
    return result


def flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))


def assert_clean(scratch: Path) -> None:
    assert list(scratch.iterdir()) == [], "the drill left files in its scratch directory"
    assert processes_mentioning(str(scratch)) == [], "a drill QEMU is still running"


def test_vm_drill_boots_the_backup_isolated_and_fails_clearly(
    make_domain: Any,
    mounts: Mounter,
    tmp_path: Path,
    run_gfs: RunGfs,
    libvirt_conn: libvirt.virConnect,
) -> None:
    target = mounts("tgt", kind="tmpfs", size_mb=512)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    writer: LabDomain = make_domain(action="write-pattern", tag="dr1")
    writer.wait_for("GFS-PATTERN-WRITTEN tag=dr1")
    writer.wait_shutoff()
    # The original: checks its pattern, then idles with qemu-ga running.
    vm: LabDomain = make_domain(action="check-pattern", after="idle", tag="dr1", disk=writer.disk)
    vm.wait_for("GFS-PATTERN-OK tag=dr1")
    passing = policy('console = "GFS-PATTERN-OK tag=dr1"\ntimeout = 300\n')
    extra = f"scratch_dir = {json.dumps(str(scratch))}\n"
    config = write_config(
        tmp_path, target, "vm", "libvirt", "domain", Path(vm.name), passing, extra
    )
    assert run_gfs("run", "--config", str(config)).exit_code == 0
    (generation,) = listing(run_gfs("list", "--config", str(config), "--json"))
    domains_before = sorted(d.name() for d in libvirt_conn.listAllDomains())
    disk_before = sha256(vm.disk)

    result = run_gfs("drill", "vm", "--config", str(config))
    assert result.exit_code == 0, result.output
    assert f"vm {generation['id']}: drill passed" in result.stdout
    assert "console matched /GFS-PATTERN-OK tag=dr1/" in result.stdout
    (record,) = drills(generation)
    assert (
        record["outcome"] == "pass" and record["check"] == "boot: console /GFS-PATTERN-OK tag=dr1/"
    )
    assert [check["name"] for check in record["checks"]] == ["checksums", "qemu-img check", "boot"]
    assert all(check["outcome"] == "pass" for check in record["checks"])
    assert "console_tail" not in record and record["duration_s"] > 0
    status = run_gfs("status", "--config", str(config), "--json")
    (row,) = json.loads(status.stdout)["jobs"]
    assert row["last_drill"]["outcome"] == "pass"
    assert row["last_drill"]["generation"] == generation["id"]
    assert "last drill: passed" in run_gfs("status", "--config", str(config)).stdout
    assert "drill passed" in run_gfs("list", "--config", str(config)).stdout
    # The original domain is untouched: still running, same disk, no domain added.
    assert vm.is_active()
    assert sha256(vm.disk) == disk_before
    assert sorted(d.name() for d in libvirt_conn.listAllDomains()) == domains_before
    assert_clean(scratch)

    # A marker that never appears: fails after the timeout with the console's end recorded.
    # accel = "auto" (the default): KVM does not run guests on these machines, the probe
    # says so and the drill runs under TCG with the timeout x 3.
    never = policy('console = "NEVER-PRINTED"\ntimeout = 10\n')
    write_config(tmp_path, target, "vm", "libvirt", "domain", Path(vm.name), never, extra)
    kvm_works, _why = runs_guest_code("kvm")
    failed = run_gfs("drill", "vm", "--config", str(config))
    assert failed.exit_code == 5, failed.output
    assert "drill FAILED" in failed.stdout
    wait = 10 if kvm_works else 30
    assert f"timed out after {wait} s: the console never matched /NEVER-PRINTED/" in failed.stdout
    assert drills(generation)[-1]["accel"] == ("kvm" if kvm_works else "tcg")
    record = drills(generation)[-1]
    assert record["outcome"] == "fail"
    assert "GFS-PATTERN-OK tag=dr1" in record["console_tail"]
    assert len(record["console_tail"].encode()) <= 2048
    assert "last drill: FAILED" in run_gfs("status", "--config", str(config)).stdout
    assert_clean(scratch)
    assert vm.is_active()

    # A corrupted copy of the generation on another target: it boots (the flipped byte is
    # in a block the boot does not read), but the checksum check, run while it boots, fails
    # the drill. The image is used in place, read-only: byte for byte the same afterwards.
    other = mounts("tgt2", kind="tmpfs", size_mb=512)
    shutil.copytree(target / "vm", other / "vm")
    copy_dir = other / "vm" / generation["id"]
    image = copy_dir / "disks" / "vda.raw"
    flip_byte(image, image.stat().st_size - 4096)
    damaged = sha256(image)
    second = tmp_path / "second"
    second.mkdir()
    config2 = write_config(second, other, "vm", "libvirt", "domain", Path(vm.name), passing, extra)
    corrupt = run_gfs("drill", "vm", "--config", str(config2))
    assert corrupt.exit_code == 5, corrupt.output
    assert "checksums: disks/vda.raw does not match the manifest's checksum" in corrupt.stdout
    record = json.loads((copy_dir / "manifest.json").read_text())["drills"][-1]
    assert record["outcome"] == "fail"
    outcomes = {check["name"]: check["outcome"] for check in record["checks"]}
    assert outcomes == {"checksums": "fail", "qemu-img check": "pass", "boot": "pass"}
    assert sha256(image) == damaged
    assert_clean(scratch)


def test_vm_drill_with_the_guest_agent_and_on_schedule(
    make_domain: Any, mounts: Mounter, tmp_path: Path, run_gfs: RunGfs
) -> None:
    target = mounts("tgt", kind="tmpfs", size_mb=512)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    vm: LabDomain = make_domain(action="idle", agent=True)
    vm.wait_for("GFS-AGENT-UP")
    drill = 'schedule = "*-*-* *:*:*"\nagent = true\ntimeout = 300\nselect = "newest"\n'
    extra = f'scratch_dir = {json.dumps(str(scratch))}\nquiesce = "off"\n'
    config = write_config(
        tmp_path, target, "vm", "libvirt", "domain", Path(vm.name), policy(drill), extra
    )
    first = run_gfs("run", "--config", str(config))
    assert first.exit_code == 0, first.output
    assert "drill of" not in first.stderr  # the schedule has not fired since the generation
    time.sleep(1.2)  # the every-second schedule fires after the generation's second only
    second = run_gfs("run", "--force", "--config", str(config))
    assert second.exit_code == 0, second.output
    assert "passed: guest agent answered guest-ping" in second.stderr
    newest = listing(run_gfs("list", "--config", str(config), "--json"))[-1]
    (record,) = drills(newest)
    assert record["outcome"] == "pass" and record["check"] == "boot: agent ping"
    assert_clean(scratch)
    assert vm.is_active()


def test_sigterm_during_a_vm_drill_kills_qemu_and_removes_the_scratch(
    make_domain: Any, mounts: Mounter, tmp_path: Path, run_gfs: RunGfs
) -> None:
    target = mounts("tgt", kind="tmpfs", size_mb=512)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    vm: LabDomain = make_domain(action="idle")
    vm.wait_for("GFS-GUEST-UP")
    extra = f"scratch_dir = {json.dumps(str(scratch))}\n"
    never = policy('console = "NEVER-PRINTED"\ntimeout = 600\n')
    config = write_config(tmp_path, target, "vm", "libvirt", "domain", Path(vm.name), never, extra)
    assert run_gfs("run", "--config", str(config)).exit_code == 0
    drill = subprocess.Popen(
        [sys.executable, "-m", "gfs_backup", "drill", "vm", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not any(scratch.glob("*/console.log")) or not processes_mentioning(str(scratch)):
            assert drill.poll() is None and time.monotonic() < deadline, "no drill QEMU started"
            time.sleep(0.2)
        time.sleep(1)  # the guest is booting
        drill.send_signal(signal.SIGTERM)
        _out, err = drill.communicate(timeout=60)
    finally:
        if drill.poll() is None:
            drill.kill()
            drill.wait()
    assert drill.returncode == 5, err
    assert "drill interrupted by SIGTERM" in err and "Traceback" not in err
    assert_clean(scratch)
    assert vm.is_active()


def test_files_drill_passes_and_a_corrupted_copy_fails(
    mounts: Mounter, tmp_path: Path, run_gfs: RunGfs
) -> None:
    source = tmp_path / "srv"
    (source / "etc").mkdir(parents=True)
    (source / "etc" / "app.conf").write_text("port = 8080\n")
    (source / "big.bin").write_bytes(os.urandom(1 << 20))
    target = mounts("tgt", kind="tmpfs", size_mb=64)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    extra = f"scratch_dir = {json.dumps(str(scratch))}\n"
    config = write_config(tmp_path, target, "srv", "files", "path", source, policy(), extra)
    assert run_gfs("run", "--config", str(config)).exit_code == 0
    result = run_gfs("drill", "srv", "--config", str(config), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["outcome"] == "pass" and report["check"] == "restore + checksums of every file"
    assert_clean(scratch)
    other = mounts("tgt2", kind="tmpfs", size_mb=64)
    shutil.copytree(target / "srv", other / "srv")
    (generation,) = [p for p in (other / "srv").iterdir()]
    flip_byte(generation / "data" / "big.bin", 4096)
    second = tmp_path / "second"
    second.mkdir()
    config2 = write_config(second, other, "srv", "files", "path", source, policy(), extra)
    failed = run_gfs("drill", "srv", "--config", str(config2))
    assert failed.exit_code == 5, failed.output
    assert "big.bin" in failed.stdout and "drill FAILED" in failed.stdout
    assert_clean(scratch)


def test_btrfs_drill_receives_on_btrfs_and_a_corrupted_stream_fails(
    mounts: Mounter, tmp_path: Path, run_gfs: RunGfs
) -> None:
    pool = mounts("src")
    volume = make_subvolume(pool / "home")
    (volume / "notes.txt").write_text("hello\n")
    (volume / "blob").write_bytes(os.urandom(3 << 20))
    target = mounts("tgt", kind="tmpfs", size_mb=64)
    config = write_config(tmp_path, target, "home", "btrfs", "subvolume", volume, policy())
    assert run_gfs("run", "--config", str(config)).exit_code == 0
    result = run_gfs("drill", "home", "--config", str(config))  # scratch: beside the subvolume
    assert result.exit_code == 0, result.output
    assert "read back 2 files" in result.stdout
    assert subvolumes_below(pool) == ["home"]
    assert [p.name for p in pool.iterdir()] == ["home"]
    other = mounts("tgt2", kind="tmpfs", size_mb=64)
    shutil.copytree(target / "home", other / "home")
    (generation,) = [p for p in (other / "home").iterdir()]
    flip_byte(generation / "subvolume.btrfs", 1 << 20)
    second = tmp_path / "second"
    second.mkdir()
    config2 = write_config(second, other, "home", "btrfs", "subvolume", volume, policy())
    failed = run_gfs("drill", "home", "--config", str(config2))
    assert failed.exit_code == 5, failed.output
    assert "subvolume.btrfs: checksum mismatch" in failed.stdout
    assert subvolumes_below(pool) == ["home"]
    elsewhere = f"scratch_dir = {json.dumps(str(tmp_path))}\n"
    config3 = write_config(
        tmp_path, target, "home", "btrfs", "subvolume", volume, policy(), elsewhere
    )
    refused = run_gfs("drill", "home", "--config", str(config3))
    assert refused.exit_code == 3
    assert "a btrfs drill receives the subvolume there: set scratch_dir" in refused.stderr

"""Restore drills from CI: `gfs drill --target` run by an unprivileged user in the target's
read group, with no /etc/gfs, on a read-only bind mount of the target (this machine has no
NFS client; a read-only NFS mount refuses writes the same way, with EROFS). The VM boots
straight from the generation's image, the JUnit file is read back by junitparser, and the
read-only tree is byte for byte the same afterwards."""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from junitparser import Error, Failure, JUnitXml

from tests.conftest import RunGfs
from tests.lab.domains import LabDomain
from tests.lab.fixtures import guest_image, libvirt_conn, libvirt_daemon, make_domain
from tests.lab.guest import LISTEN_PORT
from tests.system.conftest import Mounter
from tests.system.test_drill import flip_byte, policy, processes_mentioning

pytestmark = [pytest.mark.system, pytest.mark.slow]
__all__ = ["guest_image", "libvirt_conn", "libvirt_daemon", "make_domain"]

USER = "gfs-ci-drill"
GROUP = "gfs-ci-drill"


@pytest.fixture
def ci_user() -> Iterator[str]:
    """An unprivileged user whose only group is GROUP (the target's read_group)."""
    made_group = made_user = False
    try:
        grp.getgrnam(GROUP)
    except KeyError:
        subprocess.run(["groupadd", "--system", GROUP], check=True)
        made_group = True
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "-g", GROUP, "-s", "/bin/sh", USER],
            check=True,
        )
        made_user = True
    try:
        yield USER
    finally:
        if made_user:
            subprocess.run(["userdel", USER], check=False)
        if made_group:
            subprocess.run(["groupdel", GROUP], check=False)


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory the CI user can reach (pytest's tmp_path is root's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="gfs-ci-drill-", dir="/var/tmp"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder / "ro")], check=False, capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def tree_digest(root: Path) -> list[tuple[str, int, int, str]]:
    """(path, mode, size, sha256) of everything under root (read as root)."""
    found = []
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        digest = ""
        if path.is_file() and not path.is_symlink():
            done = subprocess.run(["sha256sum", str(path)], capture_output=True, text=True)
            digest = done.stdout.split()[0]
        found.append((str(path.relative_to(root)), info.st_mode, info.st_size, digest))
    return found


def as_user(user: str, *args: str, scratch: Path) -> subprocess.Popen[str]:
    """`gfs` as `user`, no /etc/gfs or GFS_CONFIG, TMPDIR = scratch."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/nonexistent", "TMPDIR": str(scratch)}
    argv = ["runuser", "-u", user, "--", sys.executable, "-m", "gfs_backup", *args]
    return subprocess.Popen(
        argv, cwd="/", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait(process: subprocess.Popen[str], timeout: float = 600) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def assert_no_drill_left(scratch: Path) -> None:
    assert [p.name for p in scratch.iterdir()] == [], "the drill left files in its scratch"
    assert processes_mentioning(str(scratch)) == [], "a drill QEMU is still running"


def make_generations(
    make_domain: Any, mounts: Mounter, tmp_path: Path, run_gfs: RunGfs, tag: str
) -> tuple[Path, LabDomain]:
    """A target holding a libvirt generation (read_group = GROUP) and a files generation."""
    target = mounts("tgt", kind="tmpfs", size_mb=512)
    writer: LabDomain = make_domain(action="write-pattern", tag=tag)
    writer.wait_for(f"GFS-PATTERN-WRITTEN tag={tag}")
    writer.wait_shutoff()
    # The original checks its pattern, then idles: its backup, booted, prints the same.
    vm: LabDomain = make_domain(
        action="check-pattern", after="idle", tag=tag, disk=writer.disk, agent=True
    )
    vm.wait_for(f"GFS-PATTERN-OK tag={tag}")
    source = tmp_path / "etc-copy"
    (source / "conf").mkdir(parents=True)
    (source / "conf" / "app.conf").write_text("port = 1\n")
    drill = policy(
        f'console = "GFS-PATTERN-OK tag={tag}"\ntimeout = 120\naccel = "tcg"\n'
        'commands = [["/bin/sh", "-c", "test -s /pattern.bin && echo pattern here"]]\n'
        f"ports = [{LISTEN_PORT}]\n"
    )
    config = tmp_path / "gfs.toml"
    config.write_text(
        f"state_dir = {json.dumps(str(tmp_path / 'state'))}\n"
        f"[target.usb]\npath = {json.dumps(str(target))}\nrequire_nfs = false\n"
        f'read_group = "{GROUP}"\n'
        f'[[job]]\nname = "etc"\nkind = "files"\npath = {json.dumps(str(source))}\n'
        f"{policy()}"
        f'[[job]]\nname = "vm"\nkind = "libvirt"\ndomain = "{vm.name}"\n{drill}'
    )
    result = run_gfs("run", "--config", str(config))
    assert result.exit_code == 0, result.output
    return target, vm


def test_a_ci_runner_drills_from_a_read_only_target_as_an_unprivileged_user(
    make_domain: Any,
    mounts: Mounter,
    tmp_path: Path,
    run_gfs: RunGfs,
    ci_user: str,
    shared: Path,
) -> None:
    target, _vm = make_generations(make_domain, mounts, tmp_path, run_gfs, "ci1")
    ro, scratch = shared / "ro", shared / "scratch"
    ro.mkdir()
    scratch.mkdir(mode=0o700)
    shutil.chown(scratch, ci_user, GROUP)
    subprocess.run(["mount", "--bind", str(target), str(ro)], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
    before = tree_digest(ro)
    junit, summary = scratch.parent / "drill.xml", scratch.parent / "summary.md"
    for report in (junit, summary):
        report.touch()
        shutil.chown(report, ci_user, GROUP)

    drilled = as_user(
        ci_user,
        "drill",
        "--target",
        str(ro),
        "--all-jobs",
        "--json",
        "--junit",
        str(junit),
        "--summary",
        str(summary),
        scratch=scratch,
    )
    code, out, err = wait(drilled)
    assert code == 5, err  # the files generation cannot be drilled by this user
    results = {r["job"]: r for r in json.loads(out)["drills"]}
    vm = results["vm"]
    assert vm["outcome"] == "pass", (vm, err)
    assert vm["accel"] == "tcg"
    assert [c["name"] for c in vm["checks"]] == [
        "checksums",
        "qemu-img check",
        "boot",
        "command: /bin/sh -c 'test -s /pattern.bin && echo pattern here'",
        f"port {LISTEN_PORT}",
    ]
    assert all(c["outcome"] == "pass" for c in vm["checks"]), vm
    assert "exit status 0: pattern here" in vm["checks"][3]["detail"]
    files = results["etc"]
    assert files["error"] is True
    assert "needs root or CAP_DAC_READ_SEARCH" in files["reason"]

    xml = JUnitXml.fromfile(str(junit))
    counts = {suite.name: (suite.tests, suite.failures, suite.errors) for suite in xml}
    assert counts == {"vm": (5, 0, 0), "etc": (1, 0, 1)}
    (error,) = next(iter(next(s for s in xml if s.name == "etc"))).result
    assert isinstance(error, Error) and "CAP_DAC_READ_SEARCH" in error.message
    text = summary.read_text()
    assert "| vm |" in text and "| etc |" in text and "1 of 2 drill(s) passed." in text

    assert tree_digest(ro) == before  # nothing under the target written
    assert_no_drill_left(scratch)

    # Flags replace the generation's checks: a command that fails, with its output in the
    # report, and a closed port.
    code, out, err = wait(
        as_user(
            ci_user,
            "drill",
            "--target",
            str(ro),
            "vm",
            "--json",
            "--command",
            "/bin/sh -c 'echo the service is down >&2; exit 3'",
            "--port",
            str(LISTEN_PORT),
            "--port",
            str(LISTEN_PORT + 1),
            scratch=scratch,
        )
    )
    assert code == 5, err
    (result,) = json.loads(out)["drills"]
    found = {c["name"]: c for c in result["checks"]}
    failed = found["command: /bin/sh -c 'echo the service is down >&2; exit 3'"]
    assert failed["outcome"] == "fail"
    assert failed["detail"] == "exit status 3: the service is down"
    assert found[f"port {LISTEN_PORT}"]["outcome"] == "pass"
    closed = found[f"port {LISTEN_PORT + 1}"]
    assert closed["outcome"] == "fail" and "refused" in closed["detail"], closed
    assert result["error"] is False
    assert tree_digest(ro) == before
    assert_no_drill_left(scratch)
    # Without the read group the images stay closed: other users cannot even list them.
    generation = next(p for p in (target / "vm").iterdir() if p.is_dir())
    assert generation.stat().st_mode & 0o007 == 0
    assert generation.group() == GROUP


def test_a_damaged_or_vanishing_generation_and_sigterm_under_ci(
    make_domain: Any,
    mounts: Mounter,
    tmp_path: Path,
    run_gfs: RunGfs,
    ci_user: str,
    shared: Path,
) -> None:
    target, _vm = make_generations(make_domain, mounts, tmp_path, run_gfs, "ci2")
    scratch = shared / "scratch"
    scratch.mkdir(mode=0o700)
    shutil.chown(scratch, ci_user, GROUP)
    copy = shared / "copy"
    shutil.copytree(target, copy, symlinks=True)
    subprocess.run(["chown", "-R", f"root:{GROUP}", str(copy)], check=True)
    (generation,) = [p for p in (copy / "vm").iterdir() if p.is_dir()]
    image = generation / "disks" / "vda.raw"

    # A flipped byte where the boot does not read: it boots, the checksum check fails.
    flip_byte(image, image.stat().st_size - 4096)
    code, out, err = wait(
        as_user(ci_user, "drill", "--target", str(copy), "vm", "--json", scratch=scratch)
    )
    assert code == 5, err
    (result,) = json.loads(out)["drills"]
    outcomes = {c["name"]: c["outcome"] for c in result["checks"]}
    assert outcomes["checksums"] == "fail"
    assert outcomes["boot"] == "pass" and outcomes["qemu-img check"] == "pass"
    assert result["error"] is False
    flip_byte(image, image.stat().st_size - 4096)  # repaired
    assert_no_drill_left(scratch)

    # SIGTERM while it boots: QEMU killed, the scratch directory removed.
    drilled = as_user(ci_user, "drill", "--target", str(copy), "vm", scratch=scratch)
    booting(drilled, scratch)
    drilled.send_signal(signal.SIGTERM)
    code, _out, err = wait(drilled, 60)
    assert code != 0 and "interrupted by SIGTERM" in err, err
    assert_no_drill_left(scratch)

    # The generation removed (pruned) while it is drilled: an error, not a verdict.
    junit = shared / "gone.xml"
    junit.touch()
    shutil.chown(junit, ci_user, GROUP)
    drilled = as_user(
        ci_user, "drill", "--target", str(copy), "vm", "--junit", str(junit), scratch=scratch
    )
    booting(drilled, scratch)
    shutil.rmtree(generation)
    code, out, err = wait(drilled)
    assert code == 5, out + err
    assert "was removed during its drill" in out or "vanished while it was drilled" in out
    (case,) = next(iter(JUnitXml.fromfile(str(junit))))
    (error,) = case.result
    assert isinstance(error, Error) and not isinstance(error, Failure)
    assert_no_drill_left(scratch)


def booting(drilled: subprocess.Popen[str], scratch: Path) -> None:
    """Wait until the drill's QEMU runs (a console file in the scratch, the process)."""
    deadline = time.monotonic() + 120
    while not any(scratch.glob("*/console.log")) or not processes_mentioning(str(scratch)):
        assert drilled.poll() is None, drilled.communicate()
        assert time.monotonic() < deadline, "no drill QEMU started"
        time.sleep(0.2)
    time.sleep(1)
    assert os.path.isdir(scratch)


def test_a_recorded_ci_drill_reaches_the_hosts_status_without_rewriting_the_manifest(
    mounts: Mounter, tmp_path: Path, run_gfs: RunGfs
) -> None:
    target = mounts("tgt", kind="tmpfs", size_mb=32)
    source = tmp_path / "srv"
    (source / "conf").mkdir(parents=True)
    (source / "conf" / "a").write_text("a = 1\n")
    config = tmp_path / "gfs.toml"
    config.write_text(
        f"state_dir = {json.dumps(str(tmp_path / 'state'))}\n"
        f"[target.usb]\npath = {json.dumps(str(target))}\nrequire_nfs = false\n"
        f'[[job]]\nname = "etc"\nkind = "files"\npath = {json.dumps(str(source))}\n'
        f'max_drill_age = "1h"\n{policy()}'
    )
    assert run_gfs("run", "--config", str(config)).exit_code == 0
    (generation,) = [p for p in (target / "etc").iterdir() if p.is_dir()]
    manifest = (generation / "manifest.json").read_bytes()
    check = run_gfs("status", "--check", "--config", str(config))
    assert check.exit_code == 1 and "no passing drill yet" in check.stdout, check.stdout
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    result = run_gfs("drill", "--target", str(target), "etc", "--record", "--scratch", str(scratch))
    assert result.exit_code == 0, result.output
    assert (generation / "manifest.json").read_bytes() == manifest  # not rewritten
    (record,) = (generation / "drill-records").iterdir()
    assert json.loads(record.read_text())["outcome"] == "pass"
    check = run_gfs("status", "--check", "--config", str(config))
    assert check.exit_code == 0, check.stdout
    assert "etc_drill_age=" in check.stdout

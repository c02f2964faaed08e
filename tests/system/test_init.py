"""`gfs init` against the lab's real libvirtd: the domains it lists, the opt-out command it
documents, and a configuration `gfs check` accepts once its target is made local."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import libvirt
import pytest

from tests.lab.domains import NAME_PREFIX, create_disk
from tests.lab.fixtures import libvirt_conn, libvirt_daemon
from tests.system.conftest import Mounter
from tests.system.helpers import gfs_subprocess

pytestmark = [pytest.mark.system, pytest.mark.slow]
__all__ = ["libvirt_conn", "libvirt_daemon"]


def defined_domain(conn: libvirt.virConnect, name: str, disk: Path) -> libvirt.virDomain:
    """A persistent domain, never started: one qcow2 disk."""
    return conn.defineXML(
        f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file={quoteattr(str(disk))}/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>"""
    )


@pytest.fixture
def two_domains(libvirt_conn: libvirt.virConnect, tmp_path: Path) -> Iterator[list[str]]:
    """Two shut-off domains named like the lab's (reaped if this run dies), undefined at
    the end."""
    stem = f"{NAME_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:6]}"
    names = [f"{stem}-1", f"{stem}-2"]
    try:
        for name in names:
            defined_domain(libvirt_conn, name, create_disk(tmp_path / f"{name}.qcow2"))
        yield names
    finally:
        for name in names:
            with contextlib.suppress(libvirt.libvirtError):
                libvirt_conn.lookupByName(name).undefine()


def opt_out_argv(config_text: str, domain: str) -> list[str]:
    """The opt-out command the configuration documents, for `domain`."""
    match = re.search(r"^#\s+(virsh metadata .*?--config)$", config_text, re.M | re.S)
    assert match, "the configuration documents no opt-out command"
    command = re.sub(r"\\\n#\s*", " ", match.group(1))
    argv = [domain if word == "DOMAIN" else word for word in shlex.split(command)]
    return [argv[0], "-c", "qemu:///system", *argv[1:]]


def test_init_lists_the_domains_and_check_accepts_its_configuration(
    two_domains: list[str], mounts: Mounter, tmp_path: Path
) -> None:
    plain, opted = two_domains
    target = mounts("target", kind="tmpfs", size_mb=16)
    first = tmp_path / "first.toml"
    done = gfs_subprocess("init", "--target-path", str(target), "--output", str(first))
    assert done.returncode == 0, done.stderr
    text = first.read_text(encoding="utf-8")
    assert re.search(rf"^#\s+{re.escape(plain)}\s+shut off$", text, re.M), text
    assert "warning" not in done.stderr, done.stderr  # libvirtd answered

    # The documented opt-out command works, and gfs init shows its effect.
    virsh = subprocess.run(opt_out_argv(text, opted), capture_output=True, text=True)
    assert virsh.returncode == 0, virsh.stderr
    config = tmp_path / "gfs.toml"
    done = gfs_subprocess("init", "--target-path", str(target), "--output", str(config))
    assert done.returncode == 0, done.stderr
    text = config.read_text(encoding="utf-8")
    note = re.escape('shut off (opted out: <gfs backup="no"/>)')
    assert re.search(rf"^#\s+{re.escape(opted)}\s+{note}$", text, re.M), text
    path_line = f"path = {json.dumps(str(target))}  # chosen with --target-path"
    assert path_line in text

    # The test's copy: a local target (tmpfs), state of its own.
    local = tmp_path / "local.toml"
    local.write_text(
        f"state_dir = {json.dumps(str(tmp_path / 'state'))}\n"
        + re.sub(r"^(path = .*)$", r"\1\nrequire_nfs = false", text, count=1, flags=re.M),
        encoding="utf-8",
    )
    check = gfs_subprocess("check", "--config", str(local))
    assert check.returncode in (0, 7), check.stdout + check.stderr
    assert "error" not in (check.stdout + check.stderr).lower(), check.stdout + check.stderr
    assert "1 job(s), 1 target(s)" in check.stdout


def test_without_an_nfs_mount_check_names_the_target_line_to_edit(
    two_domains: list[str], tmp_path: Path
) -> None:
    """This machine has no NFS client: the configuration marks its target path for
    editing, and `gfs check` names that path (the job's only warning)."""
    written = tmp_path / "gfs.toml"
    done = gfs_subprocess("init", "--output", str(written))
    assert done.returncode == 0, done.stderr
    text = written.read_text(encoding="utf-8")
    match = re.search(r"^path = (\"[^\"]+\").*EDIT", text, re.M)
    assert match, text
    path = json.loads(match.group(1))
    local = tmp_path / "local.toml"
    local.write_text(f"state_dir = {json.dumps(str(tmp_path / 'state'))}\n{text}")
    check = gfs_subprocess("check", "--config", str(local))
    assert check.returncode == 7, check.stdout + check.stderr
    job_warnings = [
        line.strip() for line in check.stdout.splitlines() if line.startswith("    warning:")
    ]
    assert job_warnings and all(path in line for line in job_warnings), check.stdout

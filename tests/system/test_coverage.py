"""`gfs check` and `gfs status` name what on the host no job backs up: a real libvirtd's
domains and real btrfs subvolumes on loop devices. (LVs: this kernel has no
device-mapper, so the LV rules are unit-tested on recorded `lvs` output in
tests/unit/test_members.py.)"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import libvirt
import pytest

from tests.lab.fixtures import guest_image, libvirt_conn, libvirt_daemon
from tests.system.conftest import Mounter
from tests.system.helpers import gfs_subprocess
from tests.system.test_domain_selection import Lab, config_for, lab, pattern_job

pytestmark = [pytest.mark.system, pytest.mark.slow]
__all__ = ["guest_image", "lab", "libvirt_conn", "libvirt_daemon"]


def uncovered(config: Path) -> tuple[int, set[tuple[str, str]], dict[str, object]]:
    done = gfs_subprocess("check", "--config", str(config), "--json")
    report = json.loads(done.stdout)
    return done.returncode, {(u["kind"], u["name"]) for u in report["uncovered"]}, report


def test_check_names_an_uncovered_domain_until_a_job_covers_it(
    lab: Lab, mounts: Mounter, tmp_path: Path
) -> None:
    mounts("target", "btrfs", 256)
    p = lab.prefix
    web, forgotten = lab.define("web"), lab.define("db")
    restored = lab.define("copy")
    xml = restored.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    restored.setMetadata(
        libvirt.VIR_DOMAIN_METADATA_ELEMENT,
        '<gfs restored-from="web 20261206T000000Z"/>',
        "gfs",
        "https://gfs-backup.dev/xmlns/domain/1",
        libvirt.VIR_DOMAIN_AFFECT_CONFIG,
    )
    assert xml != restored.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    config = config_for(tmp_path, pattern_job("web", [f"{p}web"]))
    code, found, report = uncovered(config)
    assert code == 7
    assert ("domain", forgotten.name()) in found
    assert ("domain", web.name()) not in found
    assert ("domain", restored.name()) not in found  # made by gfs restore: listed apart
    assert {"domain": restored.name(), "why": "made by gfs restore from web 20261206T000000Z"} in (
        report["left_out"]
    )
    text = gfs_subprocess("check", "--config", str(config))
    assert f"uncovered: domain {forgotten.name()} (qemu:///system) is backed up by no job" in (
        text.stdout
    )
    status = gfs_subprocess("status", "--config", str(config), "--check")
    assert status.returncode in (1, 2), status.stdout  # WARNING at least
    assert "backed up by no job" in status.stdout and "uncovered=" in status.stdout

    covered = config_for(tmp_path, pattern_job("all", [f"{p}*"]))
    code, found, _report = uncovered(covered)
    assert ("domain", forgotten.name()) not in found
    ignored = config_for(
        tmp_path, pattern_job("web", [f"{p}web"]) + f'[coverage]\nignore = ["{p}d*"]\n'
    )
    assert ("domain", forgotten.name()) not in uncovered(ignored)[1]


def test_check_names_an_uncovered_btrfs_subvolume(mounts: Mounter, tmp_path: Path) -> None:
    pool = mounts("pool", "btrfs", 256)
    for name in ("kept", "forgotten", ".snapshots"):
        subprocess.run(
            ["btrfs", "subvolume", "create", str(pool / name)], check=True, capture_output=True
        )
    subprocess.run(
        ["btrfs", "subvolume", "create", str(pool / "kept" / "inner")],
        check=True,
        capture_output=True,
    )
    mounts("target", "btrfs", 256)
    config = tmp_path / "gfs.toml"
    config.write_text(
        f'state_dir = "{tmp_path / "state"}"\n'
        f'[target.usb]\npath = "{tmp_path / "target"}"\nrequire_nfs = false\n'
        f'[[job]]\nname = "kept"\nkind = "btrfs"\nsubvolume = "{pool / "kept"}"\n'
        f'policy = "classic-gfs"\n',
        encoding="utf-8",
    )
    code, found, _report = uncovered(config)
    assert code == 7
    assert ("subvolume", str(pool / "forgotten")) in found
    assert ("subvolume", str(pool / "kept")) not in found
    assert ("subvolume", str(pool / "kept" / "inner")) not in found  # below a covered path
    assert ("subvolume", str(pool / ".snapshots")) not in found

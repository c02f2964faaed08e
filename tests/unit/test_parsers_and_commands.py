"""Pure parts of the pipeline: argv builders, parsers of recorded real output, target rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from gfs_backup.core.config import Target
from gfs_backup.core.validate import read_toml
from gfs_backup.target.checks import TargetError, check_target
from gfs_backup.tools.btrfs import (
    make_delete_command,
    make_receive_command,
    make_send_command,
    make_snapshot_command,
    parse_subvolume_show,
)
from gfs_backup.tools.mounts import Mount, is_mount_point, mount_of, parse_mountinfo

pytestmark = pytest.mark.unit

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
REPO = Path(__file__).resolve().parents[2]


def test_every_package_is_installed() -> None:
    declared = set(read_toml(REPO / "pyproject.toml")["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(REPO).parts)
        for init in (REPO / "gfs_backup").rglob("__init__.py")
    }
    assert found <= declared, f"add to pyproject [tool.setuptools] packages: {found - declared}"


def test_commands_are_argv_lists_with_paths_verbatim() -> None:
    odd = Path("/srv/my vol $(reboot);x")
    snapshot = make_snapshot_command(odd, odd / ".gfs-snapshots" / "gfs-a-1")
    assert snapshot.argv == (
        "btrfs",
        "subvolume",
        "snapshot",
        "-r",
        str(odd),
        f"{odd}/.gfs-snapshots/gfs-a-1",
    )
    assert snapshot.mutating
    assert make_delete_command(odd).argv[-1] == str(odd) and make_delete_command(odd).mutating
    assert not make_send_command(odd).mutating
    assert make_receive_command(odd).mutating


def test_parse_subvolume_show_of_a_source() -> None:
    info = parse_subvolume_show((FIXTURES / "btrfs" / "subvolume-show-source.txt").read_text())
    assert info.name == "my data"
    assert info.uuid == "0fcbea4a-910c-0d4a-bd79-0c57b0a5c926"
    assert info.parent_uuid is None and info.received_uuid is None
    assert info.subvolume_id == 256 and not info.readonly


def test_parse_subvolume_show_of_a_received_snapshot() -> None:
    text = (FIXTURES / "btrfs" / "subvolume-show-received.txt").read_text()
    info = parse_subvolume_show(text)
    assert info.received_uuid == "c18ddafc-152a-8c47-bbfd-645d7c091b9b"
    assert info.readonly


def test_parse_subvolume_show_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="unexpected output of btrfs subvolume show"):
        parse_subvolume_show("ERROR: Not a Btrfs subvolume\n")


def test_parse_recorded_mountinfo() -> None:
    mounts = parse_mountinfo((FIXTURES / "mountinfo-host.txt").read_text())
    root = mount_of(Path("/"), mounts)
    assert root.mount_point == "/" and root.fstype == "ext4"
    assert mount_of(Path("/proc/self"), mounts).fstype == "proc"


MOUNTINFO = """\
22 1 253:0 / / rw - ext4 /dev/vda rw
40 22 0:44 / /srv rw - btrfs /dev/loop0 rw,subvolid=5
41 22 0:44 /backups /mnt/same rw - btrfs /dev/loop0 rw,subvolid=5
42 22 0:50 / /mnt/nas rw - nfs4 10.0.0.2:/export rw
43 22 0:51 / /mnt/usb\\040disk rw - ext4 /dev/sdb1 rw
"""


def test_mountinfo_unescapes_and_finds_the_deepest_mount() -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    assert mount_of(Path("/mnt/usb disk/x"), mounts).source == "/dev/sdb1"
    assert is_mount_point(Path("/mnt/usb disk"), mounts)
    assert not is_mount_point(Path("/mnt"), mounts)
    with pytest.raises(ValueError, match="mountinfo line 1 is malformed"):
        parse_mountinfo("garbage\n")


@pytest.mark.parametrize(
    ("path", "require_nfs", "message"),
    [
        ("/mnt/empty", True, "is not a mounted filesystem"),
        ("/mnt/same", False, "is on the same filesystem as the source /srv/vol"),
        ("/mnt/usb disk", True, "is ext4, not NFS"),
    ],
)
def test_target_rules(
    tmp_path: Path, path: str, require_nfs: bool, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    monkeypatch.setattr(Path, "is_dir", lambda self: True)
    with pytest.raises(TargetError, match=message):
        check_target(Target("t", Path(path), require_nfs), [Path("/srv/vol")], mounts)


def test_nfs_target_passes_and_a_usb_disk_only_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    mounts: list[Mount] = parse_mountinfo(MOUNTINFO)
    monkeypatch.setattr(Path, "is_dir", lambda self: True)
    nfs = check_target(Target("nas", Path("/mnt/nas"), True), [Path("/srv/vol")], mounts)
    assert nfs.warnings == [] and nfs.mount.fstype == "nfs4"
    usb = check_target(Target("usb", Path("/mnt/usb disk"), False), [Path("/srv/vol")], mounts)
    assert usb.warnings == ["target usb (/mnt/usb disk) is ext4, not NFS (require_nfs = false)"]

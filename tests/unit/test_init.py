"""`gfs init`: the configuration written from a fake mount table and a fake domain list."""

from __future__ import annotations

import stat
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from gfs_backup.actions.discover import FoundDomain, found_domain, nfs_mounts
from gfs_backup.actions.init import (
    OPT_OUT_COMMAND,
    PLACEHOLDER_PATH,
    Discovery,
    discover,
    render_config,
)
from gfs_backup.core.config import load_config
from gfs_backup.tools import virt as virt_module
from gfs_backup.tools.mounts import parse_mountinfo
from gfs_backup.tools.virt import DomainInfo
from tests.conftest import RunGfs

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 only
    import tomli as tomllib

pytestmark = pytest.mark.unit

MOUNTINFO = """\
22 1 253:0 / / rw - ext4 /dev/vda rw
23 22 0:21 / /proc rw - proc proc rw
24 22 0:50 / /mnt/nas rw - nfs4 nas.example:/export/backup rw,vers=4.2
25 22 0:51 / /mnt/old\\040share rw - nfs old.example:/backup rw,vers=3
26 23 0:52 / /proc/fs/nfsd rw - nfsd nfsd rw
27 22 0:53 / /srv/over rw - nfs4 x.example:/hidden rw
28 22 254:1 / /srv/over rw - ext4 /dev/sdb1 rw
"""
NOW = datetime(2025, 3, 3, 10, 30, tzinfo=timezone(timedelta(hours=1)))
DOMAINS = [
    FoundDomain("db01", state="shut off"),
    FoundDomain("scratch", state="running", note='opted out: <gfs backup="no"/>'),
    FoundDomain("web01", state="running"),
]


def found(mountinfo: str = MOUNTINFO, **changes: Any) -> Discovery:
    values: dict[str, Any] = {
        "host": "kvm1",
        "generated_at": NOW,
        "uri": "qemu:///system",
        "nfs": nfs_mounts(parse_mountinfo(mountinfo)),
        "domains": DOMAINS,
        "policy_description": "Classic GFS",
        "other_policies": ["proxmox-default"],
        **changes,
    }
    return Discovery(**values)


def parsed(text: str) -> dict[str, Any]:
    return tomllib.loads(text)


def line_with(text: str, start: str) -> str:
    (line,) = [line for line in text.splitlines() if line.startswith(start)]
    return line


def test_nfs_mounts_are_the_nfs_ones_in_use_in_mount_order() -> None:
    mounts = nfs_mounts(parse_mountinfo(MOUNTINFO))
    # nfsd is the server's control filesystem; /srv/over has a disk mounted over the share.
    assert [(m.mount_point, m.source) for m in mounts] == [
        ("/mnt/nas", "nas.example:/export/backup"),
        ("/mnt/old share", "old.example:/backup"),
    ]


def domain_xml(metadata: str = "") -> str:
    return (
        "<domain type='kvm'><name>d</name><metadata>"
        f"<gfs:gfs xmlns:gfs='https://gfs-backup.dev/xmlns/domain/1' {metadata}/>"
        "</metadata></domain>"
    )


def test_a_domain_says_whether_it_opted_out_or_was_restored_by_gfs() -> None:
    def note(info: DomainInfo) -> str:
        return found_domain(info).note

    assert found_domain(DomainInfo("a", "u", True, True, domain_xml())) == FoundDomain(
        "a", "u", "running", ""
    )
    assert note(DomainInfo("a", "u", True, False, domain_xml('backup="no"'))) == (
        'opted out: <gfs backup="no"/>'
    )
    restored = domain_xml('restored-from="vms 2025-03-01T010000Z"')
    assert "made by gfs restore" in note(DomainInfo("a", "u", True, False, restored))
    assert note(DomainInfo("a", "u", False, True, domain_xml())) == "transient"
    assert note(DomainInfo("a", "u", True, False, None, "gone")) == "definition unreadable: gone"


def test_the_target_is_the_first_nfs_mount_point_and_the_others_are_listed() -> None:
    text = render_config(found())
    config = parsed(text)
    assert config["target"] == {"nas": {"path": "/mnt/nas"}}
    assert "#   /mnt/old share  old.example:/backup (nfs)" in text
    assert "EDIT" not in text


def test_without_nfs_the_path_is_a_placeholder_marked_for_editing() -> None:
    text = render_config(found("22 1 253:0 / / rw - ext4 /dev/vda rw\n"))
    assert parsed(text)["target"]["nas"]["path"] == PLACEHOLDER_PATH
    assert "# EDIT:" in line_with(text, "path = ")
    assert "No NFS mount was found" in text


def test_an_explicit_target_path_wins_and_a_non_nfs_one_is_pointed_out() -> None:
    on_nfs = render_config(found(), target_path="/mnt/old share")
    assert parsed(on_nfs)["target"]["nas"]["path"] == "/mnt/old share"
    assert "#" not in line_with(on_nfs, "path = ")
    local = render_config(found(), target_path="/var/backups/gfs")
    assert parsed(local)["target"]["nas"]["path"] == "/var/backups/gfs"
    assert "not NFS now" in line_with(local, "path = ")


def test_one_libvirt_job_of_every_domain_on_the_shipped_policy() -> None:
    text = render_config(found())
    (job,) = parsed(text)["job"]
    assert job == {
        "name": "vms",
        "kind": "libvirt",
        "domains": ["*"],
        "exclude": [],
        "target": "nas",
        "policy": "classic-gfs",
    }
    assert "#   db01     shut off\n" in text and "#   web01    running\n" in text
    assert '#   scratch  running (opted out: <gfs backup="no"/>)' in text
    assert OPT_OUT_COMMAND in text and "https://gfs-backup.dev/xmlns/domain/1" in text
    assert "systemctl enable --now gfs-run.timer" in text
    header = text.splitlines()[0]
    assert "gfs init" in header and "2025-03-03 10:30 +0100" in header and "kvm1" in header


@pytest.mark.parametrize("mountinfo", [MOUNTINFO, "22 1 253:0 / / rw - ext4 /dev/vda rw\n"])
def test_the_configuration_is_valid_as_written(tmp_path: Path, mountinfo: str) -> None:
    path = tmp_path / "gfs.toml"
    path.write_text(render_config(found(mountinfo), exclude=["test-*"]), encoding="utf-8")
    config = load_config(path)
    (job,) = config.jobs
    assert job.selects_domains and job.options["exclude"] == ["test-*"]
    assert job.policy.name == "classic-gfs"
    assert str(config.targets["nas"].path) in ("/mnt/nas", PLACEHOLDER_PATH)


def test_excludes_a_non_default_uri_and_odd_names_stay_valid_toml() -> None:
    odd = 'we"ird\\na\nme\x7f'
    text = render_config(
        found(uri="qemu+ssh://kvm2/system", domains=[FoundDomain(odd, state="running")]),
        exclude=["test-*", odd],
    )
    (job,) = parsed(text)["job"]
    assert job["exclude"] == ["test-*", odd]
    assert job["uri"] == "qemu+ssh://kvm2/system"
    assert '#   we"ird\\na?me?  running' in text  # control characters cannot end a comment


def test_libvirt_that_does_not_answer_is_said_in_a_comment() -> None:
    text = render_config(found(domains=[], libvirt_problem="cannot connect to libvirt at X"))
    assert "#   cannot connect to libvirt at X" in text
    assert parsed(text)["job"][0]["domains"] == ["*"]


def test_discover_waits_for_a_hung_libvirtd_only_so_long(monkeypatch: pytest.MonkeyPatch) -> None:
    class Hung:
        def __init__(self, _uri: str, _via: str | None = None) -> None:
            time.sleep(30)

    monkeypatch.setattr(virt_module, "Connection", Hung)
    started = time.monotonic()
    result = discover("qemu:///system", NOW, parse_mountinfo(MOUNTINFO), seconds=0.3)
    assert time.monotonic() - started < 2
    assert result.domains == []
    assert result.libvirt_problem == "libvirtd at qemu:///system did not answer within 0.3 s"
    assert result.policy_description.startswith("Classic GFS")
    assert [m.mount_point for m in result.nfs] == ["/mnt/nas", "/mnt/old share"]


def fake_discovery(monkeypatch: pytest.MonkeyPatch, **changes: Any) -> None:
    monkeypatch.setattr(
        "gfs_backup.cli.init.discover", lambda uri, now: found(uri=uri, generated_at=now, **changes)
    )


def test_cli_writes_stdout_and_warns_on_stderr(
    monkeypatch: pytest.MonkeyPatch, run_gfs: RunGfs
) -> None:
    fake_discovery(monkeypatch, nfs=[], domains=[], libvirt_problem="libvirt is not installed")
    result = run_gfs("init", "--exclude", "test-*")
    assert result.exit_code == 0, result.output
    assert parsed(result.stdout)["job"][0]["exclude"] == ["test-*"]
    assert "gfs: warning: libvirt is not installed" in result.stderr
    assert "no NFS mount found" in result.stderr


def test_cli_output_never_overwrites(
    monkeypatch: pytest.MonkeyPatch, run_gfs: RunGfs, tmp_path: Path
) -> None:
    fake_discovery(monkeypatch)
    path = tmp_path / "gfs.toml"
    result = run_gfs("init", "--output", str(path), "--target-path", "/mnt/nas/")
    assert result.exit_code == 0, result.output
    assert parsed(path.read_text())["target"]["nas"]["path"] == "/mnt/nas"
    assert stat.S_IMODE(path.stat().st_mode) & 0o007 == 0
    assert result.stdout == ""
    before = path.read_bytes()
    again = run_gfs("init", "--output", str(path))
    assert again.exit_code == 3
    assert again.stderr.splitlines() == [
        f"gfs: error: {path}: already exists: gfs init never overwrites a file"
    ]
    assert path.read_bytes() == before


def test_cli_refuses_a_relative_target_path(
    monkeypatch: pytest.MonkeyPatch, run_gfs: RunGfs
) -> None:
    fake_discovery(monkeypatch)
    result = run_gfs("init", "--target-path", "backup")
    assert result.exit_code == 3
    assert "--target-path" in result.stderr and result.stdout == ""


def test_cli_help_has_examples(run_gfs: RunGfs) -> None:
    result = run_gfs("init", "--help")
    assert "gfs init > /etc/gfs/gfs.toml && gfs check && gfs run --dry-run" in result.stdout
    for flag in ("--output", "--target-path", "--exclude", "--uri"):
        assert flag in result.stdout

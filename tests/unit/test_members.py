"""Domain selection, history names, overlap and coverage rules, on fakes (the real libvirtd
and btrfs cases are in tests/system/test_domain_selection.py and test_coverage.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest

from gfs_backup.actions import coverage as coverage_module
from gfs_backup.actions.coverage import Coverage, _visible_path, _volumes
from gfs_backup.actions.freshness import WARNING, check_line
from gfs_backup.actions.members import (
    History,
    history_name,
    overlapping,
    parse_history,
    select,
)
from gfs_backup.core.config import Job, load_config
from gfs_backup.core.errors import InputError
from gfs_backup.tools.domainxml import GFS_NAMESPACE, restore_xml, skipped_disks
from gfs_backup.tools.mounts import Mount
from gfs_backup.tools.virt import DomainInfo
from gfs_backup.transport.runner import Command, Completed

U1 = "6f1c0ae2-3c8e-4c64-9d1f-2b8f3f0d5a11"
U2 = "0b4e28ba-2fa1-41d2-883f-0016d3cca427"
U3 = "9a0e28ba-2fa1-41d2-883f-0016d3cca427"


def xml(name: str, metadata: str = "", disks: str = "") -> str:
    meta = f"<metadata>{metadata}</metadata>" if metadata else ""
    return f"<domain><name>{name}</name>{meta}<devices>{disks}</devices></domain>"


def info(name: str, uuid: str, metadata: str = "", persistent: bool = True) -> DomainInfo:
    return DomainInfo(name, uuid, persistent, False, xml(name, metadata))


def pattern_job(**options: Any) -> Job:
    return Job("vms", "libvirt", "local", "nas", cast(Any, None), {"domains": ["*"], **options})


@pytest.mark.parametrize("name", ["web01", "web 01/ä", ".hidden", "a--b", "x" * 300])
def test_history_names_are_safe_and_give_back_the_uuid(name: str) -> None:
    folder = history_name(name, U1.upper())
    assert "/" not in folder and not folder.startswith(".") and " " not in folder
    parsed = parse_history(folder)
    assert parsed is not None and parsed[1] == U1
    assert parse_history("20261206T010203Z") is None  # a generation, not a history
    assert parse_history(f"--{U1}") is None


def test_selection_by_patterns_exclude_metadata_and_restore_mark() -> None:
    opted = f'<gfs:gfs xmlns:gfs="{GFS_NAMESPACE}" backup="no"/>'
    restored = f'<gfs:gfs xmlns:gfs="{GFS_NAMESPACE}" restored-from="vms 2026"/>'
    domains = [
        info("web", U1),
        info("scratch", U2),
        info("quiet", U3, opted),
        info("copy", "1" * 8 + U1[8:], restored),
        info("live", "2" * 8 + U1[8:], persistent=False),
    ]
    job = pattern_job(domains=["*", "nomatch-*"], exclude=["scr*"])
    chosen = select(job, domains, [])
    assert [m.options["domain"] for m in chosen.members] == ["web", "live"]
    assert chosen.members[1].options["transient"] is True
    assert dict(chosen.left_out).keys() == {"scratch", "quiet", "copy"}
    assert chosen.warnings == ["pattern 'nomatch-*' matches no domain"]
    member = chosen.members[0]
    assert member.name == f"vms@{U1}" and member.title == "vms/web" and member.family == "vms"
    assert "domains" not in member.options and "exclude" not in member.options
    with_restored = select(pattern_job(include_restored=True), domains, [])
    assert "copy" in [m.options["domain"] for m in with_restored.members]


def test_renamed_replaced_and_vanished_domains() -> None:
    found = [
        History(history_name("old-web", U1), "old-web", U1),
        History(history_name("db", U2), "db", U2),
    ]
    chosen = select(pattern_job(), [info("web", U1), info("db", U3)], found)
    web, db = sorted(chosen.members, key=lambda m: str(m.options["domain"]))[::-1]
    assert web.options["renamed_from"] == "old-web"
    assert web.options["history_was"] == history_name("old-web", U1)
    assert web.options["history"] == history_name("web", U1)
    assert db.options["uuid"] == U3 and "renamed_from" not in db.options
    assert any("has a new UUID" in warning for warning in chosen.warnings)
    assert [gone.options["uuid"] for gone in chosen.vanished] == [U2]


def test_a_domain_two_jobs_select_is_found_with_both_names() -> None:
    one = select(pattern_job(), [info("web", U1), info("db", U2)], [])
    two = select(pattern_job(domains=["db"]), [info("web", U1), info("db", U2)], [])
    single = Job("web-job", "libvirt", "local", "nas", cast(Any, None), {"domain": "web"})
    found = overlapping({"one": one, "two": two}, [single])
    assert found == {U1: ["one", "web-job"], U2: ["one", "two"]}


def test_config_rules_for_domain_selection(tmp_path: Path) -> None:
    def problems(job: str) -> str:
        path = tmp_path / "gfs.toml"
        path.write_text(
            f'[target.nas]\npath = "/mnt"\n[[job]]\nname = "j"\nkind = "libvirt"\n{job}'
            'policy = "classic-gfs"\n'
        )
        with pytest.raises(InputError) as raised:
            load_config(path)
        return str(raised.value)

    assert "not both" in problems('domain = "a"\ndomains = ["*"]\n')
    assert "required for kind 'libvirt'" in problems("")
    assert "is empty" in problems("domains = []\n")
    assert "1 to 64" in problems('domains = ["*"]\nmax_parallel = 0\n')
    assert "use exclude_disks" in problems('domains = ["*"]\ndisks = ["vda"]\n')
    assert "needs domains" in problems('domain = "a"\nexclude = ["b"]\n')
    path = tmp_path / "two.toml"
    path.write_text(
        '[target.nas]\npath = "/mnt"\n'
        + "".join(
            f'[[job]]\nname = "{name}"\nkind = "libvirt"\ndomain = "web"\npolicy = "classic-gfs"\n'
            for name in ("a", "b")
        )
    )
    with pytest.raises(InputError, match="already backed up by job 'a'"):
        load_config(path)


def test_disks_left_out_by_default() -> None:
    disks = (
        "<disk type='file' device='cdrom'><target dev='sda'/></disk>"
        "<disk type='file' device='disk'><source file='/a'/><shareable/><target dev='vdb'/></disk>"
        "<disk type='network' device='disk'><source protocol='rbd' name='p/i'/>"
        "<target dev='vdc'/></disk>"
        "<disk type='file' device='disk'><source file='/b'/><target dev='vda'/></disk>"
        "<disk type='block' device='lun'><source dev='/dev/sdz'/><target dev='sdb'/></disk>"
    )
    assert skipped_disks(xml("d", disks=disks)) == [
        ("sda", "a cdrom"),
        ("vdb", "shareable (written by other domains too)"),
        ("vdc", "a rbd network disk"),
        ("sdb", "a lun"),
    ]


def test_a_restored_domain_carries_gfs_mark(tmp_path: Path) -> None:
    restored = restore_xml(
        "<domain><name>web</name><uuid>x</uuid><devices/></domain>",
        "web-r",
        {},
        False,
        tmp_path,
        "vms/web 20261206T000000Z",
    )
    assert f'xmlns:gfs="{GFS_NAMESPACE}"' in restored.xml
    assert 'restored-from="vms/web 20261206T000000Z"' in restored.xml


class FakeRunner:
    def __init__(self, stdout: str) -> None:
        self.stdout = stdout

    def run(self, command: Command, check: bool = True) -> Completed:
        return Completed(command, 0, self.stdout, "")


def test_lv_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    lvs = "\n".join(
        [
            "  data|vg0|1073741824|-wi-a-----|||",
            "  root|vg0|1073741824|-wi-ao----|||",
            "  swap|vg0|1073741824|-wi-ao----|||",
            "  pool|vg0|1073741824|twi-aotz--|||",
            "  thin1|vg0|1073741824|Vwi-a-tz--||pool|",
            "  thin1-snap|vg0|1073741824|Vwi---tz-k|thin1|pool|",
            "  gfs-db-20261206|vg0|1073741824|swi-a-s---|db||1.5",
            "  db|vg0|1073741824|owi-a-----|||",
            "  vmdisk|vg0|1073741824|-wi-ao----|||",
            "  scratch|vg0|1073741824|-wi-a-----|||",
        ]
    )
    monkeypatch.setattr(coverage_module.shutil, "which", lambda name: f"/usr/sbin/{name}")
    monkeypatch.setattr(
        coverage_module,
        "_system_devices",
        lambda mounts: {"/dev/vg0/root", "/dev/vg0/swap"},
    )
    monkeypatch.setattr(coverage_module.os.path, "realpath", lambda path: str(path))
    db = Job("db", "lvm", "local", "nas", cast(Any, None), {"volume": "vg0/db"})
    found = Coverage()
    _volumes([db], ["vg0/scr*"], {"/dev/vg0/vmdisk"}, [], cast(Any, FakeRunner(lvs)), found)
    assert [item.name for item in found.uncovered] == ["vg0/data", "vg0/thin1"]


def test_subvolume_paths_through_mounts() -> None:
    mounts = [
        Mount(1, "0:40", "/@", "/", "btrfs", "/dev/vda2"),
        Mount(2, "0:40", "/@home", "/home", "btrfs", "/dev/vda2"),
    ]
    assert _visible_path("/@home/alice", mounts) == "/home/alice"
    assert _visible_path("/@/srv/data", mounts) == "/srv/data"
    assert _visible_path("/@snapshots/1", mounts) is None


def test_status_check_counts_uncovered_as_a_warning() -> None:
    from datetime import datetime, timezone

    now = datetime(2026, 12, 6, tzinfo=timezone.utc)
    code, line = check_line([], now, uncovered=["web3", "vg0/data"])
    assert code == WARNING
    assert "2 backed up by no job (web3, vg0/data)" in line and "uncovered=2;1;;0" in line
    assert check_line([], now, uncovered=[])[0] == 0


def test_a_domain_whose_definition_cannot_be_read_fails_alone() -> None:
    broken = DomainInfo("odd", U2, True, False, None, "XML read failed")
    chosen = select(pattern_job(), [info("web", U1), broken], [])
    assert [m.options["domain"] for m in chosen.members] == ["web", "odd"]
    assert chosen.problems == {
        f"vms@{U2}": "domain odd: cannot read its definition: XML read failed"
    }

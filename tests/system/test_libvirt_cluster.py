"""Cluster jobs across two real libvirt hosts: this machine's lab libvirtd (host kvm1, through
a local sshd) and a second libvirtd with its own sshd in a mount namespace of its own (host
kvm2, tests/lab/second_host.py). A TCG domain is live-migrated between them by libvirt; gfs
finds it on each run, backs it up where it runs, and keeps one history. The backups are
judged by `qemu-img compare` against the domain's disk.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from tests.conftest import RunGfs
from tests.lab.domains import LabDomain, create_disk, domain_xml
from tests.lab.fixtures import guest_image, libvirt_conn, libvirt_daemon, make_domain
from tests.lab.second_host import SecondHost, start_second_host, stop_second_host
from tests.system.helpers import compare_images, listing
from tests.system.sshd import Sshd, sshd, stop
from tests.system.test_libvirt import DAILY

pytestmark = [pytest.mark.system, pytest.mark.slow]
__all__ = ["guest_image", "libvirt_conn", "libvirt_daemon", "make_domain", "sshd"]

MIGRATE = (
    libvirt.VIR_MIGRATE_LIVE
    | libvirt.VIR_MIGRATE_PERSIST_DEST
    | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
    | libvirt.VIR_MIGRATE_UNSAFE  # the disk is on shared storage libvirt cannot recognise
)


@pytest.fixture
def second_host(tmp_path: Path, libvirt_daemon: object) -> Iterator[SecondHost]:
    host = start_second_host(tmp_path / "kvm2")
    try:
        yield host
    finally:
        stop_second_host(host)


def cluster_config(
    tmp_path: Path, first: Sshd, second: Sshd, target: Path, domain: str, extra: str = ""
) -> Path:
    config = tmp_path / "gfs.toml"
    config.write_text(
        f"state_dir = {json.dumps(str(tmp_path / 'state'))}\n"
        # the hosts are this machine: its domains are the remote jobs', not uncovered ones
        '[coverage]\nignore = ["gfs-test-*"]\n'
        + first.config_table("kvm1")
        + second.config_table("kvm2")
        + '[cluster.prod]\nhosts = ["kvm1", "kvm2"]\n'
        f'[target.nas]\npath = {json.dumps(str(target))}\ncluster = "prod"\n'
        "require_nfs = false\n"
        f'[[job]]\nname = "web"\nkind = "libvirt"\ncluster = "prod"\ntarget = "nas"\n'
        f"domain = {json.dumps(domain)}\n{extra}{DAILY}",
        encoding="utf-8",
    )
    return config


def cluster_lab(
    make_domain: object,
    tmp_path: Path,
    first: Sshd,
    second: SecondHost,
    tag: str,
    extra: str = "",
) -> tuple[LabDomain, Path, Path]:
    """A lab domain on kvm1 that wrote its pattern and idles, the share both hosts mount,
    both hosts trusted, and the cluster job's configuration (`extra`: more job keys)."""
    target = second.mount_share("tgt", 512)
    vm: LabDomain = make_domain(action="write-pattern", tag=tag, after="idle")  # type: ignore[operator]
    vm.wait_for(f"GFS-PATTERN-WRITTEN tag={tag}")
    first.trust()
    second.sshd.trust()
    return vm, target, cluster_config(tmp_path, first, second.sshd, target, vm.name, extra)


def test_a_domain_migrating_between_hosts_keeps_one_history_and_ambiguity_fails(
    make_domain: object,
    tmp_path: Path,
    run_gfs: RunGfs,
    sshd: Sshd,
    second_host: SecondHost,
    libvirt_conn: libvirt.virConnect,
) -> None:
    vm, _share, config = cluster_lab(make_domain, tmp_path, sshd, second_host, "cl1")
    args = ("--config", str(config))

    checked = run_gfs("check", *args)  # 7: a warning, tmpfs is not NFS
    assert checked.exit_code == 7 and "valid, 1 job(s)" in checked.output, checked.output
    assert "web: libvirt on cluster prod -> nas" in checked.output and "not NFS" in checked.output
    assert (
        checked.output.count("warning:") == 2 and "generation on target nas yet" in checked.output
    )
    first = run_gfs("run", "--force", *args)
    assert first.exit_code == 0, first.output
    assert f"domain {vm.name} is running on host kvm1" in first.stderr

    kvm2 = second_host.connect()
    try:
        moved = vm.domain.migrate(kvm2, MIGRATE, None, None, 0)
        assert moved.isActive()
        assert vm.name not in [d.name() for d in libvirt_conn.listAllDomains(0)]
        second = run_gfs("run", "--force", *args)
        assert second.exit_code == 0, second.output
        assert f"domain {vm.name} is running on host kvm2" in second.stderr
        generations = listing(run_gfs("list", *args, "--json"))
        assert [g["host"] for g in generations] == ["kvm1", "kvm2"]  # one history, in order
        for generation in generations:
            judged = compare_images(vm.disk, Path(generation["path"]) / "disks" / "vda.qcow2")
            assert judged.returncode == 0, judged.stdout + judged.stderr
        status = run_gfs("status", "web", *args)
        newest_first = f"{generations[1]['id']} kvm2, {generations[0]['id']} kvm1"
        assert f"host of each generation, newest first: {newest_first}" in status.stdout
        orphan_name = f"gfs-orphan-{vm.name}"  # a VM made on kvm2 that no job names
        orphan = kvm2.defineXML(
            f"<domain type='qemu'><name>{orphan_name}</name><memory unit='MiB'>64</memory>"
            "<os><type arch='x86_64'>hvm</type></os></domain>"
        )
        try:
            everything = run_gfs("status", *args)  # with the coverage of every host
            assert (
                f"domain {orphan_name} (qemu:///system on host kvm2) is backed up by no job"
            ) in everything.stdout, everything.output
        finally:
            orphan.undefine()

        # A stale copy of the domain starts on kvm1 while it runs on kvm2: which is it?
        stale_disk = create_disk(tmp_path / "stale.qcow2")
        stale_xml = domain_xml(vm.spec).replace(str(vm.disk), str(stale_disk))
        stale = libvirt_conn.defineXML(stale_xml)
        try:
            stale.create()
            split = run_gfs("run", "--force", *args)
            assert split.exit_code != 0
            assert f"domain {vm.name} is running on hosts kvm1 and kvm2 at once" in split.stderr
            stale.destroy()
            both = run_gfs("run", "--force", *args)  # running on kvm2, defined on both: kvm2
            assert both.exit_code == 0, both.output
            moved.destroy()
            ambiguous = run_gfs("run", "--force", *args)
            assert ambiguous.exit_code != 0
            assert "is shut off and defined on hosts kvm1 and kvm2" in ambiguous.stderr
        finally:
            if stale.isActive():
                stale.destroy()
            stale.undefine()
        moved.undefine()
        gone = run_gfs("run", "--force", *args)
        assert gone.exit_code != 0
        assert f"domain {vm.name} is on none of the hosts of cluster prod" in gone.stderr
        assert len(listing(run_gfs("list", *args, "--json"))) == 3  # failures published none

        # kvm1, the cluster's first host, is down: the share is read, checked and restored
        # from through kvm2.
        stop(sshd)
        listed = run_gfs("list", *args, "--json")
        assert len(listing(listed)) == 3
        assert "cluster prod: host kvm1 does not answer: through host kvm2" in listed.stderr
        assert run_gfs("verify", *args).exit_code == 0
        folder = tmp_path / "restored"
        done = run_gfs("restore", "web", *args, "--to", str(folder), "--as-domain", "cl1-r")
        assert done.exit_code == 0, done.output
        assert "on host kvm2" in done.output + done.stderr
        restored = folder / "cl1-r-vda.qcow2"
        assert str(restored) in kvm2.lookupByName("cl1-r").XMLDesc(0)
        newest = Path(listing(listed)[-1]["path"]) / "disks" / "vda.qcow2"
        judged = compare_images(newest, restored)
        assert judged.returncode == 0, judged.stdout + judged.stderr
    finally:
        kvm2.close()


MIGRATE_HOOK = """#!/bin/sh
# gfs's after_snapshot hook: live-migrate the job's domain to the other host, once.
[ -e "$2" ] && exit 0
: > "$2"
exec virsh -q -c qemu:///system migrate --live --persistent --undefinesource --unsafe \\
    "$GFS_DOMAIN" "$1"
"""


def test_a_domain_migrated_during_its_backup_fails_the_run_cleanly_and_the_next_follows_it(
    make_domain: object,
    tmp_path: Path,
    run_gfs: RunGfs,
    sshd: Sshd,
    second_host: SecondHost,
    libvirt_conn: libvirt.virConnect,
) -> None:
    hook = tmp_path / "migrate.sh"
    hook.write_text(MIGRATE_HOOK)
    hook.chmod(0o755)
    once = tmp_path / "migrated"
    hooks = (
        f"hooks = {{ after_snapshot = {json.dumps([str(hook), second_host.uri, str(once)])} }}\n"
    )
    vm, target, config = cluster_lab(make_domain, tmp_path, sshd, second_host, "cl2", hooks)
    args = ("--config", str(config))

    moved = run_gfs("run", "--force", *args)  # found on kvm1, migrated to kvm2 mid-run
    assert moved.exit_code != 0
    assert once.exists()
    assert f"domain {vm.name} is running on host kvm1" in moved.stderr
    assert f"domain {vm.name} moved from host kvm1 to kvm2 during its backup" in moved.stderr
    assert "the next run backs it up there" in moved.stderr
    assert listing(run_gfs("list", *args, "--json")) == []  # nothing published
    assert [p.name for p in (target / "web").iterdir()] == []  # nor left behind
    kvm2 = second_host.connect()
    try:
        assert kvm2.lookupByName(vm.name).isActive()
        assert not kvm2.lookupByName(vm.name).jobStats().get("type")
    finally:
        kvm2.close()

    followed = run_gfs("run", "--force", *args)
    assert followed.exit_code == 0, followed.output
    (generation,) = listing(run_gfs("list", *args, "--json"))
    assert generation["host"] == "kvm2"
    judged = compare_images(vm.disk, Path(generation["path"]) / "disks" / "vda.qcow2")
    assert judged.returncode == 0, judged.stdout + judged.stderr

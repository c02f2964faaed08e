"""Clusters: their configuration, where a cluster job's domain is found (each host's view
faked: the real views are tests/system/test_libvirt_cluster.py), what a move during the
backup is called, and the libvirt tunnel's URIs and missing helper (a fake runner)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from gfs_backup.actions import cluster
from gfs_backup.actions import coverage as coverage_module
from gfs_backup.actions.cluster import Located, NotLocated, Seen, check_unmoved, locate
from gfs_backup.actions.coverage import Coverage
from gfs_backup.core.config import check_host_uri, load_config
from gfs_backup.core.errors import GfsError, InputError
from gfs_backup.tools.virt import DomainInfo
from gfs_backup.transport.runner import Command, Completed
from gfs_backup.transport.virttunnel import (
    PREFIX,
    SOCKET_NAME,
    TunnelError,
    local_uri,
    remove_stale_tunnels,
    tunnel_for,
)

pytestmark = pytest.mark.unit

HOSTS = "".join(f'[hosts.kvm{n}]\naddress = "kvm{n}"\n' for n in (1, 2, 3))
POLICY = '[job.policy]\nsemantics = "restic"\n[job.policy.retention]\nkeep-last = 1\n'
GOOD = (
    '[cluster.prod]\nhosts = ["kvm1", "kvm2"]\n'
    '[target.nas]\npath = "/mnt/backup"\ncluster = "prod"\n'
    '[[job]]\nname = "web"\nkind = "libvirt"\ncluster = "prod"\ndomain = "web01"\n'
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gfs.toml"
    path.write_text(HOSTS + text + POLICY)
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(InputError) as caught:
        load_config(path)
    return [str(problem) for problem in caught.value.problems]


def test_a_cluster_job_runs_first_on_the_first_host_and_reads_the_share_there(
    tmp_path: Path,
) -> None:
    config = load_config(write(tmp_path, GOOD))
    assert config.clusters["prod"].hosts == ("kvm1", "kvm2")
    (job,) = config.jobs
    assert (job.host, job.options["cluster"]) == ("kvm1", "prod")
    target = config.targets["nas"]
    assert (target.host, target.cluster) == ("kvm1", "prod")


def test_cluster_mistakes_are_one_error_each_naming_the_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[cluster.prod]\nhosts = ["kvm1", "kvm9", "kvm1"]\n[cluster.empty]\nhosts = []\n'
        '[target.nas]\npath = "/mnt/backup"\ncluster = "prod"\nhost = "kvm1"\n'
        '[target.own]\npath = "/mnt/own"\nhost = "kvm3"\n'
        '[target.lost]\npath = "/mnt/lost"\ncluster = "nope"\n'
        '[[job]]\nname = "a"\nkind = "libvirt"\ncluster = "prod"\nhost = "kvm1"\n'
        'domain = "x"\ntarget = "nas"\npolicy = "p"\n'
        '[[job]]\nname = "b"\nkind = "libvirt"\ncluster = "prod"\ndomains = ["*"]\n'
        'target = "nas"\npolicy = "p"\n'
        '[[job]]\nname = "c"\nkind = "libvirt"\ncluster = "prod"\ndomain = "y"\n'
        'target = "own"\npolicy = "p"\n'
        '[[job]]\nname = "d"\nkind = "lvm"\ncluster = "prod"\nvolume = "vg/lv"\n'
        'target = "nas"\npolicy = "p"\n'
        '[[job]]\nname = "e"\nkind = "libvirt"\nhost = "kvm3"\ndomain = "z"\ntarget = "nas"\n',
    )
    found = "\n".join(problems(path))
    for wanted in (
        "cluster.prod.hosts: unknown host 'kvm9': add [hosts.kvm9]",
        "cluster.prod.hosts: names a host twice",
        'cluster.empty.hosts: required: the hosts, e.g. ["kvm1", "kvm2"]',
        "target.nas.cluster: name the cluster or one host, not both",
        "target.lost.cluster: unknown cluster 'nope'",
        "job[a].cluster: name a cluster or a host, not both",
        "job[b].cluster: backs up one domain",
        "job[c].target: target own is not mounted by the hosts of cluster prod",
        "job[d].cluster: unknown key",
        "job[e].target: target nas is the share of cluster prod: a job writing to it runs on "
        "one of its hosts (kvm1, kvm9, kvm1), not on 'kvm3'",
    ):
        assert wanted in found, f"{wanted!r} not in:\n{found}"
    assert "job[c].target: target own is mounted on host" not in found  # said once
    assert len(found.splitlines()) == 10 + 4, found  # each mistake once (+ 4 for policy "p")


def locate_with(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *views: Seen) -> Located:
    config = load_config(write(tmp_path, GOOD))
    by_host = {view.host: view for view in views}
    monkeypatch.setattr(cluster, "_look", lambda _config, _job, host: by_host[host])
    return locate(config, config.jobs[0])


def test_the_domain_is_backed_up_where_it_runs_else_where_it_alone_is_defined(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    running = locate_with(
        monkeypatch, tmp_path, Seen("kvm1", True, False, "u1"), Seen("kvm2", True, True, "u1")
    )
    assert running == Located("kvm2", True, "u1")  # the shut-off definition left on kvm1
    shut_off = locate_with(monkeypatch, tmp_path, Seen("kvm1"), Seen("kvm2", True, False, "u2"))
    assert shut_off == Located("kvm2", False, "u2")
    answered = locate_with(
        monkeypatch, tmp_path, Seen("kvm1", True, True, "u1"), Seen("kvm2", error="refused")
    )
    assert answered == Located("kvm1", True, "u1")  # running there: the silent host is moot


@pytest.mark.parametrize(
    ("views", "wanted"),
    [
        (
            (Seen("kvm1", True, True, "u"), Seen("kvm2", True, True, "u")),
            "domain web01 is running on hosts kvm1 and kvm2 at once",
        ),
        (
            (Seen("kvm1", True, False, "u"), Seen("kvm2", True, False, "u")),
            "domain web01 is shut off and defined on hosts kvm1 and kvm2",
        ),
        ((Seen("kvm1"), Seen("kvm2")), "domain web01 is on none of the hosts of cluster prod"),
        (
            (Seen("kvm1", True, False, "u"), Seen("kvm2", error="connection refused")),
            "and host(s) kvm2 did not answer: it may run there",
        ),
    ],
)
def test_ambiguity_is_an_error_naming_the_hosts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, views: tuple[Seen, ...], wanted: str
) -> None:
    with pytest.raises(NotLocated) as caught:
        locate_with(monkeypatch, tmp_path, *views)
    assert wanted in str(caught.value)


@pytest.mark.parametrize(
    ("now", "wanted"),
    [
        (Located("kvm2", True, "u"), "moved from host kvm1 to kvm2 during its backup"),
        (Located("kvm1", True, "v"), "was redefined on host kvm1 (another UUID)"),
        (Located("kvm1", False, "u"), "was shut off during its backup"),
    ],
)
def test_a_domain_that_changed_during_the_backup_publishes_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, now: Located, wanted: str
) -> None:
    config = load_config(write(tmp_path, GOOD))
    monkeypatch.setattr(cluster, "locate", lambda _config, _job: now)
    before = Located("kvm1", True, "u")
    with pytest.raises(GfsError) as caught:
        check_unmoved(config, config.jobs[0], before)
    assert wanted in str(caught.value) and "no generation was made" in str(caught.value)
    monkeypatch.setattr(cluster, "locate", lambda _config, _job: before)
    check_unmoved(config, config.jobs[0], before)  # unchanged: publish


def test_a_remote_libvirt_is_named_as_its_host_names_it() -> None:
    assert check_host_uri("qemu:///system") == "qemu:///system"
    for bad in ("qemu+ssh://root@kvm2/system", "qemu://kvm2/system", "system", ""):
        with pytest.raises(ValueError, match="name the libvirt as the host itself does"):
            check_host_uri(bad)
    socket = Path("/tmp/gfs-virt-x/libvirt.sock")
    assert local_uri("qemu:///system", socket) == f"qemu+unix:///system?socket={socket}"
    assert local_uri("qemu:///session", socket).startswith("qemu+unix:///session?socket=")


class NoHelper:
    host = "kvm2"

    def run(self, command: Command, check: bool = True) -> Completed:
        return Completed(command, 127, "", "sh: 1: virt-ssh-helper: not found")

    def open_channel(self, command: Command) -> Any:
        raise AssertionError("no channel without the helper")

    def count(self, received: int = 0, sent: int = 0) -> None:
        pass


def test_a_host_without_virt_ssh_helper_is_named_with_what_to_install() -> None:
    with pytest.raises(TunnelError) as caught:
        tunnel_for(NoHelper(), "qemu:///system")
    assert str(caught.value) == (
        "host kvm2: virt-ssh-helper (not installed): gfs reaches the host's libvirt through "
        "it; install libvirt 6.8 or newer there (apt install libvirt-daemon-system)"
    )


def test_a_killed_gfs_tunnel_directory_is_removed_a_live_one_kept(tmp_path: Path) -> None:
    stale, live = tmp_path / f"{PREFIX}stale", tmp_path / f"{PREFIX}live"
    for folder in (stale, live):
        folder.mkdir()
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(stale / SOCKET_NAME))
    dead.close()  # the socket file stays, nothing listens: its gfs was killed
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listening:
        listening.bind(str(live / SOCKET_NAME))
        listening.listen(1)
        remove_stale_tunnels(tmp_path)
        assert not stale.exists() and live.is_dir()
    (tmp_path / "unrelated").mkdir()
    remove_stale_tunnels(tmp_path)
    assert (tmp_path / "unrelated").is_dir()


def test_coverage_asks_every_remote_host_and_a_cluster_job_covers_its_domain_on_each(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = load_config(
        write(
            tmp_path,
            GOOD.replace(
                'domain = "web01"\n', 'domain = "web01"\npolicy = "classic-gfs"\ntarget = "nas"\n'
            )
            + '[target.own]\npath = "/mnt/own"\nhost = "kvm3"\n'
            + '[[job]]\nname = "db"\nkind = "libvirt"\nhost = "kvm3"\ndomain = "db01"\n'
            + 'target = "own"\n',
        )
    )
    on_host = {
        "kvm1": ["web01", "stray1"],
        "kvm2": ["web01"],  # a stale definition after a migration: the cluster job's
        "kvm3": ["db01", "web01"],  # web01 here is another host's domain of that name
    }
    monkeypatch.setattr(coverage_module, "runner_for", lambda host, _config: Fake(host))
    monkeypatch.setattr(coverage_module, "SSHRunner", Fake)
    monkeypatch.setattr(coverage_module, "tunnel_for", lambda runner, _uri: runner)
    monkeypatch.setattr(
        coverage_module,
        "list_domains",
        lambda where, via: [
            DomainInfo(name, f"u-{name}", True, False, "<domain/>") for name in on_host[via]
        ],
    )
    found = Coverage()
    coverage_module._remote_domains(config, [], found)
    assert [(u.name, u.where) for u in found.uncovered] == [
        ("stray1", "qemu:///system on host kvm1"),
        ("web01", "qemu:///system on host kvm3"),
    ]
    assert found.problems == []


class Fake:
    def __init__(self, host: str) -> None:
        self.host = host
        self.uri = host

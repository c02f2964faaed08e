"""The remote source host's commands (argv only, paths never in a shell string) and its
guard against removing anything but gfs's dot-named leftovers."""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gfs_backup.actions.reconcile import reconcile
from gfs_backup.backends import backend_for
from gfs_backup.backends.base import JobContext
from gfs_backup.backends.sourcehost import REMOVE_LEFTOVER, RemoteHost
from gfs_backup.backends.vm_inplace import HostDisks
from gfs_backup.core.config import load_config
from gfs_backup.core.errors import GfsError
from gfs_backup.core.state import State
from gfs_backup.transport.runner import Command, Completed
from tests.unit.test_remote_target import config_with

log = logging.getLogger("test")


class Recorder:
    dry_run = False

    def __init__(self, answers: dict[str, tuple[int, str]] | None = None) -> None:
        self.argvs: list[tuple[str, ...]] = []
        self.answers = answers or {}

    def run(self, command: Command, check: bool = True) -> Completed:
        self.argvs.append(command.argv)
        code, out = self.answers.get(command.argv[0], (0, ""))
        return Completed(command, code, out, "")


def test_paths_travel_as_arguments() -> None:
    runner = Recorder({"stat": (0, "btrfs\n")})
    host = RemoteHost("kvm2", runner)  # type: ignore[arg-type]
    odd = Path("/srv/a b/$(reboot);'x'")
    host.exists(odd)
    host.make_quiet_dir(odd / ".gfs-snapshots")
    host.remove_leftover(odd / ".gfs-restore-x-r1")
    assert runner.argvs[0] == ("test", "-e", str(odd))
    assert runner.argvs[1][:2] == ("python3", "-c") and runner.argvs[1][3] == str(
        odd / ".gfs-snapshots"
    )
    assert runner.argvs[2] == ("sh", "-c", REMOVE_LEFTOVER, "sh", str(odd / ".gfs-restore-x-r1"))
    assert str(odd) not in REMOVE_LEFTOVER


@pytest.mark.parametrize("path", ["/srv/data", "relative/.x", "/srv/../.x", "/"])
def test_only_dot_named_absolute_leftovers_are_removed(path: str) -> None:
    runner = Recorder()
    with pytest.raises(GfsError, match="refusing"):
        RemoteHost("kvm2", runner).remove_leftover(Path(path))  # type: ignore[arg-type]
    assert runner.argvs == []


def test_a_subvolume_root_is_btrfs_with_inode_256() -> None:
    yes = Recorder({"stat": (0, "btrfs\n")})
    assert not RemoteHost("h", yes).is_subvolume_root(Path("/x"))  # type: ignore[arg-type]
    assert yes.argvs[-1] == ("stat", "-c", "%i", "--", "/x")


@pytest.mark.parametrize(
    ("kind", "action", "on_host"),
    [
        ("files", "drill", True),
        ("files", "restore", True),
        ("btrfs", "restore", True),
        ("btrfs", "drill", False),  # a btrfs drill receives here
    ],
)
def test_a_killed_restore_or_drill_of_a_remote_job_is_removed_where_it_ran(
    tmp_path: Path, kind: str, action: str, on_host: bool
) -> None:
    """reconcile removes a journaled leftover on the job's host when it was made there."""
    source = 'path = "/srv/data"' if kind == "files" else 'subvolume = "/srv/data"'
    config_file = config_with(
        tmp_path, 'host = "kvm2"', f'kind = "{kind}"\nhost = "kvm2"\n{source}'
    )
    (job,) = load_config(config_file).jobs
    state = State(tmp_path / "state")
    leftover = tmp_path / f".gfs-{action}-x"  # exists here too: only one side may go
    leftover.mkdir()
    try:
        killed = state.start_run(job.name)
        state.journal(killed, job.name, action, str(leftover))
        runner = Recorder()
        ctx = JobContext(job, runner, state, state.start_run(job.name), datetime.now(UTC), log)  # type: ignore[arg-type]
        ctx = replace(ctx, target=Entries())  # type: ignore[arg-type]
        done = reconcile(ctx, backend_for(kind), Path("/mnt/backup/db"))
    finally:
        state.close()
    removed_there = ("sh", "-c", REMOVE_LEFTOVER, "sh", str(leftover)) in runner.argvs
    assert removed_there is on_host and leftover.exists() is on_host, (runner.argvs, done)
    assert any(str(leftover) in line for line in done)


class Entries:
    """A target with nothing in the job's directory."""

    def entries(self, path: Path) -> list[object]:
        return []


def test_an_in_place_restore_on_a_host_swaps_files_by_argv_commands() -> None:
    runner = Recorder({"blockdev": (0, "1073741824\n")})
    disks = HostDisks(runner)  # type: ignore[arg-type]
    odd = Path("/var/lib/libvirt/images/web 01;$(x).qcow2")
    temp = odd.with_name(".web 01;$(x).qcow2.gfs-restore-r7")
    assert disks.size(Path("/dev/vg0/web")) == 1 << 30
    disks.take_over_metadata(temp, odd)
    disks.replace(temp, odd)
    disks.remove(temp)
    assert runner.argvs == [
        ("blockdev", "--getsize64", "/dev/vg0/web"),
        ("test", "-e", str(odd)),
        ("chown", f"--reference={odd}", "--", str(temp)),
        ("chmod", f"--reference={odd}", "--", str(temp)),
        ("mv", "-f", "-T", "--", str(temp), str(odd)),
        ("sync", "--", str(odd.parent)),
        ("rm", "-f", "--", str(temp)),
    ]
    gone = Recorder({"test": (1, "")})
    HostDisks(gone).take_over_metadata(temp, odd)  # type: ignore[arg-type]
    assert gone.argvs[-1] == ("chmod", "600", "--", str(temp))

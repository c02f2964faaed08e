"""The remote source host's commands (argv only, paths never in a shell string) and its
guard against removing anything but gfs's dot-named leftovers."""

from __future__ import annotations

from pathlib import Path

import pytest

from gfs_backup.backends.sourcehost import REMOVE_LEFTOVER, RemoteHost
from gfs_backup.core.errors import GfsError
from gfs_backup.transport.runner import Command, Completed


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

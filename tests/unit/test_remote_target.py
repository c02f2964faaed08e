"""Targets on a remote host: config validation, the host-side copy pipeline's argv and output
parser, and RemoteFS's commands against a fake runner (no I/O)."""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import pytest

from gfs_backup.copying.hostcopy import (
    EXPORT_SCRIPT,
    CopyOutput,
    make_device_copy_command,
    make_kill_group_command,
)
from gfs_backup.core.config import load_config
from gfs_backup.core.errors import InputError
from gfs_backup.target.fs import (
    Entry,
    RemoteFS,
    TargetIOError,
    TargetStalled,
    parse_find_entries,
)
from gfs_backup.transport.runner import Command, CommandError, Completed
from gfs_backup.transport.ssh import remote_command_line

pytestmark = pytest.mark.unit

HOSTS = '[hosts.kvm2]\naddress = "kvm2.example.net"\n[hosts.kvm3]\naddress = "kvm3"\n'
POLICY = '[job.policy]\nsemantics = "restic"\n[job.policy.retention]\nkeep-last = 1\n'


def config_with(tmp_path: Path, target: str, job: str) -> Path:
    path = tmp_path / "gfs.toml"
    path.write_text(
        f'[target.nas]\npath = "/mnt/backup"\n{target}\n{HOSTS}[[job]]\nname = "db"\n'
        f'target = "nas"\n{job}\n{POLICY}',
        encoding="utf-8",
    )
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(InputError) as caught:
        load_config(path)
    return [f"{p.where}: {p.message}" for p in caught.value.problems]


def test_a_target_on_a_host_is_read_with_its_io_timeout(tmp_path: Path) -> None:
    config = load_config(
        config_with(
            tmp_path,
            'host = "kvm2"\nio_timeout = 30',
            'kind = "lvm"\nhost = "kvm2"\nvolume = "vg0/db"',
        )
    )
    target = config.targets["nas"]
    assert (target.host, target.io_timeout, target.path) == ("kvm2", 30.0, Path("/mnt/backup"))


def test_a_job_on_another_host_than_its_target_is_one_error_naming_job_and_keys(
    tmp_path: Path,
) -> None:
    path = config_with(tmp_path, 'host = "kvm2"', 'kind = "lvm"\nhost = "kvm3"\nvolume = "a/b"')
    assert problems(path) == [
        f"{path}: job[db].target: target nas is mounted on host 'kvm2' but the job runs on "
        "'kvm3': set host = 'kvm2' or use a target mounted there"
    ]
    local = config_with(tmp_path, 'host = "kvm2"', 'kind = "lvm"\nvolume = "a/b"')
    assert "but the job runs on 'local'" in problems(local)[0]


def test_only_raw_lvm_jobs_export_to_a_remote_target(tmp_path: Path) -> None:
    job = 'kind = "lvm"\nhost = "kvm2"\nvolume = "a/b"\nformat = "qcow2"'
    found = problems(config_with(tmp_path, 'host = "kvm2"', job))
    wanted = 'lvm jobs export to a remote target with format "raw" only so far'
    assert any(wanted in p for p in found)


def test_btrfs_jobs_run_on_a_remote_host_to_its_own_or_a_local_target(tmp_path: Path) -> None:
    job = 'kind = "btrfs"\nhost = "kvm2"\nsubvolume = "/srv/home"'
    for target in ('host = "kvm2"', ""):
        config = load_config(config_with(tmp_path, target, job))
        assert [(j.kind, j.host) for j in config.jobs] == [("btrfs", "kvm2")]


def test_files_jobs_of_a_remote_host_export_into_a_target_that_host_mounts(
    tmp_path: Path,
) -> None:
    job = 'kind = "files"\nhost = "kvm2"\npath = "/srv/data"'
    config = load_config(config_with(tmp_path, 'host = "kvm2"', job))
    assert [(j.kind, j.host) for j in config.jobs] == [("files", "kvm2")]
    path = config_with(tmp_path, "", job)
    assert problems(path) == [
        f"{path}: job[db].target: a files job of host 'kvm2' needs a target that host "
        "mounts (the tree is exported there): use a target with host = 'kvm2'"
    ]
    other = config_with(tmp_path, 'host = "kvm3"', job)
    assert problems(other) == [  # one error, not two saying the same
        f"{other}: job[db].target: target nas is mounted on host 'kvm3' but the job runs on "
        "'kvm2': set host = 'kvm3' or use a target mounted there"
    ]


def test_libvirt_jobs_of_a_remote_host_write_into_a_target_it_mounts(tmp_path: Path) -> None:
    job = 'kind = "libvirt"\ndomain = "web01"\nhost = "kvm2"'
    config = load_config(config_with(tmp_path, 'host = "kvm2"', job))
    assert [(j.kind, j.host) for j in config.jobs] == [("libvirt", "kvm2")]
    path = config_with(tmp_path, "", job)
    assert problems(path) == [
        f"{path}: job[db].target: a libvirt job of host 'kvm2' needs a target that host "
        "mounts (QEMU writes the backup there): use a target with host = 'kvm2'"
    ]


def test_a_remote_libvirt_job_names_the_hosts_own_libvirt_and_no_snapshot_method(
    tmp_path: Path,
) -> None:
    job = (
        'kind = "libvirt"\ndomain = "web01"\nhost = "kvm2"\n'
        'uri = "qemu+ssh://root@kvm2/system"\nmethod = "snapshot"'
    )
    path = config_with(tmp_path, 'host = "kvm2"', job)
    found = problems(path)
    assert len(found) == 2, found
    assert found[0].startswith(f"{path}: job[db].uri: uri 'qemu+ssh://root@kvm2/system': with ")
    assert 'uri = "qemu:///system", the default' in found[0]
    assert found[1].startswith(f'{path}: job[db].method: "snapshot" runs on this machine only')


def test_bad_target_host_and_io_timeout_are_reported_together(tmp_path: Path) -> None:
    path = config_with(tmp_path, 'host = "nope"\nio_timeout = 0', 'kind = "lvm"\nvolume = "a/b"')
    found = problems(path)
    assert f"{path}: target.nas.io_timeout: 0 is not 1 to 86400 seconds" in found
    assert f"{path}: target.nas.host: unknown host 'nope': add [hosts.nope] or use 'local'" in found


def test_the_copy_pipeline_is_a_constant_script_with_paths_as_parameters() -> None:
    hostile = "/dev/vg/x'; rm -rf / #"
    command = make_device_copy_command(hostile, "/mnt/t/db/.partial-1/volume.raw", 3600, 20)
    assert command.argv == ("sh", "-c", EXPORT_SCRIPT, "sh", hostile, command.argv[5])
    assert (command.mutating, command.timeout, command.idle_timeout) == (True, 3600, 20)
    line = remote_command_line(command)
    assert shlex.split(line)[-6:] == list(command.argv)  # after `timeout --kill-after=10 N`
    assert "conv=sparse,fsync" in EXPORT_SCRIPT and "iflag=direct" in EXPORT_SCRIPT


def test_the_kill_command_signals_only_a_real_process_group() -> None:
    assert make_kill_group_command(4242).argv == ("kill", "-KILL", "--", "-4242")
    for bad in (0, 1, -5):
        with pytest.raises(ValueError):
            make_kill_group_command(bad)


DIGEST = "a" * 64


def test_copy_output_reports_group_progress_and_result_in_pieces() -> None:
    output = CopyOutput()
    assert output.feed(b"gfs-pgid 31") == 0 and output.pgid is None
    assert output.feed(b"7\n1048576 bytes (1.0 MB, 1.0 MiB) copied, 1 s, 1.0 MB/s\r") == 1 << 20
    assert output.pgid == 317
    assert output.feed(b"3145728 bytes (3.1 MB, 3.0 MiB) copied, 2 s, 1.5 MB/s\r") == 2 << 20
    tail = b"\n96+0 records in\n96+0 records out\n3145728 bytes (3.1 MB) copied, 2 s\n"
    assert output.feed(tail) == 0
    assert output.result() is None
    output.feed(f"gfs-result 100663296 81920 512 {DIGEST}\n".encode())
    result = output.result()
    assert result is not None
    assert (result.size, result.allocated, result.digest) == (96 << 20, 40 << 20, DIGEST)
    assert output.failures() == []


def test_copy_output_failures_name_the_step() -> None:
    output = CopyOutput()
    output.feed(
        b"dd: error writing '/mnt/t/x': Input/output error\n"
        b"gfs-failed writing /mnt/t/x (exit status 1)\ngfs-failed tee (exit status 141)\n"
    )
    assert output.failures() == [
        "dd: error writing '/mnt/t/x': Input/output error",
        "writing /mnt/t/x (exit status 1)",
        "tee (exit status 141)",
    ]


def test_find_entries_parser() -> None:
    text = "d 20260101T000000Z\0f manifest.json\0l link\0d .partial-x\0d weird name\nx\0"
    assert parse_find_entries(text) == [
        Entry(".partial-x", "d"),
        Entry("20260101T000000Z", "d"),
        Entry("link", "l"),
        Entry("manifest.json", "f"),
        Entry("weird name\nx", "d"),
    ]


class FakeRunner:
    """Records commands; answers with `reply(command)`."""

    host = "kvm2"
    dry_run = False

    def __init__(self, reply: object = None) -> None:
        self.commands: list[Command] = []
        self.reply = reply or (lambda command: Completed(command, 0, "", ""))

    def run(self, command: Command, check: bool = True) -> Completed:
        self.commands.append(command)
        return self.reply(command)  # type: ignore[operator,no-any-return]

    @contextmanager
    def reading(self, command: Command) -> Iterator[IO[bytes]]:
        raise NotImplementedError
        yield

    @contextmanager
    def writing(self, command: Command) -> Iterator[IO[bytes]]:
        raise NotImplementedError
        yield


ROOT = Path("/mnt/backup")


def test_remote_fs_commands_are_argv_lists_bounded_by_the_io_timeout() -> None:
    runner = FakeRunner()
    fs = RemoteFS(runner, "nas", ROOT, 30)
    fs.rename(ROOT / "db/.partial-1", ROOT / "db/1")
    fs.remove_tree(ROOT / "db/.pruning-1")
    fs.make_dir(ROOT / "db/.partial-2", 0o700)
    argvs = [command.argv for command in runner.commands]
    assert argvs[0][:3] == ("sh", "-c", 'mv -T -- "$1" "$2" && sync -- "$3"')
    assert argvs[0][3:] == ("sh", "/mnt/backup/db/.partial-1", "/mnt/backup/db/1", "/mnt/backup/db")
    assert argvs[1] == ("rm", "-rf", "--", "/mnt/backup/db/.pruning-1")
    assert argvs[-1] == ("mkdir", "-m", "700", "--", "/mnt/backup/db/.partial-2")
    assert all(command.timeout == 30 for command in runner.commands)
    assert all(command.mutating for command in runner.commands if command.argv[0] != "test")


@pytest.mark.parametrize("path", ["/", "/mnt/backup", "/mnt/other/x", "/mnt/backup/../etc"])
def test_remote_fs_never_mutates_outside_its_target(path: str) -> None:
    runner = FakeRunner()
    with pytest.raises(TargetIOError, match="is not inside target nas"):
        RemoteFS(runner, "nas", ROOT, 30).remove_tree(Path(path))
    assert runner.commands == []


def test_a_remote_operation_that_times_out_says_the_target_stopped_answering() -> None:
    def hang(command: Command) -> Completed:
        raise CommandError(command, "on host kvm2: timed out after 30 s")

    fs = RemoteFS(FakeRunner(hang), "nas", ROOT, 30)
    with pytest.raises(TargetStalled, match=r"stopped answering: no result within 30 s"):
        fs.entries(ROOT / "db")


def test_a_missing_remote_file_is_file_not_found() -> None:
    def missing(command: Command) -> Completed:
        return Completed(command, 1, "", "cat: /mnt/backup/db/x: No such file or directory")

    with pytest.raises(FileNotFoundError):
        RemoteFS(FakeRunner(missing), "nas", ROOT, 30).read_text(ROOT / "db/x/manifest.json")

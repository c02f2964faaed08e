"""Shell completion: job names, `JOB/DOMAIN`, generation ids and domain names from a temp
configuration and state database (never the target), and never slower than about a second."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from click.shell_completion import ShellComplete

from gfs_backup.actions import completion
from gfs_backup.actions.completion import domain_names, generation_ids, job_names, member_names
from gfs_backup.cli import cli
from gfs_backup.core.state import State
from gfs_backup.tools import virt
from gfs_backup.tools.virt import DomainInfo

pytestmark = pytest.mark.unit

UUID = "6a1f3c2e-0b7d-4c55-9a61-2f0e9d1b7c44"
OTHER_UUID = "0e2d9a7b-51c4-4f0e-8d2b-7c1a3e5f9b60"  # a domain that is gone
TEST_UUID = "9c3b1d2e-7f4a-4b6c-8e0d-1a2b3c4d5e6f"


def write_config(tmp_path: Path) -> Path:
    config = tmp_path / "gfs.toml"
    config.write_text(
        f"state_dir = {json.dumps(str(tmp_path / 'state'))}\n"
        '[target.nas]\npath = "/mnt/dead-nfs"\n'
        '[[job]]\nname = "web01"\nkind = "libvirt"\ndomain = "web01"\n'
        '[[job]]\nname = "vms"\nkind = "libvirt"\ndomains = ["*"]\nexclude = ["test-*"]\n'
        '[[job]]\nname = "vmsx"\nkind = "files"\npath = "/srv"\n'
        '[[job]]\nname = "data"\nkind = "files"\npath = "/data"\n',
        encoding="utf-8",
    )
    return config


def record(state: State, job: str, status: str, generation: str | None) -> int:
    run = state.start_run(job)
    state.finish_run(run, status, generation)
    return run


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = write_config(tmp_path)
    state = State(tmp_path / "state")
    try:
        record(state, "web01", "ok", "2025-03-01T010000Z")
        record(state, "web01", "ok", "2025-03-02T010000Z")
        record(state, "web01", "failed", None)
        pruning = record(state, "web01", "ok", "2025-03-03T010000Z")
        state.journal(pruning, "web01", "prune", "/mnt/x/web01/.d", detail="2025-03-01T010000Z")
        record(state, "web01", "drilled", "2025-03-02T010000Z")
        record(state, f"vms@{UUID}", "ok", "2025-03-02T020000Z")
        record(state, f"vms@{OTHER_UUID}", "ok", "2025-03-04T020000Z")
        record(state, "vmsx", "ok", "2025-03-05T000000Z")  # not a member of vms
        record(state, "data", "restored", "2025-02-01T000000Z")
    finally:
        state.close()
    return path


class FakeConnection:
    """libvirt with a few domains (`hang`: a libvirtd that never answers)."""

    hang = False

    def __init__(self, _uri: str, _via: str | None = None) -> None:
        if self.hang:
            time.sleep(30)

    def domains(self) -> list[DomainInfo]:
        return [
            DomainInfo("test-1", TEST_UUID, True, False, "<domain/>"),
            DomainInfo("web01", UUID, True, True, "<domain/>"),
            DomainInfo("web02", "x", True, True, "<domain/>"),
        ]

    def close(self) -> None:
        pass


@pytest.fixture
def fake_libvirt(monkeypatch: pytest.MonkeyPatch) -> type[FakeConnection]:
    monkeypatch.setattr(virt, "Connection", FakeConnection)
    monkeypatch.setattr(FakeConnection, "hang", False)
    return FakeConnection


def test_job_names_in_file_order(config: Path) -> None:
    assert job_names(config) == ["web01", "vms", "vmsx", "data"]


def test_generations_newest_first_without_pruned_ones(config: Path) -> None:
    assert generation_ids(config, ["web01"]) == ["2025-03-02T010000Z", "2025-03-03T010000Z"]
    assert generation_ids(config, ["data"]) == ["2025-02-01T000000Z"]
    everything = generation_ids(config)
    assert everything[0] == "2025-02-01T000000Z" and "2025-03-01T010000Z" not in everything


def test_a_job_over_several_domains_has_its_members_generations(
    config: Path, fake_libvirt: type[FakeConnection]
) -> None:
    assert generation_ids(config, ["vms"]) == ["2025-03-04T020000Z", "2025-03-02T020000Z"]
    assert generation_ids(config, ["vms/web01"]) == ["2025-03-02T020000Z"]
    assert generation_ids(config, [f"vms/{OTHER_UUID}"]) == ["2025-03-04T020000Z"]
    fake_libvirt.hang = True  # libvirt away: every domain's generations of the job
    assert generation_ids(config, ["vms/web01"]) == ["2025-03-04T020000Z", "2025-03-02T020000Z"]


def test_member_and_domain_names_come_from_libvirt(
    config: Path, fake_libvirt: type[FakeConnection]
) -> None:
    assert member_names(config, "vms") == ["vms/web01", "vms/web02"]  # test-* excluded
    assert member_names(config, "web01") == []  # one domain: no members
    assert domain_names(config) == ["test-1", "web01", "web02"]


def test_any_problem_is_no_answer(tmp_path: Path, config: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("[[job]\nname = 'x'\n", encoding="utf-8")
    assert job_names(broken) == [] and generation_ids(broken, ["x"]) == []
    assert job_names(tmp_path / "absent.toml") == []
    (tmp_path / "state" / "gfs.sqlite").write_bytes(b"not a database")
    assert generation_ids(config, ["web01"]) == []


def test_a_hung_libvirtd_costs_at_most_about_a_second(
    config: Path, fake_libvirt: type[FakeConnection]
) -> None:
    fake_libvirt.hang = True
    for ask in (lambda: domain_names(config), lambda: member_names(config, "vms")):
        started = time.monotonic()
        assert ask() == []
        assert time.monotonic() - started < 1.5
    assert completion.COMPLETION_SECONDS <= 1.0


def completions(*words: str, incomplete: str = "") -> list[str]:
    """What `gfs WORDS... INCOMPLETE<TAB>` offers (click's own resolution)."""
    shell = ShellComplete(cli, {}, "gfs", "_GFS_COMPLETE")
    return [item.value for item in shell.get_completions(list(words), incomplete)]


def test_commands_complete_jobs_and_generations(config: Path) -> None:
    at = ("--config", str(config))
    assert completions("list", *at, incomplete="w") == ["web01"]
    assert completions("run", *at, "web01") == ["vms", "vmsx", "data"]
    assert completions("restore", *at, "web01", "--generation") == [
        "2025-03-02T010000Z",
        "2025-03-03T010000Z",
    ]
    assert completions("protect", *at, "data") == ["2025-02-01T000000Z"]
    assert completions("verify", *at, "web01", "data", "--generation", incomplete="2025-0") == [
        "2025-02-01T000000Z",
        "2025-03-02T010000Z",
        "2025-03-03T010000Z",
    ]
    assert completions("verify", *at, "web01", "--generation", incomplete="2025-03-03") == [
        "2025-03-03T010000Z"
    ]
    for command in ("export", "snapshot", "prune", "status", "drill", "plan", "unprotect"):
        assert "data" in completions(command, *at, incomplete="d"), command


def test_commands_complete_domains(config: Path, fake_libvirt: type[FakeConnection]) -> None:
    at = ("--config", str(config))
    assert completions("restore", *at, incomplete="vms/w") == ["vms/web01", "vms/web02"]
    assert completions("init", "--exclude", incomplete="web") == ["web01", "web02"]
    assert completions("forget", *at, "vms") == [OTHER_UUID]  # gone from libvirt
    fake_libvirt.hang = True  # cannot tell: every domain the job backed up
    assert completions("forget", *at, "vms") == [OTHER_UUID, UUID]


def test_bash_completion_of_gfs_list_names_the_jobs(config: Path) -> None:
    gfs = Path(sys.executable).parent / "gfs"
    env = {
        **os.environ,
        "GFS_CONFIG": str(config),
        "_GFS_COMPLETE": "bash_complete",
        "COMP_WORDS": "gfs list ",
        "COMP_CWORD": "2",
    }
    done = subprocess.run([str(gfs)], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"plain,{name}" for name in ("web01", "vms", "vmsx", "data")
    ]


def test_shell_scripts_are_click_s_own(tmp_path: Path) -> None:
    gfs = Path(sys.executable).parent / "gfs"
    scripts: dict[str, Any] = {}
    for shell in ("bash", "zsh", "fish"):
        env = {**os.environ, "_GFS_COMPLETE": f"{shell}_source"}
        done = subprocess.run([str(gfs)], env=env, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        scripts[shell] = done.stdout
    assert "_GFS_COMPLETE=bash_complete" in scripts["bash"]
    assert "#compdef gfs" in scripts["zsh"]
    assert "complete --no-files --command gfs" in scripts["fish"]

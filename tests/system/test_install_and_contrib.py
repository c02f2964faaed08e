"""The README's install command and the shipped timer/cron files."""

from __future__ import annotations

import configparser
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.system, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def test_install_script_installs_a_working_gfs(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "GFS_PREFIX": str(tmp_path / "opt"),
        "GFS_BIN_DIR": str(tmp_path / "bin"),
        "GFS_ETC_DIR": str(tmp_path / "etc"),
        "GFS_SHARE_DIR": str(tmp_path / "share"),
    }
    done = subprocess.run(
        [str(REPO / "scripts" / "install")],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    gfs = tmp_path / "bin" / "gfs"
    plan = subprocess.run(
        [str(gfs), "plan", "--policy", "classic-gfs", "--simulate", "35", "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert plan.returncode == 0, plan.stderr
    assert '"grandfather"' in plan.stdout
    assert (tmp_path / "etc" / "gfs.toml.example").is_file()
    assert (tmp_path / "opt" / "README.md").read_text() == (REPO / "README.md").read_text()
    assert (tmp_path / "opt" / "docs" / "jobs.md").is_file()  # the README links there
    completions = {
        "bash-completion/completions/gfs": "_GFS_COMPLETE=bash_complete",
        "zsh/vendor-completions/_gfs": "#compdef gfs",
        "fish/vendor_completions.d/gfs.fish": "complete --no-files --command gfs",
    }
    for name, marker in completions.items():
        assert marker in (tmp_path / "share" / name).read_text(), name
    check = subprocess.run(
        [str(gfs), "check", "--lint-only", "--config", str(tmp_path / "etc" / "gfs.toml.example")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stderr
    # The install backs up VMs: libvirt's and libnbd's Python modules from Debian, linked.
    modules = subprocess.run(
        [str(tmp_path / "opt" / "bin" / "python"), "-c", "import libvirt, libvirt_qemu, nbd"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert modules.returncode == 0, modules.stderr


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(REPO / "contrib" / "systemd" / name)
    return parser


def test_systemd_units_run_gfs_from_a_persistent_timer() -> None:
    service = unit("gfs-run.service")
    assert service["Service"]["Type"] == "oneshot"
    assert service["Service"]["ExecStart"] == "/usr/local/bin/gfs run"
    timer = unit("gfs-run.timer")
    assert timer["Timer"]["Persistent"] == "true"
    assert timer["Timer"]["RandomizedDelaySec"]
    assert timer["Install"]["WantedBy"] == "timers.target"


def test_a_failed_run_unit_starts_the_failure_reporter() -> None:
    service = unit("gfs-run.service")
    assert service["Unit"]["OnFailure"] == "gfs-failure@%n.service"
    reporter = unit("gfs-failure@.service")
    assert reporter["Service"]["Type"] == "oneshot"
    assert reporter["Service"]["ExecStart"] == "/usr/local/bin/gfs notify-failure %i"


def test_both_ci_definitions_call_the_same_drill_line() -> None:
    wanted = "gfs drill --target /mnt/backup --all-jobs --select grandfather --junit drill.xml"
    for name in ("gitlab-ci.yml", "github-drill.yml"):
        text = (REPO / "contrib" / "ci" / name).read_text()
        assert wanted in " ".join(text.replace("\\\n", " ").split()), name


def test_cron_file_runs_gfs_as_root() -> None:
    lines = [
        line
        for line in (REPO / "contrib" / "cron" / "gfs").read_text().splitlines()
        if line and not line.startswith("#") and "=" not in line.split()[0]
    ]
    (entry,) = lines
    fields = entry.split(None, 6)
    assert fields[5] == "root" and fields[6].startswith("gfs run")

"""Job hooks: parsing the `hooks` table, and running real scripts (env, failures, timeouts,
floods of output, missing programs)."""

from __future__ import annotations

import logging
import os
import resource
import time
from pathlib import Path
from typing import Any

import pytest

from gfs_backup.core.validate import Collector
from gfs_backup.ops import hooks as hooks_module
from gfs_backup.ops.hooks import (
    DEFAULT_TIMEOUT,
    OUTPUT_LIMIT,
    PHASES,
    Hooks,
    parse_hooks,
    run_hook,
)

pytestmark = pytest.mark.unit
WHERE = "job[db01].hooks"
log = logging.getLogger("gfs.test.hooks")


def script(tmp_path: Path, body: str, name: str = "hook") -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body, encoding="utf-8")
    path.chmod(0o755)
    return str(path)


def parse(table: Any) -> tuple[Hooks, list[str]]:
    collector = Collector("gfs.toml")
    hooks = parse_hooks(table, WHERE, collector)
    return hooks, [f"{problem.where}: {problem.message}" for problem in collector.problems]


def gone(pid: int) -> bool:
    """The process ended (absent, or a zombie its new parent has not reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


# --- parsing ---


def test_no_table_means_no_hooks() -> None:
    hooks, problems = parse(None)
    assert hooks == Hooks()
    assert hooks.phases == ()
    assert hooks.timeout == DEFAULT_TIMEOUT
    assert problems == []


def test_parse_a_full_table() -> None:
    table = {
        "before": ["/usr/local/bin/flush-db", "--lock"],
        "after": ["/usr/local/bin/unlock-db"],
        "on_failure": ["/bin/sh", "-c", "logger failed"],
        "timeout": 300,
    }
    hooks, problems = parse(table)
    assert problems == []
    assert hooks.before == ("/usr/local/bin/flush-db", "--lock")
    assert hooks.command("after") == ("/usr/local/bin/unlock-db",)
    assert hooks.command("after_export") == ()
    assert hooks.phases == ("before", "after", "on_failure")
    assert hooks.timeout == 300.0
    assert PHASES == ("before", "after_snapshot", "after_export", "after", "on_failure")


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        (
            {"before": ["flush-db", "--lock"]},
            "job[db01].hooks.before: 'flush-db' must be an absolute path",
        ),
        ({"after": []}, "job[db01].hooks.after: must not be empty"),
        ({"after": "/usr/local/bin/unlock-db"}, "job[db01].hooks.after: expected a list"),
        ({"after": 3}, "job[db01].hooks.after: expected a list of strings"),
        ({"after": ["/bin/echo", 3]}, "job[db01].hooks.after: item 2 is not a string"),
        ({"before_snapshot": ["/bin/true"]}, "job[db01].hooks.before_snapshot: unknown key"),
        ({"timeout": 0}, "job[db01].hooks.timeout: 0 is not 1 to 86400 seconds"),
        ({"timeout": 100000}, "job[db01].hooks.timeout: 100000 is not 1 to 86400 seconds"),
        ({"timeout": "5m"}, "job[db01].hooks.timeout: expected a number of seconds"),
        ({"timeout": True}, "job[db01].hooks.timeout: expected a number of seconds"),
    ],
)
def test_parse_errors_name_the_key(table: dict[str, Any], expected: str) -> None:
    hooks, problems = parse(table)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"gfs.toml: {expected}"), problems
    assert hooks.phases == ()


def test_shell_advice_for_commands_without_a_path() -> None:
    for value in (["flush-db"], "flush-db --lock"):
        _, problems = parse({"before": value})
        assert 'use ["/bin/sh", "-c", "..."] if you need a shell' in problems[0]


def test_every_problem_is_reported_at_once() -> None:
    _, problems = parse({"before": [], "after": ["x"], "bogus": 1, "timeout": -1})
    assert len(problems) == 4


def test_not_a_table() -> None:
    _, problems = parse(["/bin/true"])
    assert problems[0].startswith("gfs.toml: job[db01].hooks: expected an inline table")


def test_unknown_phase_is_a_bug_of_the_caller() -> None:
    with pytest.raises(ValueError, match="unknown hook phase"):
        run_hook(Hooks(), "before_snapshot", {}, log)


# --- running ---


def test_no_hook_for_the_phase() -> None:
    assert run_hook(Hooks(before=("/bin/true",)), "after", {}, log) is None


def test_the_hook_sees_its_environment(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    hook = script(
        tmp_path,
        'echo "job=$GFS_JOB kind=$GFS_KIND phase=$GFS_PHASE generation=$GFS_GENERATION"\n'
        'echo "home=$HOME cwd=$(pwd) args=$*"\n'
        'echo "stdin=$(cat)"\n'
        # Field 6 of /proc/PID/stat is the session: its own, as the session leader.
        'echo "session=$(cut -d" " -f6 /proc/$$/stat) pid=$$"\n'
        "echo to-stderr >&2\n",
    )
    hooks = Hooks(after_export=(hook, "one", "two"))
    env = {"GFS_JOB": "db01", "GFS_KIND": "lvm", "GFS_GENERATION": "2024-05-01T0200Z"}
    with caplog.at_level(logging.DEBUG, logger=log.name):
        result = run_hook(hooks, "after_export", env, log)
    assert result is not None
    assert result.ok, result.problem
    assert result.exit_code == 0
    assert result.problem == ""
    assert result.argv == (hook, "one", "two")
    lines = result.output.splitlines()
    assert lines[0] == "job=db01 kind=lvm phase=after_export generation=2024-05-01T0200Z"
    assert lines[1] == f"home={os.environ.get('HOME', '')} cwd=/ args=one two"
    assert lines[2] == "stdin="
    session, pid = (part.split("=")[1] for part in lines[3].split())
    assert session == pid
    assert lines[4] == "to-stderr"
    assert "job db01: hook after_export output (end):\n" in caplog.text
    assert any(
        record.levelno == logging.INFO and "hook after_export" in record.getMessage()
        for record in caplog.records
    )


def test_gfs_phase_cannot_be_overridden(tmp_path: Path) -> None:
    hook = script(tmp_path, 'echo "$GFS_PHASE"\n')
    result = run_hook(Hooks(after=(hook,)), "after", {"GFS_PHASE": "before"}, log)
    assert result is not None
    assert result.output == "after\n"


def test_a_failing_hook(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    hook = script(tmp_path, "echo starting\necho 'disk full' >&2\nexit 3\n")
    with caplog.at_level(logging.DEBUG, logger=log.name):
        result = run_hook(Hooks(after_export=(hook,)), "after_export", {"GFS_JOB": "db01"}, log)
    assert result is not None
    assert not result.ok
    assert result.exit_code == 3
    assert result.problem == f"hook after_export ({hook}) exited with status 3: disk full"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"job db01: {result.problem}"]
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any(message.endswith("starting\ndisk full") for message in debug)


def test_a_silent_failure_and_a_signal(tmp_path: Path) -> None:
    silent = script(tmp_path, "exit 1\n", "silent")
    result = run_hook(Hooks(before=(silent,)), "before", {}, log)
    assert result is not None
    assert result.problem == f"hook before ({silent}) exited with status 1 (no output)"
    killed = script(tmp_path, "kill -USR1 $$\nsleep 5\n", "killed")
    result = run_hook(Hooks(before=(killed,)), "before", {}, log)
    assert result is not None
    assert result.exit_code == -10
    assert "was killed by signal 10 (SIGUSR1)" in result.problem


def test_a_hanging_hook_is_killed_with_its_children(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pidfile = tmp_path / "child.pid"
    # The background child keeps the output pipe open after its parent is gone.
    hook = script(tmp_path, 'sleep 60 &\necho $! > "$1"\necho waiting\nsleep 60\n')
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger=log.name):
        result = run_hook(Hooks(before=(hook, str(pidfile)), timeout=1), "before", {}, log)
    elapsed = time.monotonic() - started
    assert result is not None
    assert elapsed < 4, elapsed
    assert result.exit_code is None
    assert result.timed_out
    assert result.problem == f"hook before ({hook}) timed out after 1 s: waiting"
    assert caplog.messages == [result.problem]
    child = int(pidfile.read_text())
    for _ in range(50):
        if gone(child):
            break
        time.sleep(0.02)
    assert gone(child)


def test_a_hook_ignoring_sigterm_gets_sigkill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hooks_module, "KILL_GRACE", 0.3)
    hook = script(tmp_path, "trap '' TERM\nwhile :; do sleep 0.05; done\n")
    started = time.monotonic()
    result = run_hook(Hooks(before=(hook,), timeout=0.5), "before", {}, log)
    assert result is not None
    assert time.monotonic() - started < 2.5
    assert result.timed_out
    assert result.exit_code is None


def test_a_background_child_holding_the_output_does_not_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hooks_module, "DRAIN_GRACE", 0.3)
    pidfile = tmp_path / "child.pid"
    hook = script(tmp_path, 'sleep 30 &\necho $! > "$1"\necho done\n')
    started = time.monotonic()
    result = run_hook(Hooks(after=(hook, str(pidfile)), timeout=20), "after", {}, log)
    assert result is not None
    assert time.monotonic() - started < 2
    assert result.ok
    assert result.output == "done\n"
    os.kill(int(pidfile.read_text()), 9)


def test_twenty_megabytes_of_output(tmp_path: Path) -> None:
    hook = script(tmp_path, "yes 'a line of noise' | head -c 20000000\necho 'last line'\n")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    result = run_hook(Hooks(after=(hook,)), "after", {}, log)
    assert time.monotonic() - started < 5
    assert result is not None
    assert result.ok
    assert len(result.output.encode()) <= OUTPUT_LIMIT
    assert len(result.output.encode()) > OUTPUT_LIMIT - 100
    assert result.output.endswith("a line of noise\nlast line\n")
    assert len(result.last_lines().splitlines()) == 20
    # ru_maxrss is in KiB: the 20 MB never were in memory at once.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 8 * 1024


def test_a_missing_executable(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    missing = str(tmp_path / "no-such-hook")
    with caplog.at_level(logging.WARNING, logger=log.name):
        result = run_hook(Hooks(before=(missing, "--lock")), "before", {}, log)
    assert result is not None
    assert not result.ok
    assert result.exit_code is None
    assert not result.timed_out
    expected = f"hook before ({missing}) cannot be run: [Errno 2] No such file or directory"
    assert result.problem == expected
    assert caplog.messages == [expected]


def test_a_file_that_is_not_executable(tmp_path: Path) -> None:
    hook = script(tmp_path, "exit 0\n")
    Path(hook).chmod(0o644)
    result = run_hook(Hooks(before=(hook,)), "before", {}, log)
    assert result is not None
    assert result.problem.endswith("cannot be run: [Errno 13] Permission denied")

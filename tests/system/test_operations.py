"""Operations end to end, against real receivers on loopback: a `gfs run` of a files job
runs its hooks, pings its dead-man URLs, posts its notification, writes the Prometheus
textfile (read back with prometheus-client's own parser); `gfs status --check` judges the
target as a monitoring plugin."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from freezegun import freeze_time
from prometheus_client.parser import text_string_to_metric_families

from gfs_backup.cli import progress
from gfs_backup.ops.journal import JournalHandler
from tests.conftest import RunGfs
from tests.system.conftest import Mounter
from tests.system.helpers import CLASSIC_UTC, listing, write_config
from tests.unit.test_journal import Journal

pytestmark = [pytest.mark.system]


@dataclass
class Receiver:
    """An HTTP server on 127.0.0.1 that records (path, body) of every request."""

    url: str
    requests: list[tuple[str, bytes]] = field(default_factory=list)

    def paths(self) -> list[str]:
        return [path for path, _body in self.requests]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver("")

    class Handler(BaseHTTPRequestHandler):
        def _record(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            found.requests.append((self.path, self.rfile.read(length)))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"OK")

        do_GET = do_POST = _record

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    found.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield found
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


HOOK = """#!/bin/sh
env | grep '^GFS_' | sort > "{out}/$GFS_PHASE.env"
exit {status}
"""


def hook(tmp_path: Path, name: str, status: int = 0) -> str:
    out = tmp_path / "hooks"
    out.mkdir(exist_ok=True)
    script = tmp_path / f"{name}.sh"
    script.write_text(HOOK.format(out=out, status=status))
    script.chmod(0o755)
    return str(script)


def env_of(tmp_path: Path, phase: str) -> dict[str, str]:
    text = (tmp_path / "hooks" / f"{phase}.env").read_text()
    return dict(line.split("=", 1) for line in text.splitlines())


def write_ops_config(
    tmp_path: Path, target: Path, source: Path, receiver: Receiver, before_status: int = 0
) -> Path:
    hooks = {
        "before": [hook(tmp_path, "before", before_status)],
        "after_snapshot": [hook(tmp_path, "after_snapshot")],
        "after_export": [hook(tmp_path, "after_export")],
        "after": [hook(tmp_path, "after")],
        "on_failure": [hook(tmp_path, "on_failure")],
        "timeout": 30,
    }
    inline = ", ".join(f"{key} = {json.dumps(value)}" for key, value in hooks.items())
    config = tmp_path / "gfs.toml"
    config.write_text(
        f"state_dir = {json.dumps(str(tmp_path / 'state'))}\n"
        f'ping_url = "{receiver.url}/run"\n'
        f"[metrics]\ntextfile = {json.dumps(str(tmp_path / 'gfs.prom'))}\n"
        f'[notify]\non = ["failure", "warning", "success"]\n'
        f'[[notify.webhook]]\nurl = "{receiver.url}/hook"\nformat = "json"\n'
        f"[target.usb]\npath = {json.dumps(str(target))}\nrequire_nfs = false\n"
        f'[[job]]\nname = "srv"\nkind = "files"\npath = {json.dumps(str(source))}\n'
        f'ping_url = "{receiver.url}/srv"\nmax_age = "36h"\nhooks = {{ {inline} }}\n'
        f"{CLASSIC_UTC}",
        encoding="utf-8",
    )
    return config


def metrics_of(path: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    families = text_string_to_metric_families(path.read_text())
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in families
        for sample in family.samples
    }


def source_tree(tmp_path: Path) -> Path:
    source = tmp_path / "srv"
    (source / "etc").mkdir(parents=True)
    (source / "etc" / "app.conf").write_text("port = 8080\n")
    return source


def test_a_run_runs_hooks_pings_notifies_and_writes_metrics(
    mounts: Mounter, tmp_path: Path, run_gfs: RunGfs, receiver: Receiver
) -> None:
    target = mounts("tgt", kind="tmpfs", size_mb=32)
    config = write_ops_config(tmp_path, target, source_tree(tmp_path), receiver)
    result = run_gfs("run", "--config", str(config))
    assert result.exit_code == 0, result.output
    (generation,) = listing(run_gfs("list", "--config", str(config), "--json"))

    assert receiver.paths() == ["/run/start", "/srv/start", "/srv", "/hook", "/run"]
    message = json.loads(dict(receiver.requests)["/hook"])
    # a tmpfs target and a live copy are warnings of the job, so of the run
    assert message["severity"] == "warning" and message["exit_code"] == 0
    assert any("not NFS" in warning for warning in message["jobs"][0]["warnings"])
    assert [job["status"] for job in message["jobs"]] == ["ok"]
    assert message["jobs"][0]["generation"] == generation["id"]

    for phase in ("before", "after_snapshot", "after_export", "after"):
        env = env_of(tmp_path, phase)
        assert env["GFS_JOB"] == "srv" and env["GFS_KIND"] == "files"
        assert env["GFS_PHASE"] == phase
    assert env_of(tmp_path, "after_export")["GFS_GENERATION"] == generation["id"]
    assert env_of(tmp_path, "after_export")["GFS_TARGET_PATH"] == generation["path"]
    assert env_of(tmp_path, "after")["GFS_STATUS"] == "ok"
    assert not (tmp_path / "hooks" / "on_failure.env").exists()

    metrics = metrics_of(tmp_path / "gfs.prom")
    job = (("job", "srv"),)
    created = datetime.fromisoformat(generation["created_at"].replace("Z", "+00:00"))
    newest = metrics[("gfs_job_newest_generation_timestamp_seconds", job)]
    assert abs(newest - created.timestamp()) < 1
    assert metrics[("gfs_job_stored_generations", job)] == 1
    assert metrics[("gfs_job_last_run_success", job)] == 1
    assert metrics[("gfs_job_freshness_state", job)] == 0
    assert metrics[("gfs_job_max_age_seconds", job)] == 36 * 3600
    assert metrics[("gfs_run_last_exit_code", ())] == 0
    assert ("gfs_job_last_verify_timestamp_seconds", job) in metrics
    assert ("gfs_job_last_drill_timestamp_seconds", job) not in metrics  # never drilled
    assert os.stat(tmp_path / "gfs.prom").st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("gfs.prom")] == ["gfs.prom"]

    again = run_gfs("metrics", "--config", str(config), "--textfile", str(tmp_path / "x.prom"))
    assert again.exit_code == 0, again.output
    assert metrics_of(tmp_path / "x.prom")[("gfs_run_last_exit_code", ())] == 0


def test_a_failing_before_hook_fails_the_job_before_its_snapshot(
    mounts: Mounter, tmp_path: Path, run_gfs: RunGfs, receiver: Receiver
) -> None:
    target = mounts("tgt", kind="tmpfs", size_mb=32)
    config = write_ops_config(tmp_path, target, source_tree(tmp_path), receiver, 3)
    result = run_gfs("run", "--config", str(config))
    assert result.exit_code == 5, result.output
    assert "hook before" in result.stdout and "exited with status 3" in result.stdout
    assert "no snapshot was taken" in result.stdout
    assert listing(run_gfs("list", "--config", str(config), "--json")) == []
    assert list(target.iterdir()) in ([], [target / "srv"])
    assert not (tmp_path / "hooks" / "after_snapshot.env").exists()
    assert env_of(tmp_path, "on_failure")["GFS_STATUS"] == "failed"
    assert env_of(tmp_path, "after")["GFS_STATUS"] == "failed"
    assert receiver.paths() == ["/run/start", "/srv/start", "/srv/fail", "/hook", "/run/fail"]
    failed = dict(receiver.requests)
    assert b"exited with status 3" in failed["/srv/fail"]
    assert b"exited with status 3" in failed["/run/fail"]  # the log's last lines
    assert json.loads(failed["/hook"])["severity"] == "failure"
    metrics = metrics_of(tmp_path / "gfs.prom")
    assert metrics[("gfs_job_last_run_success", (("job", "srv"),))] == 0
    assert metrics[("gfs_run_last_exit_code", ())] == 5


def test_unreachable_receivers_leave_the_result_alone(
    mounts: Mounter, tmp_path: Path, run_gfs: RunGfs, receiver: Receiver
) -> None:
    target = mounts("tgt", kind="tmpfs", size_mb=32)
    dead = Receiver("http://127.0.0.1:9")  # discard port: connection refused
    config = write_ops_config(tmp_path, target, source_tree(tmp_path), dead)
    result = run_gfs("run", "--config", str(config))
    assert result.exit_code == 0, result.output
    assert "ping http://127.0.0.1:9/srv/start failed" in result.stderr
    assert "notify: webhook[0] (json) http://127.0.0.1:9/... failed" in result.stderr
    assert len(listing(run_gfs("list", "--config", str(config), "--json"))) == 1


def check(run_gfs: RunGfs, config: Path, when: datetime) -> tuple[int, str]:
    with freeze_time(when):
        result = run_gfs("status", "--check", "--config", str(config))
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout  # one line, as a plugin must print
    return result.exit_code, lines[0]


def test_status_check_judges_the_target_as_a_monitoring_plugin(
    mounts: Mounter, tmp_path: Path, run_gfs: RunGfs, receiver: Receiver
) -> None:
    target = mounts("tgt", kind="tmpfs", size_mb=32)
    config = write_ops_config(tmp_path, target, source_tree(tmp_path), receiver)
    code, line = check(run_gfs, config, datetime.now(timezone.utc))
    assert (code, line.split(" - ")[0]) == (2, "GFS CRITICAL"), line
    assert "no verified generation" in line
    assert run_gfs("run", "--config", str(config)).exit_code == 0
    (generation,) = listing(run_gfs("list", "--config", str(config), "--json"))
    made = datetime.fromisoformat(generation["created_at"].replace("Z", "+00:00"))

    code, line = check(run_gfs, config, made + timedelta(hours=1))
    assert code == 0 and line.startswith("GFS OK - 1 job(s) fresh | srv_age=3600s;129600;259200;0")
    code, line = check(run_gfs, config, made + timedelta(hours=40))
    assert code == 1 and line.startswith("GFS WARNING - 1 warning of 1 job(s): srv: newest")
    assert "1d 16h old (max_age 1d 12h)" in line
    code, line = check(run_gfs, config, made + timedelta(hours=80))
    assert code == 2 and line.startswith("GFS CRITICAL"), line

    manifest = Path(generation["path"]) / "manifest.json"
    manifest.chmod(0)
    data = json.loads(manifest.read_text())  # root reads it anyway: damage it instead
    manifest.write_text("{")
    code, line = check(run_gfs, config, made + timedelta(hours=1))
    assert code in (2, 3) and line.split(" - ")[0] in ("GFS CRITICAL", "GFS UNKNOWN"), line
    manifest.write_text(json.dumps(data))

    (tmp_path / "gfs.toml").write_text("this is = not toml [")
    code, line = check(run_gfs, config, made)
    assert code == 3 and line.startswith("GFS UNKNOWN - "), line


def test_a_failed_unit_is_reported_unless_gfs_reported_the_run_itself(
    mounts: Mounter, tmp_path: Path, run_gfs: RunGfs, receiver: Receiver
) -> None:
    """gfs-failure@.service: when gfs was killed before it could report, the unit's
    failure reaches the same channels; right after a run that reported its own failure,
    nothing is sent twice."""
    target = mounts("tgt", kind="tmpfs", size_mb=32)
    config = write_ops_config(tmp_path, target, source_tree(tmp_path), receiver)
    result = run_gfs("notify-failure", "gfs-run.service", "--config", str(config))
    assert result.exit_code == 0, result.output
    assert receiver.paths() == ["/hook", "/run/fail"]
    message = json.loads(dict(receiver.requests)["/hook"])
    assert message["severity"] == "failure"
    assert message["jobs"][0]["job"] == "systemd unit gfs-run.service"
    assert "journal" in message["jobs"][0]["message"]

    receiver.requests.clear()
    failing = write_ops_config(tmp_path, target, source_tree(tmp_path / "b"), receiver, 3)
    assert run_gfs("run", "--config", str(failing)).exit_code == 5
    receiver.requests.clear()
    result = run_gfs("notify-failure", "gfs-run.service", "--config", str(failing))
    assert result.exit_code == 0
    assert receiver.requests == []
    assert "gfs reported the run's exit code 5 itself" in result.stderr


def test_stderr_is_the_journal_when_journal_stream_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with (tmp_path / "stderr").open("w") as stderr:
        monkeypatch.setattr(sys, "stderr", stderr)
        found = os.fstat(stderr.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{found.st_dev}:{found.st_ino}")
        assert progress._stderr_is_journal()
        monkeypatch.setenv("JOURNAL_STREAM", f"{found.st_dev}:{found.st_ino + 1}")
        assert not progress._stderr_is_journal()  # stderr redirected elsewhere by hand
        monkeypatch.delenv("JOURNAL_STREAM")
        assert not progress._stderr_is_journal()


def test_under_systemd_a_run_logs_to_journald_with_the_job_as_a_field(
    mounts: Mounter, tmp_path: Path, run_gfs: RunGfs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With stderr the journal, gfs speaks journald's native protocol (a real datagram
    socket here, standing in for /run/systemd/journal/socket)."""
    journal = Journal(tmp_path / "journal.socket")
    monkeypatch.setattr(progress, "_stderr_is_journal", lambda: True)
    monkeypatch.setattr(progress, "JournalHandler", lambda: JournalHandler(str(journal.path)))
    monkeypatch.setattr(progress, "journal_available", lambda: True)
    target = mounts("tgt", kind="tmpfs", size_mb=32)
    config = write_config(tmp_path, target, "srv", "files", "path", source_tree(tmp_path))
    try:
        result = run_gfs("run", "--config", str(config))
        assert result.exit_code == 0
        records = []
        with contextlib.suppress(TimeoutError):
            while True:
                records.append(journal.read())
    finally:
        journal.socket.close()
    exporting = [r for r in records if r["MESSAGE"].startswith("job srv: exporting to ")]
    assert len(exporting) == 1, records
    assert exporting[0]["GFS_JOB"] == "srv"
    assert exporting[0]["SYSLOG_IDENTIFIER"] == "gfs"
    assert exporting[0]["PRIORITY"] == "6"
    assert result.stderr == ""  # not twice


def test_check_warns_of_channels_that_cannot_work_here(
    mounts: Mounter, tmp_path: Path, run_gfs: RunGfs, receiver: Receiver
) -> None:
    target = mounts("tgt", kind="tmpfs", size_mb=32)
    config = write_ops_config(tmp_path, target, source_tree(tmp_path), receiver)
    text = config.read_text().replace(
        "[[notify.webhook]]",
        '[notify.email]\nto = ["root@localhost"]\nsendmail = "/nonexistent/sendmail"\n'
        "[[notify.webhook]]",
    )
    text = text.replace(str(tmp_path / "gfs.prom"), str(tmp_path / "absent" / "gfs.prom"))
    config.write_text(text)
    (tmp_path / "before.sh").unlink()
    result = run_gfs("check", "--config", str(config))
    assert result.exit_code == 7, result.output
    assert f"warning: metrics: directory {tmp_path / 'absent'} does not exist" in result.stdout
    assert "warning: notify: /nonexistent/sendmail is not an executable" in result.stdout
    assert f"job srv: hook before: {tmp_path / 'before.sh'} is not an executable" in (result.stdout)

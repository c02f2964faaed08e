"""A target whose job directory vanished under a stale NFS handle (or any OSError while
gfs looks at it before the run) fails that job with a message, never the whole run."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from gfs_backup.actions import run as run_module
from gfs_backup.actions.run import RunOptions, exit_code, run_jobs
from gfs_backup.core.config import load_config


def test_an_oserror_before_the_run_fails_only_that_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_path = tmp_path / "gfs.toml"
    config_path.write_text(
        f'state_dir = "{tmp_path / "state"}"\n[target.t]\npath = "{tmp_path}"\n'
        + "".join(
            f'[[job]]\nname = "{name}"\nkind = "files"\npath = "/etc"\npolicy = "classic-gfs"\n'
            for name in ("a", "b")
        )
    )
    config = load_config(config_path)

    def vanished(job: Any, *args: Any) -> datetime:
        if job.name == "a":
            raise FileNotFoundError(2, "No such file or directory", "/mnt/target/a")
        return datetime(2100, 1, 1, tzinfo=timezone.utc)  # b: not due

    monkeypatch.setattr(run_module, "next_due", vanished)
    now = datetime(2026, 12, 6, tzinfo=timezone.utc)
    outcomes = run_jobs(config, config.jobs, lambda: now, RunOptions())
    assert [(o.job, o.status) for o in outcomes] == [("a", "failed"), ("b", "not-due")]
    assert outcomes[0].message == "No such file or directory: /mnt/target/a"
    assert int(exit_code(outcomes)) == 4

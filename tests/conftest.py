"""Shared fixtures: run the `gfs` CLI in-process and check it never shows a traceback."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from gfs_backup.cli import cli

RunGfs = Callable[..., Result]


@pytest.fixture
def run_gfs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> RunGfs:
    """run_gfs(*args, input=None) -> click Result with .exit_code, .stdout, .stderr."""
    monkeypatch.setenv("GFS_CONFIG", str(tmp_path / "absent-gfs.toml"))

    def run(*args: str, input: str | None = None) -> Result:
        result = CliRunner().invoke(cli, list(args), input=input)
        assert "Traceback" not in result.output, result.output
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result

    return run


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path

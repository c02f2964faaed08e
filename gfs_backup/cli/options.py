"""Options shared by several commands."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from gfs_backup.core.config import DEFAULT_CONFIG

F = TypeVar("F", bound=Callable[..., Any])


def config_option(func: F) -> F:
    """--config FILE, default $GFS_CONFIG or /etc/gfs/gfs.toml."""
    default = os.environ.get("GFS_CONFIG", str(DEFAULT_CONFIG))
    return click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        default=default,
        show_default=True,
        help="Main configuration file (targets, hosts, jobs). Env: GFS_CONFIG.",
    )(func)


def json_option(func: F) -> F:
    return click.option(
        "--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of text."
    )(func)

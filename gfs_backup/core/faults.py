"""Crash points for the system tests: `GFS_CRASH_AT=NAME` makes gfs SIGKILL itself there.

This is how the tests prove that a run killed at any step is cleaned up by the next one.
Without the variable these calls do nothing.
"""

from __future__ import annotations

import os
import signal

ENVIRONMENT = "GFS_CRASH_AT"
POINTS = (
    "after-snapshot",
    "after-overlay",
    "mid-export",
    "mid-commit",
    "before-publish",
    "mid-prune",
)


def crash_point(name: str) -> None:
    if os.environ.get(ENVIRONMENT) == name:
        os.kill(os.getpid(), signal.SIGKILL)

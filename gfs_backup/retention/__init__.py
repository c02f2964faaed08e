"""The retention planner: pure functions from generations and rules to a plan."""

from gfs_backup.retention.durations import parse_keep_within
from gfs_backup.retention.model import (
    SEMANTICS,
    Generation,
    KeepWithin,
    Kept,
    Plan,
    RetentionRules,
    Semantics,
)
from gfs_backup.retention.planner import plan

__all__ = [
    "SEMANTICS",
    "Generation",
    "KeepWithin",
    "Kept",
    "Plan",
    "RetentionRules",
    "Semantics",
    "parse_keep_within",
    "plan",
]

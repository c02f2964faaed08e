"""The retention planner: pure functions from generations, rules and `now` to a plan with a
reason for every kept generation. Imports only the standard library and dateutil."""

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

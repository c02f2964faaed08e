"""Small views of a Plan shared by the planner tests."""

from __future__ import annotations

from gfs_backup.retention import Plan


def reasons(result: Plan) -> dict[str, tuple[str, ...]]:
    return {kept.generation.id: kept.reasons for kept in result.keep}


def kept_ids(result: Plan) -> list[str]:
    return [kept.generation.id for kept in result.keep]


def pruned_ids(result: Plan) -> list[str]:
    return [gen.id for gen in result.prune]

"""Value types of the retention planner: generations, rules, and the plan it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

Semantics = Literal["gfs", "pbs", "borg", "restic"]
SEMANTICS: tuple[Semantics, ...] = ("gfs", "pbs", "borg", "restic")

UNLIMITED = -1

# Calendar role labels, from the classic schema; a generation may hold several.
SON, FATHER, GRANDFATHER, YEARLY = "son", "father", "grandfather", "yearly"
LABEL_ORDER = (YEARLY, GRANDFATHER, FATHER, SON)

# Reasons that are not calendar rules.
REASON_PROTECTED = "protected"
REASON_NEWEST = "newest"

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@dataclass(frozen=True, slots=True)
class Generation:
    """One generation (or any timestamped item) to plan for.

    `time` must be timezone-aware; `id` only needs to be unique for the caller.
    """

    id: str
    time: datetime
    protected: bool = False


@dataclass(frozen=True)
class KeepWithin:
    """A keep-within duration as the selected tool reads it.

    borg: a fixed number of seconds (its `1m` is 31 days); restic: calendar parts applied
    with Go's AddDate (so `1m` is one calendar month) plus hours.
    """

    text: str
    seconds: int = 0
    years: int = 0
    months: int = 0
    days: int = 0
    hours: int = 0


@dataclass(frozen=True)
class RetentionRules:
    """What to keep. Counts: 0 = rule off, -1 = unlimited, N = the N newest periods.

    `gfs` uses sons/fathers/grandfathers/yearly and `father_weekday` (0 = Monday);
    `pbs`, `borg` and `restic` use the keep_* counts and, except pbs, `keep_within`.
    """

    semantics: Semantics = "gfs"
    sons: int = 0
    fathers: int = 0
    grandfathers: int = 0
    yearly: int = 0
    father_weekday: int = 0
    keep_last: int = 0
    keep_hourly: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0
    keep_yearly: int = 0
    keep_within: KeepWithin | None = None

    def keeps_something(self) -> bool:
        """False for an all-zero policy, which would prune every generation."""
        counts: tuple[int, ...]
        if self.semantics == "gfs":
            counts = (self.sons, self.fathers, self.grandfathers, self.yearly)
        else:
            counts = (
                self.keep_last,
                self.keep_hourly,
                self.keep_daily,
                self.keep_weekly,
                self.keep_monthly,
                self.keep_yearly,
            )
        return any(counts) or (self.semantics != "gfs" and self.keep_within is not None)


@dataclass(frozen=True)
class Kept:
    """A kept generation with every rule that keeps it and its calendar labels."""

    generation: Generation
    reasons: tuple[str, ...]
    labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    """The planner's answer: `keep` and `prune`, both newest first, together all inputs."""

    keep: list[Kept] = field(default_factory=list)
    prune: list[Generation] = field(default_factory=list)

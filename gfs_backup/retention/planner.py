"""plan(generations, rules, now, zone) -> Plan: pure, no clock, no I/O.

Common to every semantics: protected generations are kept and never counted, and the
newest unprotected generation is never pruned (reason `newest` when no rule keeps it, e.g.
borg's keep-within alone, or gfs fathers only while the newest is not a father).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timezone, tzinfo
from operator import itemgetter

from gfs_backup.retention.calendar import Timeline
from gfs_backup.retention.classic import classic_keep
from gfs_backup.retention.keep_rules import borg_keep, pbs_keep, restic_keep
from gfs_backup.retention.model import (
    FATHER,
    GRANDFATHER,
    LABEL_ORDER,
    REASON_NEWEST,
    REASON_PROTECTED,
    SON,
    YEARLY,
    Generation,
    Kept,
    Plan,
    RetentionRules,
)

# The calendar label a keep-* rule gives, so every semantics labels its generations.
_RULE_LABELS = {
    "keep-daily": SON,
    "keep-weekly": FATHER,
    "keep-monthly": GRANDFATHER,
    "keep-yearly": YEARLY,
}


def plan(
    generations: Iterable[Generation], rules: RetentionRules, now: datetime, zone: tzinfo
) -> Plan:
    """Decide keep/prune for `generations` under `rules`.

    `now` (aware) matters only to keep-within (borg: from now; restic: from the newest
    generation before now); `zone` is where calendar periods are counted. Generations
    with equal times stay distinct; among them the input order counts as newest first.
    Raises ValueError if a time or `now` is naive.
    """
    if now.tzinfo is None:
        raise ValueError("plan() needs an aware `now`")
    items = [(_utc_of(gen), gen) for gen in generations]
    # Sorting on UTC times is several times faster than on datetimes with mixed tzinfos.
    items.sort(key=itemgetter(0), reverse=True)
    ordered = [gen for _, gen in items]
    utc = [stamp for stamp, gen in items if not gen.protected]
    timeline = Timeline(utc, zone)
    labels: dict[int, list[str]] | None = None
    if rules.semantics == "gfs":
        reasons, labels = classic_keep(list(timeline.locals()), rules)
    elif rules.semantics == "pbs":
        reasons = pbs_keep(timeline, rules)
    elif rules.semantics == "borg":
        reasons = borg_keep(timeline, rules, now)
    else:
        reasons = restic_keep(timeline, rules, now)
    if utc and 0 not in reasons:
        reasons[0] = [REASON_NEWEST]
    return _assemble(ordered, reasons, labels)


def _utc_of(gen: Generation) -> datetime:
    if gen.time.tzinfo is None:
        raise ValueError(f"generation {gen.id!r} has a naive time")
    return gen.time.astimezone(timezone.utc)


def _assemble(
    ordered: list[Generation],
    reasons: dict[int, list[str]],
    labels: dict[int, list[str]] | None,
) -> Plan:
    """Split `ordered` into keep/prune; `reasons`/`labels` index the unprotected ones."""
    result = Plan()
    index = 0
    for gen in ordered:
        if gen.protected:
            result.keep.append(Kept(gen, (REASON_PROTECTED,)))
            continue
        why = reasons.get(index)
        if why is None:
            result.prune.append(gen)
        else:
            own = labels.get(index, ()) if labels is not None else _labels_from_reasons(why)
            result.keep.append(Kept(gen, tuple(why), _ordered_labels(own)))
        index += 1
    return result


def _labels_from_reasons(reasons: list[str]) -> list[str]:
    bare = (reason.split("[")[0] for reason in reasons)
    return [_RULE_LABELS[r] for r in bare if r in _RULE_LABELS]


def _ordered_labels(labels: Iterable[str]) -> tuple[str, ...]:
    present = set(labels)
    return tuple(label for label in LABEL_ORDER if label in present)

"""plan(generations, rules, now, zone) -> Plan: pure, no clock, no I/O.

Common to every semantics: protected generations are kept and never counted, and the
newest unprotected generation is never pruned (reason `newest` when no rule keeps it; only
borg's keep-within alone can leave it unkept).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, tzinfo

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
    ordered = sorted(generations, key=_time_of, reverse=True)
    protected = [gen for gen in ordered if gen.protected]
    gens = [gen for gen in ordered if not gen.protected]
    local = [gen.time.astimezone(zone) for gen in gens]
    labels: list[list[str]] | None = None
    if rules.semantics == "gfs":
        reasons, labels = classic_keep(gens, local, rules)
    elif rules.semantics == "pbs":
        reasons = pbs_keep(gens, local, rules)
    elif rules.semantics == "borg":
        reasons = borg_keep(gens, local, rules, now)
    else:
        reasons = restic_keep(gens, local, rules, now, zone)
    if gens and 0 not in reasons:
        reasons[0] = [REASON_NEWEST]
    return _assemble(ordered, protected, gens, reasons, labels)


def _time_of(gen: Generation) -> datetime:
    if gen.time.tzinfo is None:
        raise ValueError(f"generation {gen.id!r} has a naive time")
    return gen.time


def _assemble(
    ordered: list[Generation],
    protected: list[Generation],
    gens: list[Generation],
    reasons: dict[int, list[str]],
    labels: list[list[str]] | None,
) -> Plan:
    decided: dict[int, Kept] = {id(gen): Kept(gen, (REASON_PROTECTED,)) for gen in protected}
    prune_ids: set[int] = set()
    for index, gen in enumerate(gens):
        why = reasons.get(index)
        if why is None:
            prune_ids.add(id(gen))
            continue
        own = labels[index] if labels is not None else _labels_from_reasons(why)
        decided[id(gen)] = Kept(gen, tuple(why), _ordered_labels(own))
    result = Plan()
    for gen in ordered:
        if id(gen) in prune_ids:
            result.prune.append(gen)
        else:
            result.keep.append(decided[id(gen)])
    return result


def _labels_from_reasons(reasons: list[str]) -> list[str]:
    bare = (reason.split("[")[0] for reason in reasons)
    return [_RULE_LABELS[r] for r in bare if r in _RULE_LABELS]


def _ordered_labels(labels: Iterable[str]) -> tuple[str, ...]:
    present = set(labels)
    return tuple(label for label in LABEL_ORDER if label in present)

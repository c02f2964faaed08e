"""Policies: rotation/retention rules, schedules and verify/drill cadence, from TOML.

A policy file (`policies/NAME.toml`, or an inline `policy` table of a job):

    description = "..."
    semantics = "gfs"            # gfs | pbs | borg | restic
    timezone = "local"           # IANA name; "local" = the host's zone
    schedule = "Mon..Sat 01:00"  # when `gfs run` exports a generation
    [retention]                  # gfs: sons, fathers, grandfathers, yearly, father-weekday
                                 # pbs/borg/restic: keep-last ... keep-yearly, keep-within
    [snapshots]                  # optional local snapshots, never counted as backups
    schedule = "hourly"
    keep = 24
    [verify]
    after_export = true
    schedule = "Sun 05:00"
    [drill]                      # restore drills (`gfs drill`), see DrillSettings
    schedule = "monthly"         # scheduled after `gfs run` of the job
    select = "grandfather"       # newest | son | father | grandfather | yearly
    console = "login:"           # VM: a regular expression on the serial console
    agent = false                # VM: the guest agent must answer guest-ping
    timeout = "5m"               # VM: seconds, or a number with s, m or h
    commands = [["pg_isready"]]  # VM: run in the guest by its agent (guest-exec): exit 0
    ports = [22, 5432]           # VM: guest TCP ports that must accept, through a restricted
                                 # user-mode network (DHCP on the guest's first NIC)
    memory = 1024                # VM: MiB cap (the domain's memory if smaller)
    accel = "auto"               # VM: auto (KVM when a probe runs guest code under it, else
                                 # TCG with the timeout x 3), tcg or kvm
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import tzinfo
from importlib import resources
from pathlib import Path
from typing import Any

from gfs_backup.core.errors import InputError, Problem
from gfs_backup.core.schedule import Schedule, parse_schedule
from gfs_backup.core.timeutil import resolve_zone
from gfs_backup.core.validate import Collector, Table, join_key, read_toml
from gfs_backup.retention import SEMANTICS, RetentionRules, Semantics, parse_keep_within
from gfs_backup.retention.model import WEEKDAYS, KeepWithin

GFS_COUNT_KEYS = ("sons", "fathers", "grandfathers", "yearly")
GFS_KEYS = (*GFS_COUNT_KEYS, "father-weekday")
KEEP_COUNT_KEYS = (
    "keep-last",
    "keep-hourly",
    "keep-daily",
    "keep-weekly",
    "keep-monthly",
    "keep-yearly",
)
KEEP_KEYS = (*KEEP_COUNT_KEYS, "keep-within")
POLICY_KEYS = (
    "description",
    "semantics",
    "timezone",
    "schedule",
    "retention",
    "snapshots",
    "verify",
    "drill",
)
DRILL_KEYS = (
    "schedule",
    "select",
    "console",
    "agent",
    "timeout",
    "memory",
    "accel",
    "commands",
    "ports",
)
DRILL_SELECT = ("newest", "son", "father", "grandfather", "yearly")
DRILL_ACCEL = ("auto", "tcg", "kvm")
TCG_TIMEOUT_FACTOR = 3  # accel = "auto" fell back to TCG: emulation boots slower
DEFAULT_DRILL_CONSOLE = "login:"
_DURATION_RE = re.compile(r"(\d+)\s*([smhdw]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SYSTEM_POLICY_DIR = Path("/etc/gfs/policies")


@dataclass(frozen=True)
class DrillSettings:
    """How `gfs drill` checks a VM generation and which generation a scheduled drill picks.

    Without `console` and `agent`, a VM drill waits for DEFAULT_DRILL_CONSOLE (the `login:`
    prompt of a getty on the serial console); `console` and `agent` together: both must pass.
    """

    select: str = "newest"
    console: str | None = None
    agent: bool = False
    timeout: float = 300.0
    memory_mib: int = 1024
    accel: str = "auto"
    # Run in the booted guest by its agent (guest-exec), each must exit 0.
    commands: tuple[tuple[str, ...], ...] = ()
    # Guest TCP ports that must accept a connection through the drill's restricted network.
    ports: tuple[int, ...] = ()

    @property
    def console_pattern(self) -> str | None:
        """The console regular expression the drill waits for (None: agent only)."""
        if self.console is None and not self.agent:
            return DEFAULT_DRILL_CONSOLE
        return self.console

    def describe(self) -> str:
        """The check in a few words, e.g. `console /login:/ + agent ping`."""
        parts = []
        if self.console_pattern is not None:
            parts.append(f"console /{self.console_pattern}/")
        if self.agent:
            parts.append("agent ping")
        if self.commands:
            parts.append(f"{len(self.commands)} command(s)")
        if self.ports:
            parts.append(f"port(s) {', '.join(map(str, self.ports))}")
        return " + ".join(parts)


@dataclass(frozen=True)
class Policy:
    """A validated policy. `zone` is resolved from `timezone`."""

    name: str
    source: str
    description: str
    rules: RetentionRules
    timezone: str
    zone: tzinfo
    schedule: Schedule
    snapshot_schedule: Schedule | None = None
    keep_snapshots: int = 0
    verify_after_export: bool = True
    verify_schedule: Schedule | None = None
    drill_schedule: Schedule | None = None
    drill: DrillSettings = DrillSettings()


def build_rules(
    semantics: Semantics, values: Mapping[str, Any], collector: Collector, path: str
) -> RetentionRules:
    """RetentionRules from `values` keyed like a [retention] table; problems go to collector."""
    family, other = (GFS_KEYS, KEEP_KEYS) if semantics == "gfs" else (KEEP_KEYS, GFS_KEYS)
    problems_before = len(collector.problems)
    for key in values:
        if key in other:
            collector.add(join_key(path, key), _family_hint(key, semantics))
        elif semantics == "pbs" and key == "keep-within":
            collector.add(
                join_key(path, key),
                "Proxmox (pbs semantics) has no keep-within; "
                "use borg or restic semantics, or keep-hourly/keep-daily",
            )
        elif key not in family:
            allowed = [k for k in family if semantics != "pbs" or k != "keep-within"]
            collector.add(
                join_key(path, key),
                f"unknown rule for {semantics} semantics (allowed: {', '.join(allowed)})",
            )
    counts: dict[str, Any] = {
        key.replace("-", "_"): collector.count(values, key, path)
        for key in family
        if key not in ("father-weekday", "keep-within")
    }
    weekday = 0
    within: KeepWithin | None = None
    if semantics == "gfs":
        weekday = collector.convert(values, "father-weekday", path, _weekday, 0)
    elif semantics != "pbs":
        within = collector.convert(
            values, "keep-within", path, lambda text: parse_keep_within(text, semantics), None
        )
    rules = replace(RetentionRules(semantics, father_weekday=weekday, keep_within=within), **counts)
    if not rules.keeps_something() and len(collector.problems) == problems_before:
        collector.add(
            path or "retention",
            "keeps nothing: every generation would be pruned; "
            "set at least one rule above 0 (or -1 for unlimited)",
        )
    return rules


def _family_hint(key: str, semantics: Semantics) -> str:
    if semantics == "gfs":
        return (
            f"{key} is a rule of pbs, borg and restic semantics; gfs semantics uses "
            "sons, fathers, grandfathers, yearly (or set semantics)"
        )
    return f"{key} is a rule of gfs semantics; {semantics} uses keep-last ... keep-yearly"


def _weekday(text: str) -> int:
    name = text.strip().lower()[:3]
    if name not in WEEKDAYS or len(text.strip()) < 3:
        raise ValueError(f"unknown weekday {text!r}: use mon, tue, wed, thu, fri, sat or sun")
    return WEEKDAYS.index(name)


def _semantics(text: str) -> Semantics:
    for known in SEMANTICS:
        if text == known:
            return known
    raise ValueError(f"unknown semantics {text!r} (allowed: {', '.join(SEMANTICS)})")


def policy_from_table(
    table: Table,
    name: str,
    collector: Collector,
    path: str = "",
) -> Policy:
    """Validate a policy table (file or inline); every problem goes to `collector`."""
    collector.unknown_keys(table, POLICY_KEYS, path)
    description = collector.get(table, "description", path, str, "", "a string")
    semantics: Semantics = collector.convert(table, "semantics", path, _semantics, "gfs")
    tz_name = collector.get(table, "timezone", path, str, "local", "a string")
    zone = collector.convert(table, "timezone", path, resolve_zone, resolve_zone("UTC"))
    schedule = collector.convert(table, "schedule", path, parse_schedule, parse_schedule("daily"))
    retention_path = join_key(path, "retention")
    retention = collector.get(table, "retention", path, dict, None, "a table")
    if retention is None:
        if "retention" not in table:
            collector.add(retention_path, "missing: a policy needs a [retention] table")
        rules = RetentionRules(semantics)
    else:
        rules = build_rules(semantics, retention, collector, retention_path)
    snapshots = _sub_table(table, "snapshots", ("schedule", "keep"), collector, path)
    verify = _sub_table(table, "verify", ("after_export", "schedule"), collector, path)
    drill = _sub_table(table, "drill", DRILL_KEYS, collector, path)
    return Policy(
        name=name,
        source=collector.source,
        description=description,
        rules=rules,
        timezone=tz_name,
        zone=zone,
        schedule=schedule,
        snapshot_schedule=_optional_schedule(snapshots, collector, join_key(path, "snapshots")),
        keep_snapshots=collector.count(snapshots, "keep", join_key(path, "snapshots")),
        verify_after_export=collector.get(
            verify, "after_export", join_key(path, "verify"), bool, True, "true or false"
        ),
        verify_schedule=_optional_schedule(verify, collector, join_key(path, "verify")),
        drill_schedule=_optional_schedule(drill, collector, join_key(path, "drill")),
        drill=drill_settings(drill, collector, join_key(path, "drill")),
    )


def drill_settings(table: Table, collector: Collector, path: str) -> DrillSettings:
    """Validate the [drill] keys other than `schedule`; problems go to `collector`."""
    default = DrillSettings()
    select = collector.convert(table, "select", path, _choice(DRILL_SELECT), default.select)
    accel = collector.convert(table, "accel", path, _choice(DRILL_ACCEL), default.accel)
    console = collector.convert(table, "console", path, _regex, None)
    agent = collector.get(table, "agent", path, bool, False, "true or false")
    memory = collector.get(table, "memory", path, int, default.memory_mib, "MiB as an integer")
    if not 64 <= memory <= 1 << 20:
        collector.add(join_key(path, "memory"), f"{memory} MiB is not allowed: use 64 or more")
        memory = default.memory_mib
    timeout = default.timeout
    if "timeout" in table:
        value = table["timeout"]
        try:
            timeout = parse_drill_timeout(value)
        except ValueError as exc:
            collector.add(join_key(path, "timeout"), str(exc))
    commands = drill_commands(table.get("commands", []), join_key(path, "commands"), collector)
    ports = drill_ports(table.get("ports", []), join_key(path, "ports"), collector)
    return DrillSettings(select, console, agent, timeout, memory, accel, commands, ports)


def drill_commands(value: object, key: str, collector: Collector) -> tuple[tuple[str, ...], ...]:
    """`commands`: a list of argv lists (no shell), e.g. [["pg_isready", "-q"]]."""
    example = 'e.g. [["systemctl", "is-active", "postgresql"]]'
    if not isinstance(value, list):
        collector.add(key, f"expected a list of argv lists, {example}")
        return ()
    found = []
    for index, argv in enumerate(value):
        if (
            not isinstance(argv, list)
            or not argv
            or not all(isinstance(item, str) and item for item in argv)
        ):
            collector.add(f"{key}[{index}]", f"expected a non-empty list of strings, {example}")
            continue
        found.append(tuple(argv))
    return tuple(found)


def drill_ports(value: object, key: str, collector: Collector) -> tuple[int, ...]:
    """`ports`: guest TCP ports, e.g. [22, 5432]."""
    if not isinstance(value, list) or not all(
        isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536 for port in value
    ):
        collector.add(key, "expected a list of TCP port numbers (1-65535), e.g. [22, 5432]")
        return ()
    return tuple(value)


def parse_duration(value: object) -> int:
    """Seconds from an integer or a string like `90`, `90s`, `5m`, `1h`, `30d`, `2w`."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and (match := _DURATION_RE.fullmatch(value.strip())):
        return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    raise ValueError(f"expected seconds or a duration such as '5m', '90s' or '30d', got {value!r}")


def parse_drill_timeout(value: object) -> float:
    """Seconds from an integer or a string like `90`, `90s`, `5m`, `1h` (10 s to 24 h)."""
    seconds = parse_duration(value)
    if not 10 <= seconds <= 86400:
        raise ValueError(f"{seconds} s is not allowed: use 10 s to 24 h")
    return float(seconds)


def _choice(allowed: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in allowed:
            raise ValueError(f"unknown value {text!r} (allowed: {', '.join(allowed)})")
        return text

    return parse


def _regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression: {exc}") from None
    if not text:
        raise ValueError("an empty regular expression matches anything: give a marker")
    return text


def _sub_table(
    table: Table, key: str, allowed: Iterable[str], collector: Collector, path: str
) -> Table:
    sub: Table = collector.get(table, key, path, dict, {}, "a table")
    collector.unknown_keys(sub, allowed, join_key(path, key))
    return sub


def _optional_schedule(table: Table, collector: Collector, path: str) -> Schedule | None:
    parse: Callable[[str], Schedule | None] = parse_schedule
    return collector.convert(table, "schedule", path, parse, None)


def load_policy_file(path: Path, name: str | None = None) -> Policy:
    """Load and validate one policy file. Raises InputError listing every problem."""
    collector = Collector(str(path))
    policy = policy_from_table(read_toml(path), name or path.stem, collector)
    collector.raise_if_any()
    return policy


def shipped_policy_paths() -> dict[str, Path]:
    """The policies that ship with gfs, by name."""
    folder = resources.files("gfs_backup.policies")
    return {
        Path(item.name).stem: Path(str(item))
        for item in folder.iterdir()
        if item.name.endswith(".toml")
    }


def find_policy(name: str, search_dirs: Iterable[Path] = ()) -> Path:
    """Resolve a policy name (or a path to a .toml file) to its file.

    Looks in `search_dirs`, then /etc/gfs/policies, then the shipped policies.
    Raises InputError naming the known policies when there is none.
    """
    if "/" in name or name.endswith(".toml"):
        return Path(name)
    if not NAME_RE.fullmatch(name):
        raise InputError(
            Problem(
                "",
                f"invalid policy name {name!r}: use letters, digits, "
                "'.', '_' and '-', or a path to a .toml file",
            )
        )
    for folder in (*search_dirs, SYSTEM_POLICY_DIR):
        candidate = folder / f"{name}.toml"
        if candidate.is_file():
            return candidate
    shipped = shipped_policy_paths()
    if name in shipped:
        return shipped[name]
    known = ", ".join(sorted(shipped))
    raise InputError(
        Problem(
            "",
            f"unknown policy {name!r}: put {name}.toml in "
            f"{SYSTEM_POLICY_DIR} or use a shipped one ({known})",
        )
    )

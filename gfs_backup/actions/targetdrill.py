"""`gfs drill --target PATH`: restore drills that need only the backup target.

For a CI runner that mounts the share (read-only is enough): no configuration, no state
database, no lock, no libvirt. Jobs are the directories under PATH holding generations;
their manifests are untrusted input, read and validated by the catalog as a restore reads
them. A VM's check comes from its generation (`drill_check`, the policy's [drill] keys at
export time), overridden by flags. Nothing under PATH is written unless `record` is asked
for; the scratch directory (with a throw-away state database for the drill's own journal)
is removed at the end, also on SIGTERM.

VM generations drill as any user who can read their images (`[target] read_group`);
files, btrfs and lvm generations keep their sources' owners and modes, so their drills
need root or CAP_DAC_READ_SEARCH: without, they are errors saying so, never skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from gfs_backup.actions.drill import DrillResult, drill_locked, select_labelled
from gfs_backup.core.config import Job
from gfs_backup.core.errors import InputError, Problem
from gfs_backup.core.policy import (
    DRILL_ACCEL,
    NAME_RE,
    DrillSettings,
    Policy,
    drill_commands,
    drill_ports,
    policy_from_table,
)
from gfs_backup.core.state import State
from gfs_backup.core.validate import Collector
from gfs_backup.target.catalog import Stored, list_generations
from gfs_backup.target.manifest import MANIFEST

DEFAULT_SCRATCH = Path(os.environ.get("TMPDIR", "/var/tmp"))
ROOT_ONLY_KINDS = ("files", "btrfs", "lvm")
CAP_DAC_READ_SEARCH = 2


@dataclass(frozen=True)
class TargetDrill:
    """What `gfs drill --target` was asked: where, which jobs and generations, how."""

    root: Path
    jobs: tuple[str, ...] = ()
    all_jobs: bool = False
    select: str = "newest"
    generation: str | None = None
    scratch: Path = DEFAULT_SCRATCH
    console: str | None = None
    agent: bool | None = None
    timeout: float | None = None
    memory_mib: int | None = None
    accel: str | None = None
    record: bool = False
    commands: tuple[tuple[str, ...], ...] | None = None  # replace the generation's
    ports: tuple[int, ...] | None = None


def job_names(request: TargetDrill) -> list[str]:
    """The job directories to drill: those named, or with `all_jobs` every directory under
    the root that holds a generation. InputError for a name that is not there."""
    root = request.root
    if not root.is_dir():
        raise InputError(Problem("--target", f"{root} is not a directory (is the share mounted?)"))
    if request.jobs:
        missing = [name for name in request.jobs if not (root / name).is_dir()]
        if missing:
            raise InputError(Problem("--target", f"no job {', '.join(missing)} under {root}"))
        return list(request.jobs)
    if not request.all_jobs:
        raise InputError(Problem("JOB", "name the jobs to drill, or --all-jobs"))
    return [
        entry.name
        for entry in sorted(root.iterdir())
        if entry.is_dir() and NAME_RE.fullmatch(entry.name) and _holds_generations(entry)
    ]


def _holds_generations(job_dir: Path) -> bool:
    """Whether `job_dir` has a generation directory (its manifest may be unreadable here:
    a generation this user may not read is still one to report)."""
    try:
        return any(child.is_dir() and not child.name.startswith(".") for child in job_dir.iterdir())
    except OSError:
        return False


def privileged() -> bool:
    """Root, or CAP_DAC_READ_SEARCH in the effective set (reads any file)."""
    if os.geteuid() == 0:
        return True
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return False
    found = re.search(r"^CapEff:\s*([0-9a-f]+)$", status, re.MULTILINE)
    return bool(found and int(found.group(1), 16) & (1 << CAP_DAC_READ_SEARCH))


def settings_for(stored: Stored, request: TargetDrill) -> DrillSettings:
    """The generation's drill check (validated: a manifest is untrusted), then the flags."""
    saved = stored.manifest.drill_check
    where = f"{stored.path / MANIFEST}: drill_check"
    settings = DrillSettings()
    console = saved.get("console")
    if console is not None:
        if not isinstance(console, str) or not _compiles(console):
            raise InputError(Problem(where, "console is not a regular expression"))
        settings = replace(settings, console=console)
    agent = saved.get("agent", False)
    timeout = saved.get("timeout", settings.timeout)
    memory = saved.get("memory", settings.memory_mib)
    accel = saved.get("accel", settings.accel)
    if not isinstance(agent, bool):
        raise InputError(Problem(where, "agent is not true or false"))
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise InputError(Problem(where, "timeout is not a number"))
    if not 10 <= timeout <= 86400:
        raise InputError(Problem(where, f"timeout {timeout} is not 10 s to 24 h"))
    if isinstance(memory, bool) or not isinstance(memory, int) or not 64 <= memory <= 65536:
        raise InputError(Problem(where, "memory is not 64 to 65536 MiB"))
    if accel not in DRILL_ACCEL:
        raise InputError(Problem(where, f"accel {accel!r} is not one of {DRILL_ACCEL}"))
    checked = Collector(where)
    commands = drill_commands(saved.get("commands", []), "commands", checked)
    ports = drill_ports(saved.get("ports", []), "ports", checked)
    checked.raise_if_any()
    settings = replace(
        settings,
        agent=agent,
        timeout=float(timeout),
        memory_mib=memory,
        accel=str(accel),
        commands=commands,
        ports=ports,
    )
    flags: dict[str, Any] = {
        "console": request.console,
        "agent": request.agent,
        "timeout": request.timeout,
        "memory_mib": request.memory_mib,
        "accel": request.accel,
        "commands": request.commands,
        "ports": request.ports,
    }
    return replace(settings, **{key: value for key, value in flags.items() if value is not None})


def _compiles(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


def _policy(settings: DrillSettings) -> Policy:
    """A policy holding only the drill's settings (a target drill has no retention)."""
    collector = Collector("--target")
    table = {"semantics": "restic", "schedule": "daily", "retention": {"keep-last": 1}}
    policy = policy_from_table(table, "target-drill", collector)
    collector.raise_if_any()
    return replace(policy, drill=settings)


def pick(stored: list[Stored], request: TargetDrill) -> Stored | None:
    if request.generation is not None:
        return next((item for item in stored if item.id == request.generation), None)
    return select_labelled(stored, request.select)


def error_result(job: str, generation: str, reason: str, now: datetime) -> DrillResult:
    return DrillResult(job, generation, False, "drill", reason, 0.0, now, error=True)


def drill_target(request: TargetDrill, now: datetime) -> list[DrillResult]:
    """Drill the selected generation of each job under the target; one result each (an
    error result when the drill could not run)."""
    if not request.scratch.is_dir():
        raise InputError(Problem("--scratch", f"{request.scratch} is not a directory"))
    results = []
    for name in job_names(request):
        listing = list_generations(request.root / name)
        chosen = pick(listing.stored, request)
        denied = [p for p in listing.problems if "Permission denied" in str(p)]
        if chosen is None and denied and not privileged():
            results.append(
                error_result(
                    name,
                    request.generation or request.select,
                    "its generations are not readable by this user: VM generations are "
                    "readable by the target's read_group; files, btrfs and lvm generations "
                    "keep their sources' owners and modes: drilling them needs root or "
                    "CAP_DAC_READ_SEARCH (run this drill as root)",
                    now,
                )
            )
            continue
        if chosen is None:
            why = "; ".join(str(problem) for problem in listing.problems[:3])
            wanted = request.generation or request.select
            results.append(
                error_result(name, wanted, f"no {wanted} generation to drill {why}".strip(), now)
            )
            continue
        kind = chosen.manifest.kind
        if kind in ROOT_ONLY_KINDS and not privileged():
            results.append(
                error_result(
                    name,
                    chosen.id,
                    f"{kind} generations keep their sources' owners and modes: drilling "
                    "them needs root or CAP_DAC_READ_SEARCH (run this drill as root)",
                    now,
                )
            )
            continue
        try:
            settings = settings_for(chosen, request)
        except InputError as exc:
            results.append(error_result(name, chosen.id, str(exc), now))
            continue
        job = Job(name, kind, "local", "target", _policy(settings), {})
        results.append(_drill_one(job, chosen, request, now))
    return results


def _drill_one(job: Job, stored: Stored, request: TargetDrill, now: datetime) -> DrillResult:
    state_dir = Path(tempfile.mkdtemp(prefix=".gfs-drill-state-", dir=request.scratch))
    try:
        state = State(state_dir)
        try:
            record = "beside" if request.record else ""
            return drill_locked(job, stored, request.scratch, state, now, record=record)
        finally:
            state.close()
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)

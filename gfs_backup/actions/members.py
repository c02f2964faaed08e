"""The domains a libvirt job with `domains` patterns backs up, one history per domain.

Layout on the target (defined once, for pattern jobs and for clusters alike):

    <target>/<job>/<domain name>--<UUID>/<generation>/manifest.json

The directory is found by the UUID (its last 36 characters); the name part is the domain's
name (characters other than letters, digits and `._+-` as `_`) so that a human finds it.
When a domain is renamed, the next run renames its directory under the member's lock and
the new generation's manifest records `renamed_from`: the history goes on. A new domain
that reuses an old name has another UUID, so it starts its own history beside the old
one (with a warning). A domain that disappears keeps its directory and generations: runs
no longer prune it (`gfs forget JOB DOMAIN` deletes it, on confirmation).

A single-domain job (`domain = "web01"`) keeps its generations directly in `<target>/<job>/`.

Each selected domain runs as a member job (see `Job`): named `JOB@UUID` in the state
database and locks, shown as `JOB/DOMAIN`.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path

from gfs_backup.actions.targets import job_location
from gfs_backup.backends.libvirt import libvirt_uri
from gfs_backup.core.config import Config, Job
from gfs_backup.core.errors import GfsError, InputError, Problem
from gfs_backup.core.lock import job_lock
from gfs_backup.core.state import State
from gfs_backup.target.catalog import list_generations
from gfs_backup.target.checks import check_target
from gfs_backup.target.fs import TargetFS
from gfs_backup.target.generation import delete_generation
from gfs_backup.tools.domainxml import gfs_metadata, opted_out
from gfs_backup.tools.virt import DomainInfo
from gfs_backup.tools.virt import list_domains as virt_domains
from gfs_backup.transport.ssh import runner_for

SEPARATOR = "--"
UUID_LENGTH = 36
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# Keys of the configured job that select domains: a member has none of them.
SELECTION_KEYS = ("domains", "exclude", "include_restored", "max_parallel")


def history_name(domain: str, uuid: str) -> str:
    """`<name>--<uuid>`: the directory of a domain's generations inside its job's."""
    safe = re.sub(r"[^A-Za-z0-9._+-]", "_", domain)[:150] or "_"
    if safe.startswith("."):  # dot-names are gfs's own temporary entries
        safe = "_" + safe[1:]
    return f"{safe}{SEPARATOR}{uuid.lower()}"


def parse_history(name: str) -> tuple[str, str] | None:
    """(name part, UUID) of a history directory's name; None for anything else."""
    cut = len(name) - UUID_LENGTH - len(SEPARATOR)
    if cut < 1 or name[cut : cut + len(SEPARATOR)] != SEPARATOR:
        return None
    uuid = name[-UUID_LENGTH:]
    return (name[:cut], uuid) if UUID_RE.fullmatch(uuid) else None


def member(job: Job, domain: str, uuid: str, history: str) -> Job:
    """The member job of `job` that backs up one domain into its history `history`."""
    options = {key: value for key, value in job.options.items() if key not in SELECTION_KEYS}
    options.update(domain=domain, uuid=uuid, history=history)
    return Job(f"{job.name}@{uuid}", job.kind, job.host, job.target, job.policy, options, job.name)


@dataclass(frozen=True)
class History:
    """A history directory found on the target."""

    directory: str
    name: str  # the name part (the domain's name when last backed up)
    uuid: str


def histories(config: Config, job: Job) -> list[History]:
    """The domain histories in the job's directory on its target, by name."""
    job_dir, fs = job_location(config, job)
    found = []
    for entry in fs.entries(job_dir):
        parsed = parse_history(entry.name) if entry.kind == "d" else None
        if parsed is not None:
            found.append(History(entry.name, *parsed))
    return sorted(found, key=lambda history: (history.name, history.uuid))


def stored_members(config: Config, job: Job) -> list[Job]:
    """A member per history on the target (for list, status, verify, restore, drill...)."""
    return [member(job, h.name, h.uuid, h.directory) for h in histories(config, job)]


@dataclass
class Selection:
    """What a run of a pattern job does with the host's domains."""

    members: list[Job] = field(default_factory=list)  # selected domains, to back up
    vanished: list[Job] = field(default_factory=list)  # histories whose domain is gone
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (domain, why)
    warnings: list[str] = field(default_factory=list)
    problems: dict[str, str] = field(default_factory=dict)  # member name -> why it cannot run


def matches(name: str, patterns: list[str]) -> bool:
    """Shell-style patterns (`*`, `?`, `[...]`), case-sensitive like libvirt's names."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def why_left_out(job: Job, info: DomainInfo) -> str | None:
    """Why the pattern job does not back up `info` (None: it does)."""
    if not matches(info.name, list(job.options["domains"])):
        return "not matched"
    if matches(info.name, list(job.options.get("exclude", []))):
        return "excluded by the job's exclude"
    if info.xml is None:
        return None  # reported as a problem of its own
    if opted_out(info.xml):
        return 'opted out in its metadata (<gfs backup="no"/>)'
    restored = gfs_metadata(info.xml).get("restored-from")
    if restored and not job.options.get("include_restored", False):
        return f"made by gfs restore from {restored} (include_restored = true backs it up)"
    return None


def select(job: Job, domains: list[DomainInfo], found: list[History]) -> Selection:
    """The members a run of pattern job `job` backs up among `domains` (libvirt's list),
    given the histories `found` on the target."""
    selection = Selection()
    by_uuid = {history.uuid: history for history in found}
    present = {info.uuid for info in domains}
    for pattern in job.options["domains"]:
        if not any(matches(info.name, [pattern]) for info in domains):
            selection.warnings.append(f"pattern {pattern!r} matches no domain")
    for info in domains:
        why = why_left_out(job, info)
        if why == "not matched":
            continue
        if why is not None:
            selection.left_out.append((info.name, why))
            continue
        history = by_uuid.get(info.uuid)
        wanted = history_name(info.name, info.uuid)
        options_extra: dict[str, str] = {}
        if history is not None and history.directory != wanted:
            options_extra = {"renamed_from": history.name, "history_was": history.directory}
        elif history is None:
            for older in found:
                if older.name == wanted[: -UUID_LENGTH - len(SEPARATOR)] and (
                    older.uuid not in present
                ):
                    selection.warnings.append(
                        f"domain {info.name} has a new UUID ({info.uuid}): a new history; "
                        f"the generations of the earlier {older.name} ({older.uuid}) stay "
                        f"apart in {older.directory}"
                    )
        one = member(job, info.name, info.uuid, wanted)
        one.options.update(options_extra)
        one.options["transient"] = not info.persistent
        if info.xml is None:
            selection.problems[one.name] = (
                f"domain {info.name}: cannot read its definition: {info.error}"
            )
        selection.members.append(one)
    for history in found:
        if history.uuid not in present:
            selection.vanished.append(member(job, history.name, history.uuid, history.directory))
    return selection


def list_domains(config: Config, job: Job) -> list[DomainInfo]:
    """The domains of the job's libvirt (on its host). GfsError when libvirtd does not
    answer (the job fails): never read as "every domain vanished"."""
    return virt_domains(*libvirt_uri(job, runner_for(job.host, config)))


def overlapping(selections: dict[str, Selection], singles: list[Job]) -> dict[str, list[str]]:
    """UUID -> the jobs that select that domain, for domains selected by more than one
    (pattern jobs, and single-domain jobs by name)."""
    claims: dict[str, list[str]] = {}
    names: dict[str, str] = {}
    for job_name, selection in selections.items():
        for one in selection.members:
            claims.setdefault(one.options["uuid"], []).append(job_name)
            names[str(one.options["domain"])] = one.options["uuid"]
    for single in singles:
        uuid = names.get(str(single.options.get("domain")))
        if uuid is not None:
            claims[uuid].append(single.name)
    return {uuid: jobs for uuid, jobs in claims.items() if len(jobs) > 1}


def pattern_job_warnings(config: Config, job: Job) -> list[str]:
    """What `gfs check` says about a `domains` job as a whole: its target (mounted, NFS,
    not the source's filesystem) and its libvirt (answering)."""
    warnings = []
    fs = job_location(config, job)[1]
    try:
        warnings += check_target(config.targets[job.target], [], fs=fs).warnings
    except GfsError as exc:
        warnings.append(str(exc))
    try:
        list_domains(config, job)
    except GfsError as exc:
        warnings.append(f"job {job.name}: {exc}")
    return warnings


def adopt_history(job: Job, job_dir: Path, fs: TargetFS) -> None:
    """A renamed domain: rename its history directory to the new name (under the member's
    lock). GfsError when the target refuses."""
    old = job.options.get("history_was")
    if not old:
        return
    try:
        fs.rename(job_dir.parent / str(old), job_dir)
    except OSError as exc:  # a remote target raises GfsError itself
        raise GfsError(f"cannot rename the history {old} to {job_dir.name}: {exc}") from None


def forget(config: Config, job: Job, member_job: Job, state: State, wait: bool) -> list[str]:
    """Delete every generation of a vanished domain's history, then its directory
    (journaled like a prune; under the domain's lock). Refused while the domain exists
    (its history would only start again) or when libvirt cannot say. Returns the ids."""
    uuid = str(member_job.options["uuid"])
    present = {info.uuid for info in list_domains(config, job)}
    if uuid in present:
        raise InputError(
            [
                Problem(
                    config.source,
                    f"domain {member_job.options['domain']} ({uuid}) still exists: exclude it "
                    f"from job {job.name} (or undefine it) before forgetting its history",
                )
            ]
        )
    job_dir, fs = job_location(config, member_job)
    deleted: list[str] = []
    with job_lock(config.state_dir, member_job.name, wait):
        run_id = state.start_run(member_job.name)
        for stored in list_generations(job_dir, fs).stored:
            delete_generation(stored.path, state, run_id, member_job.name, fs)
            deleted.append(stored.id)
        fs.remove_tree(job_dir)
        state.finish_run(run_id, "ok", message=f"forgot {len(deleted)} generation(s)")
    return deleted

"""What the shell completion offers: job names, `JOB/DOMAIN` of jobs over several domains,
domain names and generation ids.

Each answer comes from the configuration file and the state database (never the target,
which may be a dead NFS mount) or libvirt, within COMPLETION_SECONDS; on any problem, or
when the answer is late, the answer is empty: a completion never fails and never hangs
the shell.
"""

from __future__ import annotations

import contextlib
import fnmatch
import sqlite3
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from gfs_backup.actions.discover import FoundDomain, list_domains, within
from gfs_backup.actions.members import UUID_RE
from gfs_backup.core.config import DEFAULT_STATE_DIR
from gfs_backup.tools.virt import DEFAULT_URI

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 only
    import tomli as tomllib

COMPLETION_SECONDS = 1.0
# Of a job's runs, the statuses that name a generation that was on the target then.
GENERATION_STATUSES = ("ok", "restored", "drilled", "drill-failed")
Table = dict[str, Any]


def _raw_config(path: Path) -> Table:
    """The configuration's TOML as it is (not validated: a typo elsewhere in the file
    must not cost the completion of every job)."""
    with path.open("rb") as handle:
        return tomllib.load(handle)


def _quietly(work: Callable[[], list[str]], seconds: float) -> list[str]:
    try:
        return within(seconds, work)
    except Exception:  # a completion never fails: no answer instead
        return []


def _job_tables(config: Table) -> list[Table]:
    jobs = config.get("job", [])
    return [job for job in jobs if isinstance(job, dict)] if isinstance(jobs, list) else []


def _job_table(config: Table, name: str) -> Table | None:
    return next((job for job in _job_tables(config) if job.get("name") == name), None)


def _uri(job: Table | None) -> str:
    uri = job.get("uri") if job is not None else None
    return uri if isinstance(uri, str) else DEFAULT_URI


def _patterns(job: Table, key: str) -> list[str]:
    value = job.get(key, [])
    return [str(item) for item in value] if isinstance(value, list) else []


def job_names(config_path: Path, seconds: float = COMPLETION_SECONDS) -> list[str]:
    """The names of the configured jobs, in file order."""

    def read() -> list[str]:
        names = (job.get("name") for job in _job_tables(_raw_config(config_path)))
        return [name for name in names if isinstance(name, str) and name]

    return _quietly(read, seconds)


def _selected(job: Table, domains: list[FoundDomain]) -> list[FoundDomain]:
    """The domains a job's `domains` patterns select and its `exclude` leaves in."""
    wanted, excluded = _patterns(job, "domains"), _patterns(job, "exclude")
    return [
        domain
        for domain in domains
        if any(fnmatch.fnmatchcase(domain.name, p) for p in wanted)
        and not any(fnmatch.fnmatchcase(domain.name, p) for p in excluded)
    ]


def member_names(config_path: Path, job: str, seconds: float = COMPLETION_SECONDS) -> list[str]:
    """`JOB/DOMAIN` for the domains of the libvirt that job `job`'s `domains` patterns
    select now ([] for any other job)."""

    def read() -> list[str]:
        table = _job_table(_raw_config(config_path), job)
        if table is None or "domains" not in table:
            return []
        return [f"{job}/{domain.name}" for domain in _selected(table, list_domains(_uri(table)))]

    return _quietly(read, seconds)


def generation_ids(
    config_path: Path, jobs: Sequence[str] = (), seconds: float = COMPLETION_SECONDS
) -> list[str]:
    """The generations of `jobs` (every job's when empty) the state database knows: its
    runs made, restored or drilled them, and gfs did not prune them since; newest first.
    `JOB/DOMAIN` is that domain's history (its UUID asked of libvirt; when libvirt does
    not answer in time, every domain's of JOB)."""

    def read() -> list[str]:
        config = _raw_config(config_path)
        keys = [_state_key(config, name, seconds / 2) for name in jobs]
        with _state_db(config, seconds / 2) as db:
            return _generations(db, keys) if db is not None else []

    return _quietly(read, seconds)


@contextlib.contextmanager
def _state_db(config: Table, seconds: float) -> Iterator[sqlite3.Connection | None]:
    """The state database, read-only (None when there is none yet)."""
    database = Path(str(config.get("state_dir", DEFAULT_STATE_DIR))) / "gfs.sqlite"
    if not database.is_file():
        yield None
        return
    db = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=seconds)
    try:
        yield db
    finally:
        db.close()


def gone_domains(config_path: Path, job: str, seconds: float = COMPLETION_SECONDS) -> list[str]:
    """UUIDs of the domains `domains` job `job` backed up that its libvirt no longer has
    (what `gfs forget` takes; every one backed up when libvirt does not answer in time)."""

    def read() -> list[str]:
        config = _raw_config(config_path)
        with _state_db(config, seconds / 2) as db:
            if db is None:
                return []
            rows = db.execute(
                "SELECT substr(job, ?) FROM runs WHERE substr(job, 1, ?) = ? "
                "GROUP BY job ORDER BY MAX(id) DESC",
                (len(job) + 2, len(job) + 1, f"{job}@"),
            )
            uuids = [str(row[0]) for row in rows]
        table = _job_table(config, job)
        try:
            found = within(seconds / 2, lambda: list_domains(_uri(table)))
        except Exception:  # libvirt away: cannot tell which are gone
            return uuids
        present = {domain.uuid for domain in found}
        return [uuid for uuid in uuids if uuid not in present]

    return _quietly(read, seconds)


def _state_key(config: Table, name: str, seconds: float) -> str:
    """The job's name in the state database: `JOB@UUID` for `JOB/DOMAIN` (domain by name
    or UUID), else `name` (a job over several domains: the prefix of its members')."""
    parent, _, domain = name.replace("@", "/", 1).partition("/")
    if not domain:
        return name
    if UUID_RE.fullmatch(domain):
        return f"{parent}@{domain}"
    try:
        found = within(seconds, lambda: list_domains(_uri(_job_table(config, parent))))
    except Exception:  # libvirt away: every domain of the job
        return parent
    uuids = [one.uuid for one in found if one.name == domain]
    return f"{parent}@{uuids[0]}" if len(uuids) == 1 else parent


def _job_filter(jobs: Sequence[str]) -> tuple[str, list[object]]:
    """A WHERE condition on the `job` column matching `jobs` and their members (`JOB@...`),
    and its parameters ("1": every job, with none)."""
    if not jobs:
        return "1", []
    conditions: list[str] = []
    parameters: list[object] = []
    for job in jobs:
        conditions.append("job = ? OR substr(job, 1, ?) = ?")
        parameters += [job, len(job) + 1, f"{job}@"]
    return "(" + " OR ".join(conditions) + ")", parameters


def _generations(db: sqlite3.Connection, jobs: Sequence[str]) -> list[str]:
    which, parameters = _job_filter(jobs)
    pruned = set(
        db.execute(
            f"SELECT job, detail FROM journal WHERE action = 'prune' AND {which}", parameters
        )
    )
    statuses = ", ".join("?" for _ in GENERATION_STATUSES)
    rows = db.execute(
        f"SELECT job, generation FROM runs WHERE {which} AND generation IS NOT NULL "
        f"AND status IN ({statuses}) ORDER BY id DESC",
        (*parameters, *GENERATION_STATUSES),
    )
    found: list[str] = []
    for job, generation in rows:
        if (job, generation) not in pruned and generation not in found:
            found.append(str(generation))
    return found


def libvirt_uri(config: Table) -> str:
    """The `uri` of the configuration's first libvirt job, else libvirt's default."""
    for job in _job_tables(config):
        if job.get("kind") == "libvirt" and isinstance(job.get("uri"), str):
            return str(job["uri"])
    return DEFAULT_URI


def domain_names(
    config_path: Path, uri: str | None = None, seconds: float = COMPLETION_SECONDS
) -> list[str]:
    """The names of the domains at `uri` (default: the configuration's libvirt, or the
    local one without a configuration), if libvirtd answers within `seconds`."""

    def read() -> list[str]:
        where = uri
        if where is None:
            try:
                where = libvirt_uri(_raw_config(config_path))
            except (OSError, ValueError):  # no (readable) configuration
                where = DEFAULT_URI
        return [domain.name for domain in list_domains(where)]

    return _quietly(read, seconds)

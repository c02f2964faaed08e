"""Prometheus metrics of every job, written as a node_exporter textfile (`gfs metrics`, and
after every `gfs run`).

The file is written by prometheus-client's `write_to_textfile` (a temporary file in the
same directory, then a rename), so node_exporter never reads half a file. Every metric is
a gauge labelled with the job (`job` is relabelled `exported_job` by Prometheus when the
scrape has its own `job` label; `honor_labels` keeps it). Timestamps are Unix seconds; a
metric whose value is unknown (a job never drilled) is left out rather than set to 0.

    gfs_job_last_success_timestamp_seconds      end of the last successful run
    gfs_job_last_failure_timestamp_seconds      end of the last failed run
    gfs_job_last_run_success                    1 the last run succeeded, 0 it failed
    gfs_job_last_run_duration_seconds           how long the last run took
    gfs_job_last_run_written_bytes              bytes the last successful run wrote
    gfs_job_newest_generation_timestamp_seconds creation of the newest verified generation
    gfs_job_newest_generation_size_bytes        its logical size
    gfs_job_newest_generation_new_bytes         space it took that no other generation shares
                                                (changed-block capture; FIEMAP)
    gfs_job_last_verify_timestamp_seconds       the newest passing verify of any generation
    gfs_job_last_drill_timestamp_seconds        the newest passing restore drill
    gfs_job_last_drill_success                  1 the newest drill passed, 0 it failed
    gfs_job_generations{label=...}              generations per rotation label
    gfs_job_stored_generations                  generations on the target
    gfs_job_freshness_state                     0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN
                                                (as `gfs status --check`)
    gfs_job_max_age_seconds                     the age that makes the job WARNING
    gfs_run_last_exit_code                      the exit code of the last `gfs run`
    gfs_run_last_timestamp_seconds              when it ended
"""

from __future__ import annotations

import os
from collections import Counter
from datetime import datetime
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

from gfs_backup.actions.freshness import Freshness
from gfs_backup.actions.status import JobStatus, generation_size
from gfs_backup.backends.vm_capture import capture_of
from gfs_backup.core.state import State
from gfs_backup.ops.report import RunReport

DEFAULT_TEXTFILE = Path("/var/lib/prometheus/node-exporter/gfs.prom")


def _seconds(when: datetime | None) -> float | None:
    return when.timestamp() if when is not None else None


def registry_of(
    statuses: list[JobStatus],
    judged: list[Freshness],
    state: State | None,
    report: RunReport | None = None,
) -> CollectorRegistry:
    """The metrics of `statuses` (with their freshness, in the same order)."""
    registry = CollectorRegistry()

    def gauge(name: str, text: str, labels: tuple[str, ...] = ("job",)) -> Gauge:
        return Gauge(name, text, labels, registry=registry)

    last_success = gauge(
        "gfs_job_last_success_timestamp_seconds", "End of the job's last successful run."
    )
    last_failure = gauge("gfs_job_last_failure_timestamp_seconds", "End of its last failed run.")
    run_ok = gauge("gfs_job_last_run_success", "1 if the job's last run succeeded, else 0.")
    duration = gauge("gfs_job_last_run_duration_seconds", "Duration of the job's last run.")
    written = gauge("gfs_job_last_run_written_bytes", "Bytes the last successful run wrote.")
    newest = gauge(
        "gfs_job_newest_generation_timestamp_seconds",
        "Creation time of the newest verified generation on the target.",
    )
    size = gauge("gfs_job_newest_generation_size_bytes", "Logical size of the newest generation.")
    new = gauge(
        "gfs_job_newest_generation_new_bytes",
        "Space the newest generation took that no other file shares (changed-block capture).",
    )
    verified = gauge(
        "gfs_job_last_verify_timestamp_seconds", "Newest passing verify of any generation."
    )
    drilled = gauge("gfs_job_last_drill_timestamp_seconds", "Newest passing restore drill.")
    drill_ok = gauge("gfs_job_last_drill_success", "1 if the newest restore drill passed, else 0.")
    labelled = gauge(
        "gfs_job_generations", "Generations on the target per rotation label.", ("job", "label")
    )
    stored = gauge("gfs_job_stored_generations", "Generations on the target.")
    fresh = gauge(
        "gfs_job_freshness_state", "0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (gfs status --check)."
    )
    max_age = gauge("gfs_job_max_age_seconds", "Age of the newest backup that makes it WARNING.")

    def put(metric: Gauge, job: str, value: float | None) -> None:
        if value is not None:
            metric.labels(job).set(value)

    for status, found in zip(statuses, judged, strict=True):
        name = status.job.title
        success = status.last_success
        put(
            last_success,
            name,
            _seconds(success.finished_at or success.started_at) if success else None,
        )
        failure = _last_failure(state, name)
        put(last_failure, name, _seconds(failure))
        if status.last_run is not None and status.last_run.status in ("ok", "failed"):
            put(run_ok, name, 1.0 if status.last_run.status == "ok" else 0.0)
            put(duration, name, status.last_run.seconds)
        put(written, name, float(success.bytes) if success else None)
        put(newest, name, _seconds(found.newest))
        generations = status.listing.stored
        if generations:
            put(size, name, float(generation_size(generations[-1])))
            fresh_bytes = capture_of(generations[-1]).get("new_bytes")
            if isinstance(fresh_bytes, int):
                put(new, name, float(fresh_bytes))
        put(verified, name, _seconds(found.last_verify))
        put(drilled, name, _seconds(found.last_drill))
        drills = [record for item in generations for record in item.manifest.drills]
        if drills:
            put(drill_ok, name, 0.0 if found.drill_failed else 1.0)
        counts = Counter(label for item in generations for label in item.manifest.labels)
        for label, count in sorted(counts.items()):
            labelled.labels(name, label).set(count)
        put(stored, name, float(len(generations)))
        put(fresh, name, float(found.state))
        put(max_age, name, found.limits.max_age)
    if report is not None:
        Gauge("gfs_run_last_exit_code", "Exit code of the last gfs run.", registry=registry).set(
            report.exit_code
        )
        Gauge(
            "gfs_run_last_timestamp_seconds", "When the last gfs run ended.", registry=registry
        ).set(report.finished.timestamp())
    return registry


def _last_failure(state: State | None, job: str) -> datetime | None:
    if state is None:
        return None
    for run in state.runs(job, 200):
        if run.status == "failed":
            return run.finished_at or run.started_at
    return None


def write_textfile(path: Path, registry: CollectorRegistry) -> None:
    """Write atomically (temporary file in the same directory, then rename), mode 0644:
    node_exporter runs as its own user and only reads it."""
    write_to_textfile(str(path), registry)
    os.chmod(path, 0o644)

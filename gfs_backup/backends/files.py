"""Data-directory jobs: a plain file tree, hard-linked to the previous verified generation.

On BTRFS the directory's subvolume is snapshotted first, so the copy is point-in-time;
elsewhere the live directory is copied and the manifest says it is not point-in-time.
What counts as unchanged, and the periodic rehash: see filetree.

A files job of a remote host (`host = "kvm2"`) exports into a target that host mounts:
the same tree code runs there (copying/treeagent.py says why and how), reading, linking
to the previous generation, checking and restoring on the host; only the entries and the
progress cross SSH.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from gfs_backup.backends import snapshots
from gfs_backup.backends.base import (
    Exported,
    JobContext,
    Progress,
    RestoreOptions,
    Snapshot,
    SourceError,
)
from gfs_backup.backends.sourcehost import RemoteHost, source_host
from gfs_backup.copying.filetree import Base, TreeExport, export_tree, scan_clock_ns
from gfs_backup.copying.treeagent import manifest_request, run_agent
from gfs_backup.copying.treeentry import TreeEntry
from gfs_backup.copying.treerestore import restore_tree, verify_tree
from gfs_backup.core.errors import GfsError
from gfs_backup.target.catalog import Stored, last_verified_ok
from gfs_backup.target.fs import RemoteFS
from gfs_backup.target.manifest import MANIFEST
from gfs_backup.tools.btrfs import LONG, containing_subvolume
from gfs_backup.tools.mounts import mount_of, read_mounts

TREE = "data"
SCAN_STARTED = "scan_started_ns"  # source metadata keys a later export builds on
GRANULARITY = "timestamp_granularity_ns"
FULL_READ_AT = "full_read_at"
PROBE_TIMEOUT = 120.0  # a remote source's filesystem and clock


def tree_entries(stored: Stored) -> list[TreeEntry]:
    """The file-tree entries of a generation's manifest (ValueError if edited badly)."""
    where = f"{stored.path}/manifest.json: tree"
    return [
        TreeEntry.from_json(item, f"{where}[{index}]")
        for index, item in enumerate(stored.manifest.tree)
    ]


def make_base(previous: Stored | None, now: datetime, rehash_every: int) -> Base | None:
    """What a new export may take over from `previous`: None when it has no tree, failed
    its latest verify, or lacks the scan time (older gfs); `rehash` when its last full
    read is `rehash_every` seconds old or more (0: never)."""
    if previous is None or not previous.manifest.tree or not last_verified_ok(previous):
        return None
    source = previous.manifest.source
    started, granularity = source.get(SCAN_STARTED), source.get(GRANULARITY)
    if type(started) is not int or type(granularity) is not int or granularity < 0:
        return None
    try:
        entries = {entry.path: entry for entry in tree_entries(previous)}
        full_read = datetime.fromisoformat(str(source.get(FULL_READ_AT)).replace("Z", "+00:00"))
    except ValueError:
        return None
    if full_read.tzinfo is None:
        return None
    rehash = bool(rehash_every) and (now - full_read).total_seconds() >= rehash_every
    return Base(previous.path / TREE, entries, started - granularity, rehash)


class FilesBackend(snapshots.SnapshottingBackend):
    kind = "files"
    source_key = "path"
    source_what = "directory"

    def check_source(self, ctx: JobContext) -> None:
        if not source_host(ctx).is_dir(self.source_path(ctx)):
            path = ctx.job.options["path"]
            raise SourceError(f"job {ctx.job.name}: source {path} is not a directory")

    def snapshot(self, ctx: JobContext) -> Snapshot | None:
        path = Path(ctx.job.options["path"])
        if _on_host(ctx):  # the host's filesystem and clock, which stamps its files
            request = {"op": "probe", "path": str(path)}
            found = run_agent(ctx.runner, request, timeout=PROBE_TIMEOUT, idle_timeout=None)
            if found.get("fstype") != "btrfs":
                return None
            started, subvolume = int(found["clock_ns"]), Path(found["subvolume"])
        else:
            if mount_of(path, read_mounts()).fstype != "btrfs":
                return None
            started, subvolume = scan_clock_ns(), containing_subvolume(path)
        # `started` is taken before the snapshot: its files' times are older
        taken = snapshots.take_snapshot(ctx, subvolume, inside=path)
        taken.metadata[SCAN_STARTED] = started
        return taken

    def export(
        self,
        ctx: JobContext,
        snapshot: Snapshot | None,
        into: Path,
        previous: Stored | None,
        progress: Progress | None,
    ) -> Exported:
        source = snapshot.path if snapshot is not None else Path(ctx.job.options["path"])
        base = make_base(previous, ctx.now, int(ctx.job.options.get("rehash_every", 0)))
        started = snapshot.metadata.get(SCAN_STARTED) if snapshot is not None else None
        exclude = _own_snapshot_dir(ctx, snapshot)
        # The export's verify: every file this run wrote re-read from the target's storage,
        # every other object checked by its metadata (a file linked to the verified base is
        # its inode). `gfs verify` and the policy's verify schedule still re-read everything.
        read_back = ctx.job.policy.verify_after_export
        if _on_host(ctx):
            result, problems = _export_on_host(
                ctx, source, into / TREE, base, previous, progress, started, exclude, read_back
            )
        else:
            result = export_tree(
                source, into / TREE, base, progress, scan_started_ns=started, exclude=exclude
            )
            problems = (
                verify_tree(into / TREE, result.entries, content_of=result.copied)
                if read_back
                else []
            )
        if problems:
            raise GfsError(
                f"job {ctx.job.name}: the export does not read back as written: "
                f"{'; '.join(problems[:3])}"
            )
        warnings = _summary("not exported", result.skipped) + _summary("", result.warnings)
        if snapshot is None:
            warnings.append(
                f"{ctx.job.options['path']} is not on btrfs: copied live, not point-in-time"
            )
        if base is None:
            ctx.log.info("job %s: reading every file (%s)", ctx.job.name, _why_full(previous))
        elif base.rehash:
            ctx.log.info("job %s: periodic rehash: reading every file", ctx.job.name)
        metadata = {
            "path": ctx.job.options["path"],
            **_tree_metadata(result, ctx.now, previous, base),
        }
        if snapshot is not None:
            metadata.update(snapshot.metadata)
        return Exported(
            tree=tuple(entry.to_json() for entry in result.entries),
            source=metadata,
            point_in_time=snapshot is not None,
            bytes_written=result.copied_bytes,
            warnings=tuple(warnings),
            read_back=read_back,
        )

    def verify_data(self, stored: Stored, progress: Progress | None) -> list[str]:
        try:
            entries = tree_entries(stored)
        except ValueError as exc:
            return [str(exc)]
        if isinstance(stored.fs, RemoteFS):  # read on the host that mounts the target
            request = {
                "op": "verify",
                "tree": str(stored.path / TREE),
                **manifest_request(stored.path / MANIFEST, list(stored.manifest.tree)),
            }
            try:
                found = run_agent(
                    stored.fs.runner,
                    request,
                    progress,
                    timeout=LONG,
                    idle_timeout=stored.fs.io_timeout,
                )
            except (OSError, ValueError) as exc:
                return [str(exc)]
            return [str(line) for line in found["problems"]]
        return verify_tree(stored.path / TREE, entries, progress)

    def restore(
        self,
        ctx: JobContext,
        stored: Stored,
        to: Path,
        progress: Progress | None,
        options: RestoreOptions,
    ) -> None:
        if isinstance(stored.fs, RemoteFS):  # `to` is on the job's host, which mounts it
            if ctx.runner.host != stored.fs.host:
                raise GfsError(
                    f"internal: a tree on host {stored.fs.host} restored through host "
                    f"{ctx.runner.host}"
                )
            request = {
                "op": "restore",
                "tree": str(stored.path / TREE),
                "dest": str(to),
                **manifest_request(stored.path / MANIFEST, list(stored.manifest.tree)),
            }
            run_agent(ctx.runner, request, progress, timeout=LONG, idle_timeout=None)
            return
        restore_tree(stored.path / TREE, tree_entries(stored), to, progress)


def _tree_metadata(
    result: TreeExport, now: datetime, previous: Stored | None, base: Base | None
) -> dict[str, Any]:
    """The manifest's record of how the tree was taken, for the next export and humans."""
    full_read_at = now.isoformat()
    if base is not None and not base.rehash and previous is not None:
        full_read_at = previous.manifest.source[FULL_READ_AT]  # make_base checked it
    return {
        "copied_files": result.copied_files,
        "linked_files": result.linked_files,
        "rehashed_files": result.rehashed_files,
        SCAN_STARTED: result.scan_started_ns,
        GRANULARITY: result.granularity_ns,
        FULL_READ_AT: full_read_at,
        "skipped": list(result.skipped),
        "changed_behind_metadata": list(result.changed_behind_metadata),
        "changed_during_backup": sum(1 for entry in result.entries if entry.changed),
    }


def _own_snapshot_dir(ctx: JobContext, snapshot: Snapshot | None) -> frozenset[str]:
    """gfs's snapshot directory, relative to the exported path when it lies inside it."""
    if snapshot is None:
        return frozenset()
    path = Path(ctx.job.options["path"])
    folder = snapshot.subvolume.parent
    try:
        return frozenset({str(folder.relative_to(path))})
    except ValueError:
        return frozenset()


def _summary(what: str, lines: list[str], most: int = 10) -> list[str]:
    """Up to `most` lines, then one line for the rest (the manifest lists them all)."""
    shown = [f"{what}: {line}" if what else line for line in lines[:most]]
    if len(lines) > most:
        shown.append(f"... and {len(lines) - most} more (listed in the manifest)")
    return shown


def _why_full(previous: Stored | None) -> str:
    if previous is None:
        return "no verified generation to build on"
    if not previous.manifest.tree:
        return f"generation {previous.id} holds no file tree"
    return f"generation {previous.id} was made by an older gfs (no scan time recorded)"


def _on_host(ctx: JobContext) -> bool:
    """The job's tree is on a remote host, whose runner `ctx` has (not a drill here)."""
    return isinstance(source_host(ctx), RemoteHost)


def _export_on_host(
    ctx: JobContext,
    source: Path,
    dest: Path,
    base: Base | None,
    previous: Stored | None,
    progress: Progress | None,
    started: object,
    exclude: frozenset[str],
    read_back: bool,
) -> tuple[TreeExport, list[str]]:
    """export_tree (and its read-back) run by the job's host into the target it mounts."""
    request: dict[str, Any] = {
        "op": "export",
        "source": str(source),
        "dest": str(dest),
        "scan_started_ns": started,
        "exclude": sorted(exclude),
        "read_back": read_back,
        "base": None,
    }
    if base is not None and previous is not None:
        request["base"] = {
            "tree": str(base.tree),
            "racy_from_ns": base.racy_from_ns,
            "rehash": base.rehash,
            **manifest_request(previous.path / MANIFEST, list(previous.manifest.tree)),
        }
    found = run_agent(
        ctx.runner, request, progress, timeout=LONG, idle_timeout=ctx.target.io_timeout
    )
    entries = [
        TreeEntry.from_json(item, f"host {ctx.job.host}: entry {index}")
        for index, item in enumerate(found["entries"])
    ]
    result = TreeExport(
        entries,
        int(found["copied_files"]),
        int(found["linked_files"]),
        int(found["copied_bytes"]),
        [str(line) for line in found["skipped"]],
        int(found["scan_started_ns"]),
        int(found["granularity_ns"]),
        [str(line) for line in found["warnings"]],
        int(found["rehashed_files"]),
        [str(line) for line in found["changed_behind_metadata"]],
        {str(path) for path in found["copied"]},
    )
    return result, [str(line) for line in found["read_back"]]

"""Changed-block capture of VM disks: every generation a complete sparse raw image, a night
costing what changed.

A running domain is read through libvirt's pull-mode backup: libvirt freezes the disks at
one instant and QEMU serves them over NBD; gfs is the writer (it hashes in the pass that
writes, reads back what it wrote, keeps holes as holes). The same backup call creates a
checkpoint `gfs-<job>@<generation>`: a persistent dirty bitmap in each qcow2 disk. The
next run names the checkpoint of its base generation (the newest verified one) as
`<incremental>`, reads only the MiBs the bitmap marks, clones the base's image on the
target (`clone_file`) and patches them in. Before such an image is published:

- every changed MiB was read back from the target's storage (copy.py's read-back);
- a random sample of unchanged MiBs (1%, at least 64 MiB) is read from the disk and
  compared with the base's digests (a disk rolled back or replaced behind gfs's back, so
  that the bitmap lies), and from the new image on the target (a base damaged on the
  share); either mismatch makes that disk a full read, with the reason logged.

Anything that makes the base untrustworthy makes the run a full read with the reason in
the log and the manifest (`Decision`). A `full_every` run still asks libvirt for the
bitmap and compares: a block that differs from the base where the bitmap says nothing
changed is a dirty-tracking bug, an alarm in the log, the manifest and `gfs status`.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from gfs_backup.backends.base import JobContext, Progress
from gfs_backup.backends.vm_inplace import DISKS
from gfs_backup.copying.digest import BLOCK, BlockDigest
from gfs_backup.copying.image import (
    BlockSource,
    ImageResult,
    Span,
    block_count,
    check_stored_blocks,
    clone_file,
    differing_blocks,
    digest_of,
    read_digests,
    sample_blocks,
    spans_of,
    split_zero,
    unshared_bytes,
    write_digests,
    write_image,
)
from gfs_backup.target.catalog import PARTIAL_PREFIX, Stored
from gfs_backup.target.manifest import DataFile
from gfs_backup.tools.domainxml import Disk
from gfs_backup.tools.nbd import (
    ALLOCATION,
    STATE_DIRTY,
    STATE_ZERO,
    NbdExport,
    dirty_context,
    matching,
)

BLOCKS = "blocks"  # per-MiB digests of each image: blocks/<target>.sha256-1m
RAW_SUFFIX = ".raw"
VERIFY_SCOPE = "changed+sample"  # what an incremental's export verify read
CHECKPOINT_PREFIX = "gfs-"


def checkpoint_name(job: str, generation: str) -> str:
    """The checkpoint of a generation: gfs-<job>--<generation id> (libvirt allows letters,
    digits, '_', '-' and '.' in checkpoint names)."""
    return f"{CHECKPOINT_PREFIX}{job}--{generation}"


_GENERATION_RE = re.compile(r"\d{8}T\d{6}Z(-\d+)?")


def is_job_checkpoint(name: str, job: str) -> bool:
    """Whether `name` is a checkpoint gfs made for `job` (the generation id after the
    job's prefix tells it from another job whose name merely starts alike)."""
    prefix = f"{CHECKPOINT_PREFIX}{job}--"
    return name.startswith(prefix) and bool(_GENERATION_RE.fullmatch(name[len(prefix) :]))


def generation_of(into: Path) -> str:
    return into.name.removeprefix(PARTIAL_PREFIX)


def _stamp(when: datetime) -> str:
    return when.isoformat().replace("+00:00", "Z")


def _parse(text: object) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def capture_of(stored: Stored) -> dict[str, Any]:
    found = stored.manifest.source.get("capture")
    return found if isinstance(found, dict) else {}


def full_verify_time(stored: Stored) -> datetime | None:
    """When every byte of the generation was last read and matched: its newest passing
    verify that read everything (`gfs verify`, a full export's read-back), or what it
    inherited from its base when it was an incremental built on a verified base."""
    times = [
        _parse(record.get("time"))
        for record in stored.manifest.verify
        if record.get("result") == "ok" and record.get("scope", "full") == "full"
    ]
    times.append(_parse(capture_of(stored).get("full_verified_at")))
    known = [when for when in times if when is not None]
    return max(known) if known else None


@dataclass
class Decision:
    """What a run builds on: `base` (None: a full read) and why not, when not. `compare`:
    a full read that is checked against what the base and the bitmap would have given."""

    base: Stored | None
    reason: str = ""
    compare: bool = False

    @property
    def incremental(self) -> str | None:
        """The checkpoint to read changes since (also for a compared full read)."""
        if self.base is None:
            return None
        return str(capture_of(self.base).get("checkpoint"))


def decide(
    ctx: JobContext,
    disks: list[Disk],
    previous: Stored | None,
    uuid: str,
    checkpoints: list[str],
) -> Decision:
    """Whether this run may read only what changed since `previous` (the newest verified
    generation), and if not, the reason (for the log and the manifest)."""
    options = ctx.job.options
    if not options.get("incremental", True):
        return Decision(None, "incremental = false for this job")
    if previous is None:
        return Decision(None, "first run: no verified generation to build on")
    capture = capture_of(previous)
    checkpoint = capture.get("checkpoint")
    if not checkpoint:
        return Decision(
            None,
            f"generation {previous.id} has no checkpoint (taken shut off, by another "
            "method, or by an older gfs)",
        )
    if previous.manifest.source.get("uuid") != uuid:
        return Decision(None, f"the domain was redefined since generation {previous.id}")
    for disk in disks:
        if disk.format != "qcow2":
            return Decision(
                None, f"disk {disk.target} is {disk.format}: only qcow2 disks keep dirty bitmaps"
            )
        stored = {data.path for data in previous.manifest.files}
        if f"{DISKS}/{disk.target}{RAW_SUFFIX}" not in stored:
            return Decision(None, f"disk {disk.target} is not in generation {previous.id}")
    if checkpoint not in checkpoints:
        return Decision(
            None,
            f"checkpoint {checkpoint} of generation {previous.id} is missing (deleted "
            "behind gfs's back, or the domain was moved or redefined)",
        )
    return judge_base(ctx, previous)


def judge_base(ctx: JobContext, previous: Stored) -> Decision:
    """The rules every kind's base must pass: fully verified within
    `base_verified_within`; a full read every `full_every` (compared with the base)."""
    options = ctx.job.options
    capture = capture_of(previous)
    verified = full_verify_time(previous)
    within = int(options.get("base_verified_within", 0))
    if within and (verified is None or ctx.now - verified > timedelta(seconds=within)):
        when = _stamp(verified) if verified else "never"
        return Decision(
            None,
            f"generation {previous.id} was last fully verified {when}, longer ago than "
            f"base_verified_within ({within // 86400}d): `gfs verify` it or let this full "
            "read start afresh",
        )
    last_full = _parse(capture.get("last_full_at"))
    every = int(options.get("full_every", 0))
    if every and (last_full is None or ctx.now - last_full >= timedelta(seconds=every)):
        return Decision(
            previous, f"full_every ({every // 86400}d): the periodic full read", compare=True
        )
    return Decision(previous)


@dataclass(frozen=True)
class Layout:
    """Where an image and its per-MiB digests go, relative to a generation directory."""

    image: str
    blocks: str


def disk_layout(target: str) -> Layout:
    return Layout(f"{DISKS}/{target}{RAW_SUFFIX}", f"{BLOCKS}/{target}.sha256-1m")


@dataclass
class DiskCapture:
    target: str
    result: ImageResult
    mode: str  # incremental | full
    path: str  # clone | server-copy | full-write | new
    reason: str = ""
    new_bytes: int | None = None
    alarm: list[int] = field(default_factory=list)  # blocks the bitmap missed (compare)
    warning: str = ""
    sampled: int = 0  # unchanged MiBs re-read from the disk and from the target
    layout: Layout = field(default_factory=lambda: disk_layout("vda"))


class NbdDir:
    """A private directory for libvirt's NBD socket and scratch files, removed at the end
    (QEMU, under its own user, creates the socket: others may enter, never list)."""

    def __init__(self, parent: Path) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="gfs-nbd-", dir=parent))
        os.chmod(self.path, 0o1733)
        self.socket = self.path / "nbd.sock"

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


@dataclass
class SourceDisk:
    """What a capture reads: a disk (or volume) of `size` bytes, the regions that may hold
    data (a full read reads only these) and those known to read as zeros, the regions
    changed since the base (`dirty()`, None without a base), and `reader(spans)`: a
    BlockSource serving reads of those spans, in their order. `bitmap` names what tracks
    the changes, for messages."""

    name: str
    size: int
    data: list[tuple[int, int]]
    zero: list[tuple[int, int]]
    dirty: Callable[[], list[tuple[int, int]]] | None
    reader: Callable[[list[Span]], BlockSource]
    bitmap: str = "its bitmap"


def capture_disk(
    ctx: JobContext,
    export: NbdExport,
    disk: Disk,
    folder: Path,
    decision: Decision,
    progress: Progress | None,
) -> DiskCapture:
    """One disk of a VM generation from its NBD export (see `capture_source`)."""
    allocation = export.extents(ALLOCATION)
    source = SourceDisk(
        disk.target,
        export.size,
        data=matching(allocation, lambda flags: not flags & STATE_ZERO),
        zero=matching(allocation, lambda flags: flags & STATE_ZERO),
        dirty=lambda: matching(
            export.extents(dirty_context(disk.target)), lambda f: f & STATE_DIRTY
        ),
        reader=lambda _spans: export,
    )
    return capture_source(ctx, source, disk_layout(disk.target), folder, decision, progress)


def capture_source(
    ctx: JobContext,
    source: SourceDisk,
    layout: Layout,
    folder: Path,
    decision: Decision,
    progress: Progress | None,
) -> DiskCapture:
    """One image of the generation in `folder`: an incremental patch of the base's image
    when the decision allows and the checks pass, else a full read."""
    size = source.size
    image = folder / layout.image
    image.parent.mkdir(exist_ok=True)
    free_before = _free_space(folder)
    base_digests: list[bytes] | None = None
    reason = decision.reason
    if decision.base is not None:
        base_digests, why = _base_digests(decision.base, layout, size)
        if base_digests is None:
            reason = why
    if source.dirty is None and base_digests is not None:  # never assume "nothing changed"
        base_digests, reason = None, reason or f"no record of what changed in {source.name}"
    dirty = source.dirty() if base_digests is not None and source.dirty is not None else []
    warning = ""
    if base_digests is not None and decision.base is not None and not decision.compare:
        changed = spans_of(dirty, size)
        changed_blocks = blocks_of(changed)
        sample = sample_blocks(block_count(size), changed_blocks, random.Random())
        sample_spans = [Span(i * BLOCK, min(size, (i + 1) * BLOCK)) for i in sample]
        reader = source.reader(sample_spans)
        wrong = differing_blocks(reader.read_into, size, sample, base_digests)
        if wrong:
            reason = (
                f"{source.name} differs from generation {decision.base.id} at MiB "
                f"{wrong[0]} where {source.bitmap} says nothing changed: rolled back or "
                "replaced behind gfs's back"
            )
            warning = reason
        else:
            path = clone_file(decision.base.path / layout.image, image)
            spans = split_zero(changed, source.zero)
            reader = source.reader([span for span in spans if not span.zero])
            result = write_image(reader, image, spans, base_digests, progress)
            damaged = check_stored_blocks(image, sample, base_digests)
            if not damaged:
                return DiskCapture(
                    source.name,
                    result,
                    "incremental",
                    path,
                    new_bytes=_new_space(image, free_before),
                    sampled=len(sample),
                    layout=layout,
                )
            reason = (
                f"generation {decision.base.id}'s image of {source.name} is damaged on the "
                f"target (MiB {damaged[0]} no longer matches its digest): read in full"
            )
            warning = reason
            image.unlink()
    spans = spans_of(source.data, size)
    result = write_image(source.reader(spans), image, spans, None, progress)
    capture = DiskCapture(
        source.name,
        result,
        "full",
        "new",
        reason,
        _new_space(image, free_before),
        warning=warning,
        layout=layout,
    )
    if decision.compare and base_digests is not None:
        changed_blocks = blocks_of(spans_of(dirty, size))
        capture.alarm = [
            index
            for index, (got, had) in enumerate(zip(result.digests, base_digests, strict=True))
            if index not in changed_blocks and got != had
        ]
    return capture


def _free_space(folder: Path) -> int:
    info = os.statvfs(folder)
    return info.f_bfree * info.f_frsize


def _new_space(image: Path, free_before: int) -> int:
    """The space the image alone takes: its extents no other file shares (FIEMAP), or
    where FIEMAP is not offered (an NFS client) the filesystem's free space it used up
    (other writers on the share make this an upper bound)."""
    unshared = unshared_bytes(image)
    if unshared is not None:
        return unshared
    return max(0, free_before - _free_space(image.parent))


def blocks_of(spans: list[Span]) -> set[int]:
    return {index for span in spans for index in range(span.start // BLOCK, block_count(span.end))}


def _base_digests(base: Stored, layout: Layout, size: int) -> tuple[list[bytes] | None, str]:
    """The base image's per-MiB digests, checked against its manifest, or why not."""
    files = {data.path: data for data in base.manifest.files}
    image = files.get(layout.image)
    blocks = files.get(layout.blocks)
    if image is None or blocks is None:
        return None, f"{layout.image} is not in generation {base.id}"
    if image.size != size:
        return None, f"{layout.image} was resized ({image.size} -> {size} bytes)"
    try:
        digests = read_digests(base.path / blocks.path, size)
    except OSError as exc:
        return None, f"generation {base.id}: {blocks.path} unreadable ({exc.strerror})"
    if digest_of(digests) != image.digest:
        return None, f"generation {base.id}: {blocks.path} does not match its image's checksum"
    return digests, ""


def files_of(folder: Path, captures: list[DiskCapture]) -> list[DataFile]:
    """The data files of the captured images: each image and its per-MiB digests (the
    digest files written here)."""
    for capture in captures:
        blocks = folder / capture.layout.blocks
        blocks.parent.mkdir(exist_ok=True)
        write_digests(blocks, capture.result.digests)
    return data_files(captures)


def data_files(captures: list[DiskCapture]) -> list[DataFile]:
    """The manifest's entries of the captured images and their digest files (written by
    `files_of`, or on the target's host)."""
    files = []
    for capture in captures:
        layout = capture.layout
        files.append(DataFile(layout.image, capture.result.size, capture.result.digest))
        digest = BlockDigest()
        digest.update(b"".join(capture.result.digests))
        files.append(DataFile(layout.blocks, digest.size, digest.hexdigest()))
    return files


def capture_record(
    ctx: JobContext,
    decision: Decision,
    captures: list[DiskCapture],
    checkpoint: str | None,
) -> dict[str, Any]:
    """The manifest's `capture`: mode, base, reason, bytes, and what the next run needs."""
    incremental = bool(captures) and all(c.mode == "incremental" for c in captures)
    base = decision.base
    record: dict[str, Any] = {
        "mode": "incremental" if incremental else "full",
        "base": base.id if base is not None and incremental else None,
        "reason": "; ".join(dict.fromkeys(c.reason for c in captures if c.reason)),
        "checkpoint": checkpoint,
        "bytes_read": sum(c.result.bytes_read for c in captures),
        "bytes_written": sum(c.result.bytes_written for c in captures),
        "new_bytes": _sum_known([c.new_bytes for c in captures]),
        "disks": {
            c.target: {
                "mode": c.mode,
                "path": c.path,
                "bytes_read": c.result.bytes_read,
                "bytes_written": c.result.bytes_written,
                "zeroed": c.result.zeroed,
                "new_bytes": c.new_bytes,
                "sampled_mib": c.sampled,
                **({"reason": c.reason} if c.reason else {}),
            }
            for c in captures
        },
    }
    if incremental and base is not None:
        verified = full_verify_time(base)
        record["full_verified_at"] = _stamp(verified) if verified else None
        record["last_full_at"] = capture_of(base).get("last_full_at")
    else:
        record["last_full_at"] = _stamp(ctx.now)
    alarms = {c.target: c.alarm for c in captures if c.alarm}
    if alarms:
        record["alarm"] = {
            target: f"{len(blocks)} MiB differ from the base where the bitmap saw no change "
            f"(first at MiB {blocks[0]})"
            for target, blocks in alarms.items()
        }
    return record


def _sum_known(values: list[int | None]) -> int | None:
    return None if any(v is None for v in values) else sum(v for v in values if v is not None)

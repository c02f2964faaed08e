"""Thin LVM volumes read by what changed: thin_delta between the previous run's thin
snapshot (kept as the delta base) and this run's, clone-and-patch on the target.

A thin snapshot costs nothing until the origin changes, so gfs keeps the snapshot of the
newest generation as the base of the next run. At the next run, `thin_delta` (on a
reserved snapshot of the pool's metadata) lists the pool blocks that differ between the two
snapshots: those are read from the new snapshot and patched into a clone of the base's
image on the target; blocks unmapped since (discarded) are punched. The same checks as a
VM's incremental apply (vm_capture.capture_source): changed MiBs read back while written,
a sample of unchanged MiBs compared on the volume and on the target.

The base snapshot is dropped (and the next run reads everything) when the pool's data or
metadata use passes `thin_pool_max_percent` (default 80): a kept snapshot pins the blocks
the origin has overwritten since. At the start of each run every other gfs snapshot of the
job is removed. A target mounted by the volume's host: the same, built by that host in
its mount (`capture_on_host`, copying/hostimage.py; python3 needed there): the data never
crosses SSH, an NFS 4.2 mount clones on the server.
"""

from __future__ import annotations

import contextlib
import errno
import json
import random
import re
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

from gfs_backup.backends.base import JobContext, Progress
from gfs_backup.backends.vm_capture import (
    Decision,
    DiskCapture,
    Layout,
    SourceDisk,
    blocks_of,
    capture_of,
    judge_base,
)
from gfs_backup.copying.hostimage import (
    MAX_SPEC,
    ImageSpec,
    ScriptOutput,
    encode_spec,
    make_image_command,
)
from gfs_backup.copying.image import (
    ImageResult,
    Span,
    block_count,
    digest_of,
    sample_blocks,
    spans_of,
    split_zero,
)
from gfs_backup.core.errors import GfsError
from gfs_backup.target.catalog import Stored
from gfs_backup.tools.lvm import (
    make_lvs_command,
    make_metadata_snap_command,
    make_read_ranges_command,
    make_remove_command,
    make_thin_delta_command,
    make_thin_info_command,
    parse_lvs,
    parse_thin_delta,
    parse_thin_info,
)
from gfs_backup.transport.runner import CommandError, Runner

LAYOUT = Layout("volume.raw", "blocks/volume.sha256-1m")
READ_TIMEOUT = 24 * 3600.0
DEFAULT_POOL_MAX_PERCENT = 80.0


def is_job_snapshot(name: str, job: str) -> bool:
    """A snapshot gfs made for `job` (backends.base.snapshot_name), not another job's whose
    name merely starts alike."""
    prefix = f"gfs-{job}-"
    rest = name[len(prefix) :]
    return name.startswith(prefix) and bool(re.fullmatch(r"\d{8}T\d{6}Z-r\d+", rest))


class RangeReader:
    """A BlockSource over spans of a block device, read by one command on the job's host
    (its bytes arrive in span order: each read must be the next one)."""

    def __init__(self, runner: Runner, device: str, spans: list[Span], size: int) -> None:
        self.size = size
        self._ranges = [(span.start, span.end - span.start) for span in spans]
        self._index = 0
        self._within = 0
        self._context: AbstractContextManager[IO[bytes]] | None = None
        self._stream: IO[bytes] | None = None
        if self._ranges:
            command = make_read_ranges_command(device, self._ranges, READ_TIMEOUT)
            self._context = runner.reading(command)
            self._stream = self._context.__enter__()

    def read_into(self, buffer: memoryview, offset: int) -> None:
        if self._stream is None or self._index >= len(self._ranges):
            raise OSError(errno.EIO, f"read at {offset} past the ranges asked for")
        start, length = self._ranges[self._index]
        if offset != start + self._within or self._within + len(buffer) > length:
            raise OSError(errno.EIO, f"read at {offset} out of the order asked for")
        done = 0
        while done < len(buffer):
            count = self._stream.readinto(buffer[done:])  # type: ignore[attr-defined]
            if not count:
                raise OSError(errno.EIO, f"the volume's read ended early at {offset + done}")
            done += count
        self._within += len(buffer)
        if self._within == length:
            self._index, self._within = self._index + 1, 0
        if self._index == len(self._ranges):
            self.close()

    def close(self) -> None:
        """End the command once read to the end: its exit status is checked (raises)."""
        context, self._context = self._context, None
        if context is not None:
            context.__exit__(None, None, None)

    def abort(self) -> None:
        """End the command whatever it still has to send (killed). Never raises."""
        context, self._context = self._context, None
        if context is not None:
            stop = OSError(errno.ECANCELED, "read abandoned")
            with contextlib.suppress(Exception):  # it was being stopped anyway
                context.__exit__(OSError, stop, None)


class ThinDelta:
    """The thin-snapshot bookkeeping of one run of an LVM job on a thin volume."""

    def __init__(self, ctx: JobContext, vg: str, pool: str, snapshot: str, size: int) -> None:
        self.ctx = ctx
        self.vg = vg
        self.pool = pool
        self.snapshot = snapshot
        self.size = size
        self.readers: list[RangeReader] = []

    def decide(self, previous: Stored | None) -> tuple[Decision, str | None]:
        """Whether to read only the delta since `previous`'s kept snapshot (the base
        snapshot's name), and the reason when not. Removes every other gfs snapshot of the
        job, and the base too when the pool is too full to keep it."""
        job = self.ctx.job
        base = str(capture_of(previous).get("snapshot") or "") if previous else ""
        self._remove_others(keep={base, self.snapshot})
        if not job.options.get("incremental", True):
            return Decision(None, "incremental = false for this job"), None
        if previous is None:
            return Decision(None, "first run: no verified generation to build on"), None
        if not base:
            return Decision(None, f"generation {previous.id} kept no thin snapshot"), None
        info = parse_thin_info(
            self.ctx.runner.run(
                make_thin_info_command(self.vg, (base, self.snapshot, self.pool)), check=False
            ).stdout
        )
        if base not in info:
            return Decision(None, f"thin snapshot {self.vg}/{base} of {previous.id} is gone"), None
        limit = float(job.options.get("thin_pool_max_percent", DEFAULT_POOL_MAX_PERCENT))
        pool = info.get(self.pool)
        use = max(pool.data_percent or 0.0, pool.metadata_percent or 0.0) if pool else 0.0
        if use >= limit:
            self._remove(base)
            return (
                Decision(
                    None,
                    f"thin pool {self.vg}/{self.pool} is {use:.0f}% full (thin_pool_max_percent "
                    f"= {limit:.0f}): dropped the delta base {base}",
                ),
                None,
            )
        return judge_base(self.ctx, previous), base

    def changes(self, base: str) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """(changed, unmapped) byte ranges between the base snapshot and this run's."""
        runner = self.ctx.runner
        info = parse_thin_info(
            runner.run(make_thin_info_command(self.vg, (base, self.snapshot))).stdout
        )
        old, new = info[base].thin_id, info[self.snapshot].thin_id
        if old is None or new is None:
            raise GfsError(f"lvs gave no thin id for {base} or {self.snapshot}")
        runner.run(make_metadata_snap_command(self.vg, self.pool, reserve=False), check=False)
        runner.run(make_metadata_snap_command(self.vg, self.pool, reserve=True))
        try:
            xml = runner.run(make_thin_delta_command(self.vg, self.pool, old, new)).stdout
        finally:
            runner.run(make_metadata_snap_command(self.vg, self.pool, reserve=False), check=False)
        return parse_thin_delta(xml, self.size)

    def source(
        self, device: str, dirty: list[tuple[int, int]] | None, zero: list[tuple[int, int]]
    ) -> SourceDisk:
        def reader(spans: list[Span]) -> RangeReader:
            found = RangeReader(self.ctx.runner, device, spans, self.size)
            self.readers.append(found)
            return found

        changed: Callable[[], list[tuple[int, int]]] | None = None
        if dirty is not None:
            known = dirty

            def changed() -> list[tuple[int, int]]:
                return known

        return SourceDisk(
            "volume", self.size, [(0, self.size)], zero, changed, reader, "thin_delta"
        )

    def abort_readers(self) -> None:
        """Stop the reads left unfinished (an error on the way out)."""
        for reader in self.readers:
            reader.abort()

    def _remove_others(self, keep: set[str]) -> None:
        listed = self.ctx.runner.run(make_lvs_command(self.vg), check=False).stdout
        for volume in parse_lvs(listed):
            if is_job_snapshot(volume.name, self.ctx.job.name) and volume.name not in keep:
                self._remove(volume.name)

    def _remove(self, name: str) -> None:
        self.ctx.runner.run(make_remove_command(self.vg, name))
        self.ctx.log.info("job %s: removed snapshot %s/%s", self.ctx.job.name, self.vg, name)


def capture_on_host(
    ctx: JobContext,
    thin: ThinDelta,
    device: str,
    into: Path,
    decision: Decision,
    base: str | None,
    progress: Progress | None,
) -> DiskCapture:
    """The image built by the volume's own host in the target it mounts (hostimage.py):
    the changed MiBs patched into a clone of the base's image when the decision, the
    base's digests and the sampled checks allow, else a full read. Nothing crosses SSH but
    progress, the result and the digests."""
    size = thin.size
    reason = decision.reason
    warning = ""
    spec = ImageSpec(device, str(into / LAYOUT.image), str(into / LAYOUT.blocks), size, [])
    incremental: ImageSpec | None = None
    stored = decision.base
    if base is not None and stored is not None and decision.compare:
        reason = "full_every: a full read (no comparison with the base on a host's target)"
    elif base is not None and stored is not None:
        files = {data.path: data for data in stored.manifest.files}
        image, blocks = files.get(LAYOUT.image), files.get(LAYOUT.blocks)
        if image is None or blocks is None:
            reason = f"generation {stored.id} has no per-MiB digests to build on"
        elif image.size != size:
            reason = f"{LAYOUT.image} was resized ({image.size} -> {size} bytes)"
        else:
            try:
                changed, zero = thin.changes(base)
            except (GfsError, ValueError) as exc:
                reason = f"thin_delta failed: {exc}"
            else:
                touched = spans_of(changed + zero, size)
                sample = sample_blocks(block_count(size), blocks_of(touched), random.Random())
                incremental = replace(
                    spec,
                    spans=[(s.start, s.end, s.zero) for s in split_zero(touched, zero)],
                    base_image=str(stored.path / LAYOUT.image),
                    base_blocks=str(stored.path / LAYOUT.blocks),
                    base_blocks_digest=blocks.digest,
                    sample=sample,
                )
    if incremental is not None and stored is not None:
        encoded = encode_spec(incremental)
        if len(encoded) > MAX_SPEC:
            reason = f"{len(incremental.spans)} changed ranges are too many for one command"
        else:
            ctx.log.info("job %s: reading what changed since %s", ctx.job.name, base)
            outcome = _run_image_script(ctx, encoded, progress)
            if "digests" in outcome:
                return _capture(outcome, size, "incremental", "", "", len(incremental.sample or []))
            reason = _refusal(outcome, stored.id)
            warning = reason
    ctx.log.info("job %s: full read: %s", ctx.job.name, reason)
    outcome = _run_image_script(ctx, encode_spec(replace(spec, spans=[(0, size, False)])), progress)
    if "digests" not in outcome:
        raise GfsError(f"job {ctx.job.name}: the host's image writer gave no result: {outcome}")
    return _capture(outcome, size, "full", reason, warning, 0)


def _refusal(outcome: dict[str, Any], base: str) -> str:
    if "source_differs" in outcome:
        return (
            f"volume differs from generation {base} at MiB {outcome['source_differs'][0]} "
            "where thin_delta says nothing changed: rolled back or replaced behind gfs's back"
        )
    if "target_differs" in outcome:
        return (
            f"generation {base}'s image is damaged on the target (MiB "
            f"{outcome['target_differs'][0]} no longer matches its digest): read in full"
        )
    return f"generation {base}: {outcome.get('refused', 'refused')}"


def _capture(
    outcome: dict[str, Any], size: int, mode: str, reason: str, warning: str, sampled: int
) -> DiskCapture:
    raw = bytes.fromhex(str(outcome["digests"]))
    digests = [raw[index : index + 32] for index in range(0, len(raw), 32)]
    if len(digests) != block_count(size):
        raise GfsError(f"the host's image writer returned {len(digests)} digests for {size} B")
    result = ImageResult(
        size,
        digest_of(digests),
        digests,
        int(outcome["bytes_read"]),
        int(outcome["bytes_written"]),
        int(outcome["zeroed"]),
    )
    path = str(outcome["path"]) if mode == "incremental" else "new"
    return DiskCapture(
        "volume", result, mode, path, reason, None, warning=warning, sampled=sampled, layout=LAYOUT
    )


def _run_image_script(ctx: JobContext, encoded: str, progress: Progress | None) -> dict[str, Any]:
    command = make_image_command(encoded, READ_TIMEOUT, ctx.target.io_timeout)
    output = ScriptOutput()
    try:
        with ctx.runner.reading(command) as stream:
            while chunk := stream.read1(1 << 16):  # type: ignore[attr-defined]
                grown = output.feed(chunk)
                if grown and progress is not None:
                    progress(grown)
    except CommandError as exc:
        text = " ".join(str(exc).split())
        if "python3" in text and ("not found" in text or "No such file" in text):
            raise GfsError(
                f"job {ctx.job.name}: host {ctx.runner.host} has no python3, which builds "
                "images in the target it mounts (apt install python3-minimal there)"
            ) from None
        raise GfsError(
            f"job {ctx.job.name}: building the image on host {ctx.runner.host} failed: "
            f"{text[-400:]}"
        ) from None
    found = output.result()
    if found is None:
        raise GfsError(f"job {ctx.job.name}: the host's image writer gave no result")
    value = json.loads(found)
    if not isinstance(value, dict):
        raise GfsError(f"job {ctx.job.name}: the host's image writer gave {found[:200]}")
    return value

"""`gfs drill`: prove a generation restores, in a scratch directory that is always removed.

- libvirt: booted straight from the generation's images on the target, from the saved
  domain XML in an isolated plain QEMU (see drillvm): no network, memory capped, never
  libvirt, snapshot mode: QEMU opens each image read-only as the backing file of a qcow2
  overlay in the scratch directory, so the boot starts in seconds whatever the disk's size
  and the scratch space used is what the guest writes. While it boots, each image is read
  once more in full and checked against the manifest's checksum, a check of its own: a
  damaged image fails the drill even when it boots. Checks, each reported on its own:
  checksums, `qemu-img check` (qcow2), boot (the policy's console regex and/or the guest
  agent answering in time).
- files: the tree is restored with owners, modes, times and xattrs, and every restored file
  is re-read and compared with the manifest's checksums.
- lvm: the raw image is restored into the scratch directory (from a target on another
  host: streamed from that host) and checked against the manifest; the filesystem `blkid`
  finds in it (with a partition table: in each partition) is checked read-only by its own
  tool (see fscheck). An image without a filesystem passes on its checksum, and the result
  says so.
- btrfs: the stream's checksum is checked, `btrfs receive` (which checks every command's
  CRC) restores it on a btrfs scratch directory, its received UUID must be the snapshot's,
  then every file of the restored subvolume is read back (btrfs checks its data checksums
  on read). `btrfs check` needs an unmounted filesystem and `btrfs scrub` covers the whole
  scratch filesystem, so neither is run.

The result goes into the generation's manifest (`drills`) and the run history.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from gfs_backup.actions.reconcile import remove_leftover
from gfs_backup.actions.restore import find_generation
from gfs_backup.actions.verify import check_data
from gfs_backup.backends import backend_for
from gfs_backup.backends.base import JobContext, RestoreOptions
from gfs_backup.backends.libvirt import image_problems
from gfs_backup.backends.sourcehost import LocalHost, RemoteHost, SourceHost, runs_on_host
from gfs_backup.backends.vm_inplace import boot_file, disk_files
from gfs_backup.copying.copy import digest_file
from gfs_backup.core.config import LOCAL_HOST, Config, Job
from gfs_backup.core.errors import GfsError, InputError, Problem
from gfs_backup.core.lock import job_lock
from gfs_backup.core.policy import TCG_TIMEOUT_FACTOR, DrillSettings
from gfs_backup.core.state import State
from gfs_backup.target.catalog import Stored, list_generations
from gfs_backup.target.fs import LOCAL_FS, RemoteFS, TargetFS, fetch_file
from gfs_backup.target.manifest import (
    DRILL_RECORDS,
    MANIFEST,
    DataFile,
    read_manifest,
    write_manifest,
)
from gfs_backup.tools.accel import best_accel
from gfs_backup.tools.drillboot import AGENT_SOCKET, BootCheck, boot_and_check
from gfs_backup.tools.drillprobe import Probe, free_port, probe_ports, run_commands
from gfs_backup.tools.drillvm import DrillLimits, make_qemu_argv, parse_drill_machine
from gfs_backup.tools.fscheck import check_image
from gfs_backup.tools.guest_agent import AgentClient
from gfs_backup.tools.mounts import mount_of, read_mounts
from gfs_backup.transport.runner import LocalRunner

log = logging.getLogger("gfs")
DEFAULT_SCRATCH = Path("/var/tmp")
MONITOR_SOCKET = "qmp.sock"  # in the drill's directory, named relative (QEMU runs there)
WORKDIR_PREFIX = ".gfs-drill-"


@dataclass(frozen=True)
class CheckResult:
    """One layer of a drill, reported on its own (a JUnit testcase)."""

    name: str  # checksums | qemu-img check | boot
    passed: bool
    seconds: float
    detail: str
    output: str = ""  # the console's or a command's end, for a failure


class DrillCheckFailed(Exception):
    """The generation did not pass: `reason` says why, `tail` is the console's end,
    `checks` the layers that ran."""

    def __init__(
        self, reason: str, tail: str = "", checks: tuple[CheckResult, ...] = (), accel: str = ""
    ) -> None:
        super().__init__(reason)
        self.tail = tail
        self.checks = checks
        self.accel = accel


class GenerationGone(GfsError):
    """The generation vanished while it was drilled (pruned, ESTALE): no verdict."""


@dataclass(frozen=True)
class DrillResult:
    job: str
    generation: str
    passed: bool
    check: str  # what was checked, in a few words
    reason: str
    seconds: float
    time: datetime
    console_tail: str = ""
    checks: tuple[CheckResult, ...] = ()
    error: bool = False  # the drill itself could not run (not a verdict on the backup)
    accel: str = ""  # the accelerator a VM drill ran under (kvm, tcg)

    def record(self) -> dict[str, Any]:
        """The manifest's `drills` entry (console tail only on failure)."""
        entry: dict[str, Any] = {
            "time": self.time.astimezone(timezone.utc).isoformat().replace("+00:00", "Z"),
            "duration_s": round(self.seconds, 2),
            "outcome": "pass" if self.passed else "fail",
            "check": self.check,
            "reason": self.reason,
        }
        if not self.passed and self.console_tail:
            entry["console_tail"] = self.console_tail
        if self.accel:
            entry["accel"] = self.accel
        if self.checks:
            entry["checks"] = [
                {
                    "name": check.name,
                    "outcome": "pass" if check.passed else "fail",
                    "duration_s": round(check.seconds, 2),
                    "detail": check.detail,
                }
                for check in self.checks
            ]
        return entry


def scratch_root(job: Job, host: SourceHost | None = None) -> Path:
    """Where the job's drills restore, on `host` (default here): `scratch_dir`, else
    /var/tmp (btrfs: the directory holding the subvolume). InputError when it is missing
    or (btrfs) not on btrfs."""
    host = host or LocalHost()
    configured = job.options.get("scratch_dir")
    if configured:
        root = Path(configured)
    elif job.kind == "btrfs":
        root = Path(job.options["subvolume"]).parent
    else:
        root = DEFAULT_SCRATCH
    where = f"job {job.name}: scratch_dir"
    if not host.is_dir(root):
        on = f" on host {host.name}" if host.name != LOCAL_HOST else ""
        raise InputError(
            Problem(where, f"{root}{on} is not a directory: create it or set scratch_dir")
        )
    if job.kind == "btrfs":
        fstype = mount_of(root, read_mounts()).fstype
        if fstype != "btrfs":
            raise InputError(
                Problem(
                    where,
                    f"{root} is on {fstype}, but a btrfs drill receives the subvolume "
                    "there: set scratch_dir in the job to a directory on a btrfs filesystem",
                )
            )
    return root


def drill_host(job: Job, stored: Stored) -> SourceHost:
    """Where a drill of `stored` restores: a files job of a remote host restores and checks
    its tree on that host, from the target it mounts (FilesBackend.restore); every other
    drill restores here (a remote target's data is streamed here)."""
    if runs_on_host(job, "drill") and isinstance(stored.fs, RemoteFS):
        return RemoteHost(job.host, stored.fs.runner)
    return LocalHost()


def drill(
    config: Config, job: Job, generation: str | None, now: datetime, wait: bool = False
) -> DrillResult:
    """Drill the named (or newest) generation of `job` under its lock; record the result."""
    stored = find_generation(config, job, generation)
    host = drill_host(job, stored)
    root = scratch_root(job, host)
    with job_lock(config.state_dir, job.name, wait):
        state = State(config.state_dir)
        try:
            remove_leftover_drills(state, job, host)
            return drill_locked(job, stored, root, state, now)
        finally:
            state.close()


def drill_locked(
    job: Job, stored: Stored, root: Path, state: State, now: datetime, record: str = "manifest"
) -> DrillResult:
    """Drill `stored` in a new directory under `root` (the caller holds the job's lock).
    `record`: "manifest" appends the result to the generation's manifest (the host, under
    the job's lock), "beside" writes it as a file of its own next to it (a drill away from
    the host, which does not hold that lock), "" records nothing."""
    host = drill_host(job, stored)
    run_id = state.start_run(job.name)
    workdir = root / f"{WORKDIR_PREFIX}{job.name}-{stored.id}-r{run_id}"
    entry = state.journal(run_id, job.name, "drill", str(workdir))
    runner = host.runner if isinstance(host, RemoteHost) else LocalRunner()
    ctx = JobContext(job, runner, state, run_id, now, log)
    check = describe_check(job, stored)
    log.info("job %s: drill of %s in %s (%s)", job.name, stored.id, workdir, check)
    started = time.monotonic()
    passed, reason, tail, error, accel = False, "", "", False, ""
    checks: tuple[CheckResult, ...] = ()
    try:
        try:
            host.make_dir(workdir)
            reason, checks, accel = _drill_kind(ctx, stored, workdir)
            passed = True
        except DrillCheckFailed as exc:
            reason, tail, checks, accel = str(exc), exc.tail, exc.checks, exc.accel
        except (GfsError, OSError, ValueError) as exc:
            reason, error = _one_line(exc), True
        gone = not stored.fs.exists(stored.path / MANIFEST)
        if gone:
            passed, error = False, True
            reason = f"generation {stored.id} was removed during its drill (pruned?): no verdict"
    except BaseException:
        state.finish_run(run_id, "interrupted", stored.id, message="drill interrupted")
        raise
    finally:
        _remove_workdir(host, workdir)
        state.done(entry)
    seconds = time.monotonic() - started
    result = DrillResult(
        job.name, stored.id, passed, check, reason, seconds, now, tail, checks, error, accel
    )
    if record == "manifest" and not gone:
        _record(stored, result)
    elif record == "beside" and not gone:
        _record_beside(stored, result)
    status = "drilled" if passed else "drill-failed"
    state.finish_run(run_id, status, stored.id, seconds=result.seconds, message=reason)
    verdict = "passed" if passed else "FAILED"
    (log.info if passed else log.error)(
        "job %s: drill of %s %s: %s", job.name, stored.id, verdict, reason
    )
    return result


def describe_check(job: Job, stored: Stored) -> str:
    kind = stored.manifest.kind
    if kind == "libvirt":
        return f"boot: {job.policy.drill.describe()}"
    if kind == "btrfs":
        return "btrfs receive + received UUID + read back"
    if kind == "lvm":
        return "restore + image checksum + read-only filesystem check"
    return "restore + checksums of every file"


def _drill_kind(
    ctx: JobContext, stored: Stored, workdir: Path
) -> tuple[str, tuple[CheckResult, ...], str]:
    """The drill of the generation's kind: its reason, its checks when it has layers, the
    accelerator a VM ran under. Raises DrillCheckFailed."""
    kind = stored.manifest.kind
    if kind == "libvirt":
        return _drill_vm(ctx, stored, workdir)
    if kind == "btrfs":
        return _drill_btrfs(ctx, stored, workdir), (), ""
    if kind == "lvm":
        return _drill_volume(ctx, stored, workdir), (), ""
    if kind == "files":
        restored = workdir / "restored"
        backend_for(kind).restore(ctx, stored, restored, None, RestoreOptions())
        return f"restored {len(stored.manifest.tree)} entries, every checksum matches", (), ""
    raise DrillCheckFailed(f"no drill for {kind} generations yet")


def _drill_vm(
    ctx: JobContext, stored: Stored, workdir: Path
) -> tuple[str, tuple[CheckResult, ...], str]:
    """Boot from the images on the target (read-only backing files of QEMU's snapshot
    overlays in `workdir`) while their checksums are verified: the reason and every
    check's result, or DrillCheckFailed with them."""
    settings = ctx.job.policy.drill
    if stored.fs is not LOCAL_FS:
        stored = _fetched(stored, workdir / "generation")
    disks = disk_files(stored)
    images = {Path(data.path).stem: stored.path / data.path for data in disks}
    try:
        machine = parse_drill_machine(str(stored.manifest.source.get("xml", "")), images)
    except ValueError as exc:
        raise DrillCheckFailed(f"cannot boot generation {stored.id}: {exc}") from None
    # A kernel and initrd booted directly: the generation's copies (what was backed up,
    # and what a machine without the host's files has), else the host's files.
    saved = {name: boot_file(stored, name) for name in ("kernel", "initrd")}
    kernel, initrd = saved["kernel"], saved["initrd"]
    if kernel is not None and machine.kernel is not None:
        machine = replace(machine, kernel=str(stored.path / kernel.path))
    if initrd is not None and machine.initrd is not None:
        machine = replace(machine, initrd=str(stored.path / initrd.path))
    for path in (machine.kernel, machine.initrd):
        if path is not None and not os.access(path, os.R_OK):
            raise DrillCheckFailed(
                f"the domain boots {path}, which is not readable here and not saved with "
                "this generation (generations made since gfs saves boot files carry it)"
            )
    summed_files = disks + [data for data in saved.values() if data is not None]
    checks: list[CheckResult] = []
    started = time.monotonic()
    problems = [
        f"{data.path}: {found}"
        for data in disks
        if (found := image_problems(ctx.runner, stored.path / data.path))
    ]
    checks.append(
        CheckResult(
            "qemu-img check",
            not problems,
            time.monotonic() - started,
            "; ".join(problems) or "image structure sound (raw images have none to check)",
        )
    )
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gfs-drill-sum") as pool:
        summed = pool.submit(_checksums, stored, summed_files)
        accel, timeout = resolve_accel(ctx, settings)
        needs_agent = settings.agent or bool(settings.commands)
        agent_socket = Path(AGENT_SOCKET) if needs_agent else None  # QEMU runs in workdir
        forwards = tuple((port, free_port()) for port in settings.ports)
        console = workdir / "console.log"
        limits = DrillLimits(
            settings.memory_mib,
            accel,
            console,
            agent_socket,
            f"gfs-drill-{ctx.job.name}",
            forwards,
            Path(MONITOR_SOCKET) if forwards else None,
        )

        def after_boot(agent: AgentClient) -> list[Probe]:
            found = run_commands(agent, settings.commands, timeout) if settings.commands else []
            if forwards:
                found += probe_ports(forwards, workdir / MONITOR_SOCKET)
            return found

        assert isinstance(ctx.runner, LocalRunner)
        booted = boot_and_check(
            ctx.runner,
            make_qemu_argv(machine, limits),
            workdir,
            BootCheck(settings.console_pattern, settings.agent, timeout),
            console,
            after_boot if settings.commands or forwards else None,
        )
        boot = CheckResult(
            "boot",
            booted.passed,
            booted.seconds,
            f"{booted.reason} (under {accel.upper()})",
            "" if booted.passed else booted.console_tail,
        )
        checks.insert(0, summed.result())
    checks.append(boot)
    checks += [
        CheckResult(probe.name, probe.passed, probe.seconds, probe.detail, probe.output)
        for probe in booted.probes
    ]
    failed = [check for check in checks if not check.passed]
    if failed:
        reason = "; ".join(f"{check.name}: {check.detail}" for check in failed)
        raise DrillCheckFailed(reason, booted.console_tail, tuple(checks), accel)
    count = len(summed_files)
    return f"{booted.reason}; checksums of {count} file(s) match", tuple(checks), accel


def resolve_accel(ctx: JobContext, settings: DrillSettings) -> tuple[str, float]:
    """The accelerator a VM drill runs under and its boot timeout: `auto` is KVM when the
    probe (tools/accel.py) ran guest code under it, else TCG with the timeout multiplied
    by TCG_TIMEOUT_FACTOR; `tcg` and `kvm` as given."""
    if settings.accel != "auto":
        return settings.accel, settings.timeout
    accel, why = best_accel()
    if accel == "kvm":
        return accel, settings.timeout
    timeout = settings.timeout * TCG_TIMEOUT_FACTOR
    ctx.log.info(
        "job %s: drill under TCG, boot timeout %g s (x%d): %s",
        ctx.job.name,
        timeout,
        TCG_TIMEOUT_FACTOR,
        why,
    )
    return "tcg", timeout


def _fetched(stored: Stored, into: Path) -> Stored:
    """A generation on a remote target, its files streamed from the host that mounts it into
    `into` here (sparse) and checked against the manifest as they come: the generation as
    a drill here boots it. DrillCheckFailed names a file that does not match."""
    into.mkdir()
    for data in stored.manifest.files:
        local = into / data.path
        local.parent.mkdir(parents=True, exist_ok=True)
        algorithm = stored.manifest.digest_algorithm
        try:
            found = fetch_file(stored.fs, stored.path / data.path, algorithm, local)
        except GfsError as exc:
            raise DrillCheckFailed(f"{data.path}: cannot be read from the target: {exc}") from None
        if (found.size, found.digest) != (data.size, data.digest):
            raise DrillCheckFailed(
                f"checksums: {data.path} does not match the manifest's checksum (corrupted)"
            )
    return replace(stored, path=into, fs=LOCAL_FS)


def _checksums(stored: Stored, disks: list[DataFile]) -> CheckResult:
    """Every image read in full from the target's storage (not the page cache) and
    compared with the manifest: a check of its own, run while the drill boots."""
    started = time.monotonic()
    wrong = []
    for data in disks:
        try:
            found = digest_file(stored.path / data.path, uncached=True)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ESTALE):
                raise GenerationGone(
                    f"{data.path} vanished while it was drilled ({exc.strerror}): the "
                    f"generation was removed (pruned?): no verdict"
                ) from None
            wrong.append(f"{data.path}: cannot be read ({exc.strerror})")
            continue
        if (found.size, found.digest) != (data.size, data.digest):
            wrong.append(f"{data.path} does not match the manifest's checksum (corrupted)")
    size = sum(data.size for data in disks)
    return CheckResult(
        "checksums",
        not wrong,
        time.monotonic() - started,
        "; ".join(wrong) or f"{len(disks)} file(s), {size:,d} bytes, match the manifest",
    )


def _drill_btrfs(ctx: JobContext, stored: Stored, workdir: Path) -> str:
    problems = check_data(stored)
    if problems:
        raise DrillCheckFailed(f"generation {stored.id} is damaged: {'; '.join(problems[:3])}")
    restored = workdir / "subvolume"
    backend_for("btrfs").restore(ctx, stored, restored, None, RestoreOptions())
    files, size = read_back(restored)
    return f"received, UUID matches, read back {files} files ({size:,d} bytes)"


def _drill_volume(ctx: JobContext, stored: Stored, workdir: Path) -> str:
    """The volume image restored here (from a remote target: streamed from its host) and
    checked against the manifest, then its filesystem checked read-only."""
    image = workdir / "volume.raw"
    try:
        backend_for("lvm").restore(ctx, stored, image, None, RestoreOptions())
    except ValueError as exc:
        raise DrillCheckFailed(
            f"the restored image does not match the manifest (the generation's data is "
            f"corrupted): {exc}"
        ) from None
    checked = check_image(ctx.runner, image)
    if not checked.clean:
        raise DrillCheckFailed(checked.detail)
    return f"restored {image.stat().st_size:,d} bytes, checksum matches; {checked.detail}"


def read_back(root: Path) -> tuple[int, int]:
    """Read every regular file under `root` (btrfs verifies data checksums on read).

    Raises DrillCheckFailed naming the first file that cannot be read.
    """
    files = size = 0
    for directory, _dirs, names in os.walk(root):
        for name in names:
            path = Path(directory) / name
            if path.is_symlink() or not path.is_file():
                continue
            try:
                with path.open("rb") as handle:
                    while chunk := handle.read(1 << 20):
                        size += len(chunk)
            except OSError as exc:
                raise DrillCheckFailed(
                    f"{path.relative_to(root)}: cannot be read back: {exc.strerror}"
                ) from None
            files += 1
    return files, size


def _remove_workdir(host: SourceHost, workdir: Path) -> None:
    if isinstance(host, RemoteHost):
        host.remove_leftover(workdir)
    else:
        remove_leftover(LocalRunner(), workdir)


def remove_leftover_drills(state: State, job: Job, host: SourceHost | None = None) -> None:
    """Scratch directories of drills that were killed (their journal entries are open),
    on `host` (default here)."""
    for entry in state.open_entries(job.name):
        if entry.action == "drill":
            _remove_workdir(host or LocalHost(), Path(entry.path))
            state.done(entry.id)
            log.info("job %s: removed leftover drill directory %s", job.name, entry.path)


def _record(stored: Stored, result: DrillResult) -> None:
    """Append the result to the generation's manifest (re-read: it may have changed)."""
    try:
        manifest = read_manifest(stored.path, stored.fs)
        write_manifest(stored.path, manifest.with_drill(result.record()), stored.fs)
    except (OSError, ValueError) as exc:
        log.warning("job %s: drill result not recorded in %s: %s", result.job, stored.path, exc)


def _record_beside(stored: Stored, result: DrillResult) -> None:
    """The result as `drill-records/<time>-<pid>.json` beside the manifest, written
    atomically; reading the manifest merges it (target/manifest.py)."""
    folder = stored.path / DRILL_RECORDS
    stamp = result.time.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    try:
        if not stored.fs.is_dir(folder):
            with contextlib.suppress(FileExistsError):
                stored.fs.make_dir(folder, 0o755)
        data = json.dumps(result.record(), indent=2).encode() + b"\n"
        stored.fs.write_file(folder / f"{stamp}-{os.getpid()}.json", data)
    except OSError as exc:
        log.warning("job %s: drill result not recorded in %s: %s", result.job, folder, exc)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, OSError) and exc.filename:
        text = f"{exc.strerror or exc}: {exc.filename}"
    return text or type(exc).__name__


def select_for_schedule(job: Job, stored: list[Stored]) -> Stored | None:
    """The generation a scheduled drill picks: the newest with the policy's `select` label
    (the newest generation when none has it, or for `newest`)."""
    return select_labelled(stored, job.policy.drill.select, job.name)


def select_labelled(stored: list[Stored], wanted: str, job: str = "") -> Stored | None:
    """The newest generation with the label `wanted` (the newest of all when none has it,
    or for `newest`)."""
    if not stored:
        return None
    if wanted != "newest":
        labelled = [item for item in stored if wanted in item.manifest.labels]
        if labelled:
            return labelled[-1]
        log.info("job %s: no %s generation to drill: drilling the newest", job, wanted)
    return stored[-1]


def last_drill_time(stored: list[Stored]) -> datetime | None:
    """When any generation of the job was last drilled."""
    times = []
    for item in stored:
        for record in item.manifest.drills:
            try:
                times.append(
                    datetime.fromisoformat(str(record.get("time", "")).replace("Z", "+00:00"))
                )
            except ValueError:
                continue
    return max(times, default=None)


def periodic_drill(
    job: Job, job_dir: Path, state: State, now: datetime, fs: TargetFS = LOCAL_FS
) -> list[str]:
    """After a run: drill the selected generation when the policy's drill schedule fired
    since the last drill (or since the oldest generation). A warning if it failed."""
    schedule = job.policy.drill_schedule
    if schedule is None:
        return []
    stored = list_generations(job_dir, fs).stored
    chosen = select_for_schedule(job, stored)
    if chosen is None:
        return []
    reference = last_drill_time(stored) or stored[0].manifest.created_at
    due = schedule.next_after(reference, job.policy.zone)
    if due is None or due > now:
        return []
    try:
        result = drill_locked(job, chosen, scratch_root(job, drill_host(job, chosen)), state, now)
    except GfsError as exc:
        return [f"scheduled drill not run: {exc}"]
    if result.passed:
        return []
    return [f"drill of generation {chosen.id} failed: {result.reason}"]


def result_json(result: DrillResult) -> dict[str, Any]:
    return {
        "job": result.job,
        "generation": result.generation,
        **result.record(),
        "error": result.error,
    }

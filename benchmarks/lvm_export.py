"""LVM export over SSH against `dd`: `.venv/bin/python benchmarks/lvm_export.py [--rounds N]`.

Runs as root from the repo root on a machine prepared by scripts/lab-setup. It boots the
lab's nested remote KVM host (tests/lab/remote_host.py: QEMU TCG, real LVM, OpenSSH sshd
forwarded to 127.0.0.1 only), makes a `--size` MiB LV (default 256) in its volume group
filled with a seeded mix of random data (~60%, in pieces of 4..64 MiB written from
/dev/urandom) and written zeros (the rest), takes one classic snapshot of it for the
baselines, and mounts a loop-backed ext4 target here (a sparse image file under /var/tmp).
Then, `--rounds` times (default 3), in an order rotated every round so that all share the
noise of the host (2 cores shared with other QEMU TCG work):

  guest dd     in the guest, `dd if=SNAPSHOT of=/dev/null bs=1M iflag=direct` (the time dd
               itself reports: pure read throughput of the snapshot in the guest);
  ssh dd       OpenSSH's client (C, its default cipher) running the same dd in the guest,
               its stdout into a file on the target, then fsync: the transport without
               gfs (no sparse writes, no checksums);
  paramiko dd  gfs's own SSH runner (`SSHRunner.reading`, paramiko, gfs's window and
               cipher choice) streaming gfs's read command of the snapshot into a plain file
               on the target with 1 MiB writes, then fsync: what gfs's transport costs
               without gfs's copy pipeline;
  gfs          `gfs --debug run --force` of an lvm job on that LV (subprocess, wall time of
               the whole run: Python start, SSH connect, lvs, lvcreate of its own snapshot,
               the stream written sparse with sha256-1m checksums and fsynced, the policy's
               default verify-after-export (re-reading the image from the target), manifest,
               lvremove). The debug log's lines are timestamped here as they arrive; the
               stream phase is from gfs starting `dd` on the host to its next command.

Before each measurement the host's page cache of the guest's PV disk image is dropped (only
that file), so every read comes from the disk as the first one would. Prints every round,
the medians, MiB/s of each, the throughput ratios gfs / ssh dd and gfs / guest dd, the bytes
allocated on the target (gfs does not write zero blocks), and where the CPU went during each
measurement (the guest's vCPU from its /proc/stat, the QEMU process and the local client
from /proc and os.times here). About 8 minutes with the defaults under TCG (the SSH stream
from the TCG guest runs at ~7 MiB/s). Exits 1 if gfs's stream phase is
more than 10% slower than `ssh dd`, 2 if it cannot run. Everything it started (the guest's
QEMU, by PID), made (LVs, mount, loop device, temp dirs) is removed on exit, also on a
failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, cast

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import allocated, evict  # noqa: E402
from gfs_backup.copying.copy import digest_file  # noqa: E402
from gfs_backup.core.config import Host  # noqa: E402
from gfs_backup.tools.lvm import make_read_command  # noqa: E402
from gfs_backup.transport.ssh import SSHRunner  # noqa: E402
from tests.lab.errors import LabError  # noqa: E402
from tests.lab.remote_host import RemoteHost, start_remote_host  # noqa: E402
from tests.lab.remote_image import VG_NAME, build_remote_host_image, generate_ssh_keys  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
DATA_SHARE = 0.6
PIECES_MIB = (4, 8, 16, 32, 64)
WITHIN = 0.10
TARGET_IMAGE_SIZE = 4 * GiB
BASELINE_SNAPSHOT_SIZE = "128m"  # nothing writes to the origin: no copy-on-write needed
JOB = "bench"
POLICY = """
[job.policy]
semantics = "restic"
timezone = "UTC"
schedule = "daily"
[job.policy.retention]
keep-last = 3
"""
NAMES = ("guest dd", "ssh dd", "paramiko dd", "gfs run", "gfs stream")


class Abort(Exception):
    """The benchmark cannot run (missing setup, a failing command)."""


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through every `finally`


def sh(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise Abort(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def guest(host: RemoteHost, argv: list[str], timeout: float = 600.0) -> str:
    done = host.run(argv, timeout=timeout)
    if done.returncode != 0:
        raise Abort(f"in the guest: {' '.join(argv)} failed: {done.stderr.strip()}")
    return done.stdout + done.stderr


@dataclass
class Lab:
    """What the benchmark set up; `cleanups` undo it in reverse order."""

    workdir: Path
    host: RemoteHost | None = None
    target: Path | None = None
    volume: str = ""
    snapshot: str = ""
    pv_image: Path | None = None
    size_mib: int = 0
    data_mib: int = 0
    cleanups: list[Callable[[], object]] = field(default_factory=list)

    def close(self) -> None:
        for undo in reversed(self.cleanups):
            with contextlib.suppress(Exception):
                undo()
        self.cleanups.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)


def fill_script(device: str, size_mib: int, seed: int) -> tuple[str, int]:
    """A shell script writing seeded random and zero pieces over `device`; data MiB."""
    rng = random.Random(seed)
    lines, offset, data = [], 0, 0
    while offset < size_mib:
        count = min(rng.choice(PIECES_MIB), size_mib - offset)
        source = "/dev/urandom" if rng.random() < DATA_SHARE else "/dev/zero"
        data += count if source == "/dev/urandom" else 0
        lines.append(
            f"dd if={source} of={device} bs=1M seek={offset} count={count} "
            "oflag=direct status=none || exit 1"
        )
        offset += count
    return "\n".join(lines) + "\n", data


def make_volume(lab: Lab, size_mib: int) -> None:
    host = cast(RemoteHost, lab.host)
    lab.volume, lab.size_mib = f"bench{uuid.uuid4().hex[:8]}", size_mib
    guest(
        host,
        ["lvcreate", "-q", "-y", "-Zy", "-Wy", "-L", f"{size_mib}m", "-n", lab.volume, VG_NAME],
    )
    lab.cleanups.append(lambda: host.run(["lvremove", "-f", f"{VG_NAME}/{lab.volume}"]))
    lab.cleanups.append(lambda: remove_gfs_snapshots(host))
    script, lab.data_mib = fill_script(f"/dev/{VG_NAME}/{lab.volume}", size_mib, 5)
    started = time.monotonic()
    guest(host, ["sh", "-c", script], timeout=1800)
    print(
        f"LV {VG_NAME}/{lab.volume}: {size_mib} MiB, {lab.data_mib} MiB random, the rest "
        f"written zeros (filled in {time.monotonic() - started:.0f} s)"
    )
    lab.snapshot = f"benchsnap{uuid.uuid4().hex[:8]}"
    guest(
        host,
        ["lvcreate", "-q", "-y", "-s", "-L", BASELINE_SNAPSHOT_SIZE, "-n", lab.snapshot,
         f"{VG_NAME}/{lab.volume}"],
    )  # fmt: skip
    lab.cleanups.append(lambda: host.run(["lvremove", "-f", f"{VG_NAME}/{lab.snapshot}"]))


def remove_gfs_snapshots(host: RemoteHost) -> None:
    """Snapshots a failed gfs run left of the benchmark's job (gfs names them gfs-JOB-)."""
    names = guest(host, ["lvs", "--noheadings", "-o", "lv_name", VG_NAME]).split()
    for name in names:
        if name.startswith(f"gfs-{JOB}-"):
            host.run(["lvremove", "-f", f"{VG_NAME}/{name}"])


def mount_target(lab: Lab) -> None:
    """A loop-backed ext4 filesystem of TARGET_IMAGE_SIZE (sparse image file)."""
    image = lab.workdir / "target.img"
    with image.open("wb") as out:
        out.truncate(TARGET_IMAGE_SIZE)
    device = sh("losetup", "--find", "--show", str(image)).strip()
    lab.cleanups.append(lambda: sh("losetup", "-d", device))
    sh("mkfs.ext4", "-q", "-F", device)
    point = lab.workdir / "target"
    point.mkdir()
    sh("mount", device, str(point))
    lab.cleanups.append(lambda: sh("umount", str(point)))
    lab.target = point


def start_lab(lab: Lab, size_mib: int, cpus: int = 1) -> None:
    keys = generate_ssh_keys(lab.workdir / "keys")
    image = build_remote_host_image(lab.workdir, keys)
    run_dir = lab.workdir / "run"
    host = start_remote_host(run_dir, image, cpus=cpus)
    lab.host = host
    lab.cleanups.append(host.stop)
    lab.pv_image = run_dir / f"{host.name}-pv.qcow2"
    print(f"remote host {host.name} up in {host.boot_seconds:.0f} s, sshd on 127.0.0.1:{host.port}")
    mount_target(lab)
    make_volume(lab, size_mib)


def snapshot_device(lab: Lab) -> str:
    return f"/dev/{VG_NAME}/{lab.snapshot}"


def guest_dd(lab: Lab) -> float:
    """Seconds GNU dd reports for reading the snapshot to /dev/null in the guest."""
    host = cast(RemoteHost, lab.host)
    out = guest(host, ["dd", f"if={snapshot_device(lab)}", "of=/dev/null", "bs=1M", "iflag=direct"])
    found = re.search(r"copied, ([0-9.]+) s", out)
    if found is None:
        raise Abort(f"no time in dd's output: {out.strip()}")
    return float(found.group(1))


def ssh_argv(host: RemoteHost) -> list[str]:
    return [
        "ssh", "-q", "-T", "-p", str(host.port), "-i", str(host.identity_file),
        "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={host.known_hosts_file}",
        f"{host.user}@{host.address}",
    ]  # fmt: skip


def ssh_cipher(host: RemoteHost) -> str:
    done = subprocess.run(
        [*ssh_argv(host)[:-1], "-v", f"{host.user}@{host.address}", "true"],
        capture_output=True,
        text=True,
        check=False,
    )
    found = re.search(r"server->client cipher: (\S+) MAC: (\S+)", done.stderr)
    return f"{found.group(1)} ({found.group(2)})" if found else "unknown"


def ssh_dd(lab: Lab, output: Path) -> float:
    """Seconds of the OpenSSH client streaming the guest's dd into `output`, with fsync."""
    host = cast(RemoteHost, lab.host)
    argv = [*ssh_argv(host), f"dd if={snapshot_device(lab)} bs=1M iflag=direct status=none"]
    started = time.monotonic()
    with output.open("wb") as out:
        done = subprocess.run(argv, stdout=out, stderr=subprocess.PIPE, text=True, check=False)
        os.fsync(out.fileno())
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise Abort(f"ssh dd failed ({done.returncode}): {done.stderr.strip()}")
    return seconds


def gfs_host(host: RemoteHost) -> Host:
    return Host(
        name="lab",
        address=host.address,
        user=host.user,
        port=host.port,
        identity_file=str(host.identity_file),
        known_hosts=str(host.known_hosts_file),
    )


def paramiko_dd(lab: Lab, output: Path) -> tuple[float, str]:
    """Seconds of gfs's SSHRunner streaming gfs's read command into `output` (plain 1 MiB
    writes, fsync; a fresh connection like gfs's); the negotiated cipher and MAC."""
    runner = SSHRunner(gfs_host(cast(RemoteHost, lab.host)))
    try:
        started = time.monotonic()
        with (
            runner.reading(make_read_command(snapshot_device(lab), 3600.0)) as stream,
            output.open("wb") as out,
        ):
            shutil.copyfileobj(stream, out, MiB)
            out.flush()
            os.fsync(out.fileno())
        seconds = time.monotonic() - started
        transport = runner._transport  # the benchmark looks inside, gfs does not
        cipher = "unknown"
        if transport is not None:
            engine = getattr(transport, "remote_cipher", "?"), getattr(transport, "remote_mac", "?")
            cipher = f"{engine[0]} ({engine[1]})"
        return seconds, cipher
    finally:
        runner.close()


def lab_config(lab: Lab, directory: Path, target: str, job: str) -> Path:
    """DIRECTORY/gfs.toml: a state dir there, the `[target.*]` table `target`, the lab host
    as `[hosts.lab]`, and the `[[job]]` lines `job` with the benchmarks' POLICY."""
    host = cast(RemoteHost, lab.host)
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "gfs.toml"
    config.write_text(
        f"state_dir = {json.dumps(str(directory / 'state'))}\n{target}"
        f"[hosts.lab]\naddress = {json.dumps(host.address)}\nport = {host.port}\n"
        f"user = {json.dumps(host.user)}\n"
        f"identity_file = {json.dumps(str(host.identity_file))}\n"
        f"known_hosts = {json.dumps(str(host.known_hosts_file))}\n"
        f"[[job]]\n{job}{POLICY}",
        encoding="utf-8",
    )
    return config


def timed_gfs(config: Path, *args: str) -> tuple[float, str]:
    """`gfs run --force ARGS --config CONFIG`: its wall seconds and stderr; Abort if it
    fails."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "gfs_backup", "run", "--force", *args, "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise Abort(f"gfs run failed ({done.returncode}):\n{done.stderr}")
    return seconds, done.stderr


def write_config(lab: Lab, directory: Path) -> Path:
    target = f"[target.local]\npath = {json.dumps(str(lab.target))}\nrequire_nfs = false\n"
    job = f'name = "{JOB}"\nkind = "lvm"\nhost = "lab"\n'
    job += f"volume = {json.dumps(f'{VG_NAME}/{lab.volume}')}\n"
    return lab_config(lab, directory, target, job)


@dataclass
class GfsRun:
    seconds: float
    stream_seconds: float
    phases: list[tuple[float, str]]
    image: Path
    digest: str


def timestamped_lines(stream: IO[str], started: float, into: list[tuple[float, str]]) -> None:
    for line in stream:
        into.append((time.monotonic() - started, line.rstrip("\n")))


def stream_phase(lines: list[tuple[float, str]]) -> float:
    """Seconds from gfs starting the snapshot's `dd` on the host to its next command."""
    commands = [(t, text) for t, text in lines if "running on lab:" in text]
    for index, (start, text) in enumerate(commands):
        if " dd if=" in text and index + 1 < len(commands):
            return commands[index + 1][0] - start
    raise Abort("no dd in gfs's debug log:\n" + "\n".join(text for _, text in lines))


def gfs_run(lab: Lab, directory: Path) -> GfsRun:
    config = write_config(lab, directory)
    argv = [
        sys.executable,
        "-m",
        "gfs_backup",
        "--debug",
        "run",
        "--force",
        "--config",
        str(config),
    ]
    lines: list[tuple[float, str]] = []
    started = time.monotonic()
    process = subprocess.Popen(
        argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        reader = threading.Thread(
            target=timestamped_lines, args=(process.stderr, started, lines), daemon=True
        )
        reader.start()
        status = process.wait()
        seconds = time.monotonic() - started
        reader.join()
    finally:
        if process.poll() is None:  # Ctrl-C or SIGTERM here: gfs cleans up, then exits
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    if status != 0:
        raise Abort(f"gfs run failed ({status}):\n" + "\n".join(text for _, text in lines))
    manifests = sorted((cast(Path, lab.target) / JOB).glob("*/manifest.json"))
    manifest = json.loads(manifests[-1].read_text())
    (data,) = manifest["files"]
    return GfsRun(
        seconds, stream_phase(lines), lines, manifests[-1].parent / data["path"], data["digest"]
    )


@dataclass
class Round:
    seconds: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, Cpu] = field(default_factory=dict)


@dataclass(frozen=True)
class Cpu:
    """Where the CPU went during one measurement, as shares of its wall time."""

    guest_user: float  # the guest's one vCPU: dd, sshd (encryption, MAC)
    guest_kernel: float  # system + softirq: block and network stacks, virtio
    qemu: float  # the guest's QEMU process here (TCG vCPU thread, slirp, I/O threads)
    local: float  # this machine's client: ssh, paramiko in this process, or gfs


@dataclass(frozen=True)
class CpuSample:
    guest: tuple[int, ...]  # /proc/stat "cpu" jiffies: user nice system idle iowait irq softirq
    qemu: float
    local: float
    at: float


def cpu_sample(lab: Lab) -> CpuSample:
    host = cast(RemoteHost, lab.host)
    jiffies = tuple(int(x) for x in guest(host, ["head", "-1", "/proc/stat"]).split()[1:8])
    fields = Path(f"/proc/{host.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    qemu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    mine = os.times()
    local = mine.user + mine.system + mine.children_user + mine.children_system
    return CpuSample(jiffies, qemu, local, time.monotonic())


def cpu_between(before: CpuSample, after: CpuSample) -> Cpu:
    delta = [b - a for a, b in zip(before.guest, after.guest, strict=True)]
    total = sum(delta) or 1
    wall = after.at - before.at
    return Cpu(
        guest_user=(delta[0] + delta[1]) / total,
        guest_kernel=(delta[2] + delta[5] + delta[6]) / total,
        qemu=(after.qemu - before.qemu) / wall,
        local=(after.local - before.local) / wall,
    )


def one_round(lab: Lab, index: int, check_digest: bool) -> tuple[Round, dict[str, object]]:
    """Every measurement once, in an order rotated by `index`; facts for the report."""
    target = cast(Path, lab.target)
    result = Round()
    facts: dict[str, object] = {}
    steps = ["guest dd", "ssh dd", "paramiko dd", "gfs"]
    steps = steps[index % 4 :] + steps[: index % 4]
    for step in steps:
        evict(cast(Path, lab.pv_image))
        before = cpu_sample(lab)
        if step == "guest dd":
            result.seconds["guest dd"] = guest_dd(lab)
        elif step == "ssh dd":
            output = target / "ssh-dd.raw"
            result.seconds["ssh dd"] = ssh_dd(lab, output)
            facts["ssh allocated"] = allocated(output)
            if check_digest:
                facts["ssh digest"] = digest_file(output).digest
            output.unlink()
        elif step == "paramiko dd":
            output = target / "paramiko-dd.raw"
            result.seconds["paramiko dd"], facts["paramiko cipher"] = paramiko_dd(lab, output)
            output.unlink()
        else:
            run = gfs_run(lab, lab.workdir / f"gfs-{index}")
            result.seconds["gfs run"] = run.seconds
            result.seconds["gfs stream"] = run.stream_seconds
            facts["gfs allocated"] = allocated(run.image)
            facts["gfs size"] = run.image.stat().st_size
            facts["gfs digest"] = run.digest
            facts["gfs phases"] = run.phases
            shutil.rmtree(target / JOB)
        result.cpu["gfs run" if step == "gfs" else step] = cpu_between(before, cpu_sample(lab))
    return result, facts


def rate(size: int, seconds: float) -> str:
    return f"{size / MiB / seconds:7.1f} MiB/s"


def report(rounds: list[Round], size: int, facts: dict[str, object], cipher: str) -> bool:
    print(f"\n{'measurement':<12}" + "".join(f"{f'round {i + 1}':>10}" for i in range(len(rounds)))
          + f"{'median':>10}{'throughput':>16}")  # fmt: skip
    medians = {}
    for name in NAMES:
        values = [r.seconds[name] for r in rounds]
        medians[name] = statistics.median(values)
        cells = "".join(f"{v:9.1f}s" for v in values)
        print(f"{name:<12}{cells}{medians[name]:9.1f}s  {rate(size, medians[name])}")
    print(f"\nCPU, medians (share of wall time; the guest has 1 vCPU, {os.cpu_count()} cores here)")
    print(f"{'measurement':<12}{'guest user':>12}{'guest kernel':>14}{'qemu':>8}{'client':>8}")
    for name in ("guest dd", "ssh dd", "paramiko dd", "gfs run"):
        shares = [
            statistics.median(getattr(r.cpu[name], part) for r in rounds)
            for part in ("guest_user", "guest_kernel", "qemu", "local")
        ]
        widths = (12, 14, 8, 8)
        print(f"{name:<12}" + "".join(f"{v:>{w}.0%}" for v, w in zip(shares, widths, strict=True)))
    print(f"\nssh client cipher: {cipher}; gfs/paramiko cipher: {facts['paramiko cipher']}")
    for gfs_name in ("gfs stream", "gfs run"):
        for base in ("ssh dd", "paramiko dd", "guest dd"):
            ratio = medians[base] / medians[gfs_name]
            print(f"throughput {gfs_name} / {base}: {ratio:.2f}")
    gfs_alloc, ssh_alloc = cast(int, facts["gfs allocated"]), cast(int, facts["ssh allocated"])
    print(
        f"allocated on the target: gfs {gfs_alloc / MiB:.0f} MiB of {size / MiB:.0f} MiB "
        f"(ssh dd: {ssh_alloc / MiB:.0f} MiB)"
    )
    if facts.get("ssh digest") != facts["gfs digest"]:
        raise Abort(f"gfs's image ({facts['gfs digest']}) differs from ssh dd's output")
    print("gfs's sha256-1m equals that of ssh dd's output (same data)")
    met = medians["gfs stream"] <= medians["ssh dd"] * (1 + WITHIN)
    print(f"gfs stream within {WITHIN:.0%} of ssh dd: {'yes' if met else 'no'}")
    print("last gfs run, debug log with seconds since start:")
    for at, text in cast(list[tuple[float, str]], facts["gfs phases"]):
        print(f"  {at:7.2f}  {text[:150]}")
    return met


def with_lab(name: str, size_mib: int, cpus: int, body: Callable[[Lab], int]) -> int:
    """Boots the lab with a `size_mib` LV, runs `body(lab)` and returns its exit code; 2 when
    the lab cannot run, 130 on Ctrl-C or SIGTERM. Whatever the lab made is removed."""
    if os.geteuid() != 0:
        print("run as root (nested QEMU, loop device, mount)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    lab = Lab(Path(tempfile.mkdtemp(prefix=f"gfs-{name}-", dir="/var/tmp")))
    try:
        start_lab(lab, size_mib, cpus)
        return body(lab)
    except (Abort, LabError) as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted; removing what it made", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the cleanup finish
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        lab.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256, help="LV size in MiB (256)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, median counts (3)")
    args = parser.parse_args()

    def measure(lab: Lab) -> int:
        cipher = ssh_cipher(cast(RemoteHost, lab.host))
        rounds: list[Round] = []
        facts: dict[str, object] = {}
        for index in range(max(1, args.rounds)):
            result, facts_now = one_round(lab, index, check_digest=index == 0)
            facts = {**facts, **facts_now}
            rounds.append(result)
            cells = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
            print(f"round {index + 1}: {cells}", flush=True)
        return 0 if report(rounds, args.size * MiB, facts, cipher) else 1

    return with_lab("lvm_export", args.size, 1, measure)


if __name__ == "__main__":
    sys.exit(main())

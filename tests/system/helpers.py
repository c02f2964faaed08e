"""Config files and tree comparisons for the system tests."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from click.testing import Result

from tests.lab.remote_host import RemoteHost

CLASSIC_UTC = """
[job.policy]
semantics = "gfs"
timezone = "UTC"
schedule = "Mon..Sat 01:00"
[job.policy.retention]
sons = 6
fathers = 4
grandfathers = 12
"""

KEEP_LAST_ONE = """
[job.policy]
semantics = "pbs"
timezone = "UTC"
schedule = "daily"
[job.policy.retention]
keep-last = 1
"""


def write_config(
    tmp_path: Path,
    target: Path,
    job: str,
    kind: str,
    source_key: str,
    source: Path,
    policy: str = CLASSIC_UTC,
    extra: str = "",
) -> Path:
    config = tmp_path / "gfs.toml"
    config.write_text(
        f"state_dir = {json.dumps(str(tmp_path / 'state'))}\n"
        f"[target.usb]\npath = {json.dumps(str(target))}\nrequire_nfs = false\n"
        f'[[job]]\nname = {json.dumps(job)}\nkind = "{kind}"\n'
        f"{source_key} = {json.dumps(str(source))}\n{extra}{policy}",
        encoding="utf-8",
    )
    return config


def gfs_subprocess(
    *args: str,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gfs_backup", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        check=False,
    )


def listing(result: Result) -> list[dict[str, Any]]:
    assert result.exit_code == 0, result.output
    (job,) = json.loads(result.stdout)["jobs"]
    generations: list[dict[str, Any]] = job["generations"]
    return generations


def tree_state(root: Path, skip: tuple[str, ...] = (".gfs-snapshots",)) -> dict[str, Any]:
    """Everything a restore must reproduce: kinds, bytes, modes, owners, times, links."""
    state: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            info = path.lstat()
            key = str(path.relative_to(root))
            entry: dict[str, Any] = {
                "mode": stat.S_IMODE(info.st_mode),
                "owner": (info.st_uid, info.st_gid),
            }
            if stat.S_ISLNK(info.st_mode):
                entry["link"] = os.readlink(path)
            elif stat.S_ISREG(info.st_mode):
                entry["data"] = path.read_bytes()
                entry["mtime"] = info.st_mtime_ns
            state[key] = entry
    return state


def assert_same_image(image: Path, reference: Path, image_format: str = "raw") -> None:
    """`qemu-img compare` (a judge gfs did not write) of an image with a raw reference."""
    done = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", image_format, str(reference), str(image)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def run_cutting_the_link(
    host: RemoteHost, args: tuple[str, ...], cut_when: Callable[[], bool]
) -> tuple[subprocess.CompletedProcess[str], float]:
    """`gfs ARGS` with the lab host's network link cut (QMP set_link) as soon as
    `cut_when()` (polled every 50 ms, for up to 2 minutes) is true; the link is back when
    this returns. Returns gfs's result and its wall time."""

    def cutter() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if cut_when():
                host.set_link(False)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=cutter)
    thread.start()
    try:
        started = time.monotonic()
        result = gfs_subprocess(*args)
        return result, time.monotonic() - started
    finally:
        thread.join()
        host.set_link(True)


def cut_then_heal(
    host: RemoteHost,
    args: tuple[str, ...],
    cut_when: Callable[[], bool],
    still_running: list[str],
    job_dir: str,
) -> str:
    """The dropped-link drill of a remote job: `gfs ARGS` with the link cut once `cut_when()`
    must fail (exit 5) within its io_timeout, without a traceback; once the host's side of
    the dead session has ended (`still_running`, run there, exits non-zero), the same run
    must remove the partial generation and the snapshot and back up. Returns the one
    generation then in `job_dir` (a path on the host)."""
    failed, elapsed = run_cutting_the_link(host, args, cut_when)
    assert failed.returncode == 5, failed.stderr
    assert elapsed < 180, f"gfs hung {elapsed:.0f} s on a dead connection"
    assert "Traceback" not in failed.stderr
    deadline = time.monotonic() + 60  # the host's side ends once the link is back (SIGHUP)
    while host.run(still_running).returncode == 0:
        assert time.monotonic() < deadline, f"{still_running} still finds it on the host"
        time.sleep(0.5)
    healed = gfs_subprocess(*args)
    assert healed.returncode == 0, healed.stderr
    assert "removed leftover partial" in healed.stderr
    assert "deleted snapshot" in healed.stderr
    names = host.run(["ls", "-A", job_dir], check=True).stdout.split()
    assert len(names) == 1 and not names[0].startswith("."), names
    return names[0]


def compare_images(first: Path, second: Path) -> subprocess.CompletedProcess[str]:
    """`qemu-img compare` of two images (the judge of VM backups); -U reads an image a
    running QEMU holds. Exit 0: the same guest-visible content."""
    return subprocess.run(
        ["qemu-img", "compare", "-U", str(first), str(second)],
        capture_output=True,
        text=True,
        check=False,
    )

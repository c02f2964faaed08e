"""Boot a drill's QEMU and decide pass or fail: console regex and/or guest agent ping.

QEMU runs in the drill's scratch directory (its snapshot overlays there too, via TMPDIR)
and is always killed by its PID before this returns, whatever happened.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gfs_backup.tools.drillprobe import Probe
from gfs_backup.tools.guest_agent import AgentClient
from gfs_backup.transport.runner import Command, LocalRunner

AGENT_SOCKET = "qga.sock"  # relative to QEMU's working directory: no sun_path length limit
POLL_SECONDS = 0.2
AGENT_ATTEMPT_SECONDS = 1.0
CONSOLE_TAIL_BYTES = 2048
CONSOLE_READ_LIMIT = 8 << 20


@dataclass(frozen=True)
class BootCheck:
    """What must happen within `timeout` seconds of QEMU's start for the drill to pass."""

    console: str | None  # a regular expression searched in the serial console output
    agent: bool
    timeout: float


@dataclass(frozen=True)
class BootResult:
    passed: bool
    reason: str
    console_tail: str
    seconds: float  # from QEMU's start to the verdict
    probes: tuple[Probe, ...] = ()  # the checks run in the booted guest (`after_boot`)


def read_console(path: Path, limit: int = CONSOLE_READ_LIMIT) -> str:
    """The serial console so far (its last `limit` bytes), decoded leniently."""
    try:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            handle.seek(max(0, size - limit))
            return handle.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def console_tail(text: str, limit: int = CONSOLE_TAIL_BYTES) -> str:
    """The end of the console text, at most `limit` bytes of UTF-8."""
    data = text.encode()[-limit:]
    return data.decode(errors="ignore")


def boot_and_check(
    runner: LocalRunner,
    argv: tuple[str, ...],
    workdir: Path,
    check: BootCheck,
    console: Path,
    after_boot: Callable[[AgentClient], list[Probe]] | None = None,
) -> BootResult:
    """Start QEMU (argv) in `workdir`, wait for the check, run `after_boot` (the guest's
    agent client at hand) while the guest still runs, kill QEMU; the verdict.

    The agent socket (when checked) is AGENT_SOCKET in `workdir`, named relative in argv."""
    pattern = re.compile(check.console) if check.console is not None else None
    agent = AgentClient(workdir / AGENT_SOCKET) if check.agent else None
    env = {**os.environ, "TMPDIR": str(workdir)}
    started = time.monotonic()
    probes: list[Probe] = []
    process = runner.spawn(Command(argv, timeout=None), workdir / "qemu.log", env, workdir)
    try:
        passed, reason = _watch(process, pattern, agent, check, console, started)
        if passed and after_boot is not None:
            seconds = time.monotonic() - started
            client = agent if agent is not None else AgentClient(workdir / AGENT_SOCKET)
            try:
                probes = after_boot(client)
            finally:
                if client is not agent:
                    client.close()
            return BootResult(passed, reason, "", seconds, tuple(probes))
    finally:
        if agent is not None:
            agent.close()
        _kill(process)
    text = read_console(console)
    tail = "" if passed else console_tail(text)
    if not passed and not text.strip():
        qemu_said = " ".join(read_console(workdir / "qemu.log", 4096).split())[-300:]
        reason += f"; the console stayed empty{f' (QEMU said: {qemu_said})' if qemu_said else ''}"
    return BootResult(passed, reason, tail, time.monotonic() - started)


def _watch(
    process: subprocess.Popen[bytes],
    pattern: re.Pattern[str] | None,
    agent: AgentClient | None,
    check: BootCheck,
    console: Path,
    started: float,
) -> tuple[bool, str]:
    deadline = started + check.timeout
    console_ok = pattern is None
    agent_ok = agent is None
    while True:
        status = process.poll()  # before reading the console: its last lines count
        if not console_ok:
            assert pattern is not None
            console_ok = pattern.search(read_console(console)) is not None
        if console_ok and not agent_ok and status is None:
            assert agent is not None
            agent_ok = agent.attempt(
                min(AGENT_ATTEMPT_SECONDS, max(0.1, deadline - time.monotonic()))
            )
        if console_ok and agent_ok:
            return True, _passed(check, time.monotonic() - started)
        if status is not None:
            return (
                False,
                f"QEMU exited (status {status}) before {_missing(check, console_ok, agent)}",
            )
        if time.monotonic() >= deadline:
            return (
                False,
                f"timed out after {check.timeout:.0f} s: {_missing(check, console_ok, agent)}",
            )
        if agent_ok or not console_ok:
            time.sleep(POLL_SECONDS)


def _passed(check: BootCheck, seconds: float) -> str:
    what = []
    if check.console is not None:
        what.append(f"console matched /{check.console}/")
    if check.agent:
        what.append("guest agent answered guest-ping")
    return f"{' and '.join(what)} after {seconds:.1f} s"


def _missing(check: BootCheck, console_ok: bool, agent: AgentClient | None) -> str:
    if not console_ok:
        return f"the console never matched /{check.console}/"
    assert agent is not None
    return agent.last_error


def _kill(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL by PID (the guest's state does not matter: its disks are snapshots)."""
    if process.poll() is None:
        process.kill()
    process.wait()

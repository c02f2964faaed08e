"""Job hooks: commands a job runs at fixed phases, like vzdump's hook scripts.

[[job]]
name = "db01"
hooks = { before = ["/usr/local/bin/flush-db", "--lock"], after = ["/usr/local/bin/unlock-db"],
          timeout = 300 }

Phases, in the order a job reaches them: before, after_snapshot, after_export, after (the job
ended, whatever its outcome) and on_failure. A hook is an argv list (no shell, no PATH lookup)
run with the environment of gfs plus GFS_JOB, GFS_KIND, GFS_PHASE, ... as the caller knows them,
stdin /dev/null, cwd /, in its own process group so a timeout ends everything it started.
A failing hook never raises: `run_hook` returns a HookResult saying what happened.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Any

from gfs_backup.core.validate import Collector, join_key

PHASES = ("before", "after_snapshot", "after_export", "after", "on_failure")
HOOK_KEYS = (*PHASES, "timeout")
DEFAULT_TIMEOUT = 600.0
MAX_TIMEOUT = 86400.0
KILL_GRACE = 5.0  # seconds between SIGTERM and SIGKILL to a hook's process group
# After the hook exits, how long to keep reading output still held open by a background
# child it left behind, before giving up on the rest.
DRAIN_GRACE = 2.0
OUTPUT_LIMIT = 64 * 1024  # bytes of output kept (the end)
LOG_LINES = 20  # lines of output logged
_CHUNK = 64 * 1024
_POLL = 0.1
_EXAMPLE = '["/usr/local/bin/flush-db", "--lock"]'
_SHELL = 'use ["/bin/sh", "-c", "..."] if you need a shell'


@dataclass(frozen=True)
class Hooks:
    """A job's hook commands, one argv tuple per phase (empty: no hook), and their timeout."""

    before: tuple[str, ...] = ()
    after_snapshot: tuple[str, ...] = ()
    after_export: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    on_failure: tuple[str, ...] = ()
    timeout: float = DEFAULT_TIMEOUT

    def command(self, phase: str) -> tuple[str, ...]:
        """The argv of `phase` (empty when none is set). ValueError for an unknown phase."""
        if phase not in PHASES:
            raise ValueError(f"unknown hook phase {phase!r} (phases: {', '.join(PHASES)})")
        argv: tuple[str, ...] = getattr(self, phase)
        return argv

    @property
    def phases(self) -> tuple[str, ...]:
        """The phases that have a hook, in order."""
        return tuple(phase for phase in PHASES if self.command(phase))


@dataclass(frozen=True)
class HookResult:
    """What one hook did. `exit_code` is None when it could not start or timed out
    (`error` or `timed_out` say which); a negative one is the signal that killed it.
    `output` is the end of its stdout and stderr together (at most OUTPUT_LIMIT bytes)."""

    phase: str
    argv: tuple[str, ...]
    exit_code: int | None
    seconds: float
    output: str = ""
    timed_out: bool = False
    timeout: float = DEFAULT_TIMEOUT
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def problem(self) -> str:
        """One line saying what went wrong ("" when ok)."""
        if self.ok:
            return ""
        what = f"hook {self.phase} ({self.argv[0]})"
        if self.error:
            return f"{what} cannot be run: {self.error}"
        if self.timed_out:
            text = f"{what} timed out after {self.timeout:g} s"
        elif self.exit_code is not None and self.exit_code < 0:
            text = f"{what} was killed by signal {_signal_name(-self.exit_code)}"
        else:
            text = f"{what} exited with status {self.exit_code}"
        last = self.last_lines(1).strip()
        return f"{text}: {last[-200:]}" if last else f"{text} (no output)"

    def last_lines(self, count: int = LOG_LINES) -> str:
        """The last `count` non-empty lines of the output, joined by newlines."""
        lines = [line for line in self.output.splitlines() if line.strip()]
        return "\n".join(lines[-count:])


def parse_hooks(table: Mapping[str, Any] | None, where: str, collector: Collector) -> Hooks:
    """A job's `hooks` inline table (None: no hooks); every problem goes to `collector` under
    the key path `where` (e.g. job[db01].hooks) and what is wrong is left out."""
    if table is None:
        return Hooks()
    if not isinstance(table, Mapping):
        collector.add(where, f"expected an inline table, e.g. {{ before = {_EXAMPLE} }}")
        return Hooks()
    collector.unknown_keys(table, HOOK_KEYS, where)
    commands = {
        phase: _argv(table[phase], join_key(where, phase), collector)
        for phase in PHASES
        if phase in table
    }
    timeout = table.get("timeout", DEFAULT_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        collector.add(join_key(where, "timeout"), "expected a number of seconds (1 to 86400)")
        timeout = DEFAULT_TIMEOUT
    elif not 1 <= timeout <= MAX_TIMEOUT:
        collector.add(join_key(where, "timeout"), f"{timeout} is not 1 to 86400 seconds")
        timeout = DEFAULT_TIMEOUT
    return Hooks(**commands, timeout=float(timeout))


def _argv(value: object, key: str, collector: Collector) -> tuple[str, ...]:
    """A hook command: a non-empty list of strings starting with an absolute path."""
    if isinstance(value, str):
        collector.add(
            key, f"expected a list (argv, run without a shell), e.g. {_EXAMPLE}; {_SHELL}"
        )
        return ()
    if not isinstance(value, list):
        collector.add(key, f"expected a list of strings, e.g. {_EXAMPLE}")
        return ()
    if not value:
        collector.add(key, f"must not be empty: the program and its arguments, e.g. {_EXAMPLE}")
        return ()
    for index, item in enumerate(value):
        if not isinstance(item, str):
            collector.add(key, f"item {index + 1} is not a string: {item!r}"[:200])
            return ()
        if "\0" in item:
            collector.add(key, f"item {index + 1} contains a NUL character")
            return ()
    if not value[0].startswith("/"):
        collector.add(
            key,
            f"{value[0]!r} must be an absolute path (hooks run without a shell or PATH "
            f"lookup); {_SHELL}",
        )
        return ()
    return tuple(value)


def run_hook(
    hooks: Hooks, phase: str, env: Mapping[str, str], log: logging.Logger
) -> HookResult | None:
    """Run the hook of `phase` to its end or timeout; None when the phase has no hook.

    `env` is added to the environment of gfs (GFS_PHASE is set here). Hook failures never
    raise: they come back in the result and are logged as a warning; the output's end is
    logged at debug. ValueError only for an unknown phase (a bug of the caller)."""
    argv = hooks.command(phase)
    if not argv:
        return None
    prefix = f"job {env['GFS_JOB']}: " if env.get("GFS_JOB") else ""
    log.debug("%shook %s: running %s", prefix, phase, argv)
    started = time.monotonic()
    try:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd="/",
            env={**os.environ, **env, "GFS_PHASE": phase},
            start_new_session=True,
        )
    except (OSError, ValueError) as exc:
        error = f"[Errno {exc.errno}] {exc.strerror}" if isinstance(exc, OSError) else str(exc)
        result = HookResult(phase, argv, None, time.monotonic() - started, error=error)
    else:
        try:
            exit_code, timed_out, output = _supervise(process, hooks.timeout)
        except BaseException:
            # Interrupted (Ctrl-C, SIGTERM to gfs): the hook has its own session and got no
            # signal; it must not outlive the run.
            _signal_group(process.pid, signal.SIGKILL)
            raise
        finally:
            if process.stdout is not None:
                process.stdout.close()
        text = output.decode("utf-8", errors="replace")
        seconds = time.monotonic() - started
        result = HookResult(phase, argv, exit_code, seconds, text, timed_out, hooks.timeout)
    if result.output.strip():
        log.debug("%shook %s output (end):\n%s", prefix, phase, result.last_lines())
    if result.ok:
        log.info("%shook %s (%s) ok in %.1f s", prefix, phase, argv[0], result.seconds)
    else:
        log.warning("%s%s", prefix, result.problem)
    return result


class _Tail:
    """The last `limit` bytes of a stream."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()

    def add(self, chunk: bytes) -> None:
        self.data += chunk
        if len(self.data) > self.limit:
            del self.data[: len(self.data) - self.limit]


def _supervise(process: subprocess.Popen[bytes], timeout: float) -> tuple[int | None, bool, bytes]:
    """Read the output of `process` until it ends, or kill its process group at `timeout`.

    Returns (exit code or None when timed out, timed out, the end of its output)."""
    assert process.stdout is not None
    stream: IO[bytes] = process.stdout
    tail = _Tail(OUTPUT_LIMIT)
    deadline = time.monotonic() + timeout
    kill_at: float | None = None  # set once SIGTERM was sent
    drain_until: float | None = None
    reading = True
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        while True:
            now = time.monotonic()
            exit_code = process.poll()
            if exit_code is not None and not reading:
                break
            if kill_at is not None:
                if now >= kill_at:
                    break
                next_event = kill_at
            elif exit_code is None:
                if now >= deadline:
                    _signal_group(process.pid, signal.SIGTERM)
                    kill_at = now + KILL_GRACE
                    continue
                next_event = deadline
            else:
                # The hook exited but something it started still holds the output open.
                drain_until = drain_until or now + DRAIN_GRACE
                if now >= drain_until:
                    break
                next_event = drain_until
            wait = max(0.0, min(next_event - now, _POLL))
            if reading:
                if selector.select(wait):
                    chunk = os.read(stream.fileno(), _CHUNK)
                    tail.add(chunk)
                    if not chunk:
                        reading = False
                        selector.unregister(stream)
            else:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(wait)
    if kill_at is not None:
        _signal_group(process.pid, signal.SIGKILL)
        # Not forever: a process stuck in the kernel (hard NFS, D state) ignores SIGKILL.
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(KILL_GRACE)
        return None, True, bytes(tail.data)
    return process.returncode, False, bytes(tail.data)


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


def _signal_name(signum: int) -> str:
    try:
        return f"{signum} ({signal.Signals(signum).name})"
    except ValueError:
        return str(signum)

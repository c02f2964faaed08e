"""virtlogd and libvirtd started by hand (the test machines have no systemd), shared safely.

Several pytest sessions may use the lab at once (developers in parallel, pytest-xdist workers).
So the sessions register in a small state file under STATE_DIR, guarded by a lock:

- `start_libvirt_daemons` registers the session; if qemu:///system does not answer it starts
  virtlogd and libvirtd in the foreground (PIDs known without reading PID files) and records
  them as lab-started;
- `LibvirtDaemons.stop` unregisters the session; the last live session stops the lab-started
  daemons, by PID (checked against the recorded process start time). A libvirtd the lab did
  not start is never stopped.
- `LibvirtDaemons.restart_libvirtd` / `libvirtd_stopped` (tests of a libvirtd restart) stop
  the lab-started libvirtd by PID and start a new one, only when this session started it and
  no other session uses it; otherwise they raise LabError saying why.

Sessions that died are dropped from the state file, as are recorded daemons that are gone.
The daemons keep their default PID files, whose locks stop a second copy from starting next
to a live one; a stale PID file or socket left by a crashed run is taken over by the daemons.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.lab.errors import SETUP_HINT, LabError, LabUnavailable, require_root, require_tools

SYSTEM_URI = "qemu:///system"
VIRTLOGD_SOCKET = Path("/run/libvirt/virtlogd-sock")
KVM_DEVICE = Path("/dev/kvm")
STATE_DIR = Path("/run/gfs-lab")
# libvirtd probes every QEMU binary when its capability cache is stale (about 4 s each).
START_TIMEOUT = 120.0


@dataclass(frozen=True)
class ProcessRecord:
    """A process by PID plus its start time (clock ticks after boot), so PID reuse shows."""

    name: str
    pid: int
    starttime: int


def process_record(name: str, pid: int) -> ProcessRecord | None:
    """The live (not zombie) process `pid` as a ProcessRecord, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # fields after "pid (comm)": state is first
    if fields[0] == "Z":
        return None
    return ProcessRecord(name, pid, int(fields[19]))


def parent_pid(pid: int) -> int | None:
    """The parent PID of the live process `pid`, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def command_line(pid: int | None) -> str:
    """The command line of process `pid`, shortened, for messages ("gone" if it is)."""
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    return " ".join(w.decode(errors="replace") for w in words if w)[:120]


def is_alive(record: ProcessRecord) -> bool:
    return process_record(record.name, record.pid) == record


@dataclass
class StartedDaemon:
    """A daemon this session started: its process and the file it logs to."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def log_tail(self, lines: int = 20) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class LabState:
    """What STATE_DIR/state.json holds: sessions using the lab, daemons the lab started."""

    users: list[ProcessRecord] = field(default_factory=list)
    daemons: list[ProcessRecord] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LabState:
        return cls(
            users=[ProcessRecord(**item) for item in data.get("users", [])],
            daemons=[ProcessRecord(**item) for item in data.get("daemons", [])],
        )

    def prune(self) -> None:
        """Drops sessions and daemons that are no longer running."""
        self.users = [user for user in self.users if is_alive(user)]
        self.daemons = [daemon for daemon in self.daemons if is_alive(daemon)]


@contextlib.contextmanager
def locked_state(state_dir: Path) -> Iterator[LabState]:
    """The lab state, read and written back under an exclusive lock on STATE_DIR/lock."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "state.json"
    with (state_dir / "lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            data = json.loads(path.read_text()) if path.exists() else {}
        except ValueError:
            data = {}  # a torn write of a crashed session: start afresh
        state = LabState.from_json(data)
        state.prune()
        try:
            yield state
        finally:  # also after an error: a daemon started or stopped meanwhile is recorded
            scratch = path.with_suffix(".tmp")
            scratch.write_text(json.dumps(asdict(state)))
            scratch.replace(path)


@dataclass
class LibvirtDaemons:
    """The libvirt daemons one session uses: `uri` answers; `started` lists what it started."""

    uri: str
    state_dir: Path
    session: ProcessRecord
    started: list[StartedDaemon] = field(default_factory=list)

    def stop(self, timeout: float = 30.0) -> None:
        """Unregisters the session; the last session stops the lab-started daemons by PID."""
        with locked_state(self.state_dir) as state:
            state.users = [user for user in state.users if user != self.session]
            if state.users:
                return
            for record in reversed(state.daemons):
                self._stop_daemon(record, timeout)
            state.daemons = []

    def check_restartable(self) -> None:
        """Raises LabError, saying why, when `restart_libvirtd` would refuse to run."""
        with locked_state(self.state_dir) as state:
            self._own_libvirtd(state)

    def restart_libvirtd(self, timeout: float = START_TIMEOUT) -> None:
        """Stops the lab-started libvirtd by its PID and starts a new one the same way (see
        `libvirtd_stopped`). Raises LabError when this session may not restart it."""
        with self.libvirtd_stopped(timeout):
            pass

    @contextlib.contextmanager
    def libvirtd_stopped(self, timeout: float = START_TIMEOUT) -> Iterator[None]:
        """libvirtd stopped (SIGTERM by PID) during the body, then started again the same way,
        also when the body fails; the state file records the new process. Running domains
        live on: their QEMU processes are not libvirtd's children, and libvirtd reconnects
        to them. Raises LabError before stopping anything unless this session started that
        libvirtd and no other session uses it (a restart would break their tests), or when
        the new libvirtd does not answer within `timeout` seconds. The state file stays
        locked meanwhile, so no other session starts a libvirtd of its own."""
        with locked_state(self.state_dir) as state:
            record = self._own_libvirtd(state)
            self._terminate(record, 30.0)
            try:
                yield
            finally:
                state.daemons = [d for d in state.daemons if d != record]
                self.started = [d for d in self.started if d.process.pid != record.pid]
                daemon = _spawn("libvirtd", self.state_dir)
                new = process_record(daemon.name, daemon.process.pid)
                if new is not None:
                    state.daemons.append(new)
                    self.started.append(daemon)
                _wait_until(lambda: libvirt_answers(self.uri), daemon, timeout)

    def _own_libvirtd(self, state: LabState) -> ProcessRecord:
        """The lab-started libvirtd, if this session started it and is its only user; raises
        LabError saying why it may not be restarted otherwise."""
        daemons = [d for d in state.daemons if d.name == "libvirtd"]
        if not daemons:
            raise LabError(
                "restarting libvirtd needs one the lab started in this pytest session, but the "
                f"libvirtd answering {self.uri} was not started by the lab: run this test "
                "where no libvirtd runs"
            )
        record = daemons[0]
        starter = parent_pid(record.pid)
        if starter != self.session.pid:
            raise LabError(
                f"restarting libvirtd needs one this pytest session (PID {self.session.pid}) "
                f"started, but libvirtd PID {record.pid} was started by PID {starter} "
                f"({command_line(starter)}): run this test in a session of its own"
            )
        others = sorted({u.pid for u in state.users if u.pid != self.session.pid})
        if others:
            raise LabError(
                f"libvirtd PID {record.pid} is also used by pytest session(s) "
                f"{', '.join(map(str, others))}: restarting it would break their tests; run "
                "this test when no other session uses the lab"
            )
        return record

    def _stop_daemon(self, record: ProcessRecord, timeout: float) -> None:
        self._terminate(record, timeout)
        with contextlib.suppress(FileNotFoundError):
            (self.state_dir / f"{record.name}.log").unlink()

    def _terminate(self, record: ProcessRecord, timeout: float) -> None:
        """SIGTERM (SIGKILL after `timeout` s) to the daemon `record`; reaped if our child."""
        own = [d.process for d in self.started if d.process.pid == record.pid]
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while is_alive(record):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(record.pid, signal.SIGKILL)
                deadline = time.monotonic() + timeout
            time.sleep(0.1)
        for process in own:
            process.wait(timeout)  # reap our own child
        if not own:  # started by another LibvirtDaemons of this session, or not ours
            with contextlib.suppress(ChildProcessError):
                os.waitpid(record.pid, os.WNOHANG)


def libvirt_answers(uri: str = SYSTEM_URI, timeout: float = 15.0) -> bool:
    """True when `virsh -c URI version` succeeds within `timeout` seconds."""
    try:
        done = subprocess.run(
            ["virsh", "-c", uri, "version"], capture_output=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


def socket_answers(path: Path) -> bool:
    """True when something accepts connections on the UNIX socket `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def require_usable_kvm_device(device: Path = KVM_DEVICE) -> None:
    """Raises LabUnavailable when `device` exists but only root may open it.

    libvirtd then judges KVM unusable for its QEMU user while its capability probe uses it,
    discards its capability cache and re-probes QEMU (about 4 s) on nearly every API call.
    scripts/lab-setup gives the device the group udev would (root:kvm 0660).
    """
    try:
        info = device.stat()
    except FileNotFoundError:
        return
    try:
        kvm_gid = grp.getgrnam("kvm").gr_gid
    except KeyError:
        kvm_gid = -1
    if info.st_mode & 0o006 == 0o006 or (info.st_gid == kvm_gid and info.st_mode & 0o060 == 0o060):
        return
    raise LabUnavailable(
        f"{device} is usable by root only, which makes libvirtd re-probe QEMU on every call: "
        f"{SETUP_HINT} (it makes {device} root:kvm 0660 as udev would)"
    )


def _spawn(name: str, log_dir: Path) -> StartedDaemon:
    log = log_dir / f"{name}.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [name],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # it may outlive this session when another one uses it
        )
    return StartedDaemon(name, process, log)


def _wait_until(ready: Callable[[], bool], daemon: StartedDaemon, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        status = daemon.process.poll()
        if status is not None:
            raise LabError(f"{daemon.name} exited with status {status}:\n{daemon.log_tail()}")
        if time.monotonic() > deadline:
            raise LabError(
                f"{daemon.name} (PID {daemon.process.pid}) did not answer within {timeout:.0f} s:"
                f"\n{daemon.log_tail()}"
            )
        time.sleep(0.2)


def _start_daemons(state_dir: Path, timeout: float) -> list[StartedDaemon]:
    started: list[StartedDaemon] = []
    try:
        if not socket_answers(VIRTLOGD_SOCKET):
            started.append(_spawn("virtlogd", state_dir))
            _wait_until(lambda: socket_answers(VIRTLOGD_SOCKET), started[-1], 20.0)
        started.append(_spawn("libvirtd", state_dir))
        _wait_until(lambda: libvirt_answers(SYSTEM_URI), started[-1], timeout)
    except BaseException:
        for daemon in reversed(started):
            daemon.process.kill()
            daemon.process.wait()
        raise
    return started


def start_libvirt_daemons(
    state_dir: Path = STATE_DIR, timeout: float = START_TIMEOUT
) -> LibvirtDaemons:
    """Makes qemu:///system answer, starting virtlogd and libvirtd only where needed.

    Registers this session in `state_dir` (daemon logs go there too). Raises LabUnavailable
    when not root, the tools are missing or /dev/kvm needs scripts/lab-setup; LabError when a
    daemon exits or does not answer within `timeout` (what it started is stopped again).
    """
    require_root()
    require_tools("virsh", "virtlogd", "libvirtd", "qemu-system-x86_64", "qemu-img")
    require_usable_kvm_device()
    session = process_record("pytest", os.getpid())
    assert session is not None  # we are running
    with locked_state(state_dir) as state:
        started = [] if libvirt_answers(SYSTEM_URI) else _start_daemons(state_dir, timeout)
        for daemon in started:
            record = process_record(daemon.name, daemon.process.pid)
            if record is not None:
                state.daemons.append(record)
        state.users.append(session)
    return LibvirtDaemons(SYSTEM_URI, state_dir, session, started)

"""The nested "remote KVM host": a plain QEMU (TCG) guest with real LVM, NFS and sshd.

`start_remote_host` boots the guest of tests/lab/remote_image.py with `qemu-system-x86_64
-accel tcg` (no libvirt): two sparse qcow2 disks (LVM PV, NFS export), user networking that
forwards 127.0.0.1:PORT on this host to the guest's sshd (and nothing else: `restrict=on`),
the serial console in a log file, a QMP socket and a PID file. It returns a `RemoteHost` once
the guest printed its ready marker, which tests reach over SSH (paramiko, the lab's keys).

Its virtio devices interrupt the guest by INTx, not MSI-X (`vectors=0`). With MSI-X, a CI run
and a local one hung the same way: the PV disk's virtqueue was empty and every request
completed on QEMU's side (avail idx = used idx = QEMU's signalled-used, isr 1), while the
guest still counted 11 reads in flight and its used_event was 12 completions behind: an
interrupt QEMU sent and the TCG guest never handled. Every later I/O to that disk (`lvs`, the
snapshot's `dd`) then waited forever. A level-triggered INTx line stays raised until the guest
reads the ISR, so a completion cannot be missed that way.

Crashed sessions: every running guest is recorded in STATE_DIR/remote-hosts/NAME.json with
the PIDs (and start times) of its QEMU and of the owning test session; the next start kills
QEMUs whose owner is gone, by PID, and forgets them. Names are unique per run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import paramiko  # type: ignore[import-untyped,unused-ignore]

from tests.lab.daemons import STATE_DIR, ProcessRecord, is_alive, process_record
from tests.lab.errors import HostHung, LabError, require_root, require_tools
from tests.lab.remote_image import (
    ERROR_MARKER,
    NFS_SERIAL,
    NFSD_START,
    NFSD_STOP,
    PV_SERIAL,
    READY_MARKER,
    RemoteHostImage,
)

ADDRESS = "127.0.0.1"
USER = "root"
NIC_ID = "nic0"
PV_DISK_SIZE = "4G"
NFS_DISK_SIZE = "3G"
BOOT_TIMEOUT = 300.0  # generous: TCG on 2 cores shared with other test runs
PORT_ATTEMPTS = 3


class _PortTaken(LabError):
    """QEMU could not listen on the chosen forwarding port (another process took it)."""


@dataclass(frozen=True)
class QemuSpec:
    """Everything `qemu_argv` needs for one remote-host guest."""

    name: str
    image: RemoteHostImage
    pv_disk: Path
    nfs_disk: Path
    port: int
    console_log: Path
    qmp_socket: Path
    pidfile: Path
    memory_mib: int = 1024
    cpus: int = 1


def qemu_argv(spec: QemuSpec) -> list[str]:
    """The qemu-system-x86_64 command line of `spec` (TCG, direct kernel boot, no display)."""
    disks = []
    for node, path, serial in (("pv", spec.pv_disk, PV_SERIAL), ("nfs", spec.nfs_disk, NFS_SERIAL)):
        disks += [
            "-blockdev",
            f"driver=qcow2,node-name={node},cache.no-flush=on,"
            f"file.driver=file,file.filename={_escape(path)}",
            "-device",
            f"virtio-blk-pci,drive={node},serial={serial},vectors=0",
        ]
    return [
        "qemu-system-x86_64",
        "-name", spec.name,
        "-accel", "tcg",
        "-cpu", "max",
        "-smp", str(spec.cpus),
        "-m", str(spec.memory_mib),
        "-nodefaults",
        "-display", "none",
        "-no-reboot",
        "-kernel", str(spec.image.kernel),
        "-initrd", str(spec.image.initrd),
        "-append", "console=ttyS0 panic=1 quiet",
        "-serial", f"file:{_escape(spec.console_log)}",
        "-qmp", f"unix:{_escape(spec.qmp_socket)},server=on,wait=off",
        "-pidfile", str(spec.pidfile),
        "-netdev", f"user,id=net0,restrict=on,hostfwd=tcp:{ADDRESS}:{spec.port}-:22",
        "-device", f"virtio-net-pci,netdev=net0,id={NIC_ID},vectors=0",
        *disks,
    ]  # fmt: skip


def _escape(path: Path) -> str:
    """`path` as a value in a QEMU option list, where a comma is written twice."""
    return str(path).replace(",", ",,")


def known_hosts_line(address: str, port: int, public_key: str) -> str:
    """The known_hosts line of a host key (`[addr]:port` unless the port is 22)."""
    host = address if port == 22 else f"[{address}]:{port}"
    return f"{host} {public_key}"


def free_port(address: str = ADDRESS) -> int:
    """A TCP port nobody listens on at `address` right now (it may be taken before use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        port: int = sock.getsockname()[1]
    return port


def qmp_reply(lines: list[bytes]) -> Any:
    """The `return` value of the first reply among QMP `lines` (events are skipped)."""
    for line in lines:
        message = json.loads(line)
        if "error" in message:
            raise LabError(f"QMP error: {message['error'].get('desc', message['error'])}")
        if "return" in message:
            return message["return"]
    raise LabError("QMP: no reply")


def qmp_command(path: Path, command: str, timeout: float = 30.0, **arguments: Any) -> Any:
    """Runs one QMP `command` with `arguments` on the socket `path`; returns its result."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        stream = sock.makefile("rwb")
        stream.readline()  # the greeting
        result = None
        requests: list[dict[str, Any]] = [{"execute": "qmp_capabilities"}]
        requests.append({"execute": command, "arguments": arguments})
        for request in requests:
            stream.write(json.dumps(request).encode() + b"\n")
            stream.flush()
            lines: list[bytes] = []
            while not lines or b'"event"' in lines[-1]:
                line = stream.readline()
                if not line:
                    if command == "quit":
                        return None  # QEMU may close the socket before it answers
                    raise LabError(f"QMP: {path} closed the connection")
                lines.append(line)
            result = qmp_reply(lines)
        return result


@dataclass
class _Record:
    owner: ProcessRecord
    qemu: ProcessRecord


def write_record(path: Path, owner: ProcessRecord, qemu: ProcessRecord) -> None:
    """Records that the session `owner` runs the remote-host `qemu` (for reaping)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"owner": asdict(owner), "qemu": asdict(qemu)}))


def reap_stale_remote_hosts(state_dir: Path = STATE_DIR) -> None:
    """Kills (by PID) the remote-host QEMUs of test sessions that died; forgets them."""
    directory = state_dir / "remote-hosts"
    for path in sorted(directory.glob("*.json")):
        try:
            data = json.loads(path.read_text())
            record = _Record(ProcessRecord(**data["owner"]), ProcessRecord(**data["qemu"]))
        except (OSError, ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)
            continue
        if is_alive(record.owner):
            continue
        if is_alive(record.qemu):
            with contextlib.suppress(ProcessLookupError):
                os.kill(record.qemu.pid, signal.SIGKILL)
        path.unlink(missing_ok=True)


@dataclass
class RemoteHost:
    """A running remote-host guest; see the module docstring and tests/lab/remote_image.py.

    `address`:`port` reaches its sshd as `user` with `identity_file`; `known_hosts_file`
    holds its host key (`host_public_key`). `console_log` is its serial console.
    """

    name: str
    workdir: Path
    process: subprocess.Popen[bytes]
    port: int
    image: RemoteHostImage
    console_log: Path
    qmp_socket: Path
    pidfile: Path
    known_hosts_file: Path
    record_file: Path
    started_at: float
    boot_seconds: float = 0.0
    address: str = ADDRESS
    user: str = USER
    hung: bool = False
    _client: Any = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def identity_file(self) -> Path:
        return self.image.keys.client_key

    @property
    def host_public_key(self) -> str:
        return self.image.keys.host_public_key

    def console(self) -> str:
        """The serial console output so far."""
        if not self.console_log.exists():
            return ""
        return self.console_log.read_text(errors="replace")

    def connect(self, timeout: float = 30.0) -> Any:
        """A new paramiko SSHClient logged in as `user`; unknown host keys are rejected."""
        client = paramiko.SSHClient()
        client.load_host_keys(str(self.known_hosts_file))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        client.connect(
            self.address,
            port=self.port,
            username=self.user,
            key_filename=str(self.identity_file),
            look_for_keys=False,
            allow_agent=False,
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
        )
        return client

    def run(
        self,
        argv: list[str],
        *,
        input: str | None = None,
        timeout: float = 120.0,
        check: bool = False,
        expect_timeout: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """Runs `argv` in the guest over SSH (quoted with shlex.join), like subprocess.run.

        With `check`, raises subprocess.CalledProcessError on a non-zero exit status. A
        command still running after `timeout` seconds raises HostHung with what the guest
        shows (its blocked tasks), and the host's later commands fail at once (a hung guest
        would otherwise cost every later test its whole timeout); with `expect_timeout` it
        raises subprocess.TimeoutExpired instead and the host stays usable.
        """
        if self.hung:
            raise HostHung(
                f"{self.name} hung in an earlier test, so {shlex.join(argv)} was not run"
            )
        with self._lock:
            if self._client is None or not self._client.get_transport().is_active():
                self._client = self.connect()
            transport = self._client.get_transport()
        channel = transport.open_session(timeout=timeout)
        try:
            channel.exec_command(shlex.join(argv))
            if input is not None:
                channel.sendall(input.encode())
            channel.shutdown_write()
            status, out, err = _collect(channel, argv, timeout)
        except subprocess.TimeoutExpired:
            if expect_timeout:
                raise
            self.hung = True
            raise HostHung(
                f"{self.name}: {shlex.join(argv)} did not end within {timeout:.0f} s; the "
                f"host's later commands fail at once\n{self.hang_diagnostics()}"
            ) from None
        finally:
            channel.close()
        if check and status != 0:
            raise subprocess.CalledProcessError(status, argv, out, err)
        return subprocess.CompletedProcess(argv, status, out, err)

    def stop_nfs_server(self) -> None:
        """Stops the guest's nfsd (`rpc.nfsd 0`): I/O on its NFS mount then hangs."""
        self.run(list(NFSD_STOP), check=True, timeout=60)

    def start_nfs_server(self) -> None:
        """Starts the guest's nfsd again; its NFS mount recovers (after a 10 s grace time)."""
        self.run(list(NFSD_START), check=True, timeout=60)

    def set_link(self, up: bool) -> None:
        """Sets the link of the guest's NIC: down drops all its traffic (SSH included)."""
        qmp_command(self.qmp_socket, "set_link", name=NIC_ID, up=up)

    def wait_ready(self, timeout: float = BOOT_TIMEOUT) -> str:
        """Waits for the ready marker; returns its line. LabError on an error or timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.console().splitlines():
                if line.startswith(READY_MARKER):
                    self.boot_seconds = time.monotonic() - self.started_at
                    return line
                if line.startswith(ERROR_MARKER):
                    raise LabError(f"{self.name}: {line}\n{self._diagnostics()}")
            if self.process.poll() is not None:
                log = (self.workdir / "qemu.log").read_text(errors="replace")
                if "host forwarding rule" in log:
                    raise _PortTaken(f"{self.name}: port {self.port} was taken")
                raise LabError(f"{self.name}: QEMU exited early\n{self._diagnostics()}")
            time.sleep(0.2)
        raise LabError(
            f"{self.name}: no {READY_MARKER} within {timeout:.0f} s\n{self._diagnostics()}"
        )

    def stop(self, timeout: float = 15.0) -> None:
        """Quits QEMU (QMP, then SIGKILL to its PID) and forgets its record. Idempotent."""
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None
        if self.process.poll() is None:
            with contextlib.suppress(OSError, LabError):
                qmp_command(self.qmp_socket, "quit", timeout=5.0)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        self.record_file.unlink(missing_ok=True)
        self.qmp_socket.unlink(missing_ok=True)

    def hang_diagnostics(self) -> str:
        """What a hung host shows: QEMU's run state, the kernel's blocked tasks (sysrq w,
        read back with dmesg over a new connection) and the console's tail."""
        parts = []
        try:
            state = qmp_command(self.qmp_socket, "query-status", timeout=10.0)
            parts.append(f"QEMU status: {state}")
        except (OSError, LabError) as error:
            parts.append(f"QEMU status: unknown ({error})")
        client = None
        try:
            client = self.connect(timeout=20.0)
            channel = client.get_transport().open_session(timeout=20.0)
            channel.exec_command("echo w >/proc/sysrq-trigger; free; dmesg | tail -n 150")
            _, out, err = _collect(channel, ["dmesg"], 30.0)
            parts.append(f"guest memory and kernel log (sysrq w):\n{out}{err}")
        except Exception as error:  # the diagnostics must not hide the hang itself
            parts.append(f"guest kernel log: not read ({type(error).__name__}: {error})")
        finally:
            if client is not None:
                with contextlib.suppress(Exception):
                    client.close()
        parts.append(self._diagnostics())
        return "\n".join(parts)

    def _diagnostics(self) -> str:
        qemu_log = self.workdir / "qemu.log"
        qemu = qemu_log.read_text(errors="replace") if qemu_log.exists() else ""
        tail = "\n".join(self.console().splitlines()[-40:])
        return f"QEMU stderr: {qemu.strip() or '(empty)'}\nconsole tail:\n{tail}"


def _collect(channel: Any, argv: list[str], timeout: float) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of an exec channel, within `timeout` seconds. Read to
    the channel's EOF: sshd may send the exit status before the rest of the output."""
    out, err = bytearray(), bytearray()
    deadline = time.monotonic() + timeout
    while True:
        busy = False
        if channel.recv_ready():
            out += channel.recv(65536)
            busy = True
        if channel.recv_stderr_ready():
            err += channel.recv_stderr(65536)
            busy = True
        if not busy:
            if channel.closed or (channel.eof_received and channel.exit_status_ready()):
                break
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(argv, timeout, bytes(out), bytes(err))
            time.sleep(0.01)
    return channel.recv_exit_status(), out.decode(errors="replace"), err.decode(errors="replace")


def _create_disk(path: Path, size: str) -> None:
    done = subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(path), size],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise LabError(f"qemu-img create {path} failed: {done.stderr.strip()}")


def _launch(spec: QemuSpec, workdir: Path, state_dir: Path) -> RemoteHost:
    known_hosts = workdir / "known_hosts"
    line = known_hosts_line(ADDRESS, spec.port, spec.image.keys.host_public_key)
    known_hosts.write_text(line + "\n")
    for stale in (spec.console_log, spec.qmp_socket, spec.pidfile):
        stale.unlink(missing_ok=True)
    with (workdir / "qemu.log").open("wb") as log:
        process = subprocess.Popen(
            qemu_argv(spec), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
    record_file = state_dir / "remote-hosts" / f"{spec.name}.json"
    host = RemoteHost(
        name=spec.name,
        workdir=workdir,
        process=process,
        port=spec.port,
        image=spec.image,
        console_log=spec.console_log,
        qmp_socket=spec.qmp_socket,
        pidfile=spec.pidfile,
        known_hosts_file=known_hosts,
        record_file=record_file,
        started_at=time.monotonic(),
    )
    owner = process_record("pytest", os.getpid())
    qemu = process_record("qemu", process.pid)
    if owner is not None and qemu is not None:
        write_record(record_file, owner, qemu)
    return host


def start_remote_host(
    workdir: Path,
    image: RemoteHostImage,
    *,
    memory_mib: int = 1024,
    cpus: int = 1,
    boot_timeout: float = BOOT_TIMEOUT,
    state_dir: Path = STATE_DIR,
) -> RemoteHost:
    """Boots a remote-host guest with its files in `workdir`; returns it once it is ready.

    Raises LabUnavailable when the machine is not set up, LabError when the guest does not
    come up (its QEMU is killed first, so nothing is left running).
    """
    require_root()
    require_tools("qemu-system-x86_64", "qemu-img")
    reap_stale_remote_hosts(state_dir)
    name = f"gfs-remote-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    workdir.mkdir(parents=True, exist_ok=True)
    pv_disk, nfs_disk = workdir / f"{name}-pv.qcow2", workdir / f"{name}-nfs.qcow2"
    _create_disk(pv_disk, PV_DISK_SIZE)
    _create_disk(nfs_disk, NFS_DISK_SIZE)
    qmp_socket = workdir / "qmp.sock"
    if len(str(qmp_socket)) > 100:  # sun_path holds 108 bytes
        qmp_socket = Path("/run") / f"{name}.qmp"
    for attempt in range(1, PORT_ATTEMPTS + 1):
        spec = QemuSpec(
            name=name,
            image=image,
            pv_disk=pv_disk,
            nfs_disk=nfs_disk,
            port=free_port(),
            console_log=workdir / "console.log",
            qmp_socket=qmp_socket,
            pidfile=workdir / "qemu.pid",
            memory_mib=memory_mib,
            cpus=cpus,
        )
        host = _launch(spec, workdir, state_dir)
        try:
            host.wait_ready(boot_timeout)
            return host
        except _PortTaken:
            host.stop()
            if attempt == PORT_ATTEMPTS:
                raise
        except BaseException:
            host.stop()
            raise
    raise AssertionError("unreachable")

"""A real OpenSSH sshd on 127.0.0.1 for the SSH runner tests.

`sshd` starts `/usr/sbin/sshd -D -e -f CONFIG` as root on a free port, with a host key, a
client key and an AuthorizedKeysFile generated with ssh-keygen in the test's temp dir. It
is stopped by PID at the end, also when the test fails, together with the per-connection
sshd processes and whatever commands they left running. Without root or OpenSSH the tests
fail with the reason (scripts/lab-setup installs openssh-server and openssh-client).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gfs_backup.core.config import Host
from gfs_backup.transport.known_hosts import HostKey, lookup_name

SSHD = Path("/usr/sbin/sshd")
PRIVSEP_DIR = Path("/run/sshd")  # sshd refuses to start without it
START_TIMEOUT = 10.0


def require_openssh() -> None:
    if os.geteuid() != 0:
        pytest.fail("the SSH tests start sshd as root: run ./scripts/test as root")
    if not SSHD.exists() or shutil.which("ssh-keygen") is None:
        pytest.fail("the SSH tests need openssh-server and openssh-client: run scripts/lab-setup")


def keygen(path: Path, kind: str = "ed25519") -> HostKey:
    """A new key pair without passphrase at `path` (and `path`.pub); returns the public key."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", "gfs-test", "-f", str(path)],
        check=True,
        capture_output=True,
    )
    kind_name, blob = path.with_name(path.name + ".pub").read_text().split()[:2]
    return HostKey(kind_name, blob)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def children(pid: int) -> list[int]:
    """PIDs of the processes whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def descendants(pid: int) -> list[int]:
    result = []
    for child in children(pid):
        result += [child, *descendants(child)]
    return result


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def pids_with(marker: str) -> list[int]:
    """Live processes whose command line contains `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if marker.encode() in cmdline and state != "Z":
                found.append(int(entry.name))
    return found


def kill(pids: list[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


@dataclass
class Sshd:
    """A running sshd and the files a gfs Host needs to reach it."""

    directory: Path
    port: int
    host_key: HostKey
    client_key: Path
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def known_hosts(self) -> Path:
        return self.directory / "known_hosts"

    def host(self, name: str = "lab", **changes: object) -> Host:
        values: dict[str, object] = {
            "name": name,
            "address": "127.0.0.1",
            "port": self.port,
            "user": "root",
            "identity_file": str(self.client_key),
            "known_hosts": str(self.known_hosts),
            **changes,
        }
        return Host(**values)  # type: ignore[arg-type]

    def config_table(self, name: str) -> str:
        """The `[hosts.NAME]` table of a gfs configuration that reaches this sshd."""
        return (
            f'[hosts.{name}]\naddress = "127.0.0.1"\nport = {self.port}\nuser = "root"\n'
            f"identity_file = {json.dumps(str(self.client_key))}\n"
            f"known_hosts = {json.dumps(str(self.known_hosts))}\n"
        )

    def trust(self, key: HostKey | None = None) -> None:
        """Record `key` (default: the real host key) as the key of this sshd."""
        key = key or self.host_key
        with self.known_hosts.open("a") as handle:
            handle.write(f"{lookup_name('127.0.0.1', self.port)} {key.type} {key.base64}\n")

    def session_pids(self, marker: str) -> list[int]:
        """The per-connection sshd processes above the command that has `marker`."""
        pids = []
        for pid in pids_with(marker):
            while pid > 1 and pid != self.process.pid:
                if Path(f"/proc/{pid}/exe").resolve() == SSHD.resolve():
                    pids.append(pid)
                pid = parent(pid)
        return sorted(set(pids))

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])


def _config(directory: Path, port: int, host_key: Path, authorized: Path) -> Path:
    config = directory / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\nPidFile none\n"
        f"AuthorizedKeysFile {authorized}\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        "StrictModes no\nMaxSessions 64\nMaxStartups 64\nLogLevel VERBOSE\n"
    )
    return config


def _wait_listening(server: Sshd) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"sshd exited with {server.process.returncode}: {server.log_tail()}")
        try:
            socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    pytest.fail(f"sshd does not listen on port {server.port}: {server.log_tail()}")


def restart(server: Sshd) -> None:
    """Start a stopped sshd's listener again: the same port, keys and configuration."""
    with server.log.open("ab") as output:
        server.process = subprocess.Popen(
            [str(SSHD), "-D", "-e", "-f", str(server.directory / "sshd_config")],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
        )
    _wait_listening(server)


def stop(server: Sshd) -> None:
    """Stop the listener and every process below it (sessions, their commands), by PID."""
    below = descendants(server.process.pid)
    server.process.terminate()
    try:
        server.process.wait(5)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
    kill(below)


def start_sshd(directory: Path, wrapper: tuple[str, ...] = ()) -> Sshd:
    """A new sshd with its keys in `directory` (created), listening; `wrapper` is argv run
    before sshd's own (it must exec it: e.g. a script entering a namespace). `stop` ends it."""
    require_openssh()
    directory.mkdir()
    host_key = keygen(directory / "host_ed25519")
    keygen(directory / "client_ed25519")
    authorized = directory / "authorized_keys"
    shutil.copy(directory / "client_ed25519.pub", authorized)
    PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
    port = free_port()
    config = _config(directory, port, directory / "host_ed25519", authorized)
    log = directory / "sshd.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [*wrapper, str(SSHD), "-D", "-e", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
        )
    server = Sshd(directory, port, host_key, directory / "client_ed25519", process, log)
    try:
        _wait_listening(server)
    except BaseException:
        stop(server)
        raise
    return server


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    server = start_sshd(tmp_path / "sshd")
    try:
        yield server
    finally:
        stop(server)

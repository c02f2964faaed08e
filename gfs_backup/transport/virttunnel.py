"""libvirt of a remote host, through gfs's own SSH connection to it.

libvirt's `qemu+ssh://` transport runs the OpenSSH client, which checks host keys against
its own known_hosts (root's ~/.ssh/known_hosts), or not at all with `no_verify=1`, and
opens a connection of its own. gfs keeps one connection per host per run, with the host key
checked against gfs's known_hosts (transport/ssh.py). So gfs does what that transport does
on the host, on its own connection: a channel runs `virt-ssh-helper URI` there (libvirt's
own proxy, in libvirt-daemon since 6.8: it connects to the daemon serving URI, virtqemud
or libvirtd), and a private Unix socket here relays each libvirt connection to one such
channel. libvirt-python then opens `qemu+unix:///system?socket=PATH`: the same remote
protocol libvirt speaks over ssh, with the same keepalives.

The socket lives in a directory only root can enter (mkdtemp: 0700) and is removed with
the tunnel; `close_tunnels` (called by transport.ssh.close_runners) closes every tunnel at
the end of a run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import quote, urlsplit

from gfs_backup.core.config import check_host_uri
from gfs_backup.core.errors import ExitCode, GfsError
from gfs_backup.transport.runner import Command, Completed

if TYPE_CHECKING:
    import paramiko

log = logging.getLogger("gfs.virttunnel")

HELPER = "virt-ssh-helper"
PREFIX = "gfs-virt-"  # the tunnels' socket directories, in the temporary directory
SOCKET_NAME = "libvirt.sock"
CHUNK = 1 << 16
PROBE_TIMEOUT = 60.0


class TunnelError(GfsError):
    exit_code = ExitCode.FAILED


class ChannelRunner(Protocol):
    """What a tunnel needs of transport.ssh.SSHRunner."""

    host: str

    def open_channel(self, command: Command) -> paramiko.Channel: ...

    def run(self, command: Command, check: bool = True) -> Completed: ...

    def count(self, received: int = 0, sent: int = 0) -> None: ...


def local_uri(remote_uri: str, socket_path: Path) -> str:
    """The URI libvirt-python opens here for `remote_uri` served through `socket_path`."""
    parts = urlsplit(remote_uri)
    return f"{parts.scheme}+unix://{parts.path}?socket={quote(str(socket_path), safe='/')}"


class VirtTunnel:
    """A Unix socket here whose every connection is a `virt-ssh-helper` on the host."""

    def __init__(self, runner: ChannelRunner, remote_uri: str) -> None:
        self.runner = runner
        self.remote_uri = check_host_uri(remote_uri)
        self.host = runner.host
        self._directory = Path(tempfile.mkdtemp(prefix=PREFIX))
        self.path = self._directory / SOCKET_NAME
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(self.path))
        self._server.listen(16)
        self._closed = threading.Event()
        self._failing = False  # the last channel could not be opened (warned once)
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, paramiko.Channel]] = []
        self.uri = local_uri(self.remote_uri, self.path)
        threading.Thread(target=self._accept, name=f"virt-tunnel-{self.host}", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return  # closed
            try:
                channel = self.runner.open_channel(Command((HELPER, self.remote_uri)))
            except GfsError as exc:
                if not self._failing:  # once per outage: libvirt retries every second
                    log.warning("host %s: cannot reach libvirt: %s", self.host, exc)
                self._failing = True
                client.close()
                continue
            self._failing = False
            with self._lock:
                self._pairs.append((client, channel))
            for pump in (self._to_host, self._from_host):
                threading.Thread(target=pump, args=(client, channel), daemon=True).start()

    def _to_host(self, client: socket.socket, channel: paramiko.Channel) -> None:
        try:
            while data := client.recv(CHUNK):
                channel.sendall(data)
                self.runner.count(sent=len(data))
        except OSError:
            pass
        with contextlib.suppress(OSError, EOFError):
            channel.shutdown_write()

    def _from_host(self, client: socket.socket, channel: paramiko.Channel) -> None:
        try:
            while data := channel.recv(CHUNK):
                client.sendall(data)
                self.runner.count(received=len(data))
        except OSError:
            pass
        if channel.exit_status_ready() and channel.recv_exit_status() not in (0, -1):
            errors = channel.recv_stderr(CHUNK).decode(errors="replace").strip()
            log.warning("host %s: %s ended: %s", self.host, HELPER, errors[-300:])
        with contextlib.suppress(OSError):
            client.shutdown(socket.SHUT_RDWR)
        client.close()
        channel.close()
        with self._lock, contextlib.suppress(ValueError):
            self._pairs.remove((client, channel))

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        with self._lock:
            pairs = list(self._pairs)
        for client, channel in pairs:
            channel.close()
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
        shutil.rmtree(self._directory, ignore_errors=True)


def remove_stale_tunnels(folder: Path | None = None) -> None:
    """Remove the socket directories of tunnels whose gfs is gone (killed: nothing else
    leaves one): nothing listens on their socket any more. A live one answers and stays."""
    for directory in (folder or Path(tempfile.gettempdir())).glob(f"{PREFIX}*"):
        if (
            not directory.is_dir()
            or directory.is_symlink()
            or directory.stat().st_uid != os.getuid()
        ):
            continue
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(directory / SOCKET_NAME))
                continue  # a running gfs's tunnel
            except OSError:
                pass
        shutil.rmtree(directory, ignore_errors=True)
        log.debug("removed %s, the tunnel of a gfs that is gone", directory)


_tunnels: dict[tuple[int, str], VirtTunnel] = {}
_tunnels_lock = threading.Lock()


def tunnel_for(runner: ChannelRunner, remote_uri: str) -> VirtTunnel:
    """The tunnel to `remote_uri` on the runner's host, opened once per run and host. The
    first call checks that the host has virt-ssh-helper (TunnelError saying what to
    install); ValueError for a URI that names a transport or server."""
    check_host_uri(remote_uri)
    key = (id(runner), remote_uri)
    with _tunnels_lock:
        tunnel = _tunnels.get(key)
        if tunnel is None:
            probe = runner.run(Command((HELPER, "--version"), timeout=PROBE_TIMEOUT), False)
            if probe.returncode != 0:
                why = (
                    "not installed"
                    if probe.returncode == 127
                    else " ".join(probe.stderr.split())[-200:]
                )
                raise TunnelError(
                    f"host {runner.host}: {HELPER} ({why}): gfs reaches the host's libvirt "
                    "through it; install libvirt 6.8 or newer there (apt install "
                    "libvirt-daemon-system)"
                )
            remove_stale_tunnels()
            tunnel = _tunnels[key] = VirtTunnel(runner, remote_uri)
            log.debug("host %s: libvirt %s through %s", runner.host, remote_uri, tunnel.path)
        return tunnel


def close_tunnels() -> None:
    with _tunnels_lock:
        tunnels = list(_tunnels.values())
        _tunnels.clear()
    for tunnel in tunnels:
        tunnel.close()

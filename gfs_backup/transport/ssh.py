"""SSHRunner: the Runner contract on a remote host over SSH (the one module that imports
paramiko).

One paramiko Transport per host, opened at the first command and shared by every thread;
a channel per command. The remote side gets one string, always `shlex.join(argv)`, which
the remote user's login shell (a POSIX shell: sh, dash, bash) splits back into exactly argv.

Time limits: a command with a timeout runs remotely as `timeout --kill-after=10 SECONDS
argv...` (GNU coreutils on the remote) and a local watchdog closes its channel at the same
deadline. Closing the channel, or losing the connection, does not signal the remote
process (sshd sends no SIGHUP without a terminal, and paramiko cannot send SSH `signal`
requests), so the `timeout` wrapper is what bounds it: GNU `timeout` runs the command in
its own process group and signals the whole group. A command that reads or writes a
stream also dies at once of EOF or SIGPIPE when its channel goes. A dead network is found
by paramiko keepalives plus TCP_USER_TIMEOUT and TCP keepalive on the socket, and while a
stream is read: after STREAM_IDLE seconds without data gfs asks the server for an answer
(an SSH global request); none within PROBE_TIMEOUT means the connection is dead (a proxy or
NAT in between may keep TCP itself alive), a slow but living remote just goes on.

Host keys are checked against the host's known_hosts file (known_hosts.py); unknown,
changed and revoked keys are refused. Authentication is by public key only, never a
password or an agent: gfs runs from cron and systemd with nobody to answer a prompt.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import shlex
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import ModuleType
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    import paramiko
    from _typeshed import ReadableBuffer, WriteableBuffer

from gfs_backup.core.config import LOCAL_HOST, Config, Host
from gfs_backup.core.errors import ExitCode, GfsError
from gfs_backup.transport.known_hosts import (
    HostKey,
    HostKeyError,
    known_hosts_path,
    lookup_name,
    read_known_hosts,
    recorded_keys,
    verify_host_key,
)
from gfs_backup.transport.runner import (
    Command,
    CommandError,
    Completed,
    LocalRunner,
    Runner,
    check_exit_status,
    refuse_streaming_in_dry_run,
    skipped_in_dry_run,
    timed_out,
)
from gfs_backup.transport.virttunnel import close_tunnels


def _lazy_module(name: str) -> ModuleType:
    """`name`, imported at its first attribute access (importlib's LazyLoader): paramiko
    takes ~0.1 s to import, which every run of jobs without a remote host would pay."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ImportError(f"No module named {name!r}")
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


if not TYPE_CHECKING:
    paramiko = _lazy_module("paramiko")

__all__ = ["HostKeyError", "IdleTimeout", "SSHError", "SSHRunner", "close_runners", "runner_for"]

log = logging.getLogger("gfs.ssh")
# paramiko's transport thread logs lost connections with tracebacks; they reach the user
# as one-line SSHError/CommandError instead.
logging.getLogger("paramiko").addHandler(logging.NullHandler())

CONNECT_TIMEOUT = 20.0  # TCP connect, SSH handshake, opening a channel
KEEPALIVE = 15  # seconds without sending before paramiko sends a keepalive packet
TCP_USER_TIMEOUT_MS = 60_000  # unacknowledged data for this long: the peer is gone
KILL_AFTER = 10  # `timeout --kill-after`: SIGKILL this long after SIGTERM
TIMEOUT_STATUS = (124, 137)  # GNU timeout: timed out (TERM), timed out (needed KILL)
DEFAULT_IDENTITIES = ("id_ed25519", "id_ecdsa", "id_rsa")
STDERR_KEPT = 64 << 10
WINDOW = 16 << 20  # a larger SSH window than paramiko's 2 MiB: faster bulk streams
PACKET = 32 << 10
# paramiko starts a key exchange itself every 512 MiB either way. If the server's
# CHANNEL_CLOSE arrives after paramiko's KEXINIT went out and before the server's answer,
# paramiko's transport thread blocks sending its own close (it waits for the key exchange
# it is itself meant to read) and the stream fails after 30 s with "Key-exchange timed
# out": 3 of 4 reads of 512 MiB from a local sshd did. So the client never starts one
# before this many bytes; the server still rekeys by its own limit (OpenSSH: every 2**32
# cipher blocks, 64 GiB of AES), and a key exchange the server starts cannot deadlock so.
CLIENT_REKEY_BYTES = 1 << 40
STREAM_IDLE = 30.0  # seconds without stream data before gfs checks the server answers
PROBE_TIMEOUT = 15.0  # seconds the server has to answer that check


class IdleTimeout(CommandError):
    """A stream with an `idle_timeout` brought no data for that long."""


class SSHError(GfsError):
    """The host cannot be reached or refuses us (DNS, refused, authentication, handshake)."""

    exit_code = ExitCode.FAILED


def remote_argv(command: Command) -> list[str]:
    """`command.argv`, wrapped in GNU `timeout` when the command has a time limit."""
    if command.timeout is None:
        return list(command.argv)
    seconds = f"{command.timeout:.3f}".rstrip("0").rstrip(".")  # never 1e+06: timeout rejects it
    return ["timeout", f"--kill-after={KILL_AFTER}", seconds, *command.argv]


def remote_command_line(command: Command) -> str:
    """The one string sent to the remote: every argument quoted by `shlex.join`."""
    if any("\0" in arg for arg in command.argv):
        raise CommandError(command, "an argument contains a NUL byte")
    return shlex.join(remote_argv(command))


def _host_key(key: paramiko.PKey) -> HostKey:
    return HostKey(key.get_name(), key.get_base64())


def _open_socket(host: Host, timeout: float) -> socket.socket:
    where = f"host {host.name} ({host.address}:{host.port})"
    try:
        sock = socket.create_connection((host.address, host.port), timeout=timeout)
    except socket.gaierror as exc:
        raise SSHError(
            f"host {host.name}: cannot resolve address {host.address!r} ({exc.strerror}): "
            f"check address in [hosts.{host.name}] and DNS"
        ) from None
    except ConnectionRefusedError:
        raise SSHError(
            f"{where}: connection refused: check that sshd runs there and listens on port "
            f"{host.port} (port in [hosts.{host.name}])"
        ) from None
    except TimeoutError:
        raise SSHError(
            f"{where}: no answer within {timeout:.0f} s: check the address, the network "
            "and firewalls"
        ) from None
    except OSError as exc:
        raise SSHError(f"{where}: cannot connect: {exc.strerror or exc}") from None
    # paramiko writes packet by packet: with Nagle each one's last segment waits for a
    # delayed ACK, which made uploads about 30 times slower.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        ("TCP_KEEPIDLE", KEEPALIVE),
        ("TCP_KEEPINTVL", 5),
        ("TCP_KEEPCNT", 3),
        ("TCP_USER_TIMEOUT", TCP_USER_TIMEOUT_MS),
    ):
        if hasattr(socket, name):  # Linux has them all
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    return sock


def _key_type_order(transport: paramiko.Transport, known: list[HostKey]) -> None:
    """Offer the key types recorded for the host first, as OpenSSH does, so a host with
    several keys sends the one we know."""
    options = transport.get_security_options()
    wanted = {key.type for key in known}
    if "ssh-rsa" in wanted:
        wanted |= {"rsa-sha2-512", "rsa-sha2-256"}
    offered = list(options.key_types)
    options.key_types = [t for t in offered if t in wanted] + [
        t for t in offered if t not in wanted
    ]


def _handshake(host: Host, timeout: float) -> paramiko.Transport:
    """TCP connection and SSH key exchange, not yet authenticated or verified."""
    sock = _open_socket(host, timeout)
    transport = paramiko.Transport(sock, default_window_size=WINDOW, default_max_packet_size=PACKET)
    transport.packetizer.REKEY_BYTES = CLIENT_REKEY_BYTES  # see CLIENT_REKEY_BYTES
    transport.banner_timeout = timeout
    transport.auth_timeout = timeout
    known = recorded_keys(
        read_known_hosts(known_hosts_path(host)), lookup_name(host.address, host.port)
    )
    _key_type_order(transport, known)
    try:
        transport.start_client(timeout=timeout)
    except (paramiko.SSHException, OSError, EOFError) as exc:
        transport.close()
        raise SSHError(
            f"host {host.name} ({host.address}:{host.port}): SSH handshake failed ({exc}): "
            "check that an SSH server listens on that port"
        ) from None
    return transport


def fetch_host_key(host: Host, timeout: float = CONNECT_TIMEOUT) -> HostKey:
    """The key `host` presents (for `gfs hosts trust`); nothing is verified or sent."""
    transport = _handshake(host, timeout)
    try:
        return _host_key(transport.get_remote_server_key())
    finally:
        transport.close()


def _identities(host: Host) -> list[tuple[Path, paramiko.PKey]]:
    """The private keys to offer: `identity_file`, or else the running user's default
    ~/.ssh/id_ed25519, id_ecdsa, id_rsa (as ssh would try them; never an agent)."""
    if host.identity_file:
        return [(Path(host.identity_file), _load_key(host, Path(host.identity_file)))]
    found = []
    for name in DEFAULT_IDENTITIES:
        path = Path.home() / ".ssh" / name
        if path.exists():
            with suppress(SSHError):  # an unusable default key is skipped, as ssh does
                found.append((path, _load_key(host, path)))
    if not found:
        raise SSHError(
            f"host {host.name}: no identity_file in [hosts.{host.name}] and no usable "
            f"~/.ssh/id_ed25519, id_ecdsa or id_rsa for {Path.home()}: set identity_file"
        )
    return found


def _load_key(host: Host, path: Path) -> paramiko.PKey:
    try:
        return paramiko.PKey.from_path(path)
    except paramiko.PasswordRequiredException:
        raise SSHError(
            f"host {host.name}: identity file {path} is protected by a passphrase: gfs runs "
            "unattended; use a key without one, readable by root only"
        ) from None
    except OSError as exc:
        raise SSHError(
            f"host {host.name}: cannot read identity file {path}: {exc.strerror or exc}"
        ) from None
    except (paramiko.SSHException, ValueError) as exc:
        raise SSHError(
            f"host {host.name}: identity file {path} is not an ed25519, ECDSA or RSA "
            f"private key paramiko can read ({exc})"
        ) from None


def connect(host: Host, timeout: float = CONNECT_TIMEOUT) -> paramiko.Transport:
    """An authenticated Transport to `host` whose key is in its known_hosts file.

    Raises HostKeyError (unknown, changed or revoked key) or SSHError (DNS, refused,
    timeout, handshake, authentication).
    """
    identities = _identities(host)
    transport = _handshake(host, timeout)
    try:
        verify_host_key(host, _host_key(transport.get_remote_server_key()))
        for path, key in identities:
            try:
                transport.auth_publickey(host.user, key)
                break
            except paramiko.AuthenticationException:
                log.debug("host %s: key %s not accepted", host.name, path)
            except (paramiko.SSHException, OSError, EOFError) as exc:
                raise SSHError(
                    f"host {host.name} ({host.address}:{host.port}): connection lost while "
                    f"authenticating ({exc})"
                ) from None
        else:
            paths = ", ".join(str(path) for path, _ in identities)
            raise SSHError(
                f"host {host.name} ({host.user}@{host.address}:{host.port}): authentication "
                f"failed with {paths}: check that its public key is in "
                f"~{host.user}/.ssh/authorized_keys there (gfs never uses passwords)"
            )
    except BaseException:
        transport.close()
        raise
    transport.set_keepalive(KEEPALIVE)
    return transport


class _Session:
    """One remote command on its own channel: deadline watchdog, stderr drained aside."""

    def __init__(self, runner: SSHRunner, command: Command, channel: paramiko.Channel) -> None:
        self.runner = runner
        self.command = command
        self.channel = channel
        self.expired = False
        self.last_data = time.monotonic()
        self._stderr = bytearray()
        self._drain = threading.Thread(target=self._read_stderr, daemon=True)
        self._drain.start()
        self._watchdog: threading.Timer | None = None
        if command.timeout is not None:
            self._watchdog = threading.Timer(command.timeout, self._expire)
            self._watchdog.daemon = True
            self._watchdog.start()

    def _expire(self) -> None:
        self.expired = True
        self.channel.close()  # wakes every blocked recv, send and status wait

    def _read_stderr(self) -> None:
        while True:
            try:
                data = self.channel.recv_stderr(65536)
            except TimeoutError:  # a stream's idle timeout: see recv
                if self.channel.closed:
                    return
                continue
            if not data:
                return
            self._stderr += data
            self.runner.count(received=len(data))
            del self._stderr[:-STDERR_KEPT]

    def failure(self, message: str) -> CommandError:
        """The error for the channel going away: timed out, or the connection lost."""
        if self.expired:
            return timed_out(self.command, self.runner.where)
        if not self.runner.transport_alive():
            return CommandError(
                self.command,
                f"{self.runner.where}connection lost ({message}); the remote command ends "
                "at its timeout",
            )
        return CommandError(self.command, f"{self.runner.where}{message}")

    def recv(self, size: int) -> bytes:
        while True:
            try:
                data: bytes = self.channel.recv(size)
                break
            except TimeoutError:  # only streams being read have one (STREAM_IDLE)
                self._check_idle()
                if not self.runner.answers(PROBE_TIMEOUT):
                    self.runner.close()
                    raise CommandError(
                        self.command,
                        f"{self.runner.where}connection lost: no data for {STREAM_IDLE:.0f} s "
                        f"and no answer from the host for {PROBE_TIMEOUT:.0f} s more; the "
                        "remote command ends at its timeout",
                    ) from None
        if not data and not self.channel.eof_received:
            raise self.failure("the channel closed before the end of the output")
        self.last_data = time.monotonic()
        self.runner.count(received=len(data))
        return data

    def _check_idle(self) -> None:
        """Raise IdleTimeout when the command's `idle_timeout` passed without data."""
        idle = self.command.idle_timeout
        if idle is not None and time.monotonic() - self.last_data >= idle:
            raise IdleTimeout(
                self.command, f"{self.runner.where}no output for {idle:.0f} s (idle timeout)"
            )

    def send(self, data: memoryview) -> None:
        # Packet by packet: paramiko's sendall re-slices its whole argument per packet,
        # quadratic in the size of one large write.
        try:
            for offset in range(0, data.nbytes, PACKET):
                self.channel.sendall(bytes(data[offset : offset + PACKET]))
                self.runner.count(sent=min(PACKET, data.nbytes - offset))
        except OSError:
            if self.channel.exit_status_ready() and self.channel.exit_status > 0:
                self.runner.check(self.command, *self.finish())  # its status and stderr
            raise self.failure("the command stopped reading its input") from None

    def finish(self) -> tuple[int, str]:
        """Wait for the exit status; returns it with stderr. Raises on timeout/loss."""
        self.channel.status_event.wait()
        self._drain.join(CONNECT_TIMEOUT)
        stderr = self._stderr.decode(errors="replace")
        status = self.channel.exit_status
        if self.expired or (self.command.timeout is not None and status in TIMEOUT_STATUS):
            raise timed_out(self.command, self.runner.where)
        if status == -1:
            raise self.failure("the command ended without an exit status (killed by a signal?)")
        return status, stderr

    def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        self.channel.close()


class _ChannelReader(io.RawIOBase):
    def __init__(self, session: _Session) -> None:
        self.session = session

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        view = memoryview(buffer).cast("B")
        data = self.session.recv(len(view))
        view[: len(data)] = data
        return len(data)


class _ChannelWriter(io.RawIOBase):
    def __init__(self, session: _Session) -> None:
        self.session = session

    def writable(self) -> bool:
        return True

    def write(self, data: ReadableBuffer, /) -> int:
        view = memoryview(data).cast("B")
        self.session.send(view)
        return view.nbytes


class SSHRunner:
    """Runs commands on one configured remote host; safe to share between threads."""

    def __init__(self, host: Host, dry_run: bool = False) -> None:
        self.host = host.name
        self.dry_run = dry_run
        self.config = host
        self.where = f"on host {host.name}: "
        self._lock = threading.Lock()
        self._transport: paramiko.Transport | None = None
        self.received = 0  # bytes of command output (stdout, stderr) received from the host
        self.sent = 0  # bytes of command input sent to it
        self._counting = threading.Lock()  # channels' threads count at once

    def count(self, received: int = 0, sent: int = 0) -> None:
        """Account command data that crossed the connection (logged by `close`)."""
        with self._counting:
            self.received += received
            self.sent += sent

    def _connected(self) -> paramiko.Transport:
        with self._lock:
            if self._transport is None or not self._transport.is_active():
                if self._transport is not None:
                    self._transport.close()
                self._transport = None
                log.debug("connecting to %s", self.host)
                self._transport = connect(self.config)
            return self._transport

    def reachable(self) -> bool:
        """Whether the connection is open or opens now (False: connecting failed)."""
        try:
            self._connected()
        except GfsError as exc:
            log.debug("host %s does not answer: %s", self.host, exc)
            return False
        return True

    def transport_alive(self) -> bool:
        transport = self._transport
        return transport is not None and transport.is_active()

    def answers(self, timeout: float) -> bool:
        """Whether the server answers a global request within `timeout` seconds (paramiko
        waits for the reply without a limit, hence the thread)."""
        transport = self._transport
        if transport is None or not transport.is_active():
            return False
        replied = threading.Event()

        def probe() -> None:
            with suppress(Exception):
                transport.global_request("keepalive@openssh.com", wait=True)
            replied.set()

        threading.Thread(target=probe, daemon=True).start()
        return replied.wait(timeout) and transport.is_active()

    def close(self) -> None:
        """Close the connection (the next command opens a new one); logs the traffic."""
        with self._lock:
            if self._transport is not None:
                log.info(
                    "host %s: %d bytes of command output received, %d bytes of input sent over SSH",
                    self.host,
                    self.received,
                    self.sent,
                )
                self._transport.close()
                self._transport = None

    @contextmanager
    def _session(self, command: Command) -> Iterator[_Session]:
        line = remote_command_line(command)
        transport = self._connected()
        log.debug("running on %s: %s", self.host, line)
        try:
            channel = transport.open_session(timeout=CONNECT_TIMEOUT)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise CommandError(command, f"{self.where}cannot open a channel ({exc})") from None
        session = _Session(self, command, channel)
        try:
            try:
                channel.exec_command(line)
            except (paramiko.SSHException, OSError, EOFError) as exc:
                raise session.failure(f"cannot start the command ({exc})") from None
            yield session
        finally:
            session.close()

    def open_channel(self, command: Command) -> paramiko.Channel:
        """A channel running `command` on the host, its stdin and stdout for the caller to
        relay (a libvirt tunnel: transport/virttunnel.py); closing it ends the command."""
        transport = self._connected()
        log.debug("opening a channel on %s: %s", self.host, remote_command_line(command))
        try:
            channel = transport.open_session(timeout=CONNECT_TIMEOUT)
            channel.exec_command(remote_command_line(command))
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise CommandError(command, f"{self.where}cannot open a channel ({exc})") from None
        return channel

    def run(self, command: Command, check: bool = True) -> Completed:
        """Run to completion and capture output; raise CommandError if it fails and `check`."""
        if skipped_in_dry_run(self.dry_run, command):
            return Completed(command, 0, "", "")
        with self._session(command) as session:
            session.channel.shutdown_write()  # no input, like stdin=DEVNULL
            chunks = []
            while data := session.recv(1 << 20):
                chunks.append(data)
            status, stderr = session.finish()
        if check:
            self.check(command, status, stderr)
        return Completed(command, status, b"".join(chunks).decode(errors="replace"), stderr)

    def check(self, command: Command, status: int, stderr: str) -> None:
        """Raise CommandError unless `status` is 0 (127: the program is not installed)."""
        if status == 127:
            raise CommandError(
                command, f"{self.where}not installed (command not found): {stderr.strip()}"
            )
        check_exit_status(command, status, stderr, self.where)

    @contextmanager
    def reading(self, command: Command) -> Iterator[IO[bytes]]:
        """Run `command` remotely and yield its stdout as a binary stream."""
        refuse_streaming_in_dry_run(self.dry_run, command)
        with self._session(command) as session:
            session.channel.shutdown_write()
            session.channel.settimeout(min(STREAM_IDLE, command.idle_timeout or STREAM_IDLE))
            with io.BufferedReader(_ChannelReader(session), 1 << 20) as stream:
                yield stream
                if not stream.closed and stream.read(
                    1
                ):  # like a closed pipe: the command must not go on
                    raise CommandError(command, f"{self.where}output not read to the end")
            self.check(command, *session.finish())

    @contextmanager
    def writing(self, command: Command) -> Iterator[IO[bytes]]:
        """Run `command` remotely and yield its stdin as a binary stream."""
        refuse_streaming_in_dry_run(self.dry_run, command)
        with self._session(command) as session:
            with io.BufferedWriter(_ChannelWriter(session), 1 << 20) as stream:
                yield stream
            session.channel.shutdown_write()
            self.check(command, *session.finish())


_runners: dict[tuple[Host, bool], SSHRunner] = {}
_runners_lock = threading.Lock()


def runner_for(host_name: str, config: Config, dry_run: bool = False) -> Runner:
    """The runner for a job's host: LocalRunner for "local", else the SSHRunner of that
    host, shared by every job of this process (one connection per host). `close_runners`
    closes the connections at the end of a run."""
    if host_name == LOCAL_HOST:
        return LocalRunner(dry_run)
    host = config.hosts[host_name]
    with _runners_lock:
        runner = _runners.get((host, dry_run))
        if runner is None:
            runner = _runners[(host, dry_run)] = SSHRunner(host, dry_run)
        return runner


def close_runners() -> None:
    """Close every SSH connection `runner_for` opened (and the libvirt tunnels on them)."""
    close_tunnels()
    with _runners_lock:
        runners = list(_runners.values())
        _runners.clear()
    for runner in runners:
        runner.close()

"""Checks of a booted drill VM beyond its boot, each reported on its own: commands run in
the guest by its agent (`guest-exec`), and guest TCP ports reached through the drill's
restricted user-mode network.

The network (drillvm `_nic`): QEMU's user-mode stack with `restrict=on` (the guest reaches
nothing, not even the host) and one forward on 127.0.0.1 per probed port to 10.0.2.15,
the address its DHCP gives the guest's first NIC. A port probe connects to the forward and
asks QEMU (QMP `info usernet`) what became of the connection inside: ESTABLISHED is an open
port; the connection closed is a refused one; still SYN_SENT when time is up means the
guest never answered: it has no address on the drill network (a static configuration
ignores its DHCP), or drops the packets.
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gfs_backup.tools.guest_agent import AgentClient, AgentError, guest_exec_allowed

OUTPUT_TAIL = 2048  # bytes of a command's output kept for the report
PORT_SECONDS = 15.0
ROW_GRACE = 2.0  # seconds QEMU may take to list a new forwarded connection
AGENT_WAIT_SECONDS = 60.0  # for qemu-ga to start after the boot check passed


@dataclass(frozen=True)
class Probe:
    name: str
    passed: bool
    seconds: float
    detail: str
    output: str = ""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (QEMU binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def command_name(argv: tuple[str, ...]) -> str:
    return f"command: {shlex.join(argv)}"


def run_commands(
    agent: AgentClient, commands: tuple[tuple[str, ...], ...], timeout: float
) -> list[Probe]:
    """Each command through guest-exec, to its end or `timeout` seconds."""
    started = time.monotonic()
    why = ""
    while True:
        try:
            why = guest_exec_allowed(agent.call("guest-info", None, 5.0))
            break
        except AgentError as exc:
            if time.monotonic() - started > AGENT_WAIT_SECONDS:
                why = f"the guest agent did not answer: {exc}"
                break
            time.sleep(1.0)
    if why:
        return [Probe(command_name(argv), False, 0.0, why) for argv in commands]
    return [_exec(agent, argv, timeout) for argv in commands]


def _exec(agent: AgentClient, argv: tuple[str, ...], timeout: float) -> Probe:
    started = time.monotonic()
    name = command_name(argv)
    try:
        found = agent.call(
            "guest-exec", {"path": argv[0], "arg": list(argv[1:]), "capture-output": True}, 10.0
        )
        pid = int(found["pid"])
        while True:
            status: dict[str, Any] = agent.call("guest-exec-status", {"pid": pid}, 10.0)
            if status.get("exited"):
                break
            if time.monotonic() - started > timeout:
                return Probe(
                    name, False, time.monotonic() - started, f"still running after {timeout:g} s"
                )
            time.sleep(0.2)
    except (AgentError, KeyError, TypeError, ValueError) as exc:
        return Probe(name, False, time.monotonic() - started, f"guest-exec failed: {exc}")
    output = _text(status.get("out-data")) + _text(status.get("err-data"))
    tail = output.encode()[-OUTPUT_TAIL:].decode(errors="ignore")
    seconds = time.monotonic() - started
    if "exitcode" in status:
        code = int(status["exitcode"])
        last = next((line for line in reversed(tail.splitlines()) if line.strip()), "")
        detail = f"exit status {code}" + (f": {last.strip()}" if last else "")
        return Probe(name, code == 0, seconds, detail, tail)
    signal = status.get("signal")
    return Probe(name, False, seconds, f"killed by signal {signal}", tail)


def _text(data: object) -> str:
    if not isinstance(data, str):
        return ""
    try:
        return base64.b64decode(data).decode(errors="replace")
    except ValueError:
        return ""


class Monitor:
    """A minimal QMP client: `hmp(command)` returns the human monitor's text."""

    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        # A deep scratch directory makes a path longer than sun_path's 108 bytes: connect
        # through a descriptor of its directory.
        folder = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self.sock.connect(f"/proc/self/fd/{folder}/{path.name}")
        except OSError:
            self.sock.close()
            raise
        finally:
            os.close(folder)
        self.file = self.sock.makefile("rwb")
        self._reply()  # the greeting
        self._execute("qmp_capabilities")

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def hmp(self, command: str) -> str:
        return str(self._execute("human-monitor-command", {"command-line": command}))

    def _execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        message: dict[str, Any] = {"execute": command}
        if arguments is not None:
            message["arguments"] = arguments
        self.file.write(json.dumps(message).encode() + b"\n")
        self.file.flush()
        while True:
            reply = self._reply()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise OSError(f"QMP {command}: {reply['error']}")

    def _reply(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise OSError("QMP socket closed")
        reply: dict[str, Any] = json.loads(line)
        return reply


def connection_state(usernet: str, guest_port: int) -> str | None:
    """The state of the forwarded connection to `guest_port` in `info usernet` (e.g.
    SYN_SENT, ESTABLISHED), None when there is none."""
    for line in usernet.splitlines():
        fields = line.split()
        if len(fields) < 6 or not fields[0].startswith("TCP["):
            continue
        state = fields[0][4:-1]
        if state != "HOST_FORWARD" and fields[5] == str(guest_port):
            return state
    return None


def probe_ports(
    forwards: tuple[tuple[int, int], ...], monitor_path: Path, timeout: float = PORT_SECONDS
) -> list[Probe]:
    """Each (guest port, host port): open, refused, or no answer (see the module doc)."""
    results = []
    try:
        monitor = Monitor(monitor_path)
    except OSError as exc:
        return [
            Probe(f"port {guest}", False, 0.0, f"QEMU's monitor does not answer: {exc}")
            for guest, _host in forwards
        ]
    try:
        for guest, host in forwards:
            results.append(_probe(monitor, guest, host, timeout))
    finally:
        monitor.close()
    return results


def _probe(monitor: Monitor, guest: int, host: int, timeout: float) -> Probe:
    name = f"port {guest}"
    started = time.monotonic()
    try:
        connection = socket.create_connection(("127.0.0.1", host), timeout=5.0)
    except OSError as exc:
        return Probe(name, False, time.monotonic() - started, f"the drill's forward: {exc}")
    state: str | None = None
    with connection:
        connection.setblocking(False)
        while time.monotonic() - started < timeout:
            try:
                if connection.recv(1, socket.MSG_PEEK) == b"":
                    state = "closed"
            except BlockingIOError:
                pass
            except OSError:
                state = "closed"
            if state == "closed":
                break
            try:
                state = connection_state(monitor.hmp("info usernet"), guest)
            except OSError as exc:
                return Probe(name, False, time.monotonic() - started, f"QEMU: {exc}")
            if state == "ESTABLISHED":
                break
            if state is None and time.monotonic() - started > ROW_GRACE:
                state = "closed"  # QEMU dropped it: the guest reset the connection
                break
            time.sleep(0.2)
    seconds = time.monotonic() - started
    if state == "ESTABLISHED":
        return Probe(name, True, seconds, f"guest port {guest} accepted a connection")
    if state == "closed":
        return Probe(name, False, seconds, f"guest port {guest} refused the connection (closed)")
    return Probe(
        name,
        False,
        seconds,
        f"guest port {guest}: no answer within {timeout:g} s ({state}): the guest has no "
        "address on the drill network (a static configuration ignores its DHCP) or drops "
        "the connection",
    )

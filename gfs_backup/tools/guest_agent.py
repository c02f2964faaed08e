"""A minimal qemu-guest-agent client over the drill QEMU's unix socket (no libvirt).

The protocol (QEMU guest agent docs): one JSON object per line. A client first sends
`guest-sync` with a fresh id and discards every reply until `{"return": id}` comes back
(stale replies of an earlier client may still be queued); then `guest-ping` answers
`{"return": {}}`. Until qemu-ga runs in the guest, nothing answers: each attempt is bounded.
"""

from __future__ import annotations

import json
import os
import random
import socket
import time
from pathlib import Path
from typing import Any

MAX_LINE = 1 << 16
MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes with its NUL


def agent_request(command: str, arguments: dict[str, Any] | None = None) -> bytes:
    """One request line, e.g. `{"execute": "guest-ping"}\\n`."""
    message: dict[str, Any] = {"execute": command}
    if arguments is not None:
        message["arguments"] = arguments
    return json.dumps(message).encode() + b"\n"


def split_replies(buffer: bytes) -> tuple[list[Any], bytes]:
    """Complete reply lines of `buffer` as JSON values (garbage lines skipped), and the rest."""
    *lines, rest = buffer.split(b"\n")
    replies = []
    for line in lines:
        text = line.strip(b"\xff \r\t")
        if not text:
            continue
        try:
            replies.append(json.loads(text))
        except ValueError:
            continue  # a partial line from before the sync, or a delimiter byte
    return replies, rest[-MAX_LINE:]


class AgentClient:
    """Pings the guest agent behind `path`; `attempt` tries once within a time budget."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock: socket.socket | None = None
        self.buffer = b""
        self.last_error = "the guest agent socket was never opened"
        self.dir_fd: int | None = None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.dir_fd is not None:
            os.close(self.dir_fd)
            self.dir_fd = None

    def _address(self) -> str:
        """The socket's path, or for a long one (a deep scratch directory) a short path
        through an open descriptor of its directory: sun_path holds only 108 bytes."""
        if len(os.fsencode(self.path)) <= MAX_SOCKET_PATH:
            return str(self.path)
        if self.dir_fd is None:
            self.dir_fd = os.open(self.path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        return f"/proc/self/fd/{self.dir_fd}/{self.path.name}"

    def attempt(self, budget: float) -> bool:
        """True when guest-sync and guest-ping both answered within `budget` seconds."""
        deadline = time.monotonic() + budget
        try:
            if self.sock is None:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(budget)
                self.sock.connect(self._address())
                self.buffer = b""
            sync_id = random.randrange(1, 1 << 31)
            self._send(agent_request("guest-sync", {"id": sync_id}))
            if not self._wait_for(lambda reply: reply.get("return") == sync_id, deadline):
                self.last_error = "the guest agent did not answer guest-sync"
                return False
            self._send(agent_request("guest-ping"))
            if not self._wait_for(lambda reply: "return" in reply or "error" in reply, deadline):
                self.last_error = "the guest agent did not answer guest-ping"
                return False
        except OSError as exc:
            self.last_error = f"guest agent socket {self.path}: {exc.strerror or exc}"
            if self.sock is not None:
                self.sock.close()
                self.sock = None
            return False
        return True

    def _send(self, data: bytes) -> None:
        assert self.sock is not None
        self.sock.sendall(data)

    def _wait_for(self, wanted: Any, deadline: float) -> bool:
        assert self.sock is not None
        while True:
            replies, self.buffer = split_replies(self.buffer)
            for reply in replies:
                if isinstance(reply, dict) and "error" in reply and "return" not in reply:
                    self.last_error = f"the guest agent answered an error: {reply['error']}"
                if isinstance(reply, dict) and wanted(reply):
                    return "error" not in reply
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                return False
            if not data:
                raise ConnectionResetError("the guest agent socket closed")
            self.buffer += data

    def call(self, command: str, arguments: dict[str, Any] | None, budget: float) -> Any:
        """The `return` value of one command (after a fresh guest-sync), within `budget`
        seconds. AgentError with the agent's error or the reason it did not answer."""
        if not self.attempt(budget):
            raise AgentError(self.last_error)
        deadline = time.monotonic() + budget
        replies: list[Any] = []
        try:
            self._send(agent_request(command, arguments))

            def answered(reply: Any) -> bool:
                replies.append(reply)
                return "return" in reply or "error" in reply

            self._wait_for(answered, deadline)
        except OSError as exc:
            raise AgentError(f"{command}: {exc.strerror or exc}") from None
        final = next((r for r in reversed(replies) if "return" in r or "error" in r), None)
        if final is None:
            raise AgentError(f"the guest agent did not answer {command} in {budget:g} s")
        if "error" in final:
            error = final["error"]
            detail = error.get("desc", error) if isinstance(error, dict) else error
            raise AgentError(f"{command}: {detail}")
        return final["return"]


class AgentError(Exception):
    """The guest agent refused or did not answer a command."""


def guest_exec_allowed(info: Any) -> str:
    """ "" when guest-info says guest-exec is enabled, else why not."""
    commands = info.get("supported_commands", []) if isinstance(info, dict) else []
    enabled = {c.get("name"): c.get("enabled", True) for c in commands if isinstance(c, dict)}
    for name in ("guest-exec", "guest-exec-status"):
        if name not in enabled:
            return f"this guest's agent has no {name}"
        if not enabled[name]:
            return (
                f"{name} is disabled in this guest's agent (RHEL's default: allow it with "
                "qemu-ga --allow-rpcs, or remove it from BLOCK_RPCS in /etc/sysconfig/qemu-ga)"
            )
    return ""

"""Log records to the systemd journal with fields, so `journalctl GFS_JOB=db01` finds a job.

Speaks journald's native protocol (one datagram per record to its unix socket) with the
standard library only:

    KEY=value\\n                                 a value without a newline
    KEY\\n<64-bit little-endian length>value\\n    any value (binary form)

Fields: MESSAGE, PRIORITY, SYSLOG_IDENTIFIER, LOGGER, CODE_FILE, CODE_LINE, CODE_FUNC and
GFS_JOB (from `extra={"gfs_job": name}`, or a message starting `job NAME: `).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import socket
import stat
import struct

DEFAULT_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "gfs"
SEND_BUFFER = 8 << 20  # asked for: a datagram must fit the socket's send buffer
SEND_TIMEOUT = 2.0  # seconds a stuck journald may hold up one log line
MIN_MESSAGE = 512  # bytes of message below which truncating stops
JOB_RE = re.compile(r"job ([A-Za-z0-9][A-Za-z0-9._-]{0,63}): ")
TRUNCATED = "\n[message truncated by gfs: {size} bytes in all]"


def journal_available(path: str = DEFAULT_SOCKET) -> bool:
    """True when `path` exists and is a unix socket (journald runs)."""
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level: 2 crit, 3 err, 4 warning, 6 info, 7 debug."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def encode_field(name: str, value: str | bytes) -> bytes:
    """One field in the native protocol: text form, or binary form for a value with a
    newline."""
    data = value.encode("utf-8", errors="replace") if isinstance(value, str) else value
    key = name.encode("ascii")
    if b"\n" in data:
        return key + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return key + b"=" + data + b"\n"


def job_of(record: logging.LogRecord) -> str | None:
    """The job a record is about: its `gfs_job` attribute, else a leading `job NAME: `."""
    job = getattr(record, "gfs_job", None)
    if job:
        return str(job)
    match = JOB_RE.match(record.getMessage())
    return match.group(1) if match else None


class JournalHandler(logging.Handler):
    """Sends each record to journald as one native-protocol datagram.

    The socket is not connected, so a restarted journald is found again. A message too large
    for one datagram is truncated (with a note saying so) rather than lost. Like every
    handler, emit never raises: failures go to `handleError`."""

    def __init__(
        self,
        path: str = DEFAULT_SOCKET,
        identifier: str = IDENTIFIER,
        level: int = logging.NOTSET,
        send_buffer: int = SEND_BUFFER,
    ) -> None:
        super().__init__(level)
        self.path = path
        self.identifier = identifier
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.settimeout(SEND_TIMEOUT)
        # The kernel caps it at net.core.wmem_max rather than refusing.
        with contextlib.suppress(OSError):
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            fields = self.fields(record)
            self._send(message, fields)
        except Exception:
            self.handleError(record)

    def fields(self, record: logging.LogRecord) -> bytes:
        """Every field but MESSAGE, encoded."""
        parts = [
            encode_field("PRIORITY", str(syslog_priority(record.levelno))),
            encode_field("SYSLOG_IDENTIFIER", self.identifier),
            encode_field("LOGGER", record.name),
            encode_field("CODE_FILE", record.pathname),
            encode_field("CODE_LINE", str(record.lineno)),
            encode_field("CODE_FUNC", record.funcName or ""),
        ]
        job = job_of(record)
        if job is not None:
            parts.append(encode_field("GFS_JOB", job))
        return b"".join(parts)

    def _send(self, message: str, fields: bytes) -> None:
        data = message.encode("utf-8", errors="replace")
        try:
            self._socket.sendto(encode_field("MESSAGE", data) + fields, self.path)
            return
        except OSError as exc:
            if exc.errno != errno.EMSGSIZE:
                raise
        # Too large for one datagram: keep the start of the message, as much as fits.
        note = TRUNCATED.format(size=len(data)).encode()
        room = self._socket.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        room -= len(fields) + len(note) + 1024
        while True:
            room = min(room, len(data) - 1)
            if room < MIN_MESSAGE:
                raise OSError(errno.EMSGSIZE, f"journal message of {len(data)} bytes too large")
            cut = data[:room].decode("utf-8", errors="ignore").encode("utf-8") + note
            try:
                self._socket.sendto(encode_field("MESSAGE", cut) + fields, self.path)
                return
            except OSError as exc:
                if exc.errno != errno.EMSGSIZE:
                    raise
            room //= 2

    def close(self) -> None:
        try:
            self._socket.close()
        finally:
            super().close()

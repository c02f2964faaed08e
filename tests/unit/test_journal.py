"""The journald handler against a real unix datagram socket standing in for journald."""

from __future__ import annotations

import inspect
import logging
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from gfs_backup.ops.journal import (
    JournalHandler,
    encode_field,
    journal_available,
    syslog_priority,
)

pytestmark = pytest.mark.unit


def parse_datagram(data: bytes) -> dict[str, bytes]:
    """journald's native protocol: `KEY=value\\n`, or `KEY\\n<u64 le length>value\\n`."""
    fields: dict[str, bytes] = {}
    position = 0
    while position < len(data):
        newline = data.index(b"\n", position)
        line = data[position:newline]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            position = newline + 1
        else:
            key = line
            (size,) = struct.unpack_from("<Q", data, newline + 1)
            start = newline + 1 + 8
            value = data[start : start + size]
            assert data[start + size : start + size + 1] == b"\n"
            position = start + size + 1
        assert key.decode() not in fields, key
        fields[key.decode()] = value
    return fields


class Journal:
    """A bound datagram socket in tmp_path, read one record at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(str(path))
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.socket.settimeout(2)

    def read(self) -> dict[str, str]:
        data = self.socket.recv(16 << 20)
        return {key: value.decode() for key, value in parse_datagram(data).items()}


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    receiver = Journal(tmp_path / "journal.socket")
    try:
        yield receiver
    finally:
        receiver.socket.close()


@pytest.fixture
def logger(journal: Journal) -> Iterator[logging.Logger]:
    handler = JournalHandler(path=str(journal.path))
    logger = logging.getLogger("gfs.test.journal")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield logger
    finally:
        logger.removeHandler(handler)
        handler.close()


def test_fields_of_a_record(journal: Journal, logger: logging.Logger) -> None:
    logger.warning("job db01: exporting to %s", "/mnt/backup/db01")
    frame = inspect.currentframe()
    assert frame is not None
    line = frame.f_lineno - 3
    fields = journal.read()
    assert fields == {
        "MESSAGE": "job db01: exporting to /mnt/backup/db01",
        "PRIORITY": "4",
        "SYSLOG_IDENTIFIER": "gfs",
        "LOGGER": "gfs.test.journal",
        "CODE_FILE": __file__,
        "CODE_LINE": str(line),
        "CODE_FUNC": "test_fields_of_a_record",
        "GFS_JOB": "db01",
    }


@pytest.mark.parametrize(
    ("level", "priority"),
    [
        (logging.DEBUG, 7),
        (logging.INFO, 6),
        (logging.WARNING, 4),
        (logging.ERROR, 3),
        (logging.CRITICAL, 2),
    ],
)
def test_priorities(journal: Journal, logger: logging.Logger, level: int, priority: int) -> None:
    logger.log(level, "a line")
    assert journal.read()["PRIORITY"] == str(priority)
    assert syslog_priority(level) == priority


def test_job_field(journal: Journal, logger: logging.Logger) -> None:
    logger.info("job web-2.example: snapshot created")
    assert journal.read()["GFS_JOB"] == "web-2.example"
    logger.info("snapshot created", extra={"gfs_job": "db01"})
    assert journal.read()["GFS_JOB"] == "db01"
    logger.info("job db01: x", extra={"gfs_job": "mail"})
    assert journal.read()["GFS_JOB"] == "mail"
    logger.info("run finished: 3 jobs")
    assert "GFS_JOB" not in journal.read()
    logger.info("the job db01: not at the start")
    assert "GFS_JOB" not in journal.read()


def test_multi_line_messages_use_the_binary_form(journal: Journal, logger: logging.Logger) -> None:
    logger.error("job db01: hook failed:\nline one\nline = two\n")
    fields = journal.read()
    assert fields["MESSAGE"] == "job db01: hook failed:\nline one\nline = two\n"
    assert fields["GFS_JOB"] == "db01"
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("job db01: crashed")
    message = journal.read()["MESSAGE"]
    assert message.startswith("job db01: crashed\nTraceback (most recent call last):\n")
    assert message.endswith("RuntimeError: boom")


def test_encode_field_forms() -> None:
    assert encode_field("MESSAGE", "a=b") == b"MESSAGE=a=b\n"
    assert encode_field("MESSAGE", "a\nb") == b"MESSAGE\n\x03\x00\x00\x00\x00\x00\x00\x00a\nb\n"
    assert encode_field("MESSAGE", "é") == "MESSAGE=é\n".encode()


def test_a_message_of_one_megabyte(journal: Journal, logger: logging.Logger) -> None:
    text = "job db01: " + "x" * (1 << 20)
    logger.info("%s", text)
    fields = journal.read()
    assert fields["GFS_JOB"] == "db01"
    message = fields["MESSAGE"]
    # All of it when the kernel allows datagrams that large, else its start and a note.
    if message != text:
        start, note = message.split("\n")
        assert text.startswith(start)
        assert note == f"[message truncated by gfs: {len(text)} bytes in all]"


def test_too_large_for_a_datagram_is_truncated(journal: Journal) -> None:
    handler = JournalHandler(path=str(journal.path), send_buffer=64 << 10)
    record = logging.LogRecord("gfs", logging.ERROR, __file__, 1, "%s", ("é" * (1 << 19),), None)
    try:
        handler.handle(record)
    finally:
        handler.close()
    fields = journal.read()
    start, note = fields["MESSAGE"].split("\n")
    assert 512 < len(start.encode()) < 128 << 10
    assert set(start) == {"é"}
    assert note == f"[message truncated by gfs: {1 << 20} bytes in all]"
    assert fields["PRIORITY"] == "3"


def test_emit_never_raises(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    handler = JournalHandler(path=str(tmp_path / "absent.socket"))
    logger = logging.getLogger("gfs.test.journal.absent")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        logger.warning("nobody listens")
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert "--- Logging error ---" in capsys.readouterr().err


def test_journal_available(tmp_path: Path, journal: Journal) -> None:
    assert journal_available(str(journal.path))
    assert not journal_available(str(tmp_path / "absent.socket"))
    regular = tmp_path / "file"
    regular.write_text("")
    assert not journal_available(str(regular))

"""Dead-man pings against real HTTP servers on 127.0.0.1: paths, bodies, retries, deadlines."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gfs_backup.core.validate import Collector
from gfs_backup.ops.pings import BODY_LIMIT, LogTail, Pinger, check_ping_url

pytestmark = pytest.mark.unit
log = logging.getLogger("gfs.test.pings")


@dataclass
class Seen:
    method: str
    path: str
    body: bytes
    content_type: str | None


@dataclass
class Monitor:
    """A Healthchecks stand-in: records requests, answers with `statuses` then 200."""

    url: str
    requests: list[Seen] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def monitor() -> Iterator[Monitor]:
    state = Monitor("")

    class Handler(BaseHTTPRequestHandler):
        def answer(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            body = self.rfile.read(length) if length else b""
            seen = Seen(self.command, self.path, body, self.headers.get("Content-Type"))
            state.requests.append(seen)
            status = state.statuses.pop(0) if state.statuses else 200
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"OK")

        do_GET = answer
        do_POST = answer

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/abc-123"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def timed(call: Callable[[], bool]) -> tuple[bool, float]:
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def test_start_success_and_fail(monitor: Monitor, caplog: pytest.LogCaptureFixture) -> None:
    pinger = Pinger(monitor.url + "/", log)
    assert pinger.start()
    assert pinger.success()
    assert pinger.success("job db01: ok\n")
    assert pinger.fail("job db01: exporting to /mnt\njob db01: disk full\n")
    assert [(seen.method, seen.path) for seen in monitor.requests] == [
        ("GET", "/abc-123/start"),
        ("GET", "/abc-123"),
        ("POST", "/abc-123"),
        ("POST", "/abc-123/fail"),
    ]
    assert monitor.requests[0].body == b""
    assert monitor.requests[2].body == b"job db01: ok\n"
    assert monitor.requests[3].body == b"job db01: exporting to /mnt\njob db01: disk full\n"
    assert monitor.requests[3].content_type == "text/plain; charset=utf-8"
    assert warnings_of(caplog) == []


def test_a_query_string_stays_at_the_end(monitor: Monitor) -> None:
    assert Pinger(monitor.url + "?rid=42", log).fail()
    assert monitor.requests[0].path == "/abc-123/fail?rid=42"


def test_the_body_is_capped_to_its_end(monitor: Monitor) -> None:
    lines = "".join(f"line {number:06d} of the run log\n" for number in range(5000))
    assert Pinger(monitor.url, log).fail(lines)
    body = monitor.requests[0].body
    assert len(body) <= BODY_LIMIT
    assert body.endswith(b"line 004999 of the run log\n")
    assert body.startswith(b"line ")


def test_retries_after_server_errors(monitor: Monitor, caplog: pytest.LogCaptureFixture) -> None:
    monitor.statuses = [500, 503]
    pinger = Pinger(monitor.url, log, timeout=1, retries=2, deadline=5, pause=0.05)
    assert pinger.fail("boom\n")
    assert [seen.path for seen in monitor.requests] == ["/abc-123/fail"] * 3
    assert all(seen.body == b"boom\n" for seen in monitor.requests)
    assert warnings_of(caplog) == []


def test_gives_up_after_the_retries(monitor: Monitor, caplog: pytest.LogCaptureFixture) -> None:
    monitor.statuses = [500, 500, 500, 500]
    assert not Pinger(monitor.url, log, retries=1, pause=0.05).success()
    assert len(monitor.requests) == 2
    assert warnings_of(caplog) == [
        f"ping {monitor.url} failed: HTTP 500 Internal Server Error (after 2 tries)"
    ]


def test_no_retry_on_a_client_error(monitor: Monitor, caplog: pytest.LogCaptureFixture) -> None:
    monitor.statuses = [404]
    assert not Pinger(monitor.url, log, pause=0.05).start()
    assert len(monitor.requests) == 1
    assert warnings_of(caplog) == [f"ping {monitor.url}/start failed: HTTP 404 Not Found"]


def test_a_server_that_never_answers(caplog: pytest.LogCaptureFixture) -> None:
    # The kernel completes the connections (backlog); nobody ever reads or answers.
    with socket.create_server(("127.0.0.1", 0), backlog=8) as silent:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/abc"
        pinger = Pinger(url, log, timeout=0.3, retries=5, deadline=0.8, pause=0.05)
        ok, seconds = timed(lambda: pinger.fail("x"))
    assert not ok
    assert seconds < 2, seconds
    (warning,) = warnings_of(caplog)
    assert warning.startswith(f"ping {url}/fail failed: ")
    assert "timed out" in warning or "no answer within 0.8 s" in warning


def test_a_trickling_server_is_cut_at_the_deadline(caplog: pytest.LogCaptureFixture) -> None:
    stop = threading.Event()

    def trickle(server: socket.socket) -> None:
        connection, _ = server.accept()
        with connection:
            connection.sendall(b"HTTP/1.1 200 OK\r\n")
            while not stop.wait(0.1):
                connection.sendall(b"X-Slow: y\r\n")

    with socket.create_server(("127.0.0.1", 0)) as server:
        thread = threading.Thread(target=trickle, args=(server,), daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{server.getsockname()[1]}/abc"
        ok, seconds = timed(Pinger(url, log, timeout=0.5, deadline=0.7).start)
        stop.set()
        thread.join()
    assert not ok
    assert seconds < 1.5, seconds
    assert warnings_of(caplog) == [f"ping {url}/start failed: no answer within 0.7 s"]


def test_connection_refused_is_a_fast_warning(caplog: pytest.LogCaptureFixture) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
    url = f"http://127.0.0.1:{port}/abc"
    ok, seconds = timed(Pinger(url, log, retries=2, pause=0.05).success)
    assert not ok
    assert seconds < 1, seconds
    assert warnings_of(caplog) == [f"ping {url} failed: Connection refused (after 3 tries)"]


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("https://hc-ping.com/0b8e1f9a", None),
        ("http://kuma.lan:3001/api/push/abc?status=up", None),
        (42, "expected a URL string"),
        ("hc-ping.com/abc", "is not an http:// or https:// URL"),
        ("ftp://hc-ping.com/abc", "is not an http:// or https:// URL"),
        ("https:///abc", "has no host name"),
        ("https://hc-ping.com:99999/abc", "is not a valid URL"),
        ("https://hc-ping.com/a b", "must not contain spaces"),
    ],
)
def test_check_ping_url(value: object, problem: str | None) -> None:
    collector = Collector("gfs.toml")
    result = check_ping_url(value, "notify.ping_url", collector)
    if problem is None:
        assert result == value
        assert collector.problems == []
    else:
        assert result is None
        (found,) = collector.problems
        assert found.where == "gfs.toml: notify.ping_url"
        assert problem in found.message


def test_log_tail_keeps_the_last_lines() -> None:
    tail = LogTail(lines=3)
    tail.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("gfs.test.pings.tail")
    logger.propagate = False
    logger.addHandler(tail)
    try:
        assert tail.text() == ""
        for number in range(5):
            logger.warning("job db01: line %d", number)
        assert tail.lines() == [f"WARNING job db01: line {n}" for n in (2, 3, 4)]
        logger.error("two\nlines")
        assert tail.text() == "WARNING job db01: line 4\nERROR two\nlines\n"
        tail.clear()
        assert tail.lines() == []
    finally:
        logger.removeHandler(tail)


def test_log_tail_from_many_threads() -> None:
    tail = LogTail(lines=50)
    logger = logging.getLogger("gfs.test.pings.threads")
    logger.propagate = False
    logger.addHandler(tail)

    def write(name: str) -> None:
        for number in range(200):
            logger.warning("%s %d", name, number)

    try:
        threads = [threading.Thread(target=write, args=(f"t{n}",)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        lines = tail.lines()
        assert len(lines) == 50
        assert {line.split()[1] for line in lines} >= {"199"}
    finally:
        logger.removeHandler(tail)


def test_a_domains_job_pings_once_and_fails_when_one_domain_failed(monitor: Monitor) -> None:
    from typing import Any, cast

    from gfs_backup.actions.members import Selection, member
    from gfs_backup.actions.run import JobOutcome, _run_members
    from gfs_backup.core.config import Job

    job = Job("vms", "libvirt", "local", "nas", cast(Any, None), {"domains": ["*"]})
    web = member(job, "web", "6f1c0ae2-3c8e-4c64-9d1f-2b8f3f0d5a11", "web--x")
    db = member(job, "db", "0b4e28ba-2fa1-41d2-883f-0016d3cca427", "db--y")

    def one(job: Job) -> JobOutcome:
        status = "failed" if job.options["domain"] == "db" else "ok"
        return JobOutcome(job.title, status, message="disk unreadable" if status != "ok" else "")

    outcomes = _run_members(job, Selection(members=[web, db]), one, monitor.url)
    assert [o.status for o in outcomes] == ["ok", "failed"]
    assert [seen.path for seen in monitor.requests] == ["/abc-123/start", "/abc-123/fail"]
    assert b"vms/db: failed disk unreadable" in monitor.requests[-1].body

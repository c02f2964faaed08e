"""Run notifications: config parsing, the message, and delivery to real receivers.

The receivers run in this process on 127.0.0.1 (ephemeral ports): a small SMTP server
(STARTTLS or implicit TLS with a self-signed certificate made by `openssl`, AUTH PLAIN and
LOGIN), an HTTP server, a socket that never answers, and sendmail stand-in scripts.
"""

from __future__ import annotations

import base64
import json
import logging
import shutil
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from email import message_from_bytes, policy
from email.message import EmailMessage
from email.message import Message as MailHeaders
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gfs_backup.core.validate import Collector
from gfs_backup.ops import notify as notify_module
from gfs_backup.ops.notify import (
    EmailSettings,
    NotifySettings,
    WebhookSettings,
    build_message,
    notify,
    parse_notify,
    report_as_dict,
    webhook_payload,
)
from gfs_backup.ops.report import JobReport, RunReport

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 only
    import tomli as tomllib

pytestmark = pytest.mark.unit

LOG = logging.getLogger("gfs.test.notify")
STARTED = datetime(2026, 12, 6, 2, 0, tzinfo=timezone.utc)
GiB = 1 << 30
FAILED_DB = JobReport("db01", "lvm", "failed", message="lvcreate: Insufficient free space")
OK_WEB = JobReport("web", "libvirt", "ok", "20261206T020000Z", int(1.2 * GiB), 42.0)
WARNED = JobReport(
    "files", "files", "ok", "20261206T020100Z", 2048, 3.0, warnings=("2 files changed",)
)
NOT_DUE = JobReport("archive", "btrfs", "not-due")
ADDRESS = "ops@example.net"
PASSWORD = "s3cret pass"


def run_report(*jobs: JobReport, exit_code: int = 0) -> RunReport:
    return RunReport("kvm1", STARTED, STARTED + timedelta(seconds=83), exit_code, jobs)


FAILURE_RUN = run_report(FAILED_DB, OK_WEB, NOT_DUE, exit_code=4)
WARNING_RUN = run_report(OK_WEB, WARNED)
SUCCESS_RUN = run_report(OK_WEB)


@pytest.fixture(autouse=True)
def no_threads_left(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test stops its servers; notify's own threads end before it returns."""
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 2
    while (left := set(threading.enumerate()) - before) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not left


# ---- receivers ----


@dataclass(frozen=True)
class Certificate:
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        return context


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    if shutil.which("openssl") is None:
        pytest.fail(
            "the TLS tests make their certificate with the openssl command: apt install openssl"
        )
    where = tmp_path_factory.mktemp("tls")
    made = Certificate(where / "cert.pem", where / "key.pem")
    argv = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"]
    argv += ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
    argv += ["-keyout", str(made.key), "-out", str(made.cert)]
    subprocess.run(argv, check=True, capture_output=True, timeout=30)
    return made


@dataclass
class Mail:
    sender: str
    recipients: list[str]
    data: bytes
    secure: bool
    login: str | None

    def parsed(self) -> EmailMessage:
        return message_from_bytes(self.data, policy=policy.default)


class SmtpServer(socketserver.ThreadingTCPServer):
    daemon_threads = False
    block_on_close = True  # server_close() waits for the sessions

    def __init__(
        self, tls: ssl.SSLContext | None, implicit_tls: bool, auth: tuple[str, ...]
    ) -> None:
        super().__init__(("127.0.0.1", 0), SmtpSession)
        self.tls = tls
        self.implicit_tls = implicit_tls
        self.auth = auth
        self.mails: list[Mail] = []
        self.tls_errors: list[str] = []

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class SmtpSession(socketserver.StreamRequestHandler):
    """Just enough ESMTP: EHLO, STARTTLS, AUTH PLAIN/LOGIN, MAIL, RCPT, DATA, QUIT."""

    timeout = 5
    server: SmtpServer

    def handle(self) -> None:
        self.secure = False
        self.login: str | None = None
        if self.server.implicit_tls and not self.start_tls():
            return
        self.reply("220 127.0.0.1 ESMTP test")
        sender, recipients = "", list[str]()
        while line := self.read_line():
            verb, _, argument = line.partition(" ")
            verb = verb.upper()
            if verb in ("EHLO", "HELO"):
                self.ehlo()
            elif verb == "STARTTLS" and self.server.tls and not self.secure:
                self.reply("220 2.0.0 ready to start TLS")
                if not self.start_tls():
                    return
            elif verb == "AUTH" and self.server.auth:
                self.authenticate(argument)
            elif verb == "MAIL" and self.server.auth and self.login is None:
                self.reply("530 5.7.0 authentication required")
            elif verb == "MAIL":
                sender, recipients = argument.partition(":")[2].split()[0].strip("<>"), []
                self.reply("250 2.1.0 ok")
            elif verb == "RCPT" and argument.partition(":")[2].startswith("<nobody@"):
                self.reply("550 5.1.1 no such user")
            elif verb == "RCPT":
                recipients.append(argument.partition(":")[2].strip().strip("<>"))
                self.reply("250 2.1.5 ok")
            elif verb == "DATA":
                self.reply("354 end with <CRLF>.<CRLF>")
                mail = Mail(sender, recipients, self.read_data(), self.secure, self.login)
                self.server.mails.append(mail)
                self.reply("250 2.0.0 queued")
            elif verb in ("RSET", "NOOP"):
                self.reply("250 2.0.0 ok")
            elif verb == "QUIT":
                self.reply("221 2.0.0 bye")
                return
            else:
                self.reply("502 5.5.2 not implemented")

    def finish(self) -> None:
        super().finish()
        if self.connection is not self.request:
            self.connection.close()

    def reply(self, line: str) -> None:
        self.wfile.write(f"{line}\r\n".encode())

    def read_line(self) -> str:
        return self.rfile.readline(4096).decode().rstrip("\r\n")

    def ehlo(self) -> None:
        lines = ["127.0.0.1 test", "8BITMIME"]
        if self.server.tls and not self.secure:
            lines.append("STARTTLS")
        if self.server.auth and (self.secure or not self.server.tls):
            lines.append("AUTH " + " ".join(self.server.auth))
        for line in lines[:-1]:
            self.reply(f"250-{line}")
        self.reply(f"250 {lines[-1]}")

    def start_tls(self) -> bool:
        assert self.server.tls is not None
        self.rfile.close()  # nothing is buffered: the client waits for the handshake
        try:
            self.connection = self.server.tls.wrap_socket(self.connection, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            self.server.tls_errors.append(str(exc))
            return False
        self.secure = True
        self.rfile = self.connection.makefile("rb")
        self.wfile = self.connection.makefile("wb", buffering=0)
        return True

    def authenticate(self, argument: str) -> None:
        mechanism, _, initial = argument.partition(" ")
        if mechanism.upper() not in self.server.auth:
            self.reply("504 5.5.4 mechanism not supported")
            return
        if mechanism.upper() == "PLAIN":
            if not initial:
                self.reply("334 ")
                initial = self.read_line()
            _, user, password = base64.b64decode(initial).decode().split("\0")
        else:
            if not initial:
                self.reply("334 " + base64.b64encode(b"Username:").decode())
                initial = self.read_line()
            user = base64.b64decode(initial).decode()
            self.reply("334 " + base64.b64encode(b"Password:").decode())
            password = base64.b64decode(self.read_line()).decode()
        if (user, password) == ("gfs", PASSWORD):
            self.login = user
            self.reply("235 2.7.0 authentication successful")
        else:
            self.reply("535 5.7.8 authentication credentials invalid")

    def read_data(self) -> bytes:
        lines: list[bytes] = []
        while (line := self.rfile.readline()) not in (b".\r\n", b""):
            lines.append(line[1:] if line.startswith(b"..") else line)
        return b"".join(lines)


Served = TypeVar("Served", bound=socketserver.BaseServer)


@contextmanager
def serving(server: Served) -> Iterator[Served]:
    """`server` answering in a thread until the block ends; then shut down and closed."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextmanager
def serve_smtp(
    tls: ssl.SSLContext | None = None, implicit_tls: bool = False, auth: tuple[str, ...] = ()
) -> Iterator[SmtpServer]:
    with serving(SmtpServer(tls, implicit_tls, auth)) as server:
        yield server


@dataclass
class Posted:
    path: str
    headers: MailHeaders
    body: bytes


class HttpServer(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True

    def __init__(self, statuses: list[int], answer: bytes) -> None:
        super().__init__(("127.0.0.1", 0), HttpHandler)
        self.statuses = statuses  # one per request; the last one repeats
        self.answer = answer
        self.posted: list[Posted] = []

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class HttpHandler(BaseHTTPRequestHandler):
    server: HttpServer

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.posted.append(Posted(self.path, self.headers, body))
        statuses = self.server.statuses
        status = statuses.pop(0) if len(statuses) > 1 else statuses[0]
        answer = self.server.answer if status < 400 else b"something broke\nsecond line\n"
        self.send_response(status)
        if 300 <= status < 400:
            self.send_header("Location", "http://127.0.0.1:1/elsewhere")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        with suppress(OSError):  # the client read what it wanted and left
            self.wfile.write(answer)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def serve_http(statuses: list[int] | None = None, answer: bytes = b"{}") -> Iterator[HttpServer]:
    with serving(HttpServer(statuses or [200], answer)) as server:
        yield server


@contextmanager
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel does) but never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield int(listener.getsockname()[1])


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def smtp_settings(port: int, **changes: Any) -> NotifySettings:
    email = EmailSettings(
        to=(ADDRESS,), sender="gfs@kvm1.example.net", smtp_host="127.0.0.1", smtp_port=port
    )
    return NotifySettings(email=replace(email, **{"tls": "off", "timeout": 5.0, **changes}))


def hook_settings(*hooks: WebhookSettings, on: tuple[str, ...] = ("failure",)) -> NotifySettings:
    return NotifySettings(on=on, webhooks=hooks)


def password_file(tmp_path: Path) -> str:
    path = tmp_path / "smtp.pass"
    path.write_text(f"{PASSWORD}\nignored second line\n")
    return str(path)


# ---- the message ----


def test_failure_message_lists_each_job_and_the_exit_code() -> None:
    message = build_message(run_report(FAILED_DB, OK_WEB, WARNED, NOT_DUE, exit_code=4))
    assert message.subject == "gfs on kvm1: FAILURE (1 of 3 jobs failed)"
    assert message.body == (
        "db01: failed: lvcreate: Insufficient free space\n"
        "web: ok: generation 20261206T020000Z, 1.2 GiB in 42 s\n"
        "files: ok: generation 20261206T020100Z, 2.0 KiB in 3.0 s\n"
        "    warning: 2 files changed\n"
        "not due: archive\n"
        "\n"
        "exit code 4 (run started 2026-12-06 02:00:00 UTC, took 1 min 23 s)\n"
    )


@pytest.mark.parametrize(
    ("report", "subject"),
    [
        (WARNING_RUN, "gfs on kvm1: WARNING (1 warning)"),
        (
            run_report(JobReport("a", "lvm", "locked"), WARNED, WARNED),
            "gfs on kvm1: WARNING (1 job locked, 2 warnings)",
        ),
        (run_report(OK_WEB, OK_WEB, OK_WEB, NOT_DUE), "gfs on kvm1: ok (3 jobs)"),
        (SUCCESS_RUN, "gfs on kvm1: ok (1 job)"),
    ],
)
def test_subject_says_how_the_run_went(report: RunReport, subject: str) -> None:
    assert build_message(report).subject == subject


def test_multi_line_messages_stay_under_their_job() -> None:
    job = JobReport("db01", "lvm", "failed", message="first line\nsecond line\n")
    assert build_message(run_report(job)).body.startswith(
        "db01: failed: first line\n        second line\n\nexit code"
    )


@pytest.mark.parametrize(
    ("report", "priority", "tags", "gotify"),
    [
        (FAILURE_RUN, "high", "x", 8),
        (WARNING_RUN, "default", "warning", 5),
        (SUCCESS_RUN, "default", "white_check_mark", 2),
    ],
)
def test_priorities_follow_the_severity(
    report: RunReport, priority: str, tags: str, gotify: int
) -> None:
    message = build_message(report)
    headers, _ = webhook_payload("ntfy", report, message)
    assert (headers["Priority"], headers["Tags"]) == (priority, tags)
    _, body = webhook_payload("gotify", report, message)
    assert json.loads(body)["priority"] == gotify


# ---- webhooks ----


def test_json_webhook_gets_the_whole_report_and_its_headers() -> None:
    with serve_http() as server:
        hook = WebhookSettings(server.url(), "json", {"Authorization": "Bearer t0ken"}, 5.0)
        assert notify(hook_settings(hook), FAILURE_RUN, LOG) == []
    [posted] = server.posted
    assert posted.path == "/hook"
    assert posted.headers["Content-Type"] == "application/json"
    assert posted.headers["Authorization"] == "Bearer t0ken"
    assert posted.headers["User-Agent"].startswith("gfs-backup/")
    report = json.loads(posted.body)
    assert report == report_as_dict(FAILURE_RUN)
    assert report["summary"] == "gfs on kvm1: FAILURE (1 of 2 jobs failed)"
    assert report["started"] == "2026-12-06T02:00:00+00:00"
    assert report["jobs"][1] == {
        "job": "web",
        "kind": "libvirt",
        "status": "ok",
        "generation": "20261206T020000Z",
        "bytes_written": int(1.2 * GiB),
        "seconds": 42.0,
        "message": "",
        "warnings": [],
    }


def test_ntfy_gotify_and_slack_bodies() -> None:
    message = build_message(FAILURE_RUN)
    with serve_http() as server:
        hooks = [WebhookSettings(server.url(f"/{kind}"), kind) for kind in ("ntfy", "gotify")]
        hooks.append(WebhookSettings(server.url("/slack"), "slack"))
        assert notify(hook_settings(*hooks), FAILURE_RUN, LOG) == []
    posted = {post.path: post for post in server.posted}
    ntfy = posted["/ntfy"]
    assert ntfy.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert ntfy.headers["Title"] == message.subject
    assert (ntfy.headers["Priority"], ntfy.headers["Tags"]) == ("high", "x")
    assert ntfy.body.decode() == message.body
    assert json.loads(posted["/gotify"].body) == {
        "title": message.subject,
        "message": message.body,
        "priority": 8,
    }
    assert json.loads(posted["/slack"].body) == {"text": f"*{message.subject}*\n{message.body}"}


def test_a_500_is_retried_once_after_a_second() -> None:
    with serve_http([500, 200]) as server:
        began = time.monotonic()
        assert notify(hook_settings(WebhookSettings(server.url())), FAILURE_RUN, LOG) == []
        assert time.monotonic() - began >= 1.0
    assert len(server.posted) == 2


def test_a_webhook_failing_twice_gives_one_problem_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(notify_module, "RETRY_DELAY", 0.05)
    with serve_http([500]) as server:
        problems = notify(hook_settings(WebhookSettings(server.url())), FAILURE_RUN, LOG)
    assert len(server.posted) == 2
    port = server.server_address[1]
    assert problems == [
        f"notify: webhook[0] (json) http://127.0.0.1:{port}/... failed: "
        "HTTP 500 Internal Server Error: something broke (tried twice)"
    ]
    assert [record.getMessage() for record in caplog.records if record.levelname == "WARNING"] == (
        problems
    )


@pytest.mark.parametrize(("status", "reason"), [(404, "HTTP 404 Not Found"), (302, "redirect")])
def test_client_errors_and_redirects_are_not_retried(status: int, reason: str) -> None:
    with serve_http([status]) as server:
        [problem] = notify(hook_settings(WebhookSettings(server.url())), FAILURE_RUN, LOG)
    assert len(server.posted) == 1
    assert reason in problem


def test_a_refused_connection_is_retried_then_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(notify_module, "RETRY_DELAY", 0.05)
    url = f"http://127.0.0.1:{closed_port()}/x?token=secret"
    [problem] = notify(hook_settings(WebhookSettings(url)), FAILURE_RUN, LOG)
    assert problem.endswith("failed: connection refused (tried twice)")
    assert "secret" not in problem


def test_a_webhook_that_never_answers_is_bounded_by_its_timeout() -> None:
    with silent_port() as port:
        hook = WebhookSettings(f"http://127.0.0.1:{port}/hook", timeout=1.0)
        began = time.monotonic()
        [problem] = notify(hook_settings(hook), FAILURE_RUN, LOG)
        assert time.monotonic() - began < 2.5
    assert (
        problem
        == f"notify: webhook[0] (json) http://127.0.0.1:{port}/... failed: no answer within 1 s"
    )


def test_a_huge_answer_is_read_only_in_part() -> None:
    with serve_http([200], answer=b"x" * (4 << 20)) as server:
        assert notify(hook_settings(WebhookSettings(server.url())), FAILURE_RUN, LOG) == []


@pytest.mark.parametrize(
    ("report", "on"),
    [(SUCCESS_RUN, ("failure",)), (run_report(NOT_DUE), ("failure", "warning", "success"))],
    ids=["success-not-selected", "nothing-ran"],
)
def test_nothing_is_sent_unless_the_severity_is_selected(
    report: RunReport, on: tuple[str, ...]
) -> None:
    with serve_http() as server:
        assert notify(hook_settings(WebhookSettings(server.url()), on=on), report, LOG) == []
    assert server.posted == []


# ---- email by SMTP ----


def test_mail_arrives_with_subject_recipients_and_body() -> None:
    with serve_smtp() as server:
        settings = smtp_settings(server.port, to=(ADDRESS, "oncall@example.net"))
        assert notify(settings, FAILURE_RUN, LOG) == []
    [mail] = server.mails
    assert mail.sender == "gfs@kvm1.example.net"
    assert mail.recipients == [ADDRESS, "oncall@example.net"]
    parsed = mail.parsed()
    assert parsed["Subject"] == "gfs on kvm1: FAILURE (1 of 2 jobs failed)"
    assert parsed["To"] == f"{ADDRESS}, oncall@example.net"
    assert parsed["Auto-Submitted"] == "auto-generated"
    body = parsed.get_content().replace("\r\n", "\n")  # CRLF on the wire
    assert body == build_message(FAILURE_RUN).body


def test_a_refused_recipient_is_a_problem_though_the_others_get_it() -> None:
    with serve_smtp() as server:
        settings = smtp_settings(server.port, to=("nobody@example.net", ADDRESS))
        [problem] = notify(settings, FAILURE_RUN, LOG)
    assert [mail.recipients for mail in server.mails] == [[ADDRESS]]
    assert problem.endswith(
        "failed: recipients refused: nobody@example.net (550 5.1.1 no such user)"
    )


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_starttls_and_login_with_a_trusted_ca_file(
    certificate: Certificate, tmp_path: Path, mechanism: str
) -> None:
    with serve_smtp(certificate.server_context(), auth=(mechanism,)) as server:
        settings = smtp_settings(
            server.port,
            tls="starttls",
            ca_file=str(certificate.cert),
            username="gfs",
            password_file=password_file(tmp_path),
        )
        assert notify(settings, WARNING_RUN, LOG) == []
    [mail] = server.mails
    assert (mail.secure, mail.login) == (True, "gfs")
    assert mail.parsed()["Subject"] == "gfs on kvm1: WARNING (1 warning)"


def test_implicit_tls(certificate: Certificate) -> None:
    with serve_smtp(certificate.server_context(), implicit_tls=True) as server:
        settings = smtp_settings(server.port, tls="ssl", ca_file=str(certificate.cert))
        assert notify(settings, FAILURE_RUN, LOG) == []
    assert [mail.secure for mail in server.mails] == [True]


def test_an_untrusted_certificate_is_a_problem_line(certificate: Certificate) -> None:
    with serve_smtp(certificate.server_context()) as server:
        [problem] = notify(smtp_settings(server.port, tls="starttls"), FAILURE_RUN, LOG)
    assert server.mails == []
    assert problem.startswith(
        f"notify: email to {ADDRESS} via 127.0.0.1:{server.port} failed: "
        "TLS certificate verify failed (self-signed certificate)"
    )
    assert "set ca_file" in problem


def test_a_wrong_password_is_a_problem_line(certificate: Certificate, tmp_path: Path) -> None:
    secret = tmp_path / "wrong.pass"
    secret.write_text("not it\n")
    with serve_smtp(certificate.server_context(), auth=("PLAIN",)) as server:
        settings = smtp_settings(
            server.port,
            tls="starttls",
            ca_file=str(certificate.cert),
            username="gfs",
            password_file=str(secret),
        )
        [problem] = notify(settings, FAILURE_RUN, LOG)
    assert problem.endswith("failed: login refused: 535 5.7.8 authentication credentials invalid")
    assert server.mails == []


def test_an_unreadable_password_file_is_a_problem_line(tmp_path: Path) -> None:
    settings = smtp_settings(
        closed_port(), username="gfs", password_file=str(tmp_path / "absent"), tls="starttls"
    )
    [problem] = notify(settings, FAILURE_RUN, LOG)
    assert f"cannot read password_file {tmp_path / 'absent'}: No such file" in problem


def test_a_refused_connection_fails_fast() -> None:
    port = closed_port()
    began = time.monotonic()
    problems = notify(smtp_settings(port), FAILURE_RUN, LOG)
    assert time.monotonic() - began < 2
    assert problems == [
        f"notify: email to {ADDRESS} via 127.0.0.1:{port} failed: connection refused"
    ]


def test_each_channel_is_tried_on_its_own() -> None:
    with serve_http() as server:
        settings = NotifySettings(
            email=smtp_settings(closed_port()).email,
            webhooks=(WebhookSettings(server.url(), "slack"),),
        )
        [problem] = notify(settings, FAILURE_RUN, LOG)
    assert "connection refused" in problem
    assert len(server.posted) == 1


# ---- email by sendmail ----


def sendmail_script(tmp_path: Path, body: str) -> str:
    script = tmp_path / "sendmail"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return str(script)


def test_sendmail_gets_the_message_on_stdin(tmp_path: Path) -> None:
    out, args = tmp_path / "mail.eml", tmp_path / "args"
    script = sendmail_script(tmp_path, f"printf '%s\\n' \"$@\" > '{args}'\ncat > '{out}'")
    email = EmailSettings(to=(ADDRESS,), sender="gfs@kvm1", sendmail=script)
    assert notify(NotifySettings(email=email), FAILURE_RUN, LOG) == []
    assert args.read_text().split() == ["-t", "-oi"]
    parsed = message_from_bytes(out.read_bytes(), policy=policy.default)
    assert (parsed["To"], parsed["From"]) == (ADDRESS, "gfs@kvm1")
    assert parsed["Subject"] == "gfs on kvm1: FAILURE (1 of 2 jobs failed)"
    assert parsed.get_content() == build_message(FAILURE_RUN).body


def test_sendmail_failing_gives_its_last_error_line(tmp_path: Path) -> None:
    script = sendmail_script(
        tmp_path, "cat >/dev/null\necho 'starting' >&2\necho 'fatal: no such user' >&2\nexit 1"
    )
    email = EmailSettings(to=(ADDRESS,), sender="gfs@kvm1", sendmail=script)
    assert notify(NotifySettings(email=email), FAILURE_RUN, LOG) == [
        f"notify: email to {ADDRESS} via {script} failed: exit status 1: fatal: no such user"
    ]


def test_a_missing_sendmail_is_a_problem_line(tmp_path: Path) -> None:
    email = EmailSettings(to=(ADDRESS,), sender="gfs@kvm1", sendmail=str(tmp_path / "none"))
    [problem] = notify(NotifySettings(email=email), FAILURE_RUN, LOG)
    assert problem.endswith("failed: not found: install a mail transfer agent, or set smtp")


# ---- configuration ----


def parse(table: dict[str, Any] | None) -> tuple[NotifySettings, list[str]]:
    collector = Collector("gfs.toml")
    settings = parse_notify(table, collector)
    return settings, [str(problem) for problem in collector.problems]


EXAMPLE = """
[notify]
on = ["failure", "warning", "success"]
[notify.email]
to = ["ops@example.net", "oncall@example.net"]
from = "gfs@kvm1.example.net"
smtp = "mail.example.net:2525"
tls = "ssl"
username = "gfs"
password_file = "/etc/gfs/smtp.pass"
ca_file = "/etc/ssl/my-ca.pem"
timeout = 20
[[notify.webhook]]
url = "https://ntfy.example.net/backups"
format = "ntfy"
headers = { Authorization = "Bearer abc" }
timeout = 5
[[notify.webhook]]
url = "http://10.0.0.5:8080/hooks/x"
"""


def test_a_full_example_parses() -> None:
    settings, problems = parse(tomllib.loads(EXAMPLE)["notify"])
    assert problems == []
    assert settings == NotifySettings(
        on=("failure", "warning", "success"),
        email=EmailSettings(
            to=("ops@example.net", "oncall@example.net"),
            sender="gfs@kvm1.example.net",
            smtp_host="mail.example.net",
            smtp_port=2525,
            tls="ssl",
            username="gfs",
            password_file="/etc/gfs/smtp.pass",
            ca_file="/etc/ssl/my-ca.pem",
            timeout=20.0,
        ),
        webhooks=(
            WebhookSettings(
                "https://ntfy.example.net/backups", "ntfy", {"Authorization": "Bearer abc"}, 5.0
            ),
            WebhookSettings("http://10.0.0.5:8080/hooks/x"),
        ),
    )


def test_defaults() -> None:
    assert parse(None) == (NotifySettings(on=("failure", "warning")), [])
    settings, problems = parse({"email": {"to": [ADDRESS]}})
    assert problems == []
    assert settings.email == EmailSettings(
        to=(ADDRESS,), sender=f"gfs@{socket.gethostname()}", sendmail="/usr/sbin/sendmail"
    )
    assert settings.email.via == "/usr/sbin/sendmail"


@pytest.mark.parametrize(
    ("smtp", "tls", "via"),
    [
        ("mail.example.net", "starttls", "mail.example.net:587"),
        ("mail.example.net", "ssl", "mail.example.net:465"),
        ("mail.example.net", "off", "mail.example.net:25"),
        ("[::1]:2525", "off", "[::1]:2525"),
    ],
)
def test_smtp_port_follows_tls(smtp: str, tls: str, via: str) -> None:
    settings, problems = parse({"email": {"to": [ADDRESS], "smtp": smtp, "tls": tls}})
    assert problems == []
    assert settings.email is not None
    assert settings.email.via == via


EMAIL = {"to": [ADDRESS]}
SMTP = {**EMAIL, "smtp": "mail.example.net"}
HOOK = {"url": "https://hooks.example.net/x"}


@pytest.mark.parametrize(
    ("table", "key", "message"),
    [
        ({"bogus": 1}, "notify.bogus", "unknown key (allowed: on, email, webhook)"),
        ({"on": ["failure", "sometimes"]}, "notify.on", "unknown severity 'sometimes'"),
        ({"on": "failure"}, "notify.on", "expected an array of severities"),
        ({"email": "ops@example.net"}, "notify.email", "expected a [notify.email] table"),
        ({"email": {"to": []}}, "notify.email.to", "required: the addresses to mail"),
        ({"email": {}}, "notify.email.to", "required"),
        ({"email": {"to": "ops@example.net"}}, "notify.email.to", "expected an array"),
        ({"email": {"to": ["ops"]}}, "notify.email.to", "'ops' is not an email address"),
        ({"email": {**EMAIL, "from": "gfs"}}, "notify.email.from", "not an email address"),
        ({"email": {**EMAIL, "cc": [ADDRESS]}}, "notify.email.cc", "unknown key"),
        ({"email": {**EMAIL, "sendmail": "sendmail"}}, "notify.email.sendmail", "absolute"),
        ({"email": {**SMTP, "sendmail": "/x"}}, "notify.email.sendmail", "not both"),
        ({"email": {**SMTP, "smtp": "mail:99999"}}, "notify.email.smtp", "not a TCP port"),
        ({"email": {**SMTP, "smtp": "a b:25"}}, "notify.email.smtp", '"host:port"'),
        ({"email": {**SMTP, "tls": "yes"}}, "notify.email.tls", "use starttls, ssl or off"),
        ({"email": {**EMAIL, "tls": "ssl"}}, "notify.email.tls", "applies to smtp only"),
        ({"email": {**SMTP, "timeout": 0}}, "notify.email.timeout", "0 is not 1 to 120"),
        ({"email": {**SMTP, "timeout": 121}}, "notify.email.timeout", "121 is not 1 to 120"),
        ({"email": {**SMTP, "timeout": "10"}}, "notify.email.timeout", "number of seconds"),
        ({"email": {**SMTP, "username": "gfs"}}, "notify.email.username", "needs password_file"),
        (
            {"email": {**SMTP, "password_file": "/etc/gfs/p"}},
            "notify.email.password_file",
            "needs username",
        ),
        (
            {"email": {**SMTP, "username": "gfs", "password_file": "p"}},
            "notify.email.password_file",
            "'p' must be an absolute path",
        ),
        (
            {"email": {**SMTP, "username": "gfs", "password_file": "/p", "tls": "off"}},
            "notify.email.tls",
            "password in clear",
        ),
        ({"email": {**SMTP, "ca_file": "ca.pem"}}, "notify.email.ca_file", "absolute"),
        ({"webhook": HOOK}, "notify.webhook", "expected [[notify.webhook]] tables"),
        ({"webhook": ["x"]}, "notify.webhook[0]", "expected a [[notify.webhook]] table"),
        ({"webhook": [{}]}, "notify.webhook[0].url", "required"),
        (
            {"webhook": [HOOK, {"url": "ftp://x/y"}]},
            "notify.webhook[1].url",
            "'ftp://x/y' is not an http:// or https:// URL",
        ),
        ({"webhook": [{"url": "https:///x"}]}, "notify.webhook[0].url", "not an http"),
        ({"webhook": [{"url": "http://x:port/"}]}, "notify.webhook[0].url", "not an http"),
        ({"webhook": [{**HOOK, "format": "teams"}]}, "notify.webhook[0].format", "teams"),
        ({"webhook": [{**HOOK, "timeout": 500}]}, "notify.webhook[0].timeout", "1 to 120"),
        ({"webhook": [{**HOOK, "method": "PUT"}]}, "notify.webhook[0].method", "unknown key"),
        (
            {"webhook": [{**HOOK, "headers": {"Bad Name": "x"}}]},
            "notify.webhook[0].headers.Bad Name",
            "not a valid HTTP header name",
        ),
        (
            {"webhook": [{**HOOK, "headers": {"X-A": "a\nb"}}]},
            "notify.webhook[0].headers.X-A",
            "one-line string",
        ),
        (
            {"webhook": [{**HOOK, "headers": {"Host": "x"}}]},
            "notify.webhook[0].headers.Host",
            "set by gfs",
        ),
        ({"webhook": [{**HOOK, "headers": "x"}]}, "notify.webhook[0].headers", "expected a"),
    ],
)
def test_each_bad_input_is_one_problem_line(table: dict[str, Any], key: str, message: str) -> None:
    _, problems = parse(table)
    assert len(problems) == 1, problems
    [problem] = problems
    assert problem.startswith(f"gfs.toml: {key}: "), problem
    assert message in problem
    assert "\n" not in problem


def test_every_problem_is_reported_at_once() -> None:
    table = {"on": ["x"], "email": {"to": ["bad"], "tls": "?"}, "webhook": [{"url": "x"}]}
    _, problems = parse(table)
    assert len(problems) == 4

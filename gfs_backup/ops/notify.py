"""Run notifications: one message per `gfs run`, by email and webhooks.

[notify]
on = ["failure", "warning"]          # severities that send (default); also "success"; [] none
[notify.email]
to = ["ops@example.net"]              # required: plain addresses
from = "gfs@kvm1.example.net"         # default: gfs@<hostname>
smtp = "mail.example.net:587"         # host[:port] (port: 587 starttls, 465 ssl, 25 off)
sendmail = "/usr/sbin/sendmail"       # when smtp is absent (this default): `sendmail -t -oi`
tls = "starttls"                      # smtp only: starttls (default) | ssl (implicit) | off
username = "gfs"                      # smtp only: AUTH, needs password_file and TLS
password_file = "/etc/gfs/smtp.pass"  # its first line is the password, read at send time
ca_file = "/etc/ssl/my-ca.pem"        # smtp only: also trust this CA
timeout = 10                          # seconds per network operation, 1..120
[[notify.webhook]]                    # zero or more
url = "https://ntfy.example.net/backups"   # http:// or https://, POSTed to
format = "json"                       # json (default) | ntfy | gotify | slack
headers = { Authorization = "Bearer ..." }  # added to (and override) the format's own
timeout = 10                          # seconds, 1..120

Webhook bodies:
- json: the whole report, Content-Type application/json: {"host", "severity",
  "exit_code", "started", "finished" (ISO 8601), "summary" (the subject line), "jobs":
  [{"job", "kind", "status", "generation", "bytes_written", "seconds", "message",
  "warnings": [...]}]} (every job, not-due ones too).
- ntfy: the message text as text/plain, with headers `Title: <subject>`, `Priority: high`
  on failure (else `default`) and `Tags: x` (failure), `warning` or `white_check_mark`.
- gotify: JSON {"title", "message", "priority"}: priority 8 failure, 5 warning, 2 success.
- slack: JSON {"text": "*<subject>*\\n<message>"} (Slack incoming webhooks, Mattermost and
  Rocket.Chat take it); &, < and > escaped as Slack asks.

notify() never raises: each channel runs in its own thread with its own timeout, the
whole call is bounded, and every failure comes back as one line (also logged). Webhooks
are retried once, after 1 s, on connection errors and HTTP 5xx (not on timeouts).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import re
import smtplib
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timezone
from email.header import Header
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from functools import partial
from typing import Any

from gfs_backup import __version__
from gfs_backup.core.validate import Collector, join_key
from gfs_backup.ops.report import FAILURE, SEVERITIES, SUCCESS, WARNING, JobReport, RunReport

NOTIFY_KEYS = ("on", "email", "webhook")
EMAIL_KEYS = (
    *("to", "from", "smtp", "sendmail", "tls", "username", "password_file", "ca_file"),
    "timeout",
)
SMTP_ONLY_KEYS = ("tls", "username", "password_file", "ca_file")
WEBHOOK_KEYS = ("url", "format", "headers", "timeout")
DEFAULT_ON = (FAILURE, WARNING)
DEFAULT_SENDMAIL = "/usr/sbin/sendmail"
TLS_PORTS = {"starttls": 587, "ssl": 465, "off": 25}
FORMATS = ("json", "ntfy", "gotify", "slack")
DEFAULT_TIMEOUT = 10.0
MAX_TIMEOUT = 120
MAX_RESPONSE = 64 * 1024  # bytes of a webhook's answer read at most
RETRY_DELAY = 1.0
NTFY = {
    FAILURE: ("high", "x"),
    WARNING: ("default", "warning"),
    SUCCESS: ("default", "white_check_mark"),
}
GOTIFY_PRIORITY = {FAILURE: 8, WARNING: 5, SUCCESS: 2}
RESERVED_HEADERS = ("content-length", "host", "transfer-encoding")
ADDRESS_RE = re.compile(r"[^@\s<>,;:\"()\[\]\\]+@[A-Za-z0-9.-]+")
HOST_PORT_RE = re.compile(
    r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9._-]+))(?::(?P<port>\d{1,5}))?"
)
HEADER_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class EmailSettings:
    to: tuple[str, ...]
    sender: str  # the `from` key
    smtp_host: str | None = None  # None: hand the mail to `sendmail`
    smtp_port: int = 587
    sendmail: str = DEFAULT_SENDMAIL
    tls: str = "starttls"  # starttls | ssl | off
    username: str | None = None
    password_file: str | None = None
    ca_file: str | None = None
    timeout: float = DEFAULT_TIMEOUT

    @property
    def via(self) -> str:
        if self.smtp_host is None:
            return self.sendmail
        host = f"[{self.smtp_host}]" if ":" in self.smtp_host else self.smtp_host
        return f"{host}:{self.smtp_port}"


@dataclass(frozen=True)
class WebhookSettings:
    url: str
    format: str = "json"
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout: float = DEFAULT_TIMEOUT


@dataclass(frozen=True)
class NotifySettings:
    on: tuple[str, ...] = DEFAULT_ON
    email: EmailSettings | None = None
    webhooks: tuple[WebhookSettings, ...] = ()


@dataclass(frozen=True)
class Message:
    subject: str
    body: str  # plain text, lines end with "\n"


class _Failed(Exception):
    """A channel failed; the argument is the reason, one line."""


class _Retryable(_Failed):
    """A webhook failure worth one more try (connection error, HTTP 5xx)."""


# ---- configuration ----


def parse_notify(table: Mapping[str, Any] | None, collector: Collector) -> NotifySettings:
    """The [notify] table (None when absent) as settings; problems go to `collector`."""
    if table is None:
        return NotifySettings()
    if not isinstance(table, Mapping):
        collector.add("notify", "expected a [notify] table")
        return NotifySettings()
    collector.unknown_keys(table, NOTIFY_KEYS, "notify")
    email_table = collector.get(table, "email", "notify", dict, None, "a [notify.email] table")
    entries: list[Any] = collector.get(
        table, "webhook", "notify", list, [], "[[notify.webhook]] tables"
    )
    webhooks = [
        _webhook(entry, f"notify.webhook[{i}]", collector) for i, entry in enumerate(entries)
    ]
    return NotifySettings(
        on=_severities(table, collector),
        email=None if email_table is None else _email(email_table, collector),
        webhooks=tuple(hook for hook in webhooks if hook is not None),
    )


def _severities(table: Mapping[str, Any], collector: Collector) -> tuple[str, ...]:
    what = 'an array of severities, e.g. ["failure", "warning"]'
    values: list[Any] = collector.get(table, "on", "notify", list, list(DEFAULT_ON), what)
    found: list[str] = []
    for value in values:
        if value not in SEVERITIES:
            collector.add(
                "notify.on", f"unknown severity {value!r} (allowed: {', '.join(SEVERITIES)})"
            )
        elif value not in found:
            found.append(value)
    return tuple(found)


def _email(table: Mapping[str, Any], collector: Collector) -> EmailSettings:
    path = "notify.email"
    collector.unknown_keys(table, EMAIL_KEYS, path)
    to: list[Any] = collector.get(table, "to", path, list, [], "an array of email addresses")
    if not to and isinstance(table.get("to", []), list):
        collector.add(
            join_key(path, "to"), 'required: the addresses to mail, e.g. ["ops@example.net"]'
        )
    for address in to:
        _check_address(address, join_key(path, "to"), collector)
    sender = collector.get(table, "from", path, str, None, "an email address")
    if sender is None:
        sender = f"gfs@{socket.gethostname()}"
    else:
        _check_address(sender, join_key(path, "from"), collector)
    smtp = collector.convert(table, "smtp", path, _split_host_port, None)
    tls = collector.get(table, "tls", path, str, "starttls", "starttls, ssl or off")
    if "smtp" not in table:
        for key in SMTP_ONLY_KEYS:
            if key in table:
                collector.add(join_key(path, key), "applies to smtp only: set smtp, or remove it")
    elif tls not in TLS_PORTS:
        collector.add(join_key(path, "tls"), f"{tls!r} is not allowed: use starttls, ssl or off")
    elif "sendmail" in table:
        collector.add(join_key(path, "sendmail"), "set either smtp or sendmail, not both")
    else:
        _check_login(table, tls, collector)
    tls = tls if tls in TLS_PORTS else "starttls"
    username = collector.get(table, "username", path, str, None, "a user name")
    password_file = _absolute(table, "password_file", path, collector)
    host, port = smtp if smtp is not None else (None, None)
    return EmailSettings(
        to=tuple(address for address in to if isinstance(address, str)),
        sender=sender,
        smtp_host=host,
        smtp_port=port or TLS_PORTS[tls],
        sendmail=_absolute(table, "sendmail", path, collector) or DEFAULT_SENDMAIL,
        tls=tls,
        username=username,
        password_file=password_file,
        ca_file=_absolute(table, "ca_file", path, collector),
        timeout=_timeout(table, path, collector),
    )


def _check_login(table: Mapping[str, Any], tls: str, collector: Collector) -> None:
    """SMTP AUTH needs both username and password_file, and TLS."""
    path = "notify.email"
    if "username" in table and "password_file" not in table:
        collector.add(join_key(path, "username"), "needs password_file (holding the SMTP password)")
    if "password_file" in table and "username" not in table:
        collector.add(join_key(path, "password_file"), "needs username (the SMTP login)")
    if "username" in table and tls == "off":
        collector.add(
            join_key(path, "tls"),
            '"off" would send the password in clear: use starttls or ssl with username',
        )


def _webhook(entry: object, path: str, collector: Collector) -> WebhookSettings | None:
    if not isinstance(entry, dict):
        collector.add(path, "expected a [[notify.webhook]] table")
        return None
    collector.unknown_keys(entry, WEBHOOK_KEYS, path)
    url = collector.get(entry, "url", path, str, None, "an http:// or https:// URL")
    if "url" not in entry:
        collector.add(join_key(path, "url"), "required: the http:// or https:// URL to POST to")
    elif url is not None and not _is_http_url(url):
        collector.add(join_key(path, "url"), f"{url!r} is not an http:// or https:// URL")
    kind = collector.get(entry, "format", path, str, "json", "a webhook format")
    if kind not in FORMATS:
        collector.add(
            join_key(path, "format"), f"{kind!r} is not allowed: use {', '.join(FORMATS)}"
        )
        kind = "json"
    headers = collector.get(entry, "headers", path, dict, {}, "a table of header = value")
    for name, value in headers.items():
        _check_header(name, value, join_key(join_key(path, "headers"), name), collector)
    return WebhookSettings(url or "", kind, dict(headers), _timeout(entry, path, collector))


def _check_address(value: object, key: str, collector: Collector) -> None:
    if not isinstance(value, str) or not ADDRESS_RE.fullmatch(value):
        collector.add(key, f"{value!r} is not an email address (plain, e.g. ops@example.net)")


def _split_host_port(text: str) -> tuple[str, int | None]:
    match = HOST_PORT_RE.fullmatch(text)
    if match is None:
        raise ValueError(f'{text!r} is not "host" or "host:port"')
    port = int(match["port"]) if match["port"] else None
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"{port} is not a TCP port (1..65535)")
    return match["v6"] or match["name"], port


def _absolute(table: Mapping[str, Any], key: str, path: str, collector: Collector) -> str | None:
    value = collector.get(table, key, path, str, None, "an absolute path")
    if value is not None and (not value.startswith("/") or "\0" in value):
        collector.add(join_key(path, key), f"{value!r} must be an absolute path")
        return None
    return value


def _timeout(table: Mapping[str, Any], path: str, collector: Collector) -> float:
    value = table.get("timeout", DEFAULT_TIMEOUT)
    if isinstance(value, bool) or not isinstance(value, int | float):
        collector.add(join_key(path, "timeout"), f"expected a number of seconds, got {value!r}")
    elif not 1 <= value <= MAX_TIMEOUT:
        collector.add(join_key(path, "timeout"), f"{value} is not 1 to {MAX_TIMEOUT} seconds")
    else:
        return float(value)
    return DEFAULT_TIMEOUT


def _is_http_url(url: str) -> bool:
    if CONTROL_RE.search(url) or " " in url:
        return False
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _check_header(name: str, value: object, key: str, collector: Collector) -> None:
    if not HEADER_NAME_RE.fullmatch(name):
        collector.add(key, "is not a valid HTTP header name")
    elif name.lower() in RESERVED_HEADERS:
        collector.add(key, "is set by gfs: remove it")
    elif not isinstance(value, str) or CONTROL_RE.search(value) or not _latin1(value):
        collector.add(key, "expected a one-line string value (Latin-1)")


def _latin1(text: str) -> bool:
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


# ---- the message ----


def build_message(report: RunReport) -> Message:
    """Subject and plain-text body summarising every job of the run."""
    lines: list[str] = []
    for job in report.jobs:
        if job.status != "not-due" or job.warnings:
            lines.append(_indent(f"{job.job}: {job.status}{_detail(job)}"))
            lines.extend(_indent(f"    warning: {warning}") for warning in job.warnings)
    not_due = [job.job for job in report.jobs if job.status == "not-due" and not job.warnings]
    if not_due:
        lines.append(f"not due: {', '.join(not_due)}")
    took = _duration((report.finished - report.started).total_seconds())
    started = report.started.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    lines += ["", f"exit code {report.exit_code} (run started {started}, took {took})"]
    return Message(_subject(report), "".join(f"{line}\n" for line in lines))


def _subject(report: RunReport) -> str:
    ran = report.ran
    if report.severity == FAILURE:
        failed = sum(job.status == "failed" for job in ran)
        state = f"FAILURE ({failed} of {_count(len(ran), 'job')} failed)"
    elif report.severity == WARNING:
        locked = sum(job.status == "locked" for job in report.jobs)
        warnings = sum(len(job.warnings) for job in report.jobs)
        parts = [f"{_count(locked, 'job')} locked"] if locked else []
        parts += [_count(warnings, "warning")] if warnings else []
        state = f"WARNING ({', '.join(parts)})"
    else:
        state = f"ok ({_count(len(ran), 'job')})"
    return " ".join(f"gfs on {report.host}: {state}".split())


def _detail(job: JobReport) -> str:
    """What follows `name: status` on a job's line (empty or starting with ': ')."""
    parts: list[str] = []
    if job.status == "ok":
        if job.generation:
            parts.append(f"generation {job.generation}")
        parts.append(f"{_size(job.bytes_written)} in {_duration(job.seconds)}")
    text = ", ".join(parts)
    if job.message.strip():
        text = f"{text}; {job.message.strip()}" if text else job.message.strip()
    return f": {text}" if text else ""


def _indent(text: str) -> str:
    """Continuation lines of a multi-line message indented under their job."""
    return "\n        ".join(line.rstrip() for line in text.splitlines() if line.strip())


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _size(count: int) -> str:
    if count < 1024:
        return f"{count} B"
    value = float(count)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{max(seconds, 0):.1f} s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    return f"{whole // 3600} h {whole % 3600 // 60} min"


def report_as_dict(report: RunReport, message: Message | None = None) -> dict[str, Any]:
    """The report as the `json` webhook sends it."""
    return {
        "host": report.host,
        "severity": report.severity,
        "exit_code": report.exit_code,
        "started": report.started.isoformat(),
        "finished": report.finished.isoformat(),
        "summary": (message or build_message(report)).subject,
        "jobs": [
            {
                "job": job.job,
                "kind": job.kind,
                "status": job.status,
                "generation": job.generation,
                "bytes_written": job.bytes_written,
                "seconds": job.seconds,
                "message": job.message,
                "warnings": list(job.warnings),
            }
            for job in report.jobs
        ],
    }


def webhook_payload(kind: str, report: RunReport, message: Message) -> tuple[dict[str, str], bytes]:
    """Headers and body a webhook of format `kind` (json, ntfy, gotify, slack) gets."""
    severity = report.severity
    if kind == "ntfy":
        priority, tags = NTFY[severity]
        headers = {"Title": _header_value(message.subject), "Priority": priority, "Tags": tags}
        return {"Content-Type": "text/plain; charset=utf-8", **headers}, message.body.encode()
    body: dict[str, Any]
    if kind == "gotify":
        body = {
            "title": message.subject,
            "message": message.body,
            "priority": GOTIFY_PRIORITY[severity],
        }
    elif kind == "slack":
        body = {"text": _slack_escape(f"*{message.subject}*\n{message.body}")}
    else:
        body = report_as_dict(report, message)
    return {"Content-Type": "application/json"}, json.dumps(body).encode()


def _header_value(text: str) -> str:
    """Latin-1 text as is, anything else RFC 2047-encoded (ntfy decodes it)."""
    return text if _latin1(text) else Header(text, "utf-8").encode()


def _slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def build_email(email: EmailSettings, message: Message, report: RunReport) -> EmailMessage:
    """The mail for `message`: plain text, From/To from `email`, marked auto-generated."""
    mail = EmailMessage()
    mail["Subject"] = message.subject
    mail["From"] = email.sender
    mail["To"] = ", ".join(email.to)
    mail["Date"] = formatdate(usegmt=True)
    mail["Message-ID"] = make_msgid("gfs", domain=email.sender.rpartition("@")[2])
    mail["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation replies
    mail["X-GFS-Severity"] = report.severity
    mail.set_content(message.body, cte=None if message.body.isascii() else "quoted-printable")
    return mail


# ---- sending ----


@dataclass(frozen=True)
class _Channel:
    label: str  # "email to ... via ..." / "webhook[0] https://host/..."
    budget: float  # seconds it may take at most, all tries together
    send: Callable[[], None]  # raises _Failed (or anything) on failure


def notify(settings: NotifySettings, report: RunReport, log: logging.Logger) -> list[str]:
    """Send the run's message on every channel when its severity is in `settings.on`.

    Returns one line per channel that failed (each also logged as a warning); never
    raises. Channels run at once, each in a thread, and the call returns within the
    largest channel budget even if a receiver stalls.
    """
    try:
        if report.severity not in settings.on or not report.ran:
            return []
        problems = _run_channels(_channels(settings, report, build_message(report)), log)
    except Exception as exc:  # a notifier never fails the backup
        problems = [f"notify: failed: {type(exc).__name__}: {exc}"]
    problems = [" ".join(problem.split()) for problem in problems]
    for problem in problems:
        log.warning("%s", problem)
    return problems


def _channels(settings: NotifySettings, report: RunReport, message: Message) -> list[_Channel]:
    channels: list[_Channel] = []
    email = settings.email
    if email is not None and email.to:
        label = f"email to {', '.join(email.to)} via {email.via}"
        if email.smtp_host is None:
            send, budget = _sendmail, email.timeout + 2
        else:
            send, budget = _smtp, email.timeout * 3 + 1
        channels.append(_Channel(label, budget, partial(send, email, message, report)))
    for index, hook in enumerate(settings.webhooks):
        headers, body = webhook_payload(hook.format, report, message)
        headers = {"User-Agent": f"gfs-backup/{__version__}", **headers, **hook.headers}
        label = f"webhook[{index}] ({hook.format}) {_public_url(hook.url)}"
        budget = hook.timeout * 2 + RETRY_DELAY + 1
        channels.append(_Channel(label, budget, partial(_post_with_retry, hook, headers, body)))
    return channels


def _run_channels(channels: list[_Channel], log: logging.Logger) -> list[str]:
    results: dict[int, str | None] = {}

    def run(index: int, channel: _Channel) -> None:
        try:
            channel.send()
        except _Failed as exc:
            results[index] = f"notify: {channel.label} failed: {exc}"
        except Exception as exc:
            results[index] = f"notify: {channel.label} failed: {type(exc).__name__}: {exc}"
        else:
            results[index] = None
            log.info("notify: sent %s", channel.label)

    threads = [
        threading.Thread(target=run, args=(index, channel), name=f"gfs-notify-{index}", daemon=True)
        for index, channel in enumerate(channels)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + max((channel.budget for channel in channels), default=0)
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    problems: list[str] = []
    for index, channel in enumerate(channels):
        if index not in results:
            problems.append(f"notify: {channel.label} failed: not done within {channel.budget:g} s")
        elif results[index] is not None:
            problems.append(str(results[index]))
    return problems


def _public_url(url: str) -> str:
    """The URL without what may be a secret (user info, path, query: Slack's and Gotify's
    tokens live there)."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(invalid URL)"
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    rest = "/..." if parts.path.strip("/") or parts.query else ""
    return f"{parts.scheme}://{host}{port}{rest}"


def _smtp(email: EmailSettings, message: Message, report: RunReport) -> None:
    assert email.smtp_host is not None
    mail = build_email(email, message, report)
    password = _read_password(email.password_file) if email.username else None
    try:
        context = _tls_context(email.ca_file) if email.tls != "off" else None
        client: smtplib.SMTP
        if email.tls == "ssl":
            client = smtplib.SMTP_SSL(
                email.smtp_host, email.smtp_port, timeout=email.timeout, context=context
            )
        else:
            client = smtplib.SMTP(email.smtp_host, email.smtp_port, timeout=email.timeout)
        try:
            if email.tls == "starttls":
                client.starttls(context=context)
            if email.username and password is not None:
                client.login(email.username, password)
            refused = client.send_message(mail, from_addr=email.sender, to_addrs=list(email.to))
            with contextlib.suppress(smtplib.SMTPException, OSError):
                client.quit()
            if refused:  # the others got it
                raise smtplib.SMTPRecipientsRefused(refused)
        finally:
            client.close()
    except Exception as exc:
        hint = ": is ca_file its CA?" if email.ca_file else ": set ca_file to trust its CA"
        raise _Failed(_reason(exc, email.timeout, hint)) from None


def _tls_context(ca_file: str | None) -> ssl.SSLContext:
    """A verifying context trusting the system's CAs and `ca_file`."""
    context = ssl.create_default_context()
    if ca_file is not None:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise _Failed(f"cannot load ca_file {ca_file}: {detail}") from None
    return context


def _read_password(path: str | None) -> str:
    try:
        with open(str(path), encoding="utf-8") as handle:
            password = handle.readline().rstrip("\r\n")
    except OSError as exc:
        raise _Failed(f"cannot read password_file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise _Failed(f"password_file {path} is not UTF-8 text") from None
    if not password:
        raise _Failed(f"password_file {path} is empty (its first line is the password)")
    return password


def _sendmail(email: EmailSettings, message: Message, report: RunReport) -> None:
    mail = build_email(email, message, report)
    argv = [email.sendmail, "-t", "-oi"]
    try:
        done = subprocess.run(
            argv, input=mail.as_bytes(), capture_output=True, timeout=email.timeout, check=False
        )
    except FileNotFoundError:
        raise _Failed("not found: install a mail transfer agent, or set smtp") from None
    except subprocess.TimeoutExpired:
        raise _Failed(f"did not finish within {email.timeout:g} s (killed)") from None
    except OSError as exc:
        raise _Failed(f"cannot run it: {exc.strerror or exc}") from None
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        last = lines[-1].strip() if lines else "no error output"
        raise _Failed(f"exit status {done.returncode}: {last[:300]}")


def _post_with_retry(hook: WebhookSettings, headers: dict[str, str], body: bytes) -> None:
    try:
        _post(hook, headers, body)
    except _Retryable:
        time.sleep(RETRY_DELAY)
        try:
            _post(hook, headers, body)
        except _Retryable as exc:
            raise _Retryable(f"{exc} (tried twice)") from None


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect fails: following it would turn the POST into a GET."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _post(hook: WebhookSettings, headers: dict[str, str], body: bytes) -> None:
    """POST once; raises _Retryable (connection error, 5xx) or _Failed."""
    request = urllib.request.Request(hook.url, data=body, headers=headers, method="POST")
    opener = urllib.request.build_opener(_NoRedirects)
    try:
        response = opener.open(request, timeout=hook.timeout)
    except urllib.error.HTTPError as exc:
        with exc:
            reason = f"HTTP {exc.code} {exc.reason}{_answer(exc)}"
            if 300 <= exc.code < 400:
                reason += f" (redirect to {exc.headers.get('Location')}: set url to it)"
        raise (_Retryable if exc.code >= 500 else _Failed)(reason) from None
    except urllib.error.URLError as exc:
        cause = exc.reason
        if isinstance(cause, Exception):
            retry = isinstance(cause, OSError) and not isinstance(
                cause, TimeoutError | ssl.SSLError
            )
            raise (_Retryable if retry else _Failed)(_reason(cause, hook.timeout)) from None
        raise _Retryable(str(cause)) from None
    except (ConnectionError, http.client.HTTPException) as exc:
        raise _Retryable(_reason(exc, hook.timeout)) from None
    except Exception as exc:
        raise _Failed(_reason(exc, hook.timeout)) from None
    with contextlib.suppress(Exception), response:
        response.read(MAX_RESPONSE)  # answered 2xx: a body cut short changes nothing


def _answer(error: urllib.error.HTTPError) -> str:
    """': <first line of the answer>' (for the problem line), or ''."""
    try:
        text = error.read(MAX_RESPONSE).decode(errors="replace")
    except Exception:
        return ""
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f": {first[:200]}" if first else ""


def _reason(exc: BaseException, timeout: float, tls_hint: str = "") -> str:
    """One line saying why a network exchange failed."""
    if isinstance(exc, _Failed):
        return str(exc)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate verify failed ({exc.verify_message}){tls_hint}"
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed: {exc.reason or exc}"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name: {exc.strerror}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        return f"login refused: {exc.smtp_code} {_smtp_text(exc.smtp_error)}"
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        refused = ", ".join(
            f"{address} ({code} {_smtp_text(text)})"
            for address, (code, text) in exc.recipients.items()
        )
        return f"recipients refused: {refused}"
    if isinstance(exc, smtplib.SMTPResponseException):
        return f"server answered {exc.smtp_code} {_smtp_text(exc.smtp_error)}"
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return f"server closed the connection ({exc})"
    if isinstance(exc, smtplib.SMTPException):
        return str(exc).rstrip(".")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[0].lower() + exc.strerror[1:]
    return f"{type(exc).__name__}: {exc}"


def _smtp_text(text: bytes | str) -> str:
    decoded = text.decode(errors="replace") if isinstance(text, bytes) else text
    return " ".join(decoded.split())[:200]

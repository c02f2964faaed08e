"""Dead-man pings (Healthchecks.io convention): tell a monitor a run started, succeeded or
failed, so that it raises the alarm when a ping does not come.

    ping_url = "https://hc-ping.com/0b8e1f9a-..."

start() requests URL/start, success() URL, fail() URL/fail; with a body (the run's last log
lines, from a LogTail) it is a POST of text/plain. A ping is short: a few seconds at most, a
couple of retries on connection errors and 5xx, and it never raises: the monitor missing a
ping is what raises the alarm, gfs only logs a warning.
"""

from __future__ import annotations

import http.client
import logging
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from dataclasses import dataclass

from gfs_backup.core.validate import Collector

BODY_LIMIT = 10_000  # bytes of body sent (the end of it)
DEFAULT_TAIL_LINES = 50
USER_AGENT = "gfs-backup"


@dataclass
class _Outcome:
    error: str | None = "no answer"
    tries: int = 0


class Pinger:
    """Pings one check URL. `timeout`: seconds per request; `retries`: further tries after a
    connection error or 5xx, `pause` seconds apart; `deadline`: seconds for one ping in all."""

    def __init__(
        self,
        url: str,
        log: logging.Logger,
        timeout: float = 5.0,
        retries: int = 2,
        deadline: float = 10.0,
        pause: float = 1.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.log = log
        self.timeout = timeout
        self.retries = retries
        self.deadline = deadline
        self.pause = pause

    def start(self) -> bool:
        """The run started (the monitor measures its duration, and alerts if it never ends)."""
        return self.ping("/start")

    def success(self, body: str = "") -> bool:
        return self.ping("", body)

    def fail(self, body: str = "") -> bool:
        return self.ping("/fail", body)

    def ping(self, suffix: str, body: str = "") -> bool:
        """GET (POST with `body`) the URL with `suffix` added to its path; True when the
        monitor answered 2xx or 3xx. Failures are logged, never raised."""
        url = _with_suffix(self.url, suffix)
        outcome = _Outcome()
        # A worker thread, so that no server (one trickling its answer byte by byte
        # included) keeps the run longer than the deadline: past it, the thread is left to
        # end at its own socket timeout.
        worker = threading.Thread(
            target=self._attempts,
            args=(url, _cap(body), outcome, time.monotonic() + self.deadline),
            name="gfs-ping",
            daemon=True,
        )
        worker.start()
        worker.join(self.deadline)
        error = f"no answer within {self.deadline:g} s" if worker.is_alive() else outcome.error
        if error is None:
            self.log.debug("ping %s ok", url)
            return True
        tries = f" (after {outcome.tries} tries)" if outcome.tries > 1 else ""
        self.log.warning("ping %s failed: %s%s", url, error, tries)
        return False

    def _attempts(self, url: str, body: bytes | None, outcome: _Outcome, deadline: float) -> None:
        for attempt in range(self.retries + 1):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            outcome.tries = attempt + 1
            outcome.error, retry = _request(url, body, min(self.timeout, left))
            if outcome.error is None or not retry:
                return
            if attempt < self.retries:
                time.sleep(max(0.0, min(self.pause, deadline - time.monotonic())))


def _request(url: str, body: bytes | None, timeout: float) -> tuple[str | None, bool]:
    """One request: (None, _) when answered 2xx/3xx, else (what went wrong, worth a retry)."""
    request = urllib.request.Request(url, data=body, headers={"User-Agent": USER_AGENT})
    if body is not None:
        request.add_header("Content-Type", "text/plain; charset=utf-8")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read(1024)
        return None, False
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code} {exc.reason}", exc.code >= 500
    except urllib.error.URLError as exc:
        return _describe(exc.reason), True
    except (OSError, http.client.HTTPException) as exc:
        return _describe(exc), True
    except ValueError as exc:  # an invalid URL the config check let through
        return str(exc), False


def _describe(reason: object) -> str:
    if isinstance(reason, TimeoutError):
        return "timed out"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


def _cap(body: str) -> bytes | None:
    """The body as UTF-8, only its last BODY_LIMIT bytes (from a line start if it can)."""
    if not body:
        return None
    data = body.encode("utf-8", errors="replace")
    if len(data) <= BODY_LIMIT:
        return data
    data = data[-BODY_LIMIT:]
    newline = data.find(b"\n")
    if 0 <= newline < BODY_LIMIT // 2:
        data = data[newline + 1 :]
    return data.decode("utf-8", errors="ignore").encode("utf-8")


def _with_suffix(url: str, suffix: str) -> str:
    """`url` with `suffix` added to its path (any query string stays at the end)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=parts.path.rstrip("/") + suffix))


def check_ping_url(value: object, key: str, collector: Collector) -> str | None:
    """A ping URL from the config: http(s) with a host; None (and a problem) otherwise."""
    example = "e.g. https://hc-ping.com/<uuid>"
    if not isinstance(value, str):
        collector.add(key, f"expected a URL string, {example}")
        return None
    try:
        parts = urllib.parse.urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        collector.add(key, f"{value!r} is not a valid URL: {exc}")
        return None
    if parts.scheme not in ("http", "https"):
        collector.add(key, f"{value!r} is not an http:// or https:// URL, {example}")
        return None
    if not parts.hostname:
        collector.add(key, f"{value!r} has no host name, {example}")
        return None
    if any(char.isspace() for char in value) or parts.fragment:
        collector.add(key, f"{value!r} must not contain spaces or a #fragment")
        return None
    return value


class LogTail(logging.Handler):
    """Keeps the last `lines` formatted log lines (thread-safe), to send with a failure ping."""

    def __init__(self, lines: int = DEFAULT_TAIL_LINES, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self._lines: deque[str] = deque(maxlen=lines)
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:
            self.handleError(record)
            return
        with self._guard:
            self._lines.extend(text.splitlines() or [""])

    def lines(self) -> list[str]:
        with self._guard:
            return list(self._lines)

    def text(self) -> str:
        """The lines kept, each ending with a newline ("" when none)."""
        return "".join(f"{line}\n" for line in self.lines())

    def clear(self) -> None:
        with self._guard:
            self._lines.clear()

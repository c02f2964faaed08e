"""The known_hosts file of gfs (OpenSSH format) and the messages about host keys.

Pure standard library: parsing, lookup (plain, wildcard and hashed entries), fingerprints
as `ssh-keygen -l` prints them, and recording a key. ssh.py verifies the key a host sends
against these entries; `gfs hosts trust` records keys with `record_host_key`.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from gfs_backup.core.config import Host
from gfs_backup.core.errors import ExitCode, GfsError

DEFAULT_KNOWN_HOSTS = Path("/etc/gfs/known_hosts")
HASHED_PREFIX = "|1|"


class HostKeyError(GfsError):
    """The host's key is unknown, changed or revoked: gfs refuses to talk to it."""

    exit_code = ExitCode.FAILED


@dataclass(frozen=True)
class HostKey:
    """A public host key: its type (`ssh-ed25519`) and its base64 blob."""

    type: str
    base64: str

    @property
    def fingerprint(self) -> str:
        """`SHA256:...` as `ssh-keygen -lf` prints it."""
        digest = hashlib.sha256(base64.b64decode(self.base64)).digest()
        return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")

    def __str__(self) -> str:
        return f"{self.type} {self.fingerprint}"


@dataclass(frozen=True)
class Entry:
    """One line of a known_hosts file: host patterns, the key, and a marker if any."""

    patterns: tuple[str, ...]
    key: HostKey
    marker: str = ""  # "", "@revoked" or "@cert-authority"

    def matches(self, name: str) -> bool:
        """True if `name` (see `lookup_name`) matches; a matching `!pattern` vetoes."""
        found = False
        for pattern in self.patterns:
            negated = pattern.startswith("!")
            if _pattern_matches(pattern[1:] if negated else pattern, name):
                if negated:
                    return False
                found = True
        return found


class Verdict(enum.Enum):
    KNOWN = "known"
    UNKNOWN = "unknown"
    CHANGED = "changed"
    REVOKED = "revoked"


def lookup_name(address: str, port: int) -> str:
    """The name OpenSSH files a host under: `address`, or `[address]:port` off port 22."""
    return address if port == 22 else f"[{address}]:{port}"


def known_hosts_path(host: Host) -> Path:
    return Path(host.known_hosts) if host.known_hosts else DEFAULT_KNOWN_HOSTS


def _pattern_matches(pattern: str, name: str) -> bool:
    if pattern.startswith(HASHED_PREFIX):
        try:
            salt, digest = (base64.b64decode(part) for part in pattern[3:].split("|", 1))
        except (ValueError, binascii.Error):
            return False
        mac = hmac.new(salt, name.encode(), hashlib.sha1).digest()
        return hmac.compare_digest(mac, digest)
    # OpenSSH wildcards are only `*` and `?`: `[` is literal, as in `[host]:port`.
    regex = "".join(
        ".*" if char == "*" else "." if char == "?" else re.escape(char) for char in pattern
    )
    return re.fullmatch(regex, name, re.IGNORECASE) is not None


def parse_known_hosts(text: str) -> list[Entry]:
    """The entries of a known_hosts file; comments, blank and malformed lines are skipped."""
    entries = []
    for line in text.splitlines():
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        marker = fields.pop(0) if fields[0].startswith("@") else ""
        if len(fields) < 3:
            continue
        try:
            base64.b64decode(fields[2], validate=True)
        except binascii.Error:
            continue
        patterns = tuple(fields[0].split(","))
        entries.append(Entry(patterns, HostKey(fields[1], fields[2]), marker))
    return entries


def read_known_hosts(path: Path) -> list[Entry]:
    """The entries of the file at `path`; none if it does not exist."""
    try:
        return parse_known_hosts(path.read_text(encoding="utf-8", errors="replace"))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise HostKeyError(f"cannot read known hosts file {path}: {exc.strerror}") from None


def recorded_keys(entries: list[Entry], name: str) -> list[HostKey]:
    """The keys recorded for `name` (not revoked ones, not certificate authorities)."""
    return [entry.key for entry in entries if not entry.marker and entry.matches(name)]


def check_host_key(entries: list[Entry], name: str, key: HostKey) -> tuple[Verdict, HostKey | None]:
    """Is `key` the key recorded for `name`? CHANGED also returns the recorded key."""
    if any(entry.marker == "@revoked" and entry.key == key for entry in entries):
        return Verdict.REVOKED, None
    recorded = recorded_keys(entries, name)
    if key in recorded:
        return Verdict.KNOWN, None
    same_type = [known for known in recorded if known.type == key.type]
    if same_type:
        return Verdict.CHANGED, same_type[0]
    return Verdict.UNKNOWN, None


def where(host: Host) -> str:
    return f"host {host.name} ({host.address}:{host.port})"


def unknown_key_message(host: Host, key: HostKey) -> str:
    return (
        f"{where(host)}: unknown host key {key}; check the fingerprint and run "
        f"`gfs hosts trust {host.name}`"
    )


def changed_key_message(host: Host, key: HostKey, recorded: HostKey, path: Path) -> str:
    return (
        f"host key of {host.name} ({host.address}:{host.port}) CHANGED: it sent {key}, "
        f"{path} has {recorded.fingerprint} (possible man-in-the-middle); if the host was "
        f"reinstalled, remove the old key from {path} and run `gfs hosts trust {host.name}`"
    )


def revoked_key_message(host: Host, key: HostKey, path: Path) -> str:
    return f"{where(host)}: its host key {key} is marked @revoked in {path}: refused"


def verify_host_key(host: Host, key: HostKey) -> None:
    """Raise HostKeyError unless `key` is recorded for `host` in its known_hosts file."""
    path = known_hosts_path(host)
    verdict, recorded = check_host_key(
        read_known_hosts(path), lookup_name(host.address, host.port), key
    )
    if verdict is Verdict.UNKNOWN:
        raise HostKeyError(unknown_key_message(host, key))
    if verdict is Verdict.CHANGED:
        assert recorded is not None
        raise HostKeyError(changed_key_message(host, key, recorded, path))
    if verdict is Verdict.REVOKED:
        raise HostKeyError(revoked_key_message(host, key, path))


def replace_lines(text: str, name: str, key: HostKey) -> str:
    """`text` without the plain or hashed lines for exactly `name`, plus a line for `key`.

    Lines that match `name` only through a wildcard or a list of several hosts stay: gfs
    does not rewrite what an admin wrote for other hosts too.
    """
    kept = []
    for line in text.splitlines():
        entries = parse_known_hosts(line)
        only_this_host = (
            entries
            and not entries[0].marker
            and len(entries[0].patterns) == 1
            and "*" not in entries[0].patterns[0]
            and "?" not in entries[0].patterns[0]
            and entries[0].matches(name)
        )
        if not only_this_host:
            kept.append(line)
    kept.append(f"{name} {key.type} {key.base64}")
    return "".join(f"{line}\n" for line in kept)


def record_host_key(path: Path, name: str, key: HostKey, replace: bool) -> None:
    """Add `key` for `name` to the file at `path` (created 0600, with its directory 0700).

    With `replace`, the lines for `name` alone are dropped first. Written to a temporary
    file, fsynced and renamed: the file is never seen half-written.
    """
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            text = ""
        if replace:
            text = replace_lines(text, name, key)
        else:
            text = (text if not text or text.endswith("\n") else text + "\n") + (
                f"{name} {key.type} {key.base64}\n"
            )
        fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:  # mkstemp makes it 0600
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise HostKeyError(
            f"cannot write known hosts file {path}: {exc.strerror or exc}; "
            "check that the directory is writable (run gfs as root)"
        ) from None

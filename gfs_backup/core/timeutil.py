"""Time zones and ISO-8601 timestamps: parsing with clear errors, no clock inside."""

from __future__ import annotations

import os
from datetime import datetime, tzinfo
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

LOCAL_ZONE_NAME = "local"


def resolve_zone(name: str) -> tzinfo:
    """Return the IANA zone `name`; "local" means the host's zone ($TZ, /etc/localtime, UTC).

    Raises ValueError with a message fit for the user when the zone is unknown.
    """
    if name == LOCAL_ZONE_NAME:
        return _host_zone()
    if not name or name.startswith(("/", ".")) or ".." in name:
        raise ValueError(f"unknown time zone {name!r}: use an IANA name such as Europe/Brussels")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {name!r}: use an IANA name such as Europe/Brussels or UTC"
        ) from None


def _host_zone() -> tzinfo:
    tz_env = os.environ.get("TZ", "").lstrip(":")
    if tz_env:
        try:
            return ZoneInfo(tz_env)
        except (ZoneInfoNotFoundError, ValueError):
            pass
    localtime = Path("/etc/localtime")
    if localtime.is_symlink():
        # Debian: /etc/localtime -> /usr/share/zoneinfo/Europe/Brussels; use the IANA key.
        target = str(localtime.resolve())
        if "/zoneinfo/" in target:
            try:
                return ZoneInfo(target.split("/zoneinfo/", 1)[1])
            except (ZoneInfoNotFoundError, ValueError):
                pass
    if localtime.exists():
        with localtime.open("rb") as handle:
            return ZoneInfo.from_file(handle, key="localtime")
    return ZoneInfo("UTC")


def parse_timestamp(text: str, zone: tzinfo) -> datetime:
    """Parse one ISO-8601 timestamp; a naive one is wall-clock time in `zone`.

    Returns an aware datetime. Raises ValueError when `text` is not ISO-8601.
    A wall-clock time that DST makes ambiguous resolves to its first occurrence (fold=0).
    """
    value = text.strip()
    if value.endswith(("z", "Z")):
        value = value[:-1] + "+00:00"
    stamp = datetime.fromisoformat(value)
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=zone)
    return stamp


def format_timestamp(stamp: datetime, zone: tzinfo) -> str:
    """ISO-8601 in `zone`, with its UTC offset, to the second (microseconds if present)."""
    return stamp.astimezone(zone).isoformat()

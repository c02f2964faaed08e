"""Bandwidth limits: a target's `bandwidth`, shared by the jobs writing to it at once.

`bandwidth = "100M"` in `[target.NAME]` caps what gfs sends to that target at 100 MiB/s in
total. The jobs of one `gfs run` that write to the target at the same time (at most
`concurrency` of them) each get an equal share, so the sum stays under the limit even
when external programs move the data (`qemu-img convert -r`). Copies that gfs makes
itself are paced by `Throttle`, fed with the byte counts of the export's progress.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable

RATE_RE = re.compile(r"(?i)^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?(?:/s)?\s*$")
UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
MIN_RATE = 64 << 10  # below 64 KiB/s a backup of anything real never ends


def parse_rate(value: object) -> int:
    """Bytes per second from an integer or a string like "100M", "1.5G", "800K/s" (binary
    units); 0 means no limit. Raises ValueError with what is accepted."""
    if isinstance(value, bool):
        raise ValueError('expected bytes per second such as "100M" (MiB/s), or 0')
    if isinstance(value, int):
        rate = value
    elif isinstance(value, str) and (match := RATE_RE.match(value)):
        rate = int(float(match.group(1)) * UNITS[match.group(2).upper()])
    else:
        raise ValueError(
            f'expected bytes per second such as "100M" (MiB/s) or 0 for no limit, got {value!r}'
        )
    if rate < 0 or 0 < rate < MIN_RATE:
        raise ValueError(f"{value!r} is too low: use 0 (no limit) or at least 64K")
    return rate


def format_rate(rate: int) -> str:
    if rate >= UNITS["M"]:
        return f"{rate / UNITS['M']:.4g} MiB/s"
    return f"{rate / UNITS['K']:.4g} KiB/s"


def shares(
    limits: dict[str, int], targets_of_jobs: Iterable[str], concurrency: int
) -> dict[str, int]:
    """Per target, the rate each job gets: the target's limit divided by the number of its
    jobs that can run at once (0 = no limit)."""
    counts: dict[str, int] = {}
    for target in targets_of_jobs:
        counts[target] = counts.get(target, 0) + 1
    return {
        target: limit // max(1, min(concurrency, counts.get(target, 1)))
        for target, limit in limits.items()
        if limit
    }


class Throttle:
    """Paces a stream of byte counts to at most `rate` bytes per second on average.

    `consume(count)` returns once the bytes seen so far may have been moved at `rate`,
    sleeping as needed; a pause in the stream does not earn a later burst beyond one
    second's worth."""

    def __init__(
        self,
        rate: int,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError("a throttle needs a positive rate")
        self.rate = rate
        self._clock = clock
        self._sleep = sleep
        self._start = clock()
        self._moved = 0

    def consume(self, count: int) -> None:
        now = self._clock()
        earliest = now - 1.0  # the credit of an idle stream is capped at one second
        if self._start + self._moved / self.rate < earliest:
            self._start, self._moved = earliest, 0
        self._moved += count
        delay = self._start + self._moved / self.rate - now
        if delay > 0:
            self._sleep(delay)

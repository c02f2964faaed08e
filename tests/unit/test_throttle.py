"""Bandwidth limits: parsing, sharing a target's limit between jobs, pacing."""

from __future__ import annotations

import pytest

from gfs_backup.core.throttle import Throttle, format_rate, parse_rate, shares

pytestmark = pytest.mark.unit
MiB = 1 << 20


@pytest.mark.parametrize(
    ("value", "rate"),
    [
        (0, 0),
        ("0", 0),
        (1 << 20, MiB),
        ("100M", 100 * MiB),
        ("100MiB/s", 100 * MiB),
        ("1.5G", 3 * 512 * MiB),
        ("800k", 800 * 1024),
        ("64K/s", 64 * 1024),
        ("2 MB", 2 * MiB),
    ],
)
def test_rates_in_binary_units(value: object, rate: int) -> None:
    assert parse_rate(value) == rate


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("fast", 'expected bytes per second such as "100M"'),
        ("-5M", "expected bytes per second"),
        (-1, "too low"),
        ("10K", "too low"),
        (True, "expected bytes per second"),
        (1.5, "expected bytes per second"),
    ],
)
def test_bad_rates_say_what_is_accepted(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_rate(value)


def test_format_rate() -> None:
    assert format_rate(100 * MiB) == "100 MiB/s"
    assert format_rate(512 * 1024) == "512 KiB/s"


def test_a_target_limit_is_split_between_the_jobs_that_run_at_once() -> None:
    limits = {"nas": 100 * MiB, "usb": 0, "tape": 30 * MiB}
    jobs = ["nas", "nas", "nas", "usb", "tape"]
    assert shares(limits, jobs, concurrency=1) == {"nas": 100 * MiB, "tape": 30 * MiB}
    assert shares(limits, jobs, concurrency=2) == {"nas": 50 * MiB, "tape": 30 * MiB}
    assert shares(limits, jobs, concurrency=8) == {"nas": 100 * MiB // 3, "tape": 30 * MiB}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_throttle_paces_to_the_rate() -> None:
    clock = FakeClock()
    throttle = Throttle(10 * MiB, clock, clock.sleep)
    for _ in range(10):
        throttle.consume(8 * MiB)
    assert clock.now - 1000.0 == pytest.approx(8.0)  # 80 MiB at 10 MiB/s


def test_a_slow_source_is_not_slowed_further() -> None:
    clock = FakeClock()
    throttle = Throttle(10 * MiB, clock, clock.sleep)
    for _ in range(5):
        clock.now += 2.0  # reading 8 MiB takes 2 s: slower than the limit
        throttle.consume(8 * MiB)
    assert clock.slept == []


def test_an_idle_stream_earns_at_most_one_second_of_burst() -> None:
    clock = FakeClock()
    throttle = Throttle(10 * MiB, clock, clock.sleep)
    clock.now += 60.0  # a minute without data (a slow snapshot, a pause)
    start = clock.now
    for _ in range(10):
        throttle.consume(10 * MiB)
    assert clock.now - start == pytest.approx(9.0)  # 100 MiB: 10 s less the 1 s credit


def test_a_throttle_needs_a_rate() -> None:
    with pytest.raises(ValueError):
        Throttle(0)

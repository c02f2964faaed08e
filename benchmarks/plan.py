"""Benchmark of the retention planner: `python benchmarks/plan.py [--sizes N,...] [--quick]`.

For each size n: n seeded timestamps (Europe/Brussels, four years, some identical), two
baselines (A: parse the ISO strings with datetime.fromisoformat and sort them; B: sort the
parsed times alone), read_timestamps, and plan() for each semantics on the parsed
generations. For 100k also the end-to-end `gfs plan --timestamps FILE --json` (wall time).
Exits 1 if planning 100k generations takes 1 s or more for any semantics.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import TypeVar
from zoneinfo import ZoneInfo

from gfs_backup.actions.plan import read_timestamps
from gfs_backup.retention import RetentionRules, Semantics, parse_keep_within, plan

T = TypeVar("T")
ZONE_NAME = "Europe/Brussels"
ZONE = ZoneInfo(ZONE_NAME)
START = datetime(2021, 1, 1, tzinfo=ZONE)
SPAN_SECONDS = 4 * 365 * 86400  # 10k: ~3.5 h apart, 100k: ~21 min, 1M: ~2 min
DUPLICATES = 0.02  # share of timestamps identical to another one
SEED = 20260101
LIMIT_SIZE, LIMIT_SECONDS = 100_000, 1.0
GROWTH_OK = 15.0  # time(n)/time(n/10): ~10-12 for n log n, 100 for n squared
CLI_ARGS = ["--semantics", "borg", "--keep-last", "3", "--keep-daily", "7", "--keep-weekly", "4"]
CLI_ARGS += ["--keep-monthly", "12", "--keep-yearly", "3", "--keep-within", "2w"]


def keep_rules(semantics: Semantics, within: str | None = None) -> RetentionRules:
    """keep-last 3, daily 7, weekly 4, monthly 12, yearly 3 (+ keep-within) for pbs/borg/restic."""
    keep_within = parse_keep_within(within, semantics) if within else None
    return RetentionRules(
        semantics,
        keep_last=3,
        keep_daily=7,
        keep_weekly=4,
        keep_monthly=12,
        keep_yearly=3,
        keep_within=keep_within,
    )


def rule_sets() -> dict[str, RetentionRules]:
    return {
        "gfs": RetentionRules("gfs", sons=7, fathers=4, grandfathers=12, yearly=3),
        "pbs": keep_rules("pbs"),
        "borg": keep_rules("borg"),
        "borg+within": keep_rules("borg", "2w"),
        "restic": keep_rules("restic"),
        "restic+within": keep_rules("restic", "1m15d"),
    }


def make_lines(n: int) -> list[str]:
    """n ISO-8601 timestamps with Brussels offsets, in shuffled order, deterministic."""
    rng = random.Random(SEED + n)
    seconds = [rng.randrange(SPAN_SECONDS) for _ in range(n)]
    for index in range(1, n):
        if rng.random() < DUPLICATES:
            seconds[index] = seconds[rng.randrange(index)]
    utc_start = START.astimezone(ZoneInfo("UTC"))
    return [(utc_start + timedelta(seconds=s)).astimezone(ZONE).isoformat() for s in seconds]


def best_of(runs: int, func: Callable[[], T]) -> tuple[float, T]:
    """The fastest of `runs` calls of func (seconds) and the last call's result."""
    best = float("inf")
    for _ in range(runs):
        began = time.perf_counter()
        result = func()
        best = min(best, time.perf_counter() - began)
    return best, result


def time_cli(lines: list[str], now: datetime) -> tuple[float, int]:
    """Wall time and exit status of `gfs plan --timestamps FILE --json` in a subprocess."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "stamps.txt"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        command = [sys.executable, "-m", "gfs_backup", "plan", "--timestamps", str(path)]
        command += [*CLI_ARGS, "--at", now.isoformat(), "--tz", ZONE_NAME, "--json"]
        began = time.perf_counter()
        done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        elapsed = time.perf_counter() - began
    if done.returncode != 0:
        print(done.stderr.decode(errors="replace"), file=sys.stderr)
    return elapsed, done.returncode


def bench_size(n: int, cli: bool) -> tuple[dict[str, float], tuple[float, int] | None]:
    """Seconds per row name (baselines, read_timestamps, each semantics) for size n."""
    lines = make_lines(n)
    runs = 3 if n <= 100_000 else 1
    parsed = [datetime.fromisoformat(line) for line in lines]
    times = {
        "baseline A": best_of(runs, lambda: sorted(datetime.fromisoformat(x) for x in lines))[0],
        "baseline B": best_of(runs, lambda: sorted(parsed))[0],
    }
    times["read_timestamps"], gens = best_of(runs, lambda: read_timestamps(lines, "bench", ZONE))
    now = max(parsed) + timedelta(hours=1)
    for name, rules in rule_sets().items():
        times[name], result = best_of(runs, partial(plan, gens, rules, now, ZONE))
        if len(result.keep) + len(result.prune) != n or not result.keep:
            raise SystemExit(f"{name}: the plan does not cover the {n} generations")
    return times, (time_cli(lines, now) if cli else None)


def print_table(results: dict[int, dict[str, float]]) -> None:
    sizes = sorted(results)
    print(f"{'n':>9}  {'what':<16} {'seconds':>9} {'µs/gen':>8} {'x base A':>9}  growth")
    for n in sizes:
        base_a = results[n]["baseline A"]
        smaller = results.get(n // 10) if n % 10 == 0 else None
        for name, seconds in results[n].items():
            growth = ""
            if smaller is not None and smaller[name] > 0:
                # Judged against sorting the same data in the same run (n log n, with the
                # same cache effects); n squared would grow x100.
                ratio = seconds / smaller[name]
                sort_ratio = results[n]["baseline B"] / smaller["baseline B"]
                ok = ratio < max(GROWTH_OK, 2 * sort_ratio)
                verdict = "n log n OK" if ok else "SUPERLINEAR?"
                growth = f"x{ratio:5.1f} vs n/10 (sort x{sort_ratio:4.1f})  {verdict}"
            per_gen = seconds / n * 1e6
            ratio_a = seconds / base_a
            print(f"{n:>9}  {name:<16} {seconds:>9.4f} {per_gen:>8.2f} {ratio_a:>9.2f}  {growth}")
        print()


def parse_args(argv: list[str] | None) -> list[int]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated sizes")
    parser.add_argument("--quick", action="store_true", help="only 10k and 100k")
    args = parser.parse_args(argv)
    if args.quick:
        return [10_000, 100_000]
    return sorted({int(part) for part in args.sizes.split(",") if part.strip()})


def main(argv: list[str] | None = None) -> int:
    sizes = parse_args(argv)
    results: dict[int, dict[str, float]] = {}
    cli: tuple[float, int] | None = None
    for n in sizes:
        print(f"benchmarking n={n} ...", file=sys.stderr, flush=True)
        results[n], cli_run = bench_size(n, cli=n == LIMIT_SIZE)
        cli = cli_run or cli
    print(f"python {sys.version.split()[0]}, zone {ZONE_NAME}, best of 3 (1 run above 100k)\n")
    print_table(results)
    if cli is not None:
        print(
            f"CLI end to end, n={LIMIT_SIZE}: gfs plan --timestamps FILE {' '.join(CLI_ARGS)}"
            f" --json: {cli[0]:.2f} s wall (exit {cli[1]})"
        )
    slow = {
        name: seconds
        for name, seconds in results.get(LIMIT_SIZE, {}).items()
        if name not in ("baseline A", "baseline B", "read_timestamps") and seconds >= LIMIT_SECONDS
    }
    for name, seconds in slow.items():
        print(f"TOO SLOW: planning {LIMIT_SIZE} generations with {name} took {seconds:.2f} s")
    if cli is not None and cli[1] != 0:
        print("CLI run failed", file=sys.stderr)
        return 1
    return 1 if slow else 0


if __name__ == "__main__":
    sys.exit(main())

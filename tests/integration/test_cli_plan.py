"""`gfs plan` as a user runs it: the prune simulator, the simulation, configured jobs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from freezegun import freeze_time

from tests.conftest import RunGfs, write_lines

pytestmark = pytest.mark.integration

STAMPS = [
    "2026-11-20T10:00:00Z",
    "2026-11-21T10:00:00Z",
    "2026-11-22T09:00:00Z",
    "2026-11-22T10:00:00Z",
    "2026-11-23T08:00:00Z",
]


def plan_json(run_gfs: RunGfs, *args: str) -> dict[str, list[dict[str, object]]]:
    result = run_gfs("plan", *args, "--json")
    assert result.exit_code == 0, result.output
    data: dict[str, list[dict[str, object]]] = json.loads(result.stdout)
    return data


def test_json_names_kept_with_reasons_and_pruned(run_gfs: RunGfs, tmp_path: Path) -> None:
    stamps = write_lines(tmp_path / "stamps", STAMPS)
    data = plan_json(
        run_gfs,
        "--timestamps",
        str(stamps),
        "--semantics",
        "borg",
        "--keep-daily",
        "2",
        "--tz",
        "UTC",
        "--at",
        "2026-11-23T12:00:00Z",
    )
    assert set(data) == {"keep", "prune"}
    assert [(k["time"], k["reasons"]) for k in data["keep"]] == [
        ("2026-11-23T08:00:00+00:00", ["keep-daily"]),
        ("2026-11-22T10:00:00+00:00", ["keep-daily"]),
    ]
    assert [p["time"] for p in data["prune"]] == [
        "2026-11-22T09:00:00+00:00",
        "2026-11-21T10:00:00+00:00",
        "2026-11-20T10:00:00+00:00",
    ]


def test_times_are_shown_in_the_requested_zone(run_gfs: RunGfs, tmp_path: Path) -> None:
    stamps = write_lines(tmp_path / "stamps", ["2026-07-01T22:30:00Z", "2026-07-01 08:00"])
    data = plan_json(
        run_gfs,
        "--timestamps",
        str(stamps),
        "--semantics",
        "restic",
        "--keep-daily",
        "5",
        "--tz",
        "Europe/Brussels",
    )
    # 22:30Z is 00:30 on July 2 in Brussels (CEST), a day of its own; the naive line is
    # wall-clock time in --tz.
    assert [k["time"] for k in data["keep"]] == [
        "2026-07-02T00:30:00+02:00",
        "2026-07-01T08:00:00+02:00",
    ]


@freeze_time("2026-11-23T12:00:00Z")
def test_borg_keep_within_counts_back_from_the_clock(run_gfs: RunGfs, tmp_path: Path) -> None:
    stamps = write_lines(
        tmp_path / "stamps",
        ["2026-11-23T08:00:00Z", "2026-11-22T13:00:00Z", "2026-11-22T11:00:00Z"],
    )
    data = plan_json(
        run_gfs,
        "--timestamps",
        str(stamps),
        "--semantics",
        "borg",
        "--keep-within",
        "1d",
        "--tz",
        "UTC",
    )
    assert [k["time"] for k in data["keep"]] == [
        "2026-11-23T08:00:00+00:00",
        "2026-11-22T13:00:00+00:00",
    ]
    assert [p["time"] for p in data["prune"]] == ["2026-11-22T11:00:00+00:00"]


@freeze_time("2026-12-30T12:00:00Z")
def test_borg_keep_within_alone_never_prunes_the_newest(run_gfs: RunGfs, tmp_path: Path) -> None:
    # borg itself would delete all three: nothing is within 1 day of the clock. gfs keeps
    # the newest and says why.
    stamps = write_lines(tmp_path / "stamps", STAMPS[:3])
    data = plan_json(
        run_gfs,
        "--timestamps",
        str(stamps),
        "--semantics",
        "borg",
        "--keep-within",
        "1d",
        "--tz",
        "UTC",
    )
    assert [(k["time"], k["reasons"]) for k in data["keep"]] == [
        ("2026-11-22T09:00:00+00:00", ["newest"])
    ]


def test_restic_keep_within_counts_back_from_the_newest(run_gfs: RunGfs, tmp_path: Path) -> None:
    stamps = write_lines(tmp_path / "stamps", STAMPS)
    data = plan_json(
        run_gfs,
        "--timestamps",
        str(stamps),
        "--semantics",
        "restic",
        "--keep-within",
        "1d1h",
        "--tz",
        "UTC",
        "--at",
        "2027-06-01T00:00:00Z",
    )
    # newest 11-23 08:00 minus 1 day 1 hour = 11-22 07:00; strictly after is kept.
    assert [k["time"] for k in data["keep"]] == [
        "2026-11-23T08:00:00+00:00",
        "2026-11-22T10:00:00+00:00",
        "2026-11-22T09:00:00+00:00",
    ]


def test_default_policy_is_classic_gfs_with_calendar(run_gfs: RunGfs, tmp_path: Path) -> None:
    # Four weeks of Monday..Saturday runs; 2026-11-02 is the first Monday of November.
    days = [f"2026-11-{day:02d}T01:00:00" for day in range(2, 29) if (day - 2) % 7 != 6]
    stamps = write_lines(tmp_path / "stamps", days)
    result = run_gfs(
        "plan",
        "--timestamps",
        str(stamps),
        "--tz",
        "Europe/Brussels",
        "--at",
        "2026-11-28T12:00:00",
    )
    assert result.exit_code == 0, result.output
    assert "Rules (policy classic-gfs) gfs: sons 6, fathers 4, grandfathers 12" in result.stdout
    calendar = result.stdout.split("Calendar")[1].splitlines()[2:]
    assert calendar == [
        "  2026-11-02 GF   -    -    -    -    -",
        "  2026-11-09 F    -    -    -    -    -",
        "  2026-11-16 F    -    -    -    -    -",
        "  2026-11-23 F    S    S    S    S    S",
    ]
    assert "keep 9, prune 15" in result.stdout


def test_simulating_a_year_keeps_twelve_grandfathers(run_gfs: RunGfs) -> None:
    data = plan_json(
        run_gfs,
        "--policy",
        "classic-gfs",
        "--simulate",
        "365",
        "--tz",
        "Europe/Brussels",
        "--at",
        "2026-01-01T00:00:00",
    )
    grandfathers = [k["time"] for k in data["keep"] if "grandfather" in k["reasons"]]
    # The first run, Thursday January 1, is the first generation of its week and so
    # January's first father: it takes the grandfather role of the Monday before it.
    first_mondays = [
        "2026-12-07",
        "2026-11-02",
        "2026-10-05",
        "2026-09-07",
        "2026-08-03",
        "2026-07-06",
        "2026-06-01",
        "2026-05-04",
        "2026-04-06",
        "2026-03-02",
        "2026-02-02",
        "2026-01-01",
    ]
    assert [str(time)[:10] for time in grandfathers] == first_mondays
    sons = [str(k["time"])[:10] for k in data["keep"] if "son" in k["reasons"]]
    assert sons == [
        "2026-12-31",
        "2026-12-30",
        "2026-12-29",
        "2026-12-28",
        "2026-12-26",
        "2026-12-25",
    ]
    fathers = [str(k["time"])[:10] for k in data["keep"] if "father" in k["reasons"]]
    assert fathers == ["2026-12-28", "2026-12-21", "2026-12-14", "2026-12-07"]
    assert len(data["keep"]) == 20
    # Every Monday..Saturday of 2026 ran once: 313 runs, each kept or pruned.
    assert len(data["keep"]) + len(data["prune"]) == 313


def test_simulation_text_reports_runs(run_gfs: RunGfs) -> None:
    result = run_gfs(
        "plan",
        "--simulate",
        "14",
        "--schedule",
        "daily",
        "--semantics",
        "pbs",
        "--keep-last",
        "3",
        "--tz",
        "UTC",
        "--at",
        "2026-11-01T12:00:00Z",
    )
    assert result.exit_code == 0, result.output
    assert "14 run(s), at most 4 generation(s) held at once" in result.stdout
    assert "keep 3, prune 11" in result.stdout


@pytest.mark.parametrize(
    ("args", "lines", "code", "message"),
    [
        (["--tz", "Mars/Olympus"], STAMPS, 3, "--tz: unknown time zone 'Mars/Olympus'"),
        ([], ["2026-11-20T10:00:00Z", "yesterday"], 3, "stamps:2: cannot parse 'yesterday'"),
        ([], ["# only a comment", ""], 3, "no timestamps in the file"),
        (
            ["--semantics", "pbs", "--keep-daily", "-2"],
            STAMPS,
            3,
            "--keep-daily: -2 is not allowed: use 0 or more, or -1 for unlimited",
        ),
        (["--semantics", "borg", "--keep-daily", "0"], STAMPS, 3, "keeps nothing"),
        (["--sons", "0", "--fathers", "0"], STAMPS, 3, "keeps nothing"),
        (
            ["--semantics", "pbs", "--keep-within", "2d"],
            STAMPS,
            3,
            "--keep-within: Proxmox (pbs semantics) has no keep-within",
        ),
        (
            ["--semantics", "borg", "--keep-within", "1y2m"],
            STAMPS,
            3,
            "--keep-within: invalid borg interval '1y2m'",
        ),
        (
            ["--semantics", "restic", "--keep-within", "2w"],
            STAMPS,
            3,
            "--keep-within: invalid restic duration '2w'",
        ),
        (["--keep-daily", "3"], STAMPS, 3, "--keep-daily: keep-daily is a rule of pbs, borg"),
        (["--semantics", "restic"], STAMPS, 3, "policy 'classic-gfs' uses gfs semantics"),
        (["--at", "noon"], STAMPS, 3, "--at: cannot parse 'noon'"),
        (["--policy", "no-such-policy"], STAMPS, 3, "unknown policy 'no-such-policy'"),
        (["--semantics", "zfs"], STAMPS, 2, "Invalid value for '--semantics'"),
        (["--simulate", "0"], STAMPS, 2, "Invalid value for '--simulate'"),
        (["--schedule", "Funday"], STAMPS, 3, "--schedule: unknown weekday 'funday'"),
    ],
)
def test_bad_input_gets_one_clear_line(
    run_gfs: RunGfs, tmp_path: Path, args: list[str], lines: list[str], code: int, message: str
) -> None:
    stamps = write_lines(tmp_path / "stamps", lines)
    extra = ["--simulate", "3"] if "--schedule" in args else []
    result = run_gfs("plan", "--timestamps", str(stamps), *args, *extra)
    assert result.exit_code == code, result.output
    assert message in result.stderr
    assert result.stdout == ""
    if code == 3:
        assert all(line.startswith("gfs: error: ") for line in result.stderr.splitlines())


def test_missing_timestamps_file(run_gfs: RunGfs, tmp_path: Path) -> None:
    result = run_gfs("plan", "--timestamps", str(tmp_path / "nope"))
    assert result.exit_code == 3
    assert result.stderr == (
        f"gfs: error: {tmp_path / 'nope'}: cannot read timestamps: No such file or directory\n"
    )


def test_every_bad_line_is_reported_with_its_number(run_gfs: RunGfs, tmp_path: Path) -> None:
    stamps = write_lines(tmp_path / "stamps", ["2026-11-20", "x", "2026-11-21", "y"])
    result = run_gfs("plan", "--timestamps", str(stamps))
    assert result.exit_code == 3
    assert [line.split(": cannot")[0] for line in result.stderr.splitlines()] == [
        f"gfs: error: {stamps}:2",
        f"gfs: error: {stamps}:4",
    ]


def test_timestamps_from_stdin(run_gfs: RunGfs) -> None:
    result = run_gfs(
        "plan",
        "--timestamps",
        "-",
        "--semantics",
        "restic",
        "--keep-last",
        "1",
        "--tz",
        "UTC",
        "--json",
        input="2026-01-01T00:00:00Z\n2026-01-02\n",
    )
    assert result.exit_code == 0, result.output
    assert [k["time"] for k in json.loads(result.stdout)["keep"]] == ["2026-01-02T00:00:00+00:00"]


def test_rule_options_need_the_simulator(run_gfs: RunGfs) -> None:
    result = run_gfs("plan", "--keep-daily", "3")
    assert result.exit_code == 2
    assert "--keep-daily need --timestamps or --simulate" in result.stderr


def test_unexpected_error_is_one_line_unless_debug(
    run_gfs: RunGfs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_args: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("gfs_backup.cli.plan.read_timestamps", broken)
    stamps = write_lines(tmp_path / "stamps", STAMPS)
    result = run_gfs("plan", "--timestamps", str(stamps))
    assert result.exit_code == 1
    assert result.stderr == (
        "gfs: internal error: RuntimeError: disk on fire (run again with --debug for a traceback)\n"
    )
    with pytest.raises(RuntimeError, match="disk on fire"):
        run_gfs("--debug", "plan", "--timestamps", str(stamps))

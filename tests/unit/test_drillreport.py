"""Drill results for CI: the JUnit file is read back by junitparser (a parser nobody here
wrote), the summary is a Markdown table."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from junitparser import Error, Failure, JUnitXml

from gfs_backup.actions.drill import CheckResult, DrillResult
from gfs_backup.actions.drillreport import junit_xml, summary_markdown, write_report

WHEN = datetime(2026, 12, 6, 3, 0, tzinfo=timezone.utc)


def vm(passed_sums: bool = True) -> DrillResult:
    checks = (
        CheckResult("checksums", passed_sums, 4.5, "ok" if passed_sums else "vda.raw corrupted"),
        CheckResult("qemu-img check", True, 0.1, "sound"),
        CheckResult("boot", True, 12.0, "console matched", ""),
    )
    return DrillResult(
        "web01", "20261205T010000Z", passed_sums, "boot", "reason", 16.7, WHEN, "", checks
    )


def test_junit_has_one_suite_per_job_and_one_case_per_check(tmp_path: Path) -> None:
    files = DrillResult("etc", "20261205T040000Z", True, "restore", "restored 12", 1.5, WHEN)
    gone = DrillResult(
        "db01",
        "20261201T010000Z",
        False,
        "boot",
        "generation vanished (ESTALE)",
        0.2,
        WHEN,
        error=True,
    )
    broken = vm(passed_sums=False)
    console = "login: \x1b[0m\x00\x07 bad bytes \ufffe end"
    broken = DrillResult(
        broken.job,
        broken.generation,
        False,
        broken.check,
        broken.reason,
        broken.seconds,
        WHEN,
        console,
        (*broken.checks[:2], CheckResult("boot", False, 300.0, "timed out", console)),
    )
    path = tmp_path / "drill.xml"
    write_report(path, junit_xml([vm(), files, gone, broken]))
    xml = JUnitXml.fromfile(str(path))
    counts = [(s.name, s.tests, s.failures, s.errors) for s in xml]
    assert counts == [
        ("web01", 3, 0, 0),
        ("etc", 1, 0, 0),
        ("db01", 1, 0, 1),
        ("web01", 3, 2, 0),
    ]
    last = list(xml)[-1]
    cases = {case.name: case for case in last}
    assert set(cases) == {"checksums", "qemu-img check", "boot"}
    assert all(case.classname == "web01" for case in last)
    (failure,) = cases["boot"].result
    assert isinstance(failure, Failure) and "timed out" in failure.message
    assert "bad bytes" in (failure.text or "") and "\x00" not in (failure.text or "")
    (error,) = next(iter(list(xml)[2])).result
    assert isinstance(error, Error) and "ESTALE" in error.message
    assert xml.tests == 8 and xml.failures == 2 and xml.errors == 1
    assert float(cases["boot"].time) == 300.0


def test_the_summary_is_a_table_with_a_line_per_failure() -> None:
    text = summary_markdown([vm(), vm(passed_sums=False)])
    lines = text.splitlines()
    assert lines[0] == "| job | generation | age | result | checks | seconds |"
    assert "| web01 | 20261205T010000Z | ? | pass | checksums ok, qemu-img check ok, boot ok |" in (
        text
    )
    assert "**FAIL** | checksums FAILED" in text
    assert "1 of 2 drill(s) passed." in text

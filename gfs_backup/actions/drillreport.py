"""Drill results as CI systems read them: JUnit XML and a Markdown summary.

JUnit (the format GitLab's `artifacts:reports:junit`, GitHub test-report actions and
Jenkins read): one `<testsuite>` per job, one `<testcase>` per check of the drill
(`classname` = the job, `name` = the check, stable and unique within the job), `time` in
seconds. A check the backup failed is a `<failure>`; a drill that could not run at all
(the generation vanished, QEMU missing) is one `<error>` testcase named `drill`. Texts are
stripped of the bytes XML cannot hold (console output may carry any). Written with the
standard library's ElementTree.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from datetime import datetime
from pathlib import Path

from gfs_backup.actions.drill import CheckResult, DrillResult

# XML 1.0 allows tab, newline, carriage return and these ranges only.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def xml_text(text: str) -> str:
    return _NOT_XML.sub("", text)


def _cases(result: DrillResult) -> list[CheckResult]:
    """The checks as testcases: a drill without layers (files, btrfs, lvm) is one check
    named by what it does."""
    if result.checks:
        return list(result.checks)
    return [CheckResult("drill", result.passed, result.seconds, result.reason, result.console_tail)]


def junit_xml(results: list[DrillResult]) -> bytes:
    suites = ET.Element("testsuites", name="gfs drill")
    totals = {"tests": 0, "failures": 0, "errors": 0}
    for result in results:
        cases = [] if result.error else _cases(result)
        failures = sum(1 for case in cases if not case.passed)
        errors = 1 if result.error else 0
        suite = ET.SubElement(
            suites,
            "testsuite",
            name=result.job,
            tests=str(max(len(cases), errors)),
            failures=str(failures),
            errors=str(errors),
            skipped="0",
            time=f"{result.seconds:.3f}",
            timestamp=result.time.replace(microsecond=0, tzinfo=None).isoformat(),
        )
        properties = ET.SubElement(suite, "properties")
        ET.SubElement(properties, "property", name="generation", value=result.generation)
        ET.SubElement(properties, "property", name="check", value=xml_text(result.check))
        if result.error:
            case = ET.SubElement(
                suite, "testcase", classname=result.job, name="drill", time=f"{result.seconds:.3f}"
            )
            error = ET.SubElement(case, "error", message=xml_text(result.reason)[:1024])
            error.text = xml_text(result.reason)
        for check in cases:
            case = ET.SubElement(
                suite,
                "testcase",
                classname=result.job,
                name=check.name,
                time=f"{check.seconds:.3f}",
            )
            if not check.passed:
                failure = ET.SubElement(case, "failure", message=xml_text(check.detail)[:1024])
                failure.text = xml_text(
                    check.detail + (f"\n\n{check.output}" if check.output else "")
                )
            else:
                ET.SubElement(case, "system-out").text = xml_text(check.detail)
        totals["tests"] += max(len(cases), errors)
        totals["failures"] += failures
        totals["errors"] += errors
    for key, value in totals.items():
        suites.set(key, str(value))
    ET.indent(suites)
    data: bytes = ET.tostring(suites, encoding="utf-8", xml_declaration=True)
    return data + b"\n"


def _age(result: DrillResult, created: datetime | None) -> str:
    if created is None:
        return "?"
    hours = (result.time - created).total_seconds() / 3600
    return f"{hours / 24:.1f} d" if hours >= 48 else f"{hours:.0f} h"


def summary_markdown(
    results: list[DrillResult], created: dict[tuple[str, str], datetime] | None = None
) -> str:
    """A Markdown table for `$GITHUB_STEP_SUMMARY` or a merge-request note."""
    created = created or {}
    lines = [
        "| job | generation | age | result | checks | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        verdict = "error" if result.error else ("pass" if result.passed else "**FAIL**")
        checks = ", ".join(
            f"{case.name} {'ok' if case.passed else 'FAILED'}" for case in _cases(result)
        )
        lines.append(
            f"| {result.job} | {result.generation} | "
            f"{_age(result, created.get((result.job, result.generation)))} | {verdict} | "
            f"{_cell(checks if not result.error else result.reason)} | {result.seconds:.1f} |"
        )
    failed = [r for r in results if not r.passed]
    lines.append("")
    lines.append(
        f"{len(results) - len(failed)} of {len(results)} drill(s) passed."
        + "".join(f"\n- {r.job} {r.generation}: {_cell(r.reason)}" for r in failed)
    )
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def write_report(path: Path, data: bytes, append: bool = False) -> None:
    """Write (or with `append`, add to) a report file in place: CI systems hand out files
    to write into ($GITHUB_STEP_SUMMARY is appended to) in directories a job may not
    create files in."""
    with path.open("ab" if append else "wb") as handle:
        handle.write(data)

"""The tree agent (copying/treeagent.py) run by the system's python3, outside gfs's
virtualenv and source tree: the sources it carries in its arguments are all it needs, and it
exports, verifies and restores as the local tree code does."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from gfs_backup.copying.hostimage import MAX_SPEC
from gfs_backup.copying.treeagent import make_agent_command, manifest_request, payload, run_agent
from gfs_backup.core.errors import GfsError
from gfs_backup.transport.runner import CommandError, LocalRunner

SYSTEM_PYTHON = Path("/usr/bin/python3")


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LocalRunner:
    """A runner whose `python3` is the system's, started in a directory without gfs."""
    if not SYSTEM_PYTHON.exists():
        pytest.fail(f"these tests run the agent with {SYSTEM_PYTHON} (Debian's python3)")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python3").symlink_to(SYSTEM_PYTHON)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.chdir(bindir)
    return LocalRunner()


def make_tree(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "a").write_bytes(b"alpha\n")
    (root / "sub" / "b").write_bytes(os.urandom(300_000))
    os.link(root / "a", root / "sub" / "a-link")
    os.symlink("a", root / "to-a")
    os.mkfifo(root / "fifo")
    os.setxattr(root / "a", "user.note", b"\x00\xff")


def write_manifest(path: Path, tree: list[dict[str, object]]) -> Path:
    path.write_text(json.dumps({"tree": tree}), encoding="utf-8")
    return path


def test_the_payload_fits_in_one_argument() -> None:
    assert 10_000 < len(payload()) < MAX_SPEC


def test_export_verify_and_restore_run_from_the_arguments_alone(
    runner: LocalRunner, tmp_path: Path
) -> None:
    source, gen1, gen2 = tmp_path / "src", tmp_path / "gen1", tmp_path / "gen2"
    make_tree(source)
    gen1.mkdir()
    gen2.mkdir()
    found = run_agent(runner, {"op": "probe", "path": str(source)}, timeout=60, idle_timeout=None)
    assert found["is_dir"] is True and found["clock_ns"] > 0 and found["fstype"]
    seen: list[int] = []
    request = {"op": "export", "source": str(source), "dest": str(gen1 / "data"), "read_back": True}
    first = run_agent(runner, request, seen.append, timeout=60, idle_timeout=None)
    assert first["read_back"] == [] and first["copied_files"] == 2 and first["linked_files"] == 0
    assert sum(seen) == 300_000 + 6
    manifest1 = write_manifest(gen1 / "manifest.json", first["entries"])

    # The second export links the unchanged files to the first.
    (source / "c").write_bytes(b"new\n")
    base = {
        "tree": str(gen1 / "data"),
        "racy_from_ns": first["scan_started_ns"] - first["granularity_ns"],
        "rehash": False,
        **manifest_request(manifest1, first["entries"]),
    }
    request = {**request, "dest": str(gen2 / "data"), "base": base}
    second = run_agent(runner, request, timeout=60, idle_timeout=None)
    assert (second["copied_files"], second["linked_files"]) == (1, 2)
    assert (gen2 / "data" / "sub" / "b").stat().st_ino == (
        gen1 / "data" / "sub" / "b"
    ).stat().st_ino
    manifest2 = write_manifest(gen2 / "manifest.json", second["entries"])
    generation = {"tree": str(gen2 / "data"), **manifest_request(manifest2, second["entries"])}
    verify = run_agent(runner, {"op": "verify", **generation}, timeout=60, idle_timeout=None)
    assert verify["problems"] == []

    restored = tmp_path / "restored"
    run_agent(
        runner,
        {"op": "restore", "dest": str(restored), **generation},
        timeout=60,
        idle_timeout=None,
    )
    assert (restored / "sub" / "b").read_bytes() == (source / "sub" / "b").read_bytes()
    assert os.getxattr(restored / "a", "user.note") == b"\x00\xff"
    assert (restored / "a").stat().st_ino == (restored / "sub" / "a-link").stat().st_ino

    (gen2 / "data" / "c").write_bytes(b"bad\n")  # same size, other content
    verify = run_agent(runner, {"op": "verify", **generation}, timeout=60, idle_timeout=None)
    assert any(line.startswith("c:") for line in verify["problems"]), verify


def test_a_manifest_changed_since_gfs_read_it_is_refused(
    runner: LocalRunner, tmp_path: Path
) -> None:
    source = tmp_path / "src"
    make_tree(source)
    request = {"op": "export", "source": str(source), "dest": str(tmp_path / "data")}
    entries = run_agent(runner, request, timeout=60, idle_timeout=None)["entries"]
    manifest = write_manifest(tmp_path / "manifest.json", entries)
    generation = {"tree": str(tmp_path / "data"), **manifest_request(manifest, entries)}
    write_manifest(manifest, entries[:-1])
    with pytest.raises(ValueError, match="changed since gfs read it"):
        run_agent(runner, {"op": "verify", **generation}, timeout=60, idle_timeout=None)


def test_the_hosts_os_errors_come_back_with_their_errno(
    runner: LocalRunner, tmp_path: Path
) -> None:
    source = tmp_path / "src"
    make_tree(source)
    (tmp_path / "data").mkdir()  # export_tree's destination must not exist
    request = {"op": "export", "source": str(source), "dest": str(tmp_path / "data")}
    with pytest.raises(OSError) as raised:
        run_agent(runner, request, timeout=60, idle_timeout=None)
    assert raised.value.errno == errno.EEXIST
    assert "on host local" in str(raised.value) and raised.value.filename == str(tmp_path / "data")
    shutil.rmtree(tmp_path / "data")


def test_logs_and_errors_show_the_agents_arguments_by_size() -> None:
    command = make_agent_command({"op": "probe", "path": "/srv/x"}, 60, None)
    shown = str(command)
    assert len(shown) < 400 and shown.startswith("python3 -c '<")
    assert f"<{len(payload())} characters>" in shown and '"/srv/x"' in shown
    assert len(str(CommandError(command, "timed out"))) < 500


def test_a_host_without_python3_is_named_with_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no python3 on it
    with pytest.raises(GfsError, match=r"host local has no python3: .*apt install python3-minimal"):
        run_agent(LocalRunner(), {"op": "probe", "path": "/"}, timeout=60, idle_timeout=None)

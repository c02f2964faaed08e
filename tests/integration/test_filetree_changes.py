"""Change detection of files exports: what is read again, what is taken over from the base.

Each case is a way real programs change files that size and mtime alone do not show.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from gfs_backup.backends.files import make_base
from gfs_backup.copying import copy
from gfs_backup.copying.copy import digest_file
from gfs_backup.copying.filetree import export_tree
from gfs_backup.copying.treeentry import ROOT
from gfs_backup.copying.treerestore import restore_tree, verify_tree
from gfs_backup.target.catalog import Stored
from gfs_backup.target.manifest import Manifest, ManifestError, parse_manifest
from tests.integration.test_filetree import base_of, by_path, settle, snapshot, work

pytestmark = pytest.mark.integration
__all__ = ["work"]  # the fixture, shared with test_filetree
MIB = 1 << 20


def rewrite_keeping_size_and_mtime(path: Path, content: bytes) -> None:
    """What `cp -p`, `rsync -t`, `tar x` and `touch -d` do: new bytes, the old mtime."""
    st = path.stat()
    assert len(content) == st.st_size
    path.write_bytes(content)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_rewrite_with_the_same_size_and_an_old_mtime_is_read_again(work: Path) -> None:
    source = work / "source"
    source.mkdir()
    (source / "db").write_bytes(b"A" * 4096)
    (source / "same").write_bytes(b"unchanged")
    settle()
    first = export_tree(source, work / "gen1")
    rewrite_keeping_size_and_mtime(source / "db", b"B" * 4096)

    second = export_tree(source, work / "gen2", base_of(work / "gen1", first))

    assert (second.copied_files, second.linked_files) == (1, 1)
    assert (work / "gen2/db").read_bytes() == b"B" * 4096
    assert by_path(second)["db"].digest == digest_file(source / "db").digest
    assert verify_tree(work / "gen2", second.entries) == []
    restore_tree(work / "gen2", second.entries, work / "restored")
    assert (work / "restored/db").read_bytes() == b"B" * 4096
    assert (work / "gen1/db").read_bytes() == b"A" * 4096


def test_a_file_replaced_by_rename_is_read_again(work: Path) -> None:
    """Same size, same mtime, and even the same ctime second: a new inode (safe-save)."""
    source = work / "source"
    source.mkdir()
    (source / "conf").write_bytes(b"old!")
    settle()
    first = export_tree(source, work / "gen1")
    old = by_path(first)["conf"]
    (source / "conf.tmp").write_bytes(b"new!")
    os.utime(source / "conf.tmp", ns=(old.mtime_ns, old.mtime_ns))
    os.rename(source / "conf.tmp", source / "conf")

    second = export_tree(source, work / "gen2", base_of(work / "gen1", first))

    assert by_path(second)["conf"].ino != old.ino
    assert (work / "gen2/conf").read_bytes() == b"new!"


def test_a_file_changed_in_the_tick_of_the_scan_is_read_again(work: Path) -> None:
    """The racy-timestamp rule: the base saw the file within its timestamp granularity of
    the scan's start, so a change in the same tick would not move its times."""
    source = work / "source"
    source.mkdir()
    (source / "hot").write_bytes(b"v1")
    ctime = os.stat(source / "hot").st_ctime_ns
    first = export_tree(source, work / "gen1", scan_started_ns=ctime)
    settle()

    second = export_tree(source, work / "gen2", base_of(work / "gen1", first))
    third = export_tree(source, work / "gen3", base_of(work / "gen2", second))

    assert (second.copied_files, second.linked_files) == (1, 0)
    assert (third.copied_files, third.linked_files) == (0, 1)


def test_a_rehash_reads_everything_and_reports_content_changed_behind_metadata(
    work: Path,
) -> None:
    source = work / "source"
    source.mkdir()
    (source / "silent").write_bytes(b"x" * 5000)
    (source / "fine").write_bytes(b"y" * 5000)
    settle()
    first = export_tree(source, work / "gen1")
    # What the base recorded no longer matches the content although the metadata does:
    # as after a write that left the times alone (a bit flip, a tool resetting ctime).
    entries = by_path(first)
    wrong = replace(entries["silent"], digest="0" * 64)
    base = base_of(work / "gen1", first)
    trusting = replace(base, entries={**entries, "silent": wrong})

    linked = export_tree(source, work / "gen2", trusting)
    rehashed = export_tree(source, work / "gen3", replace(trusting, rehash=True))

    assert (linked.copied_files, linked.linked_files, linked.rehashed_files) == (0, 2, 0)
    assert (rehashed.copied_files, rehashed.linked_files, rehashed.rehashed_files) == (1, 1, 2)
    assert rehashed.changed_behind_metadata == ["silent"]
    assert any("silent: content changed behind unchanged" in w for w in rehashed.warnings)
    assert by_path(rehashed)["silent"].digest == digest_file(source / "silent").digest
    assert (work / "gen3/fine").stat().st_ino == (work / "gen1/fine").stat().st_ino


def test_a_file_changing_while_read_is_read_again_then_marked(work: Path) -> None:
    source = work / "source"
    source.mkdir()
    (source / "calm").write_bytes(b"c" * 3 * MIB)
    (source / "live.db").write_bytes(b"\x01" * 32 * MIB)
    writes: list[int] = []

    def write_during_reads(limit: int) -> object:
        def step(_count: int) -> None:
            if len(writes) < limit:
                with (source / "live.db").open("r+b") as handle:
                    handle.write(bytes([len(writes) + 2]) * 16)
                writes.append(1)

        return step

    once = export_tree(source, work / "gen1", progress=write_during_reads(1))
    assert by_path(once)["live.db"].changed is False
    assert by_path(once)["live.db"].digest == digest_file(source / "live.db").digest
    assert once.warnings == []

    writes.clear()
    always = export_tree(source, work / "gen2", progress=write_during_reads(1000))
    entry = by_path(always)["live.db"]
    assert entry.changed is True and not by_path(always)["calm"].changed
    assert any("live.db: changed while being read, twice" in w for w in always.warnings)
    assert verify_tree(work / "gen2", always.entries) == []
    # a changed file is never taken over: the next export reads it again
    settle()
    again = export_tree(source, work / "gen3", base_of(work / "gen2", always))
    assert by_path(again)["live.db"].changed is False
    assert (work / "gen3/live.db").stat().st_ino != (work / "gen2/live.db").stat().st_ino


def test_the_root_directory_keeps_its_owner_mode_times_and_xattrs(work: Path) -> None:
    source = work / "www"
    source.mkdir()
    (source / "index.html").write_text("<h1>hi</h1>\n")
    os.chown(source, 33, 33)
    os.chmod(source, 0o2755)
    os.setxattr(source, "user.origin", b"www-root")
    os.utime(source, ns=(1_500_000_000_000_000_001, 1_500_000_000_000_000_001))

    export = export_tree(source, work / "tree")
    restore_tree(work / "tree", export.entries, work / "restored")

    root = by_path(export)[ROOT]
    assert (root.mode, root.uid, root.gid) == (0o2755, 33, 33)
    assert snapshot(work / "restored")["."] == snapshot(source)["."]
    assert snapshot(work / "tree")["."] == snapshot(source)["."]


def test_acls_and_capabilities_come_back_from_the_manifest_alone(work: Path) -> None:
    """An NFS target keeps only user.* xattrs: restore takes the rest from the manifest."""
    source = work / "source"
    (source / "shared").mkdir(parents=True)
    (source / "ping").write_bytes(b"\x7fELF fake binary")
    (source / "shared/report").write_text("numbers\n")
    run = ["setfacl", "-m", "u:1234:rwx,g:5678:r-x", str(source / "shared/report")]
    subprocess.run(run, check=True)
    subprocess.run(["setfacl", "-d", "-m", "u:1234:rwx", str(source / "shared")], check=True)
    subprocess.run(["setcap", "cap_net_raw+ep", str(source / "ping")], check=True)
    acl = subprocess.run(
        ["getfacl", "-R", "-p", "."], cwd=source, capture_output=True, text=True, check=True
    ).stdout

    export = export_tree(source, work / "tree")
    for path in ("ping", "shared/report", "shared"):  # as an NFS target would hold them
        for name in os.listxattr(work / "tree" / path):
            if not name.startswith("user."):
                os.removexattr(work / "tree" / path, name)
    assert verify_tree(work / "tree", export.entries) == []
    restore_tree(work / "tree", export.entries, work / "restored")

    restored = work / "restored"
    getcap = subprocess.run(["getcap", str(restored / "ping")], capture_output=True, text=True)
    assert "cap_net_raw=ep" in getcap.stdout
    again = subprocess.run(
        ["getfacl", "-R", "-p", "."], cwd=restored, capture_output=True, text=True, check=True
    ).stdout
    assert again == acl and "user:1234:rwx" in again


def stored_with(source: dict[str, object], verify: str | None) -> Stored:
    records = ({"time": "2026-11-01T00:00:00Z", "result": verify, "problems": []},)
    manifest = Manifest(
        job="j",
        kind="files",
        host="local",
        generation="g",
        created_at=datetime(2026, 11, 1, tzinfo=timezone.utc),
        tree=({"path": ".", "kind": "dir", "mode": 0o755, "uid": 0, "gid": 0, "mtime_ns": 1},),
        source=source,
        verify=records if verify else (),
    )
    return Stored(Path("/nonexistent/g"), manifest)


RECORDED = {
    "scan_started_ns": 10**18,
    "timestamp_granularity_ns": 10**7,
    "full_read_at": "2026-11-01T00:00:00+00:00",
}
NOW = datetime(2026, 11, 20, tzinfo=timezone.utc)


def test_the_base_must_have_passed_its_verify_and_know_its_scan() -> None:
    assert make_base(stored_with(RECORDED, "ok"), NOW, 30 * 86400) is not None
    assert make_base(stored_with(RECORDED, "failed"), NOW, 30 * 86400) is None
    assert make_base(stored_with(RECORDED, None), NOW, 30 * 86400) is None
    older_gfs = {"path": "/srv"}  # format 1: no scan time, no ctime or inode
    assert make_base(stored_with(older_gfs, "ok"), NOW, 30 * 86400) is None
    assert make_base(None, NOW, 30 * 86400) is None


def test_the_rehash_falls_due_by_the_last_full_read() -> None:
    stored = stored_with(RECORDED, "ok")
    base = make_base(stored, NOW, 30 * 86400)
    assert base is not None and not base.rehash
    assert base.racy_from_ns == 10**18 - 10**7
    due = make_base(stored, NOW + timedelta(days=11), 30 * 86400)
    assert due is not None and due.rehash
    never = make_base(stored, NOW + timedelta(days=400), 0)
    assert never is not None and not never.rehash


def test_a_manifest_of_a_newer_format_is_refused_in_one_line() -> None:
    text = json.dumps({**stored_with(RECORDED, "ok").manifest.to_json(), "format": 3})
    with pytest.raises(ManifestError) as caught:
        parse_manifest(text, "/mnt/backup/j/g/manifest.json")
    message = str(caught.value)
    assert "\n" not in message
    assert "manifest format 3 was written by a newer gfs" in message
    assert "upgrade gfs" in message
    assert parse_manifest(text.replace('"format": 3', '"format": 1'), "m").tree


def test_the_export_verify_reads_what_it_wrote_and_checks_the_rest_by_metadata(
    work: Path,
) -> None:
    source = work / "source"
    source.mkdir()
    (source / "same").write_bytes(b"s" * 300_000)
    (source / "edited").write_bytes(b"e" * 200_000)
    settle()
    first = export_tree(source, work / "gen1")
    (source / "edited").write_bytes(b"E" * 100_000)
    second = export_tree(source, work / "gen2", base_of(work / "gen1", first))
    read: list[int] = []

    assert second.copied == {"edited"}
    assert verify_tree(work / "gen2", second.entries, read.append, content_of=second.copied) == []
    assert sum(read) == 100_000  # the linked file was not read again
    os.chmod(work / "gen2/same", 0o600)  # metadata of a linked file is still checked
    problems = verify_tree(work / "gen2", second.entries, content_of=second.copied)
    assert [line.split(":")[0] for line in problems] == ["same"]


def test_the_export_verify_catches_data_that_reached_the_target_damaged(
    work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = work / "source"
    source.mkdir()
    (source / "file").write_bytes(b"x" * 4096)
    real_write = copy._pwrite_all

    def damaged(fd: int, data: memoryview, offset: int) -> None:
        flipped = bytearray(data)
        flipped[0] ^= 1
        real_write(fd, memoryview(flipped), offset)

    monkeypatch.setattr(copy, "_pwrite_all", damaged)
    export = export_tree(source, work / "tree")

    problems = verify_tree(work / "tree", export.entries, content_of=export.copied)
    assert len(problems) == 1 and problems[0].startswith("file: content differs")

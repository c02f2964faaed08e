"""export_tree / restore_tree / verify_tree on real directories (run as root: chown, mount)."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gfs_backup.copying.copy import digest_file
from gfs_backup.copying.filetree import Base, TreeExport, export_tree
from gfs_backup.copying.treeentry import ROOT, TreeEntry
from gfs_backup.copying.treerestore import restore_tree, verify_tree

pytestmark = pytest.mark.integration

MIB = 1 << 20
MTIME = 1_600_000_000_123_456_789
FILES: dict[str, tuple[bytes, int, int, int]] = {  # path: content, mode, uid, gid
    "plain.txt": (b"hello\n", 0o644, 0, 0),
    "empty-file": (b"", 0o600, 0, 0),
    "setuid-bin": (b"\x7fELF" + bytes(range(256)) * 9, 0o4755, 0, 0),
    "secret": (b"s3cr3t", 0o000, 4242, 4343),
    "sub/owned": (b"x" * 3000, 0o640, 1234, 5678),
    "sub/deeper/setgid": (b"group stuff", 0o2750, 1001, 1002),
    "ünïcødé ✓.txt": ("ünïcødé\n".encode(), 0o644, 0, 0),
    "with space/$(rm -rf x) ;&|<>*?'\"`.txt": (b"metachars", 0o664, 7, 8),
}
DIRS: dict[str, tuple[int, int, int]] = {  # path: mode, uid, gid
    "sub": (0o750, 2000, 2001),
    "sub/deeper": (0o755, 0, 0),
    "with space": (0o1777, 0, 0),
    "empty": (0o700, 3000, 3000),
}
LINKS = {"abs-link": "/etc/hostname", "rel-link": "sub/owned", "dangling": "does/not/exist"}

Snapshot = dict[str, tuple[object, ...]]


def supports_user_xattrs(path: Path) -> bool:
    probe = path / ".xattr-probe"
    probe.touch()
    try:
        os.setxattr(probe, "user.probe", b"1")
    except OSError:
        return False
    finally:
        probe.unlink()
    return True


@pytest.fixture
def work(tmp_path: Path) -> Iterator[Path]:
    """A directory whose filesystem has user xattrs: tmp_path, else a tmpfs mounted there."""
    if supports_user_xattrs(tmp_path):
        yield tmp_path
        return
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def build_source(root: Path) -> Path:
    """Files, dirs and symlinks with odd owners, modes, names, ns mtimes and xattrs."""
    root.mkdir()
    for path in DIRS:
        (root / path).mkdir(parents=True)
    for path, (content, _mode, _uid, _gid) in FILES.items():
        (root / path).write_bytes(content)
    for path, target in LINKS.items():
        os.symlink(target, root / path)
    os.lchown(root / "dangling", 1234, 1235)
    os.setxattr(root / "plain.txt", "user.comment", b"kept across export")
    os.setxattr(root / "sub", "user.binary", b"\x00\xff\x10")
    os.setxattr(root / "rel-link", "trusted.on-link", b"v", follow_symlinks=False)
    owners = {path: meta for path, (_content, *meta) in FILES.items()} | DIRS
    for path, (mode, uid, gid) in owners.items():
        os.chown(root / path, uid, gid)
        os.chmod(root / path, mode)  # after chown, which clears setuid/setgid
    for index, path in enumerate(sorted([*FILES, *DIRS, *LINKS], reverse=True)):
        stamp = MTIME + index * 1_000_001
        os.utime(root / path, ns=(stamp, stamp), follow_symlinks=False)
    return root


def snapshot(root: Path) -> Snapshot:
    """Everything gfs should preserve about each object below `root`, and `root` itself."""
    result: Snapshot = {}
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files] if folder != str(root) else [".", *dirs, *files]:
            path = Path(folder, name)
            st = path.lstat()
            if path.is_symlink():
                body: object = ("symlink", os.readlink(path))
            elif path.is_dir():
                body = ("dir",)
            elif stat.S_ISREG(st.st_mode):
                body = ("file", path.read_bytes())
            else:
                body = (stat.S_IFMT(st.st_mode), st.st_rdev)
            xattrs = {
                key: os.getxattr(path, key, follow_symlinks=False)
                for key in os.listxattr(path, follow_symlinks=False)
            }
            meta = (st.st_mode & 0o7777, st.st_uid, st.st_gid, st.st_mtime_ns, xattrs)
            result[os.path.relpath(path, root)] = (body, *meta)
    return result


def by_path(export: TreeExport) -> dict[str, TreeEntry]:
    return {entry.path: entry for entry in export.entries}


def paths(export: TreeExport) -> list[str]:
    """The exported paths, without the root directory's entry."""
    return [entry.path for entry in export.entries if entry.path != ROOT]


def base_of(tree: Path, export: TreeExport, *, rehash: bool = False) -> Base:
    """The base a run gets from a verified generation holding `export` at `tree`."""
    racy_from = export.scan_started_ns - export.granularity_ns
    return Base(tree, by_path(export), racy_from, rehash)


def settle() -> None:
    """Let the clock tick past the racy-timestamp window of the files just written (a
    file changed in the same tick as a scan is read again by the next export)."""
    time.sleep(0.05)


def test_round_trip_keeps_every_byte_and_all_metadata(work: Path) -> None:
    source = build_source(work / "source")
    expected = snapshot(source)

    export = export_tree(source, work / "tree")

    assert [entry.path for entry in export.entries] == sorted(expected)
    assert snapshot(work / "tree") == expected
    assert export.skipped == []
    assert (export.copied_files, export.linked_files) == (len(FILES), 0)
    assert export.copied_bytes == sum(len(content) for content, *_ in FILES.values())
    entries = by_path(export)
    assert entries["setuid-bin"].mode == 0o4755
    assert entries["sub/owned"].digest == digest_file(source / "sub/owned").digest
    assert entries["dangling"].target == "does/not/exist"
    assert entries["plain.txt"].xattrs == {"user.comment": "a2VwdCBhY3Jvc3MgZXhwb3J0"}
    assert verify_tree(work / "tree", export.entries) == []

    restore_tree(work / "tree", export.entries, work / "restored")
    assert snapshot(work / "restored") == expected
    (work / "empty-dest").mkdir()
    restore_tree(work / "tree", export.entries, work / "empty-dest")
    assert snapshot(work / "empty-dest") == expected


def test_sparse_file_stays_sparse_in_export_and_restore(work: Path) -> None:
    source = work / "source"
    source.mkdir()
    with (source / "disk.img").open("wb") as image:
        image.truncate(64 * MIB)
        image.seek(32 * MIB)
        image.write(os.urandom(MIB))

    export = export_tree(source, work / "tree")
    restore_tree(work / "tree", export.entries, work / "restored")

    assert export.copied_bytes <= 2 * MIB
    assert by_path(export)["disk.img"].digest == digest_file(source / "disk.img").digest
    for copy in (work / "tree/disk.img", work / "restored/disk.img"):
        assert copy.stat().st_size == 64 * MIB
        assert copy.stat().st_blocks * 512 <= 2 * MIB
        assert copy.read_bytes() == (source / "disk.img").read_bytes()


def test_incremental_export_links_unchanged_files_and_copies_changed(work: Path) -> None:
    source = work / "source"
    source.mkdir()
    for name in ("same", "edited", "chmodded", "removed"):
        (source / name).write_bytes(name.encode() * 1000)
    settle()
    first = export_tree(source, work / "gen1")
    (source / "edited").write_bytes(b"new content")
    os.chmod(source / "chmodded", 0o600)
    (source / "added").write_bytes(b"added")
    (source / "removed").unlink()

    second = export_tree(source, work / "gen2", base_of(work / "gen1", first))

    assert (second.copied_files, second.linked_files) == (3, 1)
    assert second.copied_bytes == len(b"new content") + len(b"chmodded") * 1000 + len(b"added")
    gen1, gen2 = work / "gen1", work / "gen2"
    assert (gen2 / "same").stat().st_ino == (gen1 / "same").stat().st_ino
    assert (gen2 / "same").stat().st_nlink == 2
    assert by_path(second)["same"].digest == by_path(first)["same"].digest
    assert (gen2 / "edited").stat().st_ino != (gen1 / "edited").stat().st_ino
    assert (gen1 / "edited").read_bytes() == b"edited" * 1000
    assert (gen1 / "chmodded").stat().st_mode & 0o777 == 0o644
    assert (gen2 / "chmodded").stat().st_mode & 0o777 == 0o600
    assert not (gen2 / "removed").exists()
    assert verify_tree(gen1, first.entries) == []
    assert verify_tree(gen2, second.entries) == []
    restore_tree(gen2, second.entries, work / "restored")
    assert snapshot(work / "restored") == snapshot(source)


def test_incremental_export_copies_when_previous_copy_is_gone_or_altered(work: Path) -> None:
    source = work / "source"
    source.mkdir()
    (source / "gone").write_bytes(b"gone")
    (source / "touched").write_bytes(b"touched")
    settle()
    first = export_tree(source, work / "gen1")
    (work / "gen1/gone").unlink()
    os.utime(work / "gen1/touched", ns=(1, 1))

    second = export_tree(source, work / "gen2", base_of(work / "gen1", first))

    assert (second.copied_files, second.linked_files) == (2, 0)
    assert (work / "gen2/touched").stat().st_nlink == 1
    assert verify_tree(work / "gen2", second.entries) == []


def test_hard_links_inside_the_tree_are_one_file_in_export_and_restore(work: Path) -> None:
    source = work / "source"
    (source / "sub").mkdir(parents=True)
    (source / "a").write_bytes(b"shared" * 1000)
    os.link(source / "a", source / "b")
    os.link(source / "a", source / "sub/c")
    os.link(source / "a", work / "outside-name")  # a name outside the tree: not in the group
    (source / "single").write_bytes(b"one name inside")
    os.link(source / "single", work / "outside-single")

    export = export_tree(source, work / "tree")

    entries = by_path(export)
    assert (entries["b"].link, entries["sub/c"].link, entries["a"].link) == ("a", "a", None)
    assert entries["single"].link is None
    assert export.copied_files == 2 and export.copied_bytes == 6000 + len(b"one name inside")
    tree = work / "tree"
    assert {(tree / name).stat().st_ino for name in ("a", "b", "sub/c")} == {
        (tree / "a").stat().st_ino
    }
    assert (tree / "a").stat().st_nlink == 3
    assert verify_tree(tree, export.entries) == []
    restore_tree(tree, export.entries, work / "restored")
    restored = work / "restored"
    assert len({(restored / name).stat().st_ino for name in ("a", "b", "sub/c")}) == 1
    assert (restored / "a").stat().st_nlink == 3
    assert (restored / "single").stat().st_nlink == 1

    (tree / "b").unlink()  # a group member replaced by a copy is no longer the group
    (tree / "b").write_bytes(b"shared" * 1000)
    os.chmod(tree / "b", entries["a"].mode)
    os.utime(tree / "b", ns=(entries["a"].mtime_ns, entries["a"].mtime_ns))
    assert verify_tree(tree, export.entries) == ["b: is not a hard link of a, as the manifest says"]


def test_hard_link_groups_build_on_the_base_generation(work: Path) -> None:
    source = work / "source"
    source.mkdir()
    (source / "a").write_bytes(b"group")
    os.link(source / "a", source / "b")
    (source / "c").write_bytes(b"solo")
    settle()
    first = export_tree(source, work / "gen1")

    second = export_tree(source, work / "gen2", base_of(work / "gen1", first))

    assert (second.copied_files, second.linked_files) == (0, 2)
    assert by_path(second)["b"].link == "a"
    inodes = {(work / gen / name).stat().st_ino for gen in ("gen1", "gen2") for name in "ab"}
    assert len(inodes) == 1
    assert verify_tree(work / "gen2", second.entries) == []


def flip_byte(path: Path) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # only the content gives it away


def swap_dir_for_symlink(tree: Path) -> None:
    outside = tree.parent / "outside"
    (tree / "sub").rename(outside)
    os.symlink(outside, tree / "sub")


# (tamper with the tree, the problem verify reports, whether restore fails: restore takes
# metadata and symlink targets from the manifest, so only damaged content makes it fail)
TAMPERING: list[tuple[Callable[[Path], object], str, bool]] = [
    (lambda tree: flip_byte(tree / "sub/owned"), "sub/owned: content differs", True),
    (lambda tree: os.truncate(tree / "plain.txt", 2), "plain.txt: size is 2, expected 6", True),
    (lambda tree: (tree / "secret").unlink(), "secret: missing", True),
    (swap_dir_for_symlink, "sub: is a symlink, expected a dir", True),
    (lambda tree: os.chmod(tree / "setuid-bin", 0o755), "setuid-bin: mode is 0o755", False),
    (lambda tree: (tree / "sub/extra").write_bytes(b"!"), "sub/extra: not in the manifest", False),
    (lambda tree: os.chown(tree / "secret", 0, 4343), "secret: uid is 0, expected 4242", False),
    (
        lambda tree: (tree / "dangling").unlink() or os.symlink("x", tree / "dangling"),
        "dangling: symlink target is 'x'",
        False,
    ),
]


@pytest.mark.parametrize(("tamper", "problem", "restore_fails"), TAMPERING)
def test_verify_reports_a_tree_changed_by_hand(
    work: Path, tamper: Callable[[Path], object], problem: str, restore_fails: bool
) -> None:
    source = build_source(work / "source")
    export = export_tree(source, work / "tree")
    assert verify_tree(work / "tree", export.entries) == []

    tamper(work / "tree")

    problems = verify_tree(work / "tree", export.entries)
    assert any(line.startswith(problem) for line in problems), problems
    if restore_fails:
        with pytest.raises(ValueError, match="differs from its manifest"):
            restore_tree(work / "tree", export.entries, work / "restored")
    else:
        restore_tree(work / "tree", export.entries, work / "restored")
        assert snapshot(work / "restored") == snapshot(source)


def test_restore_refuses_a_non_empty_destination(work: Path) -> None:
    export = export_tree(build_source(work / "source"), work / "tree")
    (work / "dest").mkdir()
    (work / "dest/keep").write_text("mine")

    with pytest.raises(FileExistsError):
        restore_tree(work / "tree", export.entries, work / "dest")
    assert os.listdir(work / "dest") == ["keep"]


@pytest.mark.parametrize(
    "hostile", ["../x", "/etc/passwd", "a/../../b", "", "a\0b", "./a", "a//b", "a/", "a/."]
)
def test_from_json_refuses_unsafe_paths(hostile: str) -> None:
    data = {"path": hostile, "kind": "dir", "mode": 0o755, "uid": 0, "gid": 0, "mtime_ns": 0}
    with pytest.raises(ValueError, match=r"^manifest\.json entries\[3\]: field 'path'"):
        TreeEntry.from_json(data, "manifest.json entries[3]")


GOOD_FILE = {
    "path": "f",
    "kind": "file",
    "mode": 420,
    "uid": 0,
    "gid": 0,
    "mtime_ns": 5,
    "size": 3,
    "digest": "a" * 64,
}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"mode": "755"}, "mode"),
        ({"mode": True}, "mode"),
        ({"mode": 0o10000}, "mode"),
        ({"kind": "socket"}, "kind"),
        ({"ctime_ns": "1"}, "ctime_ns"),
        ({"ino": -1}, "ino"),
        ({"rdev": 5}, "rdev"),
        ({"changed": 1}, "changed"),
        ({"link": "../x"}, "link"),
        ({"uid": -1}, "uid"),
        ({"size": -3}, "size"),
        ({"digest": "A" * 64}, "digest"),
        ({"digest": None}, "digest"),
        ({"target": "elsewhere"}, "target"),
        ({"xattrs": {"user.a": "not base64!"}}, "xattrs"),
        ({"xattrs": ["user.a"]}, "xattrs"),
        ({"bogus": 1}, "bogus"),
        ({"mtime_ns": None}, "mtime_ns"),
    ],
)
def test_from_json_names_the_bad_field(change: dict[str, object], field: str) -> None:
    data = {**GOOD_FILE, **change}
    with pytest.raises(ValueError, match=rf"^m\.json#7: .*'{field}'"):
        TreeEntry.from_json(data, "m.json#7")


def test_from_json_reads_what_to_json_wrote(work: Path) -> None:
    export = export_tree(build_source(work / "source"), work / "tree")
    text = json.dumps([entry.to_json() for entry in export.entries])

    parsed = [TreeEntry.from_json(item, f"[{i}]") for i, item in enumerate(json.loads(text))]

    assert parsed == export.entries
    assert set(by_path(export)["empty"].to_json()) == {
        "path",
        "kind",
        "mode",
        "uid",
        "gid",
        "mtime_ns",
        "ctime_ns",
        "ino",
    }
    with pytest.raises(ValueError, match="expected an object"):
        TreeEntry.from_json(["path"], "x")


def test_restore_and_verify_refuse_entries_escaping_the_tree(work: Path) -> None:
    outside = work / "outside"
    outside.mkdir()
    (work / "tree").mkdir()
    escape = TreeEntry("../escape", "file", 0o644, 0, 0, 0, size=0, digest="0" * 64)
    via_link = [
        TreeEntry("a", "symlink", 0o777, 0, 0, 0, target=str(outside)),
        TreeEntry("a/x", "file", 0o644, 0, 0, 0, size=0, digest="0" * 64),
    ]

    cases = [([escape], "field 'path' must not contain '.', '..'"), (via_link, "parent 'a'")]
    for entries, reason in cases:
        with pytest.raises(ValueError, match=re.escape(reason)):
            restore_tree(work / "tree", entries, work / "dest")
        assert any(reason in line for line in verify_tree(work / "tree", entries))
    assert not (work / "escape").exists()
    assert os.listdir(outside) == []
    assert not (work / "dest").exists()


def test_fifos_and_devices_are_kept_in_the_manifest_sockets_and_mounts_skipped(
    work: Path,
) -> None:
    source = work / "source"
    source.mkdir()
    (source / "kept").write_bytes(b"kept")
    os.mkfifo(source / "pipe", 0o640)
    os.mknod(source / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(source / "loop9", 0o660 | stat.S_IFBLK, os.makedev(7, 9))
    os.chown(source / "loop9", 0, 6)
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(source / "sock"))
        (source / "mnt").mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(source / "mnt")], check=True
        )
        try:
            (source / "mnt/inside").write_bytes(b"other fs")
            export = export_tree(source, work / "tree")
        finally:
            subprocess.run(["umount", str(source / "mnt")], check=True)

    assert sorted(export.skipped) == ["mnt (other filesystem)", "sock (socket)"]
    entries = by_path(export)
    assert paths(export) == ["kept", "loop9", "null", "pipe"]
    assert (entries["pipe"].kind, entries["null"].kind, entries["loop9"].kind) == (
        "fifo",
        "char",
        "block",
    )
    assert entries["loop9"].rdev == os.makedev(7, 9)
    assert sorted(os.listdir(work / "tree")) == ["kept"]  # specials: in the manifest only
    assert verify_tree(work / "tree", export.entries) == []

    restore_tree(work / "tree", export.entries, work / "restored")
    restored = work / "restored"
    assert stat.S_ISFIFO((restored / "pipe").lstat().st_mode)
    assert (restored / "loop9").lstat().st_rdev == os.makedev(7, 9)
    assert snapshot(restored) == {
        path: value for path, value in snapshot(source).items() if path not in ("sock", "mnt")
    }


def test_file_vanishing_during_export_is_skipped_with_a_note(work: Path) -> None:
    source = work / "source"
    source.mkdir()
    (source / "a-big").write_bytes(b"\x01" * 2 * MIB)
    (source / "z-victim").write_bytes(b"doomed")

    def delete_victim(_count: int) -> None:
        (source / "z-victim").unlink(missing_ok=True)

    export = export_tree(source, work / "tree", progress=delete_victim)

    assert export.skipped == ["z-victim (vanished while reading)"]
    assert paths(export) == ["a-big"]
    assert verify_tree(work / "tree", export.entries) == []


def test_file_shrinking_during_export_is_copied_again(work: Path) -> None:
    source = work / "source"
    source.mkdir()
    (source / "log").write_bytes(b"\x01" * 32 * MIB)
    calls: list[int] = []

    def shrink_once(count: int) -> None:
        if not calls:
            os.truncate(source / "log", MIB)
        calls.append(count)

    export = export_tree(source, work / "tree", progress=shrink_once)

    assert export.skipped == []
    assert by_path(export)["log"].size == MIB
    assert by_path(export)["log"].digest == digest_file(source / "log").digest
    assert verify_tree(work / "tree", export.entries) == []

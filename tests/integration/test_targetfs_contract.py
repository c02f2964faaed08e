"""One contract for every TargetFS: LocalFS, and RemoteFS driving a LocalRunner (the same
coreutils commands and constant scripts a remote host runs, here in a tmp dir)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import pytest

from gfs_backup.core.state import State
from gfs_backup.target.catalog import list_generations
from gfs_backup.target.fs import LOCAL_FS, WHOLE_FILE_SHA256, RemoteFS, TargetFS
from gfs_backup.target.generation import PartialGeneration, delete_generation, generation_id
from gfs_backup.target.manifest import DataFile, Manifest, read_manifest
from gfs_backup.transport.runner import LocalRunner

pytestmark = pytest.mark.integration

Make = Callable[[Path], TargetFS]
KINDS: dict[str, Make] = {
    "local": lambda root: LOCAL_FS,
    "remote-commands": lambda root: RemoteFS(LocalRunner(), "t", root, 30),
}
CREATED = datetime(2026, 3, 1, 4, 5, 6, tzinfo=timezone.utc)


@pytest.fixture(params=sorted(KINDS))
def fs_root(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[TargetFS, Path]:
    root = tmp_path / "target"
    root.mkdir()
    return KINDS[request.param](root), root


def test_files_directories_and_listing(fs_root: tuple[TargetFS, Path]) -> None:
    fs, root = fs_root
    job = root / "db"
    assert fs.entries(job) == [] and not fs.is_dir(job)
    fs.make_dir(job / ".partial-1", 0o700)
    assert (job / ".partial-1").stat().st_mode & 0o777 == 0o700
    fs.write_file(job / ".partial-1" / "manifest.json", b"{}\n")
    assert fs.read_text(job / ".partial-1" / "manifest.json") == "{}\n"
    assert not (job / ".partial-1" / ".manifest.json.tmp").exists()
    (job / "link").symlink_to("/etc")
    (job / "a file with spaces").write_text("x")
    assert [(e.name, e.kind) for e in fs.entries(job)] == [
        (".partial-1", "d"),
        ("a file with spaces", "f"),
        ("link", "l"),
    ]
    fs.rename(job / ".partial-1", job / "1")
    assert fs.is_dir(job / "1") and fs.exists(job / "1" / "manifest.json")
    with pytest.raises(FileNotFoundError):
        fs.read_text(job / "missing")
    fs.remove_tree(job / "1")
    fs.remove_tree(job / "1")  # a missing path is fine
    assert not (job / "1").exists()
    assert fs.realpath(root / "db" / "link") == "/etc"
    assert any(mount.mount_point == "/" for mount in fs.mounts())


def test_whole_file_sha256_and_streams(fs_root: tuple[TargetFS, Path]) -> None:
    fs, root = fs_root
    data = bytes(range(256)) * 5000
    (root / "image").write_bytes(data)
    digest = fs.file_digest(root / "image", WHOLE_FILE_SHA256)
    assert (digest.size, digest.digest) == (len(data), hashlib.sha256(data).hexdigest())
    with fs.open_read(root / "image") as stream:
        assert stream.read() == data
    with pytest.raises(FileNotFoundError):
        fs.file_digest(root / "missing", WHOLE_FILE_SHA256)


def test_the_generation_lifecycle_through_the_interface(
    fs_root: tuple[TargetFS, Path], tmp_path: Path
) -> None:
    fs, root = fs_root
    job_dir = root / "db"
    state = State(tmp_path / "state")
    try:
        run = state.start_run("db")
        gen = generation_id(CREATED, job_dir, fs)
        partial = PartialGeneration(job_dir, gen, state, run, "db", fs)
        (partial.path / "volume.raw").write_bytes(b"data")
        manifest = Manifest("db", "lvm", "kvm2", gen, CREATED, (DataFile("volume.raw", 4, "x"),))
        assert list_generations(job_dir, fs).stored == []  # invisible until published
        final = partial.publish(manifest)
        (stored,) = list_generations(job_dir, fs).stored
        assert stored.path == final and stored.manifest == read_manifest(final, fs)
        assert generation_id(CREATED, job_dir, fs) == f"{gen}-2"
        delete_generation(final, state, run, "db", fs)
        assert fs.entries(job_dir) == []
        assert state.open_entries("db") == []
    finally:
        state.close()


def test_remote_fs_refuses_to_remove_its_own_root(tmp_path: Path) -> None:
    fs = RemoteFS(LocalRunner(), "t", tmp_path, 30)
    with pytest.raises(Exception, match="is not inside target t"):
        fs.remove_tree(tmp_path)
    assert tmp_path.is_dir()

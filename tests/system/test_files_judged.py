"""Files jobs judged by rsync: every generation restored and compared with the source as it
was (`rsync -aHAX --checksum --dry-run --itemize-changes --delete`), over a tree holding
every kind of object, on a btrfs source (snapshotted) and an ext4 source (copied live)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest
from freezegun import freeze_time

from tests.conftest import RunGfs
from tests.system.conftest import Mounter, make_subvolume
from tests.system.helpers import listing, write_config

pytestmark = [pytest.mark.system, pytest.mark.slow]
MIB = 1 << 20
OLD_MTIME = 1_600_000_000_000_000_000
# Times compared to the nanosecond. rsync's default compares whole seconds, and then even
# its own copy of a directory, symlink or fifo made in the second it was created keeps the
# copy's time (it sees "the same second" and sets nothing).
NANOSECONDS = "--modify-window=-1"


def judge(expected: Path, restored: Path) -> list[str]:
    """What rsync would change to turn `restored` into `expected` (empty: identical)."""
    if shutil.which("rsync") is None:
        pytest.fail("the restore judge needs rsync: ./scripts/test installs it")
    done = subprocess.run(
        ["rsync", "-aHAX", "--checksum", "--dry-run", "--itemize-changes", "--delete",
         NANOSECONDS, f"{expected}/", f"{restored}/"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return done.stdout.splitlines()


def take_copy(source: Path, into: Path) -> Path:
    """The source as it is now, copied by rsync (the judge's reference, not gfs's)."""
    exclude = ["--exclude=/.gfs-snapshots", "--exclude=*.sock"]  # never exported
    subprocess.run(["rsync", "-aHAX", NANOSECONDS, *exclude, f"{source}/", f"{into}/"], check=True)
    return into


def populate(root: Path) -> None:
    """Every kind of object a data directory holds, with odd metadata."""
    (root / "sub/deeper").mkdir(parents=True)
    (root / "db.bin").write_bytes(b"A" * 8192)
    os.utime(root / "db.bin", ns=(OLD_MTIME, OLD_MTIME))
    (root / "big.bin").write_bytes(os.urandom(3 * MIB))
    with (root / "sparse.img").open("wb") as handle:
        handle.seek(40 * MIB)
        handle.write(b"tail")
    (root / "maildir-1").write_text("mail\n")
    os.link(root / "maildir-1", root / "sub/maildir-2")
    os.link(root / "maildir-1", root / "sub/deeper/maildir-3")
    os.symlink("sub/deeper", root / "link-to-dir")
    os.symlink("/nonexistent/target", root / "dangling")
    os.mkfifo(root / "queue.fifo", 0o620)
    os.mknod(root / "null-copy", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    (root / "naïve name\twith tab; $(x) *").write_text("odd\n")
    (root / "ping").write_bytes(b"\x7fELF")
    os.chmod(root / "ping", 0o755)
    subprocess.run(["setcap", "cap_net_raw+ep", str(root / "ping")], check=True)
    subprocess.run(["setfacl", "-m", "u:1234:rw", str(root / "sub/maildir-2")], check=True)
    subprocess.run(["setfacl", "-d", "-m", "g:99:rx", str(root / "sub")], check=True)
    os.setxattr(root / "big.bin", "user.origin", b"camera")
    os.chown(root / "sub/deeper", 1001, 1002)
    os.chmod(root / "sub/deeper", 0o2750)
    os.chmod(root, 0o755)
    os.setxattr(root, "user.root-note", b"root dir")
    with socket.socket(socket.AF_UNIX) as server:  # the file stays after close
        server.bind(str(root / "app.sock"))


def change(root: Path) -> None:
    """What the second night finds: changes size and mtime do not show, and new links."""
    st = (root / "db.bin").stat()
    (root / "db.bin").write_bytes(b"B" * 8192)  # same size, old mtime set back
    os.utime(root / "db.bin", ns=(st.st_atime_ns, st.st_mtime_ns))
    with (root / "big.bin").open("r+b") as handle:
        handle.seek(MIB)
        handle.write(b"changed in the middle")
    os.link(root / "big.bin", root / "sub/big-again")
    (root / "sub/maildir-2").unlink()
    os.chmod(root, 0o750)


@pytest.mark.parametrize("fs", ["btrfs", "ext4"])
def test_every_generation_restores_as_the_source_was(
    fs: str, mounts: Mounter, tmp_path: Path, run_gfs: RunGfs
) -> None:
    volume = mounts("src", kind=fs, size_mb=256)
    source = make_subvolume(volume / "data") if fs == "btrfs" else volume / "data"
    source.mkdir(exist_ok=True)
    populate(source)
    target = mounts("tgt", kind="tmpfs", size_mb=256)
    config = write_config(tmp_path, target, "data", "files", "path", source)
    expected = []
    for day, mutate in (("2026-11-23", None), ("2026-11-24", change), ("2026-11-25", None)):
        if mutate is not None:
            mutate(source)
        time.sleep(0.05)  # past the racy window of what was just written
        expected.append(take_copy(source, tmp_path / f"as-of-{day}"))
        with freeze_time(f"{day}T01:00:00Z"):
            result = run_gfs("run", "--config", str(config), "--force")
        assert result.exit_code == 0, result.output
    generations = listing(run_gfs("list", "--config", str(config), "--json"))
    assert [g["point_in_time"] for g in generations] == [fs == "btrfs"] * 3
    assert [g["skipped"] for g in generations] == [1, 1, 1]  # app.sock
    assert "1 skipped" in run_gfs("list", "--config", str(config)).stdout
    for generation, reference in zip(generations, expected, strict=True):
        restored = tmp_path / f"restored-{generation['id']}"
        args = ("--generation", generation["id"], "--to", str(restored))
        result = run_gfs("restore", "data", "--config", str(config), *args)
        assert result.exit_code == 0, result.output
        assert judge(reference, restored) == [], generation["id"]
        assert (restored / "sparse.img").stat().st_blocks * 512 < MIB
    first, second, third = (Path(g["path"]) / "data" for g in generations)
    assert (second / "db.bin").read_bytes() == b"B" * 8192  # read again, not linked
    assert (third / "db.bin").stat().st_ino == (second / "db.bin").stat().st_ino
    assert (third / "sparse.img").stat().st_ino == (first / "sparse.img").stat().st_ino
    manifest = json.loads((Path(generations[0]["path"]) / "manifest.json").read_text())
    assert manifest["format"] == 2
    assert run_gfs("verify", "--config", str(config)).exit_code == 0


def test_a_failed_restore_leaves_nothing_at_the_destination(
    mounts: Mounter, tmp_path: Path, run_gfs: RunGfs
) -> None:
    source = tmp_path / "srv"
    (source / "sub").mkdir(parents=True)
    (source / "a.txt").write_text("first\n")
    (source / "sub/z.txt").write_text("last\n")
    target = mounts("tgt", kind="tmpfs", size_mb=64)
    config = write_config(tmp_path, target, "srv", "files", "path", source)
    assert run_gfs("run", "--config", str(config)).exit_code == 0
    (generation,) = listing(run_gfs("list", "--config", str(config), "--json"))
    stored = Path(generation["path"]) / "data/sub/z.txt"
    stored.unlink()
    stored.symlink_to("/etc/hostname")  # swapped on the share: must be refused

    restored = tmp_path / "restored"
    result = run_gfs("restore", "srv", "--config", str(config), "--to", str(restored))

    assert result.exit_code != 0
    assert "sub/z.txt" in result.output
    assert not restored.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".gfs-restore")] == []


def test_a_restore_that_runs_out_of_space_leaves_nothing_and_says_so(
    mounts: Mounter, tmp_path: Path, run_gfs: RunGfs
) -> None:
    source = tmp_path / "srv"
    source.mkdir()
    (source / "big.bin").write_bytes(os.urandom(3 * MIB))
    target = mounts("tgt", kind="tmpfs", size_mb=64)
    config = write_config(tmp_path, target, "srv", "files", "path", source)
    assert run_gfs("run", "--config", str(config)).exit_code == 0
    small = mounts("small", kind="tmpfs", size_mb=1)

    result = run_gfs("restore", "srv", "--config", str(config), "--to", str(small / "srv"))

    assert result.exit_code == 5, result.output
    assert "No space left on device" in result.stderr
    assert f"nothing was left at {small / 'srv'}" in result.stderr
    assert os.listdir(small) == []

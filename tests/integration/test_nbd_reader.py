"""tools/nbd.py against a real NBD server: `qemu-nbd` serving an image read-only (what a
shut-off domain's disk is read through), its allocation map and reads, and errors."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from gfs_backup.core.errors import GfsError
from gfs_backup.tools.nbd import ALLOCATION, STATE_ZERO, NbdExport, matching

MIB = 1 << 20


def require_qemu_nbd() -> None:
    if shutil.which("qemu-nbd") is None:
        pytest.fail("qemu-nbd is missing: run scripts/lab-setup (package qemu-utils)")


def test_a_qcow2_is_read_with_its_data_map(tmp_path: Path) -> None:
    require_qemu_nbd()
    data = os.urandom(3 * MIB)
    raw = tmp_path / "disk.raw"
    with raw.open("wb") as handle:
        handle.truncate(32 * MIB)
        handle.seek(5 * MIB)
        handle.write(data)
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(image)], check=True)
    export = NbdExport.image(image, "qcow2")
    try:
        assert export.size == 32 * MIB
        extents = export.extents(ALLOCATION)
        assert sum(length for _, length, _ in extents) == 32 * MIB
        assert matching(extents, lambda flags: not flags & STATE_ZERO) == [(5 * MIB, 3 * MIB)]
        buffer = bytearray(4 * MIB)
        export.read_into(memoryview(buffer), 4 * MIB)
        assert bytes(buffer) == bytes(MIB) + data
    finally:
        export.close()


def test_a_missing_image_is_one_clear_error(tmp_path: Path) -> None:
    require_qemu_nbd()
    with pytest.raises(GfsError, match="qemu-nbd cannot serve"):
        NbdExport.image(tmp_path / "gone.qcow2", "qcow2")


def test_nothing_listening_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(GfsError, match="cannot connect to the NBD export vda"):
        NbdExport.unix(tmp_path / "none.sock", "vda", (ALLOCATION,))

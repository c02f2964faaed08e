"""The image writer that runs on a target's host (copying/hostimage.py), run here as the
host would run it: `python3 -c SCRIPT SPEC` on real files. Each image is compared with its
source by `cmp`, its digests with gfs's own sha256-1m."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from gfs_backup.copying.copy import digest_file
from gfs_backup.copying.digest import BlockDigest
from gfs_backup.copying.hostimage import (
    DIGEST_SCRIPT,
    IMAGE_SCRIPT,
    ImageSpec,
    ScriptOutput,
    encode_spec,
)
from gfs_backup.copying.image import digest_of

MIB = 1 << 20
SIZE = 20 * MIB + 8192  # a partial last MiB too


def run(spec: ImageSpec) -> dict[str, Any]:
    done = subprocess.run(
        ["python3", "-c", IMAGE_SCRIPT, encode_spec(spec)], capture_output=True, check=False
    )
    assert done.returncode == 0, done.stderr.decode()
    output = ScriptOutput()
    output.feed(done.stdout)
    found = output.result()
    assert found is not None, done.stdout
    result: dict[str, Any] = json.loads(found)
    return result


def write_source(path: Path) -> None:
    with path.open("wb") as handle:
        handle.write(os.urandom(6 * MIB))
        handle.write(bytes(4 * MIB))  # zeros: holes in the image
        handle.write(os.urandom(SIZE - 10 * MIB))


def rewrite(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def same(first: Path, second: Path) -> bool:
    return subprocess.run(["cmp", str(first), str(second)], check=False).returncode == 0


def blocks_digest(path: Path) -> str:
    digest = BlockDigest()
    digest.update(path.read_bytes())
    return digest.hexdigest()


def digests(result: dict[str, Any]) -> list[bytes]:
    raw = bytes.fromhex(result["digests"])
    return [raw[i : i + 32] for i in range(0, len(raw), 32)]


def full(tmp_path: Path, source: Path, name: str) -> tuple[ImageSpec, dict[str, Any]]:
    folder = tmp_path / name
    folder.mkdir()
    spec = ImageSpec(
        str(source),
        str(folder / "volume.raw"),
        str(folder / "blocks/volume.sha256-1m"),
        SIZE,
        [(0, SIZE, False)],
    )
    return spec, run(spec)


def test_a_full_image_then_a_patched_clone_equal_their_sources(tmp_path: Path) -> None:
    source = tmp_path / "snapshot"
    write_source(source)
    spec, first = full(tmp_path, source, "g1")
    image = Path(spec.image)
    assert same(image, source)
    assert first["path"] == "new" and first["bytes_read"] == SIZE
    assert first["bytes_written"] == SIZE - 4 * MIB  # zero MiBs left as holes
    assert os.stat(image).st_blocks * 512 <= SIZE - 4 * MIB + MIB
    assert digest_of(digests(first)) == digest_file(source).digest
    assert Path(spec.blocks).read_bytes() == b"".join(digests(first))

    # 2 MiB rewritten at MiB 2, MiB 12 discarded (a zero span), the tail rewritten.
    rewrite(source, 2 * MIB, os.urandom(2 * MIB))
    rewrite(source, 12 * MIB, bytes(MIB))
    rewrite(source, SIZE - 100, os.urandom(100))
    folder = tmp_path / "g2"
    folder.mkdir()
    patch = ImageSpec(
        str(source),
        str(folder / "volume.raw"),
        str(folder / "blocks/volume.sha256-1m"),
        SIZE,
        [(2 * MIB, 4 * MIB, False), (12 * MIB, 13 * MIB, True), (20 * MIB, SIZE, False)],
        base_image=spec.image,
        base_blocks=spec.blocks,
        base_blocks_digest=blocks_digest(Path(spec.blocks)),
        sample=[0, 1, 5, 9, 15, 19],
    )
    second = run(patch)
    assert second["path"] in ("clone", "server-copy", "full-write")
    assert second["bytes_read"] == 2 * MIB + 8192 and second["zeroed"] == MIB
    assert same(Path(patch.image), source)
    assert same(image, tmp_path / "g1" / "volume.raw")
    assert digest_of(digests(second)) == digest_file(source).digest
    assert second["checked"] == 4


def test_a_volume_changed_where_the_delta_saw_nothing_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "snapshot"
    write_source(source)
    spec, _first = full(tmp_path, source, "g1")
    rewrite(source, 15 * MIB + 5, b"rolled back")
    folder = tmp_path / "g2"
    folder.mkdir()
    base = dict(
        base_image=spec.image,
        base_blocks=spec.blocks,
        base_blocks_digest=blocks_digest(Path(spec.blocks)),
    )
    patch = ImageSpec(
        str(source),
        str(folder / "volume.raw"),
        str(folder / "blocks/b"),
        SIZE,
        [(0, MIB, False)],
        sample=list(range(1, 21)),
        **base,  # type: ignore[arg-type]
    )
    assert run(patch) == {"source_differs": [15]}
    assert not Path(patch.image).exists()

    rewrite(source, 15 * MIB + 5, Path(spec.image).read_bytes()[15 * MIB + 5 : 15 * MIB + 16])
    rewrite(Path(spec.image), 9 * MIB, b"bit rot")  # the base damaged on the target
    assert run(patch)["target_differs"] == [9]
    assert not Path(patch.image).exists()

    wrong = ImageSpec(**{**patch.__dict__, "base_blocks_digest": "0" * 64})
    assert run(wrong) == {"refused": "base digests do not match its manifest"}


def test_the_host_digest_is_gfs_sha256_1m(tmp_path: Path) -> None:
    source = tmp_path / "file"
    write_source(source)
    done = subprocess.run(
        ["python3", "-c", DIGEST_SCRIPT, str(source)], capture_output=True, text=True, check=True
    )
    output = ScriptOutput()
    output.feed(done.stdout.encode())
    size, digest = (output.result() or "").split()
    assert (int(size), digest) == (SIZE, digest_file(source).digest)

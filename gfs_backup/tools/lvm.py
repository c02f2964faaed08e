"""LVM commands as argv lists, and parsers of their output (pure, tested on recorded output).

Names reach these functions checked (core.lvmnames: split_volume, parse_size).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

from gfs_backup.transport.runner import Command

FIELDS = ("lv_name", "vg_name", "lv_size", "lv_attr", "origin", "pool_lv", "snap_percent")
LVM_TIMEOUT = 120.0


@dataclass(frozen=True)
class Volume:
    """One line of `lvs`: a logical volume and what gfs needs to know about it."""

    name: str
    vg: str
    size: int
    attr: str
    origin: str = ""
    pool: str = ""
    snap_percent: float | None = None

    @property
    def path(self) -> str:
        return f"/dev/{self.vg}/{self.name}"

    @property
    def is_thin(self) -> bool:
        return self.attr[:1] == "V"

    @property
    def is_invalid_snapshot(self) -> bool:
        """An old-style snapshot that overflowed: lvs marks it (I)nvalid, or 100% full."""
        state = self.attr[4:5]
        full = self.snap_percent is not None and self.snap_percent >= 100.0
        return state == "I" or (self.attr[:1] in ("s", "S") and full)


def make_lvs_command(vg: str | None, lv: str | None = None) -> Command:
    """`lvs` of one volume, one volume group, or (`vg` None) every visible volume."""
    target = (f"{vg}/{lv}" if lv else vg,) if vg else ()
    return Command(
        (
            "lvs",
            "--noheadings",
            "--nosuffix",
            "--units",
            "b",
            "--separator",
            "|",
            "-o",
            ",".join(FIELDS),
            *target,
        ),
        timeout=LVM_TIMEOUT,
    )


def parse_lvs(output: str) -> list[Volume]:
    volumes = []
    for line in output.splitlines():
        if not line.strip():
            continue
        parts = [part.strip() for part in line.split("|")]
        if len(parts) != len(FIELDS):
            raise ValueError(f"unexpected lvs line: {line.strip()!r}")
        name, vg, size, attr, origin, pool, percent = parts
        volumes.append(
            Volume(
                name,
                vg,
                int(float(size)),
                attr,
                origin,
                pool,
                float(percent) if percent else None,
            )
        )
    return volumes


def make_snapshot_command(vg: str, lv: str, name: str, size: int | None) -> Command:
    """`lvcreate -s`: classic with a size (copy-on-write space), thin without one.
    Thin snapshots are created with activation skip off, so they are active at once."""
    sized = ("-L", f"{size}b") if size is not None else ("-kn",)
    return Command(
        ("lvcreate", "--yes", "-s", *sized, "-n", name, f"{vg}/{lv}"),
        mutating=True,
        timeout=LVM_TIMEOUT,
    )


def make_remove_command(vg: str, lv: str) -> Command:
    return Command(("lvremove", "-f", f"{vg}/{lv}"), mutating=True, timeout=LVM_TIMEOUT)


def make_read_command(device: str, timeout: float) -> Command:
    """Read a block device as a stream (dd bypasses the page cache of the host)."""
    return Command(("dd", f"if={device}", "bs=1M", "iflag=direct", "status=none"), timeout=timeout)


# Thin pools: what changed between two thin snapshots (thin_delta of thin-provisioning-tools
# on a reserved snapshot of the pool's metadata), and how full the pool is.

THIN_FIELDS = ("lv_name", "thin_id", "data_percent", "metadata_percent")


def dm_name(vg: str, lv: str) -> str:
    """The device-mapper name of an LV: '-' doubled in each part, joined by '-'."""
    return f"{vg.replace('-', '--')}-{lv.replace('-', '--')}"


def make_thin_info_command(vg: str, names: tuple[str, ...]) -> Command:
    """`lvs` of thin LVs and their pool: thin ids, and the pool's data and metadata use."""
    return Command(
        (
            "lvs",
            "--noheadings",
            "--separator",
            "|",
            "-o",
            ",".join(THIN_FIELDS),
            *(f"{vg}/{name}" for name in names),
        ),
        timeout=LVM_TIMEOUT,
    )


@dataclass(frozen=True)
class ThinInfo:
    thin_id: int | None
    data_percent: float | None
    metadata_percent: float | None


def parse_thin_info(output: str) -> dict[str, ThinInfo]:
    found = {}
    for line in output.splitlines():
        if not line.strip():
            continue
        parts = [part.strip() for part in line.split("|")]
        if len(parts) != len(THIN_FIELDS):
            raise ValueError(f"unexpected lvs line: {line.strip()!r}")
        name, thin_id, data, metadata = parts
        found[name] = ThinInfo(
            int(thin_id) if thin_id else None,
            float(data) if data else None,
            float(metadata) if metadata else None,
        )
    return found


def make_metadata_snap_command(vg: str, pool: str, reserve: bool) -> Command:
    """Reserve (or release) the pool's metadata snapshot, which thin_delta reads: the live
    metadata changes under it otherwise. Only one may exist at a time."""
    message = "reserve_metadata_snap" if reserve else "release_metadata_snap"
    return Command(
        ("dmsetup", "message", f"{dm_name(vg, pool)}-tpool", "0", message),
        mutating=True,
        timeout=LVM_TIMEOUT,
    )


def make_thin_delta_command(vg: str, pool: str, old_id: int, new_id: int) -> Command:
    """thin_delta between two thins of the pool, on the reserved metadata snapshot (`-m`
    alone: its argument is optional and attached)."""
    return Command(
        (
            "thin_delta",
            "-m",
            "--snap1",
            str(old_id),
            "--snap2",
            str(new_id),
            f"/dev/mapper/{dm_name(vg, pool)}_tmeta",
        ),
        timeout=LVM_TIMEOUT,
    )


def parse_thin_delta(xml: str, size: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(changed, unmapped) byte ranges from thin_delta's XML, clamped to `size`: changed =
    `different` and `right_only` (remapped or newly mapped: read them), unmapped =
    `left_only` (mapped before, not now: they read as zeros). `begin`/`length` count pool
    data blocks of `data_block_size` 512-byte sectors. ValueError on anything else."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise ValueError(f"thin_delta output is not XML: {exc}") from None
    diff = root.find("diff")
    if root.tag != "superblock" or diff is None:
        raise ValueError("thin_delta output has no <superblock><diff>")
    block = int(root.get("data_block_size", "0")) * 512
    if block <= 0:
        raise ValueError("thin_delta output has no data_block_size")
    changed: list[tuple[int, int]] = []
    unmapped: list[tuple[int, int]] = []
    for item in diff:
        begin, length = int(item.get("begin", "-1")), int(item.get("length", "0"))
        if begin < 0 or length <= 0:
            raise ValueError(f"thin_delta: bad range {ET.tostring(item, encoding='unicode')}")
        start, end = begin * block, min(size, (begin + length) * block)
        if start >= end:
            continue  # past the volume's end (a shrunk LV)
        if item.tag in ("different", "right_only"):
            changed.append((start, end - start))
        elif item.tag == "left_only":
            unmapped.append((start, end - start))
        elif item.tag != "same":
            raise ValueError(f"thin_delta: unknown range <{item.tag}>")
    return changed, unmapped


def make_read_ranges_command(device: str, ranges: list[tuple[int, int]], timeout: float) -> Command:
    """The bytes of `ranges` of a block device, one after the other on stdout (direct I/O:
    not this host's page cache). The device and ranges are positional parameters."""
    script = (
        'dev=$1; shift; for r in "$@"; do '
        'dd if="$dev" bs=1M iflag=skip_bytes,count_bytes,direct status=none '
        'skip="${r%:*}" count="${r#*:}" || exit 1; done'
    )
    return Command(
        ("sh", "-c", script, "gfs-read-ranges", device, *(f"{o}:{n}" for o, n in ranges)),
        timeout=timeout,
    )

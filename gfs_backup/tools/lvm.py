"""LVM commands as argv lists, and parsers of their output (pure, tested on recorded output).

Names reach these functions checked (core.lvmnames: split_volume, parse_size).
"""

from __future__ import annotations

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


def make_lvs_command(vg: str, lv: str | None = None) -> Command:
    target = f"{vg}/{lv}" if lv else vg
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
            target,
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

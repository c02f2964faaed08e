"""A block device copied to a file on the same remote host, in one pipeline: the data never
leaves that host; only progress lines and the checksum come back over SSH.

    dd if=DEVICE bs=1M iflag=direct | tee FIFO | dd of=IMAGE bs=1M iflag=fullblock conv=sparse,fsync
    sha256sum <FIFO                   (the whole-file sha256, computed in the same pass)

The device is read once (tee), not once for the copy and once for the checksum: on a real
host the extra processes cost spare cores, a second read would cost the source's disks.
`iflag=fullblock` makes the writer see whole 1 MiB blocks (a pipe hands out 64 KiB), so
zero blocks are skipped and the NFS writes are large (measured: ~1 s less per 256 MiB
in the lab guest).

The script is a constant (POSIX sh, GNU coreutils); the device and image paths reach it only
as positional parameters. It first prints its process group (GNU `timeout` made one), so gfs
can end the whole pipeline by that id when the target stops answering; the writing `dd`
prints its progress once a second (`status=progress`): no progress for the command's
`idle_timeout` means the target is stuck (a hard NFS mount whose server is down).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gfs_backup.transport.runner import Command

PGID_TAG = "gfs-pgid"
RESULT_TAG = "gfs-result"
FAILED_TAG = "gfs-failed"
KILL_TIMEOUT = 30.0

EXPORT_SCRIPT = r"""
dev=$1 out=$2
set -- $(cat /proc/$$/stat)
echo "gfs-pgid $5"
work=$(mktemp -d) || exit 90
trap 'rm -rf -- "$work"' EXIT
mkfifo -- "$work/fifo" || exit 91
sha256sum <"$work/fifo" >"$work/sum" &
hasher=$!
failed() { echo "$1 (exit status $2)" >>"$work/failed"; }
{ dd if="$dev" bs=1M iflag=direct status=none 2>"$work/err" || failed "reading $dev" $?; } |
  { tee -- "$work/fifo" || failed "tee" $?; } |
  { dd of="$out" bs=1M iflag=fullblock conv=sparse,fsync status=progress 2>&1 ||
    failed "writing $out" $?; }
wait "$hasher" || failed "sha256sum" $?
if [ -s "$work/failed" ]; then
  cat -- "$work/err" >>"$work/failed"
  while read -r line; do echo "gfs-failed $line"; done <"$work/failed"
  exit 1
fi
read -r digest rest <"$work/sum"
echo "gfs-result $(stat -c '%s %b %B' -- "$out") $digest"
"""

# `gfs verify` of a remote image: sha256sum fed by a dd that reports its progress, so a file
# on a stuck NFS mount fails at the idle timeout instead of after the whole-run timeout.
DIGEST_SCRIPT = r"""
exec 3>&1
sum=$( { dd if="$1" bs=1M status=progress 2>&3 || echo "gfs-failed reading $1 ($?)" >&3; } |
  sha256sum ) || exit 1
digest=${sum%% *}
echo "gfs-result $(stat -c '%s %b %B' -- "$1") $digest"
"""

_BYTES_RE = re.compile(rb"(?:^|[\r\n])(\d+) bytes")


@dataclass(frozen=True)
class HostCopyResult:
    size: int  # bytes of the image (its logical size)
    allocated: int  # bytes it occupies (holes excluded)
    digest: str  # whole-file sha256


def make_device_copy_command(
    device: str, image: str, timeout: float, idle_timeout: float
) -> Command:
    """The pipeline that copies `device` to the new file `image` on the same host."""
    return Command(
        ("sh", "-c", EXPORT_SCRIPT, "sh", device, image),
        mutating=True,
        timeout=timeout,
        idle_timeout=idle_timeout,
    )


def make_file_digest_command(path: str, timeout: float, idle_timeout: float) -> Command:
    """Size and whole-file sha256 of `path` on its host, with progress (see CopyOutput)."""
    return Command(
        ("sh", "-c", DIGEST_SCRIPT, "sh", path), timeout=timeout, idle_timeout=idle_timeout
    )


def make_kill_group_command(pgid: int) -> Command:
    """SIGKILL every process of the pipeline's group (its id came from the pipeline)."""
    if pgid <= 1:
        raise ValueError(f"refusing to signal process group {pgid}")
    return Command(("kill", "-KILL", "--", f"-{pgid}"), mutating=True, timeout=KILL_TIMEOUT)


class CopyOutput:
    """The pipeline's output, fed as it arrives: its process group, progress, the result."""

    def __init__(self) -> None:
        self.text = bytearray()
        self.copied = 0  # bytes written so far, by the writer's last progress line
        self.pgid: int | None = None

    def feed(self, data: bytes) -> int:
        """Take more output; return how many more bytes the writer reported as copied."""
        self.text += data
        if self.pgid is None:
            match = re.search(rb"gfs-pgid (\d+)\n", self.text)
            if match:
                self.pgid = int(match.group(1))
        counts = [int(found) for found in _BYTES_RE.findall(bytes(self.text[-4096:]))]
        newest = max(counts, default=self.copied)
        grown, self.copied = max(0, newest - self.copied), max(newest, self.copied)
        del self.text[:-65536]
        return grown

    def failures(self) -> list[str]:
        """The lines the pipeline reported as failed steps, with the writer's own errors."""
        lines = bytes(self.text).decode(errors="replace").replace("\r", "\n").splitlines()
        return [
            line.removeprefix(f"{FAILED_TAG} ")
            for line in lines
            if line.startswith(FAILED_TAG) or line.startswith("dd: ")
        ]

    def result(self) -> HostCopyResult | None:
        """The final line `gfs-result SIZE BLOCKS DIGEST`, or None if it did not come."""
        match = re.search(
            rb"gfs-result (\d+) (\d+) (\d+) ([0-9a-f]{64})\n", bytes(self.text[-4096:])
        )
        if match is None:
            return None
        size, blocks, unit = (int(match.group(index)) for index in (1, 2, 3))
        return HostCopyResult(size, blocks * unit, match.group(4).decode())

"""Images built on a remote host, in a target that host mounts: the data never crosses SSH.

Changed-block capture of a thin LVM volume whose target is mounted by the volume's own
host runs there as one Python program (IMAGE_SCRIPT, a constant; python3 >= 3.7, standard
library only): clone the base generation's image (FICLONE: an NFS 4.2 CLONE on a
reflink-capable server; else copy_file_range: an NFS 4.2 server-side COPY; else a full
read and write), check a sample of unchanged MiBs on the volume and on the clone against
the base's per-MiB digests, write the changed MiBs from the snapshot (all-zero MiBs and
unmapped ranges punched as holes), fsync, read every changed MiB back from storage
(O_DIRECT: on NFS from the server) and write the new per-MiB digests beside the image.
A full read does the same into a new sparse file. Only progress lines and a JSON result
(the paths taken, the bytes, the digests) come back.

DIGEST_SCRIPT computes a file's sha256-1m on the host (`gfs verify` of such images).

STREAM_SCRIPT writes what a program run on the host prints (`btrfs send` of a snapshot)
into a new file of a target that host mounts, computing its sha256-1m as it writes, then
fsyncs it: the stream never crosses SSH (the read-back is DIGEST_SCRIPT's, from storage).

What to do comes as one argument: JSON, zlib-compressed, base64 (shell-safe, and a
change list of thousands of ranges stays far below the kernel's 128 KiB per argument).
"""

from __future__ import annotations

import base64
import json
import re
import zlib
from dataclasses import dataclass
from typing import Any

from gfs_backup.transport.runner import Command

PROGRESS_TAG = "gfs-progress"
RESULT_TAG = "gfs-result"
MAX_SPEC = 100_000  # characters of the encoded argument (the kernel allows 131072)

IMAGE_SCRIPT = r"""
import ctypes, errno, fcntl, hashlib, json, mmap, os, sys, zlib, base64
spec = json.loads(zlib.decompress(base64.b64decode(sys.argv[1])))
BLOCK = 1 << 20
FICLONE = 0x40049409
size = spec["size"]
count = (size + BLOCK - 1) // BLOCK
ZERO = hashlib.sha256(bytes(BLOCK)).digest()
ZEROS = bytes(BLOCK)
libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)
buf = mmap.mmap(-1, BLOCK)
view = memoryview(buf)
result = {"bytes_read": 0, "bytes_written": 0, "zeroed": 0}

def say(tag, value):
    sys.stdout.write(tag + " " + value + "\n")
    sys.stdout.flush()

def length(i):
    return min(BLOCK, size - i * BLOCK)

def read_block(fd, i):
    n = length(i)
    want = -(-n // 4096) * 4096
    done = 0
    while done < n:
        got = os.preadv(fd, [view[done:want]], i * BLOCK + done)
        if got == 0:
            break
        done += got
    if done < n:
        view[done:n] = ZEROS[: n - done]
    return view[:n]

def digest_of(data):
    return ZERO if len(data) == BLOCK and data == ZEROS else hashlib.sha256(data).digest()

def open_direct(path, flags):
    try:
        return os.open(path, flags | os.O_DIRECT)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return os.open(path, flags)

def punch(fd, offset, n):
    if libc.fallocate(fd, 3, offset, n) != 0:  # PUNCH_HOLE | KEEP_SIZE
        code = ctypes.get_errno()
        if code not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise OSError(code, os.strerror(code))
        for start in range(offset, offset + n, BLOCK):
            os.pwrite(fd, ZEROS[: min(BLOCK, offset + n - start)], start)

def clone(source, target):
    with open(source, "rb") as reader:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                fcntl.ioctl(fd, FICLONE, reader.fileno())
                return "clone"
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY):
                    raise
            os.ftruncate(fd, size)
            try:
                if not hasattr(os, "copy_file_range"):  # Python < 3.8
                    raise OSError(errno.ENOSYS, "no copy_file_range")
                offset = 0
                while offset < size:
                    got = os.copy_file_range(reader.fileno(), fd, size - offset, offset, offset)
                    if got == 0:
                        raise OSError(errno.EIO, "copy_file_range: the base shrank")
                    offset += got
                return "server-copy"
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOSYS):
                    raise
            while True:
                data = reader.read(BLOCK)
                if not data:
                    return "full-write"
                if data != ZEROS[: len(data)]:
                    os.pwrite(fd, data, reader.tell() - len(data))
        finally:
            os.close(fd)

def sampled_wrong(fd, indexes, want):
    return [i for i in indexes if digest_of(read_block(fd, i)) != want[i]]

device = open_direct(spec["device"], os.O_RDONLY)
base = spec.get("base")
digests = [ZERO] * count
if size % BLOCK:
    digests[-1] = hashlib.sha256(bytes(size % BLOCK)).digest()
path = "new"
if base is not None:
    with open(base["blocks"], "rb") as handle:
        raw = handle.read()
    had = [raw[i : i + 32] for i in range(0, len(raw), 32)]
    outer = hashlib.sha256()
    for i in range(0, len(raw), BLOCK):
        outer.update(hashlib.sha256(raw[i : i + BLOCK]).digest())
    if len(had) != count or outer.hexdigest() != base["digest"]:
        say("gfs-result", json.dumps({"refused": "base digests do not match its manifest"}))
        sys.exit(0)
    wrong = sampled_wrong(device, spec["sample"], had)
    if wrong:
        say("gfs-result", json.dumps({"source_differs": wrong[:10]}))
        sys.exit(0)
    path = clone(base["image"], spec["image"])
    digests = had
    image = open_direct(spec["image"], os.O_RDWR)
    wrong = sampled_wrong(image, spec["sample"], had)
    if wrong:
        os.close(image)
        os.unlink(spec["image"])
        say("gfs-result", json.dumps({"target_differs": wrong[:10], "path": path}))
        sys.exit(0)
    os.close(image)
    image = os.open(spec["image"], os.O_RDWR)
else:
    image = os.open(spec["image"], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(image, size)
patch = base is not None
touched = []
reported = 0
for start, end, zero in spec["spans"]:
    if zero:
        punch(image, start, end - start)
        result["zeroed"] += end - start
        for i in range(start // BLOCK, -(-end // BLOCK)):
            digests[i] = ZERO if length(i) == BLOCK else hashlib.sha256(bytes(length(i))).digest()
            touched.append(i)
        continue
    for i in range(start // BLOCK, -(-end // BLOCK)):
        data = read_block(device, i)
        result["bytes_read"] += len(data)
        found = digest_of(data)
        digests[i] = found
        touched.append(i)
        if found == ZERO:
            if patch:
                punch(image, i * BLOCK, len(data))
                result["zeroed"] += len(data)
        elif len(data) < BLOCK and data == ZEROS[: len(data)]:
            if patch:
                punch(image, i * BLOCK, len(data))
        else:
            os.pwrite(image, data, i * BLOCK)
            result["bytes_written"] += len(data)
        if result["bytes_read"] - reported >= 64 * BLOCK:
            reported = result["bytes_read"]
            say("gfs-progress", str(reported))
os.fsync(image)
os.close(image)
image = open_direct(spec["image"], os.O_RDONLY)
wrong = sampled_wrong(image, touched, digests)
os.close(image)
if wrong:
    sys.stderr.write("the image reads back differently at MiB %d\n" % wrong[0])
    sys.exit(3)
os.makedirs(os.path.dirname(spec["blocks"]), exist_ok=True)
fd = os.open(spec["blocks"], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
os.write(fd, b"".join(digests))
os.fsync(fd)
os.close(fd)
result.update(path=path, digests=b"".join(digests).hex(), checked=len(touched))
say("gfs-result", json.dumps(result))
"""

# sha256-1m of one file on the host, read from its storage where O_DIRECT is allowed.
DIGEST_SCRIPT = r"""
import errno, hashlib, mmap, os, sys
BLOCK = 1 << 20
try:
    fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT)
except OSError as exc:
    if exc.errno != errno.EINVAL:
        raise
    fd = os.open(sys.argv[1], os.O_RDONLY)
size = os.fstat(fd).st_size
buf = mmap.mmap(-1, BLOCK)
view = memoryview(buf)
outer = hashlib.sha256()
offset = 0
while offset < size:
    n = min(BLOCK, size - offset)
    done = 0
    while done < n:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise OSError(errno.EIO, "short read")
        done += got
    outer.update(hashlib.sha256(view[:n]).digest())
    offset += n
    if offset % (64 * BLOCK) == 0:
        sys.stdout.write("gfs-progress %d\n" % offset)
        sys.stdout.flush()
sys.stdout.write("gfs-result %d %s\n" % (size, outer.hexdigest()))
"""


# A program's output into a new file, sha256-1m computed in the pass that writes it.
STREAM_SCRIPT = r"""
import hashlib, json, os, subprocess, sys
argv = json.loads(sys.argv[1])
dest = sys.argv[2]
BLOCK = 1 << 20
fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
child = subprocess.Popen(argv, stdout=subprocess.PIPE)
outer = hashlib.sha256()
size = 0
buf = bytearray(BLOCK)
view = memoryview(buf)
while True:
    filled = 0
    while filled < BLOCK:
        got = child.stdout.readinto(view[filled:])
        if not got:
            break
        filled += got
    if not filled:
        break
    outer.update(hashlib.sha256(view[:filled]).digest())
    done = 0
    while done < filled:
        done += os.write(fd, view[done:filled])
    size += filled
    if size % (64 * BLOCK) == 0:
        sys.stdout.write("gfs-progress %d\n" % size)
        sys.stdout.flush()
    if filled < BLOCK:
        break
status = child.wait()
if status != 0:
    sys.stderr.write("%s exited with status %d\n" % (argv[0], status))
    sys.exit(1)
os.fsync(fd)
os.close(fd)
sys.stdout.write("gfs-result %d %s\n" % (size, outer.hexdigest()))
"""


# Files copied on the host (a VM's boot files and NVRAM into a generation, a generation's
# disks into a restore): for each [source, destination] pair, the source is read once and
# its sha256-1m computed as it is written (all-zero MiBs skipped: sparse), the copy is
# fsynced and read back from its storage (O_DIRECT where allowed) for a second sha256-1m.
# A missing source gives null; the caller compares the digests.
COPY_SCRIPT = r"""
import errno, hashlib, json, mmap, os, sys
BLOCK = 1 << 20
ZEROS = bytes(BLOCK)
buf = mmap.mmap(-1, BLOCK)
view = memoryview(buf)

def read_into(fd, offset):
    done = 0
    while done < BLOCK:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            break
        done += got
    return done

def digest(path):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        fd = os.open(path, os.O_RDONLY)
    outer, offset = hashlib.sha256(), 0
    while True:
        n = read_into(fd, offset)
        if not n:
            break
        outer.update(hashlib.sha256(view[:n]).digest())
        offset += n
    os.close(fd)
    return offset, outer.hexdigest()

results = []
for source, destination in json.loads(sys.argv[1]):
    if not os.path.isfile(source):
        results.append(None)
        continue
    os.makedirs(os.path.dirname(destination), 0o755, exist_ok=True)
    src = os.open(source, os.O_RDONLY)
    dst = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    outer, offset = hashlib.sha256(), 0
    while True:
        n = read_into(src, offset)
        if not n:
            break
        outer.update(hashlib.sha256(view[:n]).digest())
        if view[:n] != ZEROS[:n]:
            done = 0
            while done < n:
                done += os.pwrite(dst, view[done:n], offset + done)
        offset += n
        if offset % (64 * BLOCK) == 0:
            sys.stdout.write("gfs-progress %d\n" % offset)
            sys.stdout.flush()
    os.ftruncate(dst, offset)
    os.fsync(dst)
    os.close(dst)
    os.close(src)
    size, copied = digest(destination)
    results.append([offset, outer.hexdigest(), size, copied])
sys.stdout.write("gfs-result %s\n" % json.dumps(results))
"""


@dataclass(frozen=True)
class HostCopy:
    """A file copied on the host: its size and sha256-1m as read, and of the copy as read
    back from its storage (see COPY_SCRIPT)."""

    size: int
    digest: str
    copy_size: int
    copy_digest: str

    @property
    def intact(self) -> bool:
        return (self.size, self.digest) == (self.copy_size, self.copy_digest)


def make_copy_command(pairs: list[tuple[str, str]], timeout: float, idle_timeout: float) -> Command:
    return Command(
        ("python3", "-c", COPY_SCRIPT, json.dumps([list(pair) for pair in pairs])),
        mutating=True,
        timeout=timeout,
        idle_timeout=idle_timeout,
    )


def parse_copies(result: str | None, count: int) -> list[HostCopy | None]:
    """COPY_SCRIPT's result line: one HostCopy (None: no such source) per pair. ValueError
    when it is missing or malformed."""
    found = json.loads(result) if result else None
    if not isinstance(found, list) or len(found) != count:
        raise ValueError(f"no result for {count} file(s) in the copy's output")
    return [
        None if one is None else HostCopy(int(one[0]), one[1], int(one[2]), one[3]) for one in found
    ]


@dataclass(frozen=True)
class ImageSpec:
    device: str
    image: str
    blocks: str
    size: int
    spans: list[tuple[int, int, bool]]  # byte ranges: read (False) or punch (True)
    base_image: str | None = None
    base_blocks: str | None = None
    base_blocks_digest: str | None = None  # the manifest's sha256-1m of the base's digests
    sample: list[int] | None = None


def encode_spec(spec: ImageSpec) -> str:
    data: dict[str, Any] = {
        "device": spec.device,
        "image": spec.image,
        "blocks": spec.blocks,
        "size": spec.size,
        "spans": [[start, end, zero] for start, end, zero in spec.spans],
        "sample": spec.sample or [],
        "base": None
        if spec.base_image is None
        else {
            "image": spec.base_image,
            "blocks": spec.base_blocks,
            "digest": spec.base_blocks_digest,
        },
    }
    return base64.b64encode(zlib.compress(json.dumps(data).encode(), 9)).decode()


def make_image_command(encoded: str, timeout: float, idle_timeout: float) -> Command:
    return Command(
        ("python3", "-c", IMAGE_SCRIPT, encoded),
        mutating=True,
        timeout=timeout,
        idle_timeout=idle_timeout,
    )


def make_digest_command(path: str, timeout: float, idle_timeout: float) -> Command:
    return Command(
        ("python3", "-c", DIGEST_SCRIPT, path), timeout=timeout, idle_timeout=idle_timeout
    )


def make_stream_command(
    argv: tuple[str, ...], destination: str, timeout: float, idle_timeout: float
) -> Command:
    """Run `argv` on the host and write its output to the new file `destination` there
    (see STREAM_SCRIPT); prints progress, then `gfs-result SIZE SHA256-1M`."""
    return Command(
        ("python3", "-c", STREAM_SCRIPT, json.dumps(list(argv)), destination),
        mutating=True,
        timeout=timeout,
        idle_timeout=idle_timeout,
    )


_PROGRESS_RE = re.compile(rb"gfs-progress (\d+)\n")


class ScriptOutput:
    """A host script's stdout as it arrives: progress (bytes so far) and its result line."""

    def __init__(self) -> None:
        self.text = bytearray()
        self.done = 0

    def feed(self, data: bytes) -> int:
        """Take more output; how many more bytes the script reported as done."""
        self.text += data
        found = [int(value) for value in _PROGRESS_RE.findall(bytes(self.text[-4096:]))]
        newest = max(found, default=self.done)
        grown, self.done = max(0, newest - self.done), max(newest, self.done)
        return grown

    def result(self) -> str | None:
        """The text after `gfs-result ` on the last such line, or None."""
        for line in reversed(bytes(self.text).decode(errors="replace").splitlines()):
            if line.startswith(f"{RESULT_TAG} "):
                return line[len(RESULT_TAG) + 1 :]
        return None

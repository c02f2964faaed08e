"""The lab guest: a Debian cloud kernel plus a tiny busybox initramfs driven by its command line.

The guest's /init loads the virtio modules, prints `BOOT_MARKER` on the serial console and then
does what `gfs.action=` on the kernel command line says (see `guest_cmdline`):

- `idle`: nothing; the guest stays up until it is destroyed.
- `write-pattern`: writes the disk layout below to /dev/vda, prints `PATTERN_WRITTEN tag=T`,
  then powers off.
- `check-pattern`: reads /dev/vda back and prints `PATTERN_OK tag=T` when header and pattern
  are intact (and the tag matches `gfs.tag=`, if given), else `PATTERN_BAD <why>`; powers off.
- `churn`: like `write-pattern`, then keeps rewriting the churn area (outside the pattern)
  forever and prints `CHURN_MARKER n` every 100 writes: a running guest with a busy disk.

`gfs.after=poweroff|idle|churn` overrides what follows the action. With `gfs.agent=1` /init
starts qemu-ga on the virtio port `org.qemu.guest_agent.0` and prints `AGENT_MARKER`;
`gfs.freezehang=N` gives that qemu-ga a freeze hook that sleeps N seconds (a hanging freeze).

A guest given a network card (a drill probing ports) takes its address by DHCP, prints
`GFS-NET-UP <address>` and serves HTTP on LISTEN_PORT (busybox httpd).

`gfs.layout=raw` (default), raw disk layout (offsets in bytes): a one-sector header
`GFS-LAB-DISK tag=T` at 0, `PATTERN_SIZE` bytes of `pattern_bytes()` at `PATTERN_OFFSET`, the
churn area at `CHURN_OFFSET` (1 MiB). `gfs.layout=fs`: write-pattern makes an ext2 filesystem
on /dev/vda and mounts it on /mnt (files `tag`, `pattern.bin`; churn rewrites `churn`), so the
guest has a filesystem that qemu-ga can freeze; check-pattern mounts it read-only.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.lab.errors import LabError, LabUnavailable, require_tools

DEFAULT_CACHE = Path("/var/cache/gfs-lab")
BUSYBOX = Path("/bin/busybox")
QEMU_GA = Path("/usr/sbin/qemu-ga")
DEFAULT_MODULES = ("virtio_pci", "virtio_blk", "virtio_console", "virtio_net")
LISTEN_PORT = 8080  # a guest with a NIC serves HTTP here (a drill's port probe)

BOOT_MARKER = "GFS-GUEST-UP"
PATTERN_WRITTEN = "GFS-PATTERN-WRITTEN"
PATTERN_OK = "GFS-PATTERN-OK"
PATTERN_BAD = "GFS-PATTERN-BAD"
CHURN_MARKER = "GFS-CHURN"
AGENT_MARKER = "GFS-AGENT-UP"
ERROR_MARKER = "GFS-GUEST-ERROR"
ACTIONS = ("idle", "write-pattern", "check-pattern", "churn")
LAYOUTS = ("raw", "fs")

PATTERN_OFFSET = 1 << 20
PATTERN_SIZE = 256 << 10
CHURN_OFFSET = 4 << 20
MIN_DISK_MIB = 8

INIT_SCRIPT = r"""#!/bin/busybox sh
# gfs lab guest init: protocol and disk layout are described in tests/lab/guest.py.
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
export PATH=/bin:/usr/sbin
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mkdir -p /run /tmp
while read -r module; do
    insmod "/modules/$module" || echo "GFS-GUEST-ERROR insmod $module"
done </modules/order

action=idle; tag=none; after=; agent=0; layout=raw; freezehang=0
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        gfs.action=*) action=${arg#gfs.action=} ;;
        gfs.tag=*) tag=${arg#gfs.tag=} ;;
        gfs.after=*) after=${arg#gfs.after=} ;;
        gfs.agent=*) agent=${arg#gfs.agent=} ;;
        gfs.layout=*) layout=${arg#gfs.layout=} ;;
        gfs.freezehang=*) freezehang=${arg#gfs.freezehang=} ;;
    esac
done

wait_for_file() {  # $1 path, $2 test flag; up to 10 s
    i=0
    while ! test "$2" "$1" && [ $i -lt 100 ]; do usleep 100000; i=$((i + 1)); done
    test "$2" "$1"
}

start_agent() {
    [ -x /usr/sbin/qemu-ga ] || { echo "GFS-GUEST-ERROR no qemu-ga in initramfs"; return; }
    wait_for_file /sys/class/virtio-ports -d
    for port in /sys/class/virtio-ports/*; do
        [ "$(cat "$port/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] || continue
        device=/dev/${port##*/}
        wait_for_file "$device" -c
        mkdir -p /run/qemu-ga
        hook=
        if [ "$freezehang" -gt 0 ]; then  # a guest whose freeze hangs: the hook sleeps
            printf '#!/bin/sh\nsleep %s\n' "$freezehang" >/run/freeze-hook
            chmod 755 /run/freeze-hook
            hook=--fsfreeze-hook=/run/freeze-hook
        fi
        if qemu-ga -d -m virtio-serial -p "$device" -t /run/qemu-ga -f /run/qemu-ga.pid $hook
        then
            echo "GFS-AGENT-UP $device"
        else
            echo "GFS-GUEST-ERROR qemu-ga failed"
        fi
        return
    done
    echo "GFS-GUEST-ERROR no virtio port org.qemu.guest_agent.0"
}

mount_fs() {
    mkdir -p /mnt
    mount -t ext2 "$@" /dev/vda /mnt
}

write_pattern() {
    if [ "$layout" = fs ]; then
        mke2fs -F /dev/vda >/dev/null 2>&1 && mount_fs || return 1
        cp /pattern.bin /mnt/pattern.bin && echo "$tag" >/mnt/tag && sync || return 1
    else
        dd if=/pattern.bin of=/dev/vda bs=65536 seek=16 conv=notrunc,fsync 2>/dev/null || return 1
        printf 'GFS-LAB-DISK tag=%s\n' "$tag" \
            | dd of=/dev/vda bs=512 count=1 conv=notrunc,sync,fsync 2>/dev/null || return 1
    fi
    echo "GFS-PATTERN-WRITTEN tag=$tag"
}

check_pattern() {
    if [ "$layout" = fs ]; then
        mount_fs -o ro 2>/dev/null || { echo "GFS-PATTERN-BAD no-filesystem"; return; }
        found=$(cat /mnt/tag 2>/dev/null)
        sum=$(sha256sum </mnt/pattern.bin 2>/dev/null | cut -d' ' -f1)
    else
        found=$(dd if=/dev/vda bs=512 count=1 2>/dev/null | tr -d '\000' \
            | sed -n 's/^GFS-LAB-DISK tag=//p')
        sum=$(dd if=/dev/vda bs=65536 skip=16 count=4 2>/dev/null | sha256sum | cut -d' ' -f1)
    fi
    if [ "$sum" != "$(cat /pattern.sha256)" ]; then
        echo "GFS-PATTERN-BAD data tag=${found:-none}"
    elif [ -z "$found" ]; then
        echo "GFS-PATTERN-BAD header"
    elif [ "$tag" != none ] && [ "$found" != "$tag" ]; then
        echo "GFS-PATTERN-BAD tag=$found expected=$tag"
    else
        echo "GFS-PATTERN-OK tag=$found"
    fi
}

churn() {
    n=0; target=/dev/vda; base=1024
    [ "$layout" = fs ] && { target=/mnt/churn; base=0; }
    while true; do
        n=$((n + 1))
        printf 'GFS-CHURN %012d\n' "$n" \
            | dd of="$target" bs=4096 seek=$((base + n % 256)) count=1 conv=notrunc,sync,fsync \
                2>/dev/null
        [ $((n % 100)) -eq 0 ] && echo "GFS-CHURN $n"
        usleep 20000
    done
}

start_network() {  # only a guest given a NIC: DHCP, then an HTTP listener
    [ -d /sys/class/net/eth0 ] || return 0
    ip link set lo up
    ip link set eth0 up
    cat >/run/udhcpc.sh <<'SCRIPT'
#!/bin/sh
[ "$1" = bound ] && ip addr add "$ip/${mask:-24}" dev "$interface"
exit 0
SCRIPT
    chmod 755 /run/udhcpc.sh
    if udhcpc -i eth0 -s /run/udhcpc.sh -q -n -t 10 -T 1 >/dev/null 2>&1; then
        mkdir -p /run/www && echo gfs-lab >/run/www/index.html
        httpd -p @LISTEN_PORT@ -h /run/www
        echo "GFS-NET-UP $(ip -4 -o addr show eth0 | awk '{print $4}')"
    else
        echo "GFS-GUEST-ERROR no DHCP answer on eth0"
    fi
}

[ "$agent" = 1 ] && start_agent
start_network
echo "GFS-GUEST-UP action=$action kernel=$(uname -r)"
case "$action" in
    idle) after=${after:-idle} ;;
    write-pattern|churn)
        if ! wait_for_file /dev/vda -b; then echo "GFS-GUEST-ERROR no /dev/vda"
        elif ! write_pattern; then echo "GFS-GUEST-ERROR writing the pattern failed"
        fi
        [ "$action" = churn ] && after=${after:-churn}
        after=${after:-poweroff} ;;
    check-pattern)
        if wait_for_file /dev/vda -b; then check_pattern; else echo "GFS-PATTERN-BAD no-disk"; fi
        after=${after:-poweroff} ;;
    *) echo "GFS-GUEST-ERROR unknown gfs.action=$action"; after=poweroff ;;
esac
case "$after" in
    churn) churn ;;
    poweroff) umount /mnt 2>/dev/null; sync; echo "GFS-GUEST-POWEROFF"; poweroff -f ;;
    *) echo "GFS-GUEST-IDLE"; while true; do sleep 3600; done ;;
esac
"""


@dataclass(frozen=True)
class Kernel:
    """An unpacked Debian kernel package: vmlinuz and the root holding lib/modules/RELEASE."""

    vmlinuz: Path
    root: Path
    release: str


@dataclass(frozen=True)
class GuestImage:
    """What a lab domain boots: kernel, initramfs, and whether qemu-ga is inside."""

    kernel: Path
    initrd: Path
    release: str
    has_agent: bool


def lab_cache() -> Path:
    """The directory scripts/lab-setup fills: $GFS_LAB_CACHE or /var/cache/gfs-lab."""
    return Path(os.environ.get("GFS_LAB_CACHE", str(DEFAULT_CACHE)))


def find_kernel(cache: Path) -> Kernel:
    """The kernel scripts/lab-setup unpacked to CACHE/kernel; LabUnavailable if absent."""
    root = cache / "kernel"
    found = sorted((root / "boot").glob("vmlinuz-*"))
    if len(found) != 1:
        raise LabUnavailable(
            f"no guest kernel in {root}/boot: run `scripts/lab-setup` (GFS_LAB_CACHE={cache})"
        )
    release = found[0].name.removeprefix("vmlinuz-")
    if not (root / "lib" / "modules" / release / "modules.dep").is_file():
        raise LabUnavailable(f"no modules.dep for {release} in {root}: run `scripts/lab-setup`")
    return Kernel(found[0], root, release)


def parse_show_depends(output: str) -> list[str]:
    """Module paths from `modprobe --show-depends` output, in load order (builtins skipped)."""
    return [line.split()[1] for line in output.splitlines() if line.startswith("insmod ")]


def module_files(kernel: Kernel, names: tuple[str, ...]) -> list[Path]:
    """The .ko files `names` need, dependencies first, each once."""
    ordered: list[Path] = []
    for name in names:
        done = subprocess.run(
            ["modprobe", "-S", kernel.release, "-d", str(kernel.root), "--show-depends", name],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise LabError(f"modprobe --show-depends {name} failed: {done.stderr.strip()}")
        for path in map(Path, parse_show_depends(done.stdout)):
            if path not in ordered:
                ordered.append(path)
    return ordered


def parse_ldd(output: str) -> list[Path]:
    """Absolute library paths from `ldd` output (`x => /path (addr)` and `/path (addr)`)."""
    found = re.findall(r"(?:=>\s*|^\s*)(/\S+)\s+\(0x", output, flags=re.MULTILINE)
    return [Path(path) for path in found]


def library_files(binary: Path) -> list[Path]:
    """The shared libraries (and loader) `binary` needs, as `ldd` reports them."""
    done = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise LabError(f"ldd {binary} failed: {done.stderr.strip()}")
    return parse_ldd(done.stdout)


def pattern_bytes() -> bytes:
    """The deterministic PATTERN_SIZE bytes the guest writes at PATTERN_OFFSET."""
    blocks = (
        hashlib.sha256(f"gfs-lab-pattern-{index}".encode()).digest()
        for index in range(PATTERN_SIZE // 32)
    )
    return b"".join(blocks)


def _copy_into(root: Path, source: Path, mode: int | None = None) -> None:
    target = root / source.relative_to("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    target.chmod(mode if mode is not None else source.stat().st_mode & 0o777)


def _stage(root: Path, kernel: Kernel, modules: tuple[str, ...], binaries: list[Path]) -> None:
    for directory in ("bin", "dev", "proc", "sys", "run", "tmp", "modules", "usr/sbin"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    _copy_into(root, BUSYBOX, 0o755)
    (root / "init").write_text(INIT_SCRIPT.replace("@LISTEN_PORT@", str(LISTEN_PORT)))
    (root / "init").chmod(0o755)
    pattern = pattern_bytes()
    (root / "pattern.bin").write_bytes(pattern)
    (root / "pattern.sha256").write_text(hashlib.sha256(pattern).hexdigest() + "\n")
    order = []
    for index, module in enumerate(module_files(kernel, modules)):
        name = f"{index:02d}-{module.name}"
        shutil.copyfile(module, root / "modules" / name)
        order.append(name)
    (root / "modules" / "order").write_text("".join(f"{name}\n" for name in order))
    for binary in binaries:
        _copy_into(root, binary, 0o755)
        for library in library_files(binary):
            _copy_into(root, library)


def _pack(root: Path, out: Path) -> None:
    names = [".", *(str(path.relative_to(root)) for path in sorted(root.rglob("*")))]
    done = subprocess.run(
        ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"],
        cwd=root,
        input="\n".join(names).encode() + b"\n",
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        raise LabError(f"cpio failed: {done.stderr.decode(errors='replace').strip()}")
    out.write_bytes(gzip.compress(done.stdout, compresslevel=6, mtime=0))


def build_guest_image(
    workdir: Path,
    cache: Path | None = None,
    modules: tuple[str, ...] = DEFAULT_MODULES,
    binaries: tuple[Path, ...] = (),
    agent: bool = True,
) -> GuestImage:
    """Builds WORKDIR/initramfs.gz for the kernel in `cache` (default: `lab_cache()`).

    `modules` are loaded at boot (dependencies resolved on the host); `binaries` are copied
    with their libraries, e.g. /sbin/lvm for later tests. With `agent` and qemu-ga installed
    on the host, qemu-ga goes in too. Raises LabUnavailable when setup is missing.
    """
    require_tools("modprobe", "cpio", "ldd")
    if not BUSYBOX.is_file():
        raise LabUnavailable(f"no {BUSYBOX} (busybox-static): run `scripts/lab-setup`")
    kernel = find_kernel(cache if cache is not None else lab_cache())
    has_agent = agent and QEMU_GA.is_file()
    root = workdir / "initramfs-root"
    if root.exists():
        shutil.rmtree(root)
    _stage(root, kernel, modules, [*binaries, *([QEMU_GA] if has_agent else [])])
    initrd = workdir / "initramfs.gz"
    _pack(root, initrd)
    shutil.rmtree(root)
    return GuestImage(kernel.vmlinuz, initrd, kernel.release, has_agent)


def guest_cmdline(
    action: str = "idle",
    tag: str | None = None,
    after: str | None = None,
    agent: bool = False,
    layout: str = "raw",
    freeze_hang: int = 0,
) -> str:
    """The kernel command line that makes the guest's /init do `action` (see ACTIONS)."""
    if action not in ACTIONS:
        raise ValueError(f"unknown guest action {action!r}; known: {', '.join(ACTIONS)}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown disk layout {layout!r}; known: {', '.join(LAYOUTS)}")
    for value in (tag, after):
        if value is not None and not re.fullmatch(r"[A-Za-z0-9._-]+", value):
            raise ValueError(f"guest tag/after must be a plain word, got {value!r}")
    words = ["console=ttyS0", "panic=1", "quiet", f"gfs.action={action}"]
    words += [f"gfs.tag={tag}"] if tag else []
    words += [f"gfs.after={after}"] if after else []
    words += ["gfs.agent=1"] if agent else []
    words += [f"gfs.layout={layout}"] if layout != "raw" else []
    words += [f"gfs.freezehang={int(freeze_hang)}"] if freeze_hang else []
    return " ".join(words)

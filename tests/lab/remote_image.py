"""The initramfs of the nested "remote KVM host" guest (booted by tests/lab/remote_host.py).

The guest is a Debian cloud kernel plus a busybox initramfs holding the real tools a remote
KVM host has: lvm2 (all its commands as links to /usr/sbin/lvm), dmsetup, thin-provisioning
tools, btrfs-progs, mke2fs, qemu-img, GNU coreutils, findutils and diffutils (in /usr/bin,
ahead of the busybox applets in /bin on PATH), python3 with its standard library (gfs builds thin
volumes' images and exports file trees there), rsync, setfacl and setcap (tests make and judge
trees with them), the kernel NFS server tools and mount.nfs, and OpenSSH's sshd.
Binaries are copied from this host with their `ldd` libraries (scripts/lab-setup installs them).

Its /init (INIT_SCRIPT) loads the modules, configures the network as QEMU user networking
expects (eth0 10.0.2.15/24 via 10.0.2.2, lo up), then:

- LVM: the disk with serial PV_SERIAL becomes a PV of the VG `VG_NAME` holding the thin pool
  `VG_NAME/THIN_POOL` (THIN_POOL_SIZE); the rest of the VG is free for classic LVs/snapshots;
- NFS: the disk with serial NFS_SERIAL gets btrfs (reflink: an NFS 4.2 CLONE of a file on
  the mount shares its extents on the server), mounted at NFS_EXPORT and exported as the
  NFSv4 root (fsid=0) to 127.0.0.1 only; the guest mounts it with its kernel NFSv4.2 client at
  NFS_MOUNT with NFS_MOUNT_OPTIONS (grace and lease times 10 s, so it is usable at once);
- sshd on port 22: root with the lab's client key only (no passwords, no PAM);

and prints `READY_MARKER uptime=SECONDS` on the serial console, or `ERROR_MARKER <why>`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.lab.errors import LabError, LabUnavailable, require_tools
from tests.lab.guest import (
    BUSYBOX,
    _copy_into,
    _pack,
    find_kernel,
    lab_cache,
    library_files,
    module_files,
)

READY_MARKER = "GFS-REMOTE-READY"
ERROR_MARKER = "GFS-REMOTE-ERROR"
VG_NAME = "gfslab"
THIN_POOL = "thinpool"
THIN_POOL_SIZE = "1g"
PV_SERIAL = "gfslab-pv"
NFS_SERIAL = "gfslab-nfs"
NFS_EXPORT = "/srv/nfs"
NFS_MOUNT = "/mnt/target"
# What a real backup target mount looks like: NFSv4.2 over TCP, hard (an I/O to a dead server
# blocks until it is back, which is what gfs's own timeouts must cope with), and the Linux
# defaults for TCP spelled out (60 s per try, 2 retransmissions before "not responding").
NFS_MOUNT_OPTIONS = "vers=4.2,proto=tcp,hard,timeo=600,retrans=2"
NFSD_START = ("rpc.nfsd", "-N", "3", "-V", "4", "--no-udp", "-p", "2049", "4")
NFSD_STOP = ("rpc.nfsd", "0")
GUEST_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

MODULES = (
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "dm-snapshot",
    "dm-thin-pool",
    "btrfs",
    "ext4",
    "nfsd",
    "nfsv4",
)
# Tools copied into the guest, each with every link to it in its host directory
# (lvs -> lvm, thin_check -> pdata_tools, mkfs.ext4 -> mke2fs, mount.nfs4 -> mount.nfs).
SBIN_TOOLS = (
    "lvm",
    "dmsetup",
    "pdata_tools",
    "mkfs.btrfs",
    "mke2fs",
    "exportfs",
    "rpc.mountd",
    "rpc.nfsd",
    "mount.nfs",
    "sshd",
    "setcap",
)
# rsync judges restored trees (-aHAX --checksum); setfacl and setcap make ACLs, capabilities.
BIN_TOOLS = ("btrfs", "qemu-img", "bash", "dash", "rsync", "setfacl")
# busybox-static's sh runs its own applets ahead of PATH, so neither /bin/sh nor root's shell
# may be busybox: sshd runs every command with `$SHELL -c`, and gfs needs the GNU tools.
SHELL_LINKS = {"bin/sh": "/usr/bin/dash", "bin/bash": "/usr/bin/bash"}
GNU_PACKAGES = ("coreutils", "findutils", "diffutils")  # all their commands go to /usr/bin
# The parts of Python's standard library a host script never needs (tests, GUI, tools).
PYTHON_SKIP = {
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "lib2to3",
    "ensurepip",
    "pydoc_data",
    "site-packages",
    "dist-packages",
    "__pycache__",
}
ETC_FILES = ("services", "protocols", "netconfig", "mke2fs.conf")

LVM_CONF = """\
# No udev in the guest: LVM creates its /dev nodes and links itself.
activation {
    udev_sync = 0
    udev_rules = 0
    monitoring = 0
}
devices {
    obtain_device_list_from_udev = 0
}
global {
    use_lvmlockd = 0
}
"""

SSHD_CONFIG = """\
Port 22
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
AuthorizedKeysFile /root/.ssh/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
UseDNS no
PidFile /run/sshd.pid
MaxStartups 64
MaxSessions 64
SetEnv PATH={path}
Subsystem sftp internal-sftp
"""

ETC_TEXT = {
    "passwd": "root:x:0:0:root:/root:/bin/bash\nsshd:x:100:65534::/run/sshd:/bin/false\n",
    "group": "root:x:0:\nnogroup:x:65534:\n",
    "shadow": "root:*:19000:0:99999:7:::\nsshd:*:19000:0:99999:7:::\n",
    "nsswitch.conf": "passwd: files\ngroup: files\nshadow: files\nhosts: files\n",
    "hosts": "127.0.0.1 localhost\n10.0.2.15 gfs-remote-host\n",
    "hostname": "gfs-remote-host\n",
    "exports": f"{NFS_EXPORT} 127.0.0.1(rw,sync,no_subtree_check,no_root_squash,fsid=0)\n",
    "lvm/lvm.conf": LVM_CONF,
    "ssh/sshd_config": SSHD_CONFIG.format(path=GUEST_PATH),
}

INIT_SCRIPT = r"""#!/bin/busybox sh
# gfs remote-host lab init: what it sets up is described in tests/lab/remote_image.py.
# This shell runs busybox applets ahead of PATH: tools that are also applets need full paths.
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
export PATH=@PATH@ HOME=/root
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /run/lock /run/lvm /run/sshd /tmp /var/log /var/lib/nfs/v4recovery
mount -t devpts devpts /dev/pts
exec </dev/console >/dev/console 2>&1
syslogd -O /var/log/messages

fail() { echo "@ERROR@ $*"; while true; do sleep 3600; done; }
must() { "$@" || fail "$step: '$*' failed with exit status $?"; }
uptime_s() { cut -d' ' -f1 /proc/uptime; }

disk_with_serial() {  # $1 serial: prints /dev/vdX once its block device exists (up to 10 s)
    i=0
    while [ $i -lt 100 ]; do
        for dev in /sys/block/vd*; do
            [ "$(cat "$dev/serial" 2>/dev/null)" = "$1" ] && [ -b "/dev/${dev##*/}" ] \
                && { echo "/dev/${dev##*/}"; return 0; }
        done
        usleep 100000; i=$((i + 1))
    done
    return 1
}

begin() { step=$1; echo "GFS-REMOTE-STEP $step uptime=$(uptime_s)"; }

begin modules
while read -r module; do
    insmod "/modules/$module" || echo "GFS-REMOTE-WARNING insmod $module failed"
done </modules/order

# A task blocked for 30 s is reported on the console with its stack (KERN_ERR passes `quiet`):
# a guest that hangs in CI then says where.
[ -w /proc/sys/kernel/hung_task_timeout_secs ] && echo 30 >/proc/sys/kernel/hung_task_timeout_secs

begin network
hostname -F /etc/hostname
must ip link set lo up
must ip link set eth0 up
must ip addr add 10.0.2.15/24 dev eth0
must ip route add default via 10.0.2.2

# The NFS server first: its grace period (10 s) passes while LVM is set up.
begin nfs-server
disk=$(disk_with_serial @NFS_SERIAL@) || fail "nfs: no disk with serial @NFS_SERIAL@"
must /usr/sbin/mkfs.btrfs -q -f -L gfs-nfs "$disk"
mkdir -p @EXPORT@ @MOUNT@
must mount -t btrfs "$disk" @EXPORT@
must mount -t nfsd nfsd /proc/fs/nfsd
# Before nfsd starts: the kernel's 90 s grace period would block every open for that long.
must sh -c 'echo 10 >/proc/fs/nfsd/nfsv4gracetime && echo 10 >/proc/fs/nfsd/nfsv4leasetime'
must exportfs -ra
must rpc.mountd -N 2 -N 3 --no-udp
must @NFSD_START@
grace_end=$(($(cut -d. -f1 /proc/uptime) + 11))

begin lvm
pv=$(disk_with_serial @PV_SERIAL@) || fail "lvm: no disk with serial @PV_SERIAL@"
must lvm pvcreate -q -y -ff "$pv"
must lvm vgcreate -q @VG@ "$pv"
must lvm lvcreate -q --type thin-pool -L @POOL_SIZE@ -n @POOL@ @VG@

begin nfs-mount
must mount.nfs 127.0.0.1:/ @MOUNT@ -o @NFS_OPTIONS@
fstype=$(/usr/bin/stat -f -c %T @MOUNT@)
[ "$fstype" = nfs ] || fail "nfs: @MOUNT@ is $fstype, not nfs"
# Opens wait until the server has left its grace period, but the client retries with a growing
# backoff (up to 15 s): wait out the 10 s here, then a create proves the mount is usable.
while [ "$(cut -d. -f1 /proc/uptime)" -lt "$grace_end" ]; do usleep 200000; done
must sh -c 'echo probe >@MOUNT@/.gfs-lab-probe && rm @MOUNT@/.gfs-lab-probe'

begin sshd
must /usr/sbin/sshd -f /etc/ssh/sshd_config -E /var/log/sshd.log
# sshd's parent returns before its daemon child listens: wait for it (up to 20 s, the guest
# is slow when the host's two cores are busy; a listener missing in CI failed the lab).
i=0 log=/var/log/sshd.log
until netstat -ltn | grep -q ':22 '; do
    [ $i -lt 200 ] || fail "sshd: nothing listens on port 22 after 20 s: $(tail -n 3 "$log")"
    usleep 100000; i=$((i + 1))
done

echo "@READY@ uptime=$(uptime_s) kernel=$(uname -r)"
while true; do sleep 3600; done
"""


@dataclass(frozen=True)
class SshKeys:
    """The lab's SSH keys: the guest's host key and the client key root logs in with."""

    host_key: Path
    host_public_key: str
    client_key: Path
    client_public_key: str


@dataclass(frozen=True)
class RemoteHostImage:
    """What the remote-host guest boots: kernel and initramfs (with the keys of `keys`)."""

    kernel: Path
    initrd: Path
    release: str
    keys: SshKeys


def init_script() -> str:
    """INIT_SCRIPT with the lab's names filled in."""
    values = {
        "@PATH@": GUEST_PATH,
        "@ERROR@": ERROR_MARKER,
        "@READY@": READY_MARKER,
        "@PV_SERIAL@": PV_SERIAL,
        "@NFS_SERIAL@": NFS_SERIAL,
        "@VG@": VG_NAME,
        "@POOL@": THIN_POOL,
        "@POOL_SIZE@": THIN_POOL_SIZE,
        "@EXPORT@": NFS_EXPORT,
        "@MOUNT@": NFS_MOUNT,
        "@NFS_OPTIONS@": NFS_MOUNT_OPTIONS,
        "@NFSD_START@": " ".join(NFSD_START),
    }
    script = INIT_SCRIPT
    for key, value in values.items():
        script = script.replace(key, value)
    return script


def generate_ssh_keys(directory: Path) -> SshKeys:
    """Fresh ed25519 host and client keys in `directory` (made by ssh-keygen)."""
    require_tools("ssh-keygen")
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"host": directory / "ssh_host_ed25519_key", "client": directory / "id_ed25519"}
    for role, path in paths.items():
        for stale in (path, path.with_name(path.name + ".pub")):
            stale.unlink(missing_ok=True)
        argv = ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"gfs-lab-{role}"]
        done = subprocess.run(
            [*argv, "-f", str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise LabError(f"ssh-keygen for the {role} key failed: {done.stderr.strip()}")
    return SshKeys(
        host_key=paths["host"],
        host_public_key=_public_key(paths["host"]),
        client_key=paths["client"],
        client_public_key=_public_key(paths["client"]),
    )


def _public_key(private: Path) -> str:
    """`TYPE BASE64` of the key pair `private` (the comment dropped)."""
    words = private.with_name(private.name + ".pub").read_text().split()
    return f"{words[0]} {words[1]}"


def links_to(directory: Path, name: str) -> list[str]:
    """Names of the symlinks in `directory` whose target is `name` (lvs -> lvm), sorted."""
    return sorted(
        entry.name
        for entry in directory.iterdir()
        if entry.is_symlink() and os.readlink(entry) == name
    )


def package_commands(packages: tuple[str, ...]) -> list[Path]:
    """The commands (files in a bin/ or sbin/ directory) the Debian `packages` install."""
    done = subprocess.run(
        ["dpkg-query", "-L", *packages], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise LabUnavailable(f"dpkg-query -L {' '.join(packages)}: {done.stderr.strip()}")
    commands = []
    for line in done.stdout.splitlines():
        path = Path(line)
        if path.parent.name in ("bin", "sbin") and path.is_file() and os.access(path, os.X_OK):
            commands.append(path)
    return commands


def _find_tool(name: str) -> Path:
    found = shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if found is None:
        raise LabUnavailable(f"the remote-host lab needs {name}: run `scripts/lab-setup`")
    return Path(found)


def _install(root: Path, source: Path, target: str) -> None:
    """Copies the binary `source` to `target` in `root`, with its libraries (ldd)."""
    path = root / target.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source.resolve(), path)
    path.chmod(0o755)
    for library in library_files(source):
        if not (root / library.relative_to("/")).exists():
            _copy_into(root, library)


def _install_tools(root: Path) -> None:
    _copy_into(root, BUSYBOX, 0o755)  # static: no libraries
    for name in SBIN_TOOLS:
        source = _find_tool(name)
        _install(root, source, f"/usr/sbin/{name}")
        for link in links_to(source.parent, name):
            (root / "usr/sbin" / link).symlink_to(name)
    for name in BIN_TOOLS:
        _install(root, _find_tool(name), f"/usr/bin/{name}")
    for link, target in SHELL_LINKS.items():
        (root / link).symlink_to(target)  # busybox --install leaves existing names alone
    for command in package_commands(GNU_PACKAGES):
        if not (root / "usr/bin" / command.name).exists():
            _install(root, command, f"/usr/bin/{command.name}")
    _install_python(root)


def _install_python(root: Path) -> None:
    """python3 and its standard library (without tests, GUI and tools), the libraries of
    its extension modules too."""
    binary = _find_tool("python3").resolve()
    _install(root, binary, f"/usr/bin/{binary.name}")
    (root / "usr/bin/python3").symlink_to(binary.name)
    library = Path(f"/usr/lib/{binary.name}")
    if not library.is_dir():
        raise LabUnavailable(f"no {library} for {binary}")
    for path in sorted(library.rglob("*")):
        parts = set(path.relative_to(library).parts)
        skipped = parts & PYTHON_SKIP or any(part.startswith("config-") for part in parts)
        if skipped or not path.is_file():
            continue
        _copy_into(root, path)
        if path.suffix == ".so":
            for needed in library_files(path):
                if not (root / needed.relative_to("/")).exists():
                    _copy_into(root, needed)


def _install_config(root: Path, keys: SshKeys) -> None:
    for name in ETC_FILES:
        _copy_into(root, Path("/etc") / name, 0o644)
    for name, text in ETC_TEXT.items():
        path = root / "etc" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (root / "etc/shadow").chmod(0o600)
    (root / "etc/mtab").symlink_to("/proc/mounts")
    host_key = root / "etc/ssh/ssh_host_ed25519_key"
    shutil.copyfile(keys.host_key, host_key)
    host_key.chmod(0o600)
    (root / "etc/ssh/ssh_host_ed25519_key.pub").write_text(keys.host_public_key + "\n")
    ssh_dir = root / "root/.ssh"
    ssh_dir.mkdir(parents=True, mode=0o700)
    (ssh_dir / "authorized_keys").write_text(keys.client_public_key + "\n")
    for name in ("etab", "rmtab"):
        (root / "var/lib/nfs").mkdir(parents=True, exist_ok=True)
        (root / "var/lib/nfs" / name).touch()


def _install_modules(root: Path, names: tuple[str, ...], cache: Path) -> str:
    kernel = find_kernel(cache)
    (root / "modules").mkdir(parents=True)
    order = []
    for index, module in enumerate(module_files(kernel, names)):
        name = f"{index:02d}-{module.name}"
        shutil.copyfile(module, root / "modules" / name)
        order.append(name)
    (root / "modules/order").write_text("".join(f"{name}\n" for name in order))
    return kernel.release


def build_remote_host_image(
    workdir: Path, keys: SshKeys, cache: Path | None = None
) -> RemoteHostImage:
    """Builds WORKDIR/remote-host-initramfs.gz holding `keys`; LabUnavailable if setup lacks."""
    require_tools("modprobe", "cpio", "ldd", "dpkg-query")
    if not BUSYBOX.is_file():
        raise LabUnavailable(f"no {BUSYBOX} (busybox-static): run `scripts/lab-setup`")
    cache = cache if cache is not None else lab_cache()
    kernel = find_kernel(cache)
    root = workdir / "remote-host-root"
    if root.exists():
        shutil.rmtree(root)
    for directory in ("bin", "sbin", "dev", "proc", "sys", "run", "tmp", "srv", "mnt"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    release = _install_modules(root, MODULES, cache)
    _install_tools(root)
    _install_config(root, keys)
    (root / "init").write_text(init_script())
    (root / "init").chmod(0o755)
    initrd = workdir / "remote-host-initramfs.gz"
    _pack(root, initrd)
    shutil.rmtree(root)
    return RemoteHostImage(kernel.vmlinuz, initrd, release, keys)

"""A second KVM host on this machine, for cluster tests: its own libvirtd, virtlogd and sshd
in a mount namespace of their own.

The namespace (`unshare --mount --propagation slave`) gets private copies of what makes a
libvirt host one: /run/libvirt (sockets, PID files, live domain state), /var/lib/libvirt,
/var/cache/libvirt, /var/log/libvirt and /etc/libvirt (a copy of this machine's, with its
own `host_uuid`, so libvirt migrates between the two hosts as between two machines, and no
cgroup controllers, so two QEMUs of the same domain name cannot collide in a cgroup). All
else is shared: disks live in shared storage as on a cluster, and a filesystem mounted here
later (the backup share) shows up there too (below `share`, a shared mount point: slave
propagation), as a share every host of a cluster mounts. The host's sshd runs in the
namespace, so what gfs runs over SSH (virt-ssh-helper, qemu-img, cp) sees that host's
libvirt. This machine's lab libvirtd is
the first host.

Checked by hand (libvirt 9.0, QEMU 7.2): a TCG domain live-migrates between the two
(`virsh migrate --live --unsafe`: --unsafe because the disk is on a local filesystem, not
on storage libvirt knows to be shared) in about 2 s.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import libvirt

from tests.lab.errors import LabError
from tests.system.sshd import Sshd, descendants, kill, start_sshd, stop

START_TIMEOUT = 60.0
NAMESPACE_SCRIPT = r"""
set -e
D=$1
shift
mount -t tmpfs -o mode=755 gfs-lab-run /run/libvirt
mount --bind "$D/lib" /var/lib/libvirt
mount --bind "$D/cache" /var/cache/libvirt
mount --bind "$D/log" /var/log/libvirt
mount --bind "$D/etc" /etc/libvirt
virtlogd --pid-file /run/libvirt/virtlogd.pid >>"$D/virtlogd.log" 2>&1 &
libvirtd --pid-file /run/libvirt/libvirtd.pid >>"$D/libvirtd.log" 2>&1 &
exec "$@"
"""


@dataclass
class SecondHost:
    directory: Path
    sshd: Sshd

    @property
    def share(self) -> Path:
        """A shared mount point: what is mounted below it here is mounted there too."""
        return self.directory / "share"

    def mount_share(self, name: str, size_mib: int) -> Path:
        """A new tmpfs below `share`, mounted on both hosts (a cluster's backup share)."""
        path = self.share / name
        path.mkdir()
        _run("mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "gfs-lab-share", str(path))
        return path

    def libvirtd_pid(self) -> int:
        for pid in descendants(self.sshd.process.pid):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "libvirtd":
                    return pid
        raise LabError(f"the second host's libvirtd is not running: {self.log_tail()}")

    @property
    def uri(self) -> str:
        """Its libvirt, from this machine (root may enter the namespace's files by /proc)."""
        socket = f"/proc/{self.libvirtd_pid()}/root/run/libvirt/libvirt-sock"
        return f"qemu+unix:///system?socket={socket}"

    def log_tail(self) -> str:
        log = self.directory / "libvirtd.log"
        text = log.read_text(errors="replace") if log.exists() else "(no log)"
        return "\n".join(text.splitlines()[-15:])

    def connect(self) -> libvirt.virConnect:
        return libvirt.open(self.uri)


def _run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed: {done.stderr.strip()}")


def start_second_host(directory: Path) -> SecondHost:
    directory.mkdir()
    share = directory / "share"
    share.mkdir()
    # This machine's mounts are private: only a shared mount point propagates into the
    # namespace (as a slave: its own mounts stay inside).
    _run("mount", "--bind", str(share), str(share))
    _run("mount", "--make-shared", str(share))
    for name in ("lib", "cache", "log"):
        (directory / name).mkdir()
    subprocess.run(["cp", "-a", "/etc/libvirt", str(directory / "etc")], check=True)
    with (directory / "etc" / "libvirtd.conf").open("a") as conf:
        conf.write(f'\nhost_uuid = "{uuid.uuid4()}"\n')
    with (directory / "etc" / "qemu.conf").open("a") as conf:
        conf.write("\ncgroup_controllers = [ ]\n")
    wrapper = ("unshare", "--mount", "--propagation", "slave", "sh", "-c", NAMESPACE_SCRIPT)
    server = start_sshd(directory / "sshd", (*wrapper, "sh", str(directory)))
    host = SecondHost(directory, server)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            host.connect().close()
            return host
        except (libvirt.libvirtError, LabError):
            if time.monotonic() > deadline:
                stop_second_host(host)
                why = f"the second host's libvirtd does not answer: {host.log_tail()}"
                raise LabError(why) from None
            time.sleep(0.3)


def stop_second_host(host: SecondHost) -> None:
    """Destroy and undefine its domains, then stop its daemons (and everything in it)."""
    with contextlib.suppress(libvirt.libvirtError, LabError):
        conn = host.connect()
        for domain in conn.listAllDomains(0):
            with contextlib.suppress(libvirt.libvirtError):
                if domain.isActive():
                    domain.destroy()
            with contextlib.suppress(libvirt.libvirtError):
                domain.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
        conn.close()
    below = descendants(host.sshd.process.pid)
    stop(host.sshd)
    kill(below)
    subprocess.run(["umount", "-R", str(host.share)], capture_output=True, check=False)

"""Lab domains: qcow2 disks and small TCG libvirt domains booting the lab guest.

Every domain is named `gfs-test-<pytest PID>-<token>-<n>`, defined persistently (so tests can
back it up, snapshot it, dump its XML like any real domain), started at once and destroyed and
undefined by `DomainFactory.cleanup`. QEMU runs as root (a static DAC label) so disks, kernels
and logs may live in pytest's private temporary directories. Domains of earlier runs whose
pytest process is gone (and domains named NAME-suffix after them, such as restored copies)
are removed by `reap_stale_domains`, with libvirt's QEMU logs of them.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import libvirt
import libvirt_qemu

from tests.lab.errors import LabError
from tests.lab.guest import (
    AGENT_MARKER,
    ERROR_MARKER,
    MIN_DISK_MIB,
    GuestImage,
    guest_cmdline,
)

NAME_PREFIX = "gfs-test-"
QEMU_LOG_DIR = Path("/var/log/libvirt/qemu")
# A lab domain's name, or one derived from it with a suffix (a restored copy: NAME-r).
_LAB_NAME = re.compile(rf"^{NAME_PREFIX}(\d+)-[0-9a-f]{{6}}-\d+(?:-.+)?$", re.DOTALL)
_UNDEFINE_FLAGS = (
    libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
    | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
)
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")  # Debian's ovmf: UEFI firmware
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")  # and its variable store template
AGENT_CHANNEL = (
    "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
)


def _ignore_libvirt_error(_context: object, _error: object) -> None:
    """libvirt-python prints every error to stderr by default; the exceptions suffice."""


libvirt.registerErrorHandler(_ignore_libvirt_error, None)


def _run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed: {done.stderr.strip()}")


def create_disk(path: Path, size_mib: int = 64) -> Path:
    """Creates an empty (sparse) qcow2 image of `size_mib` MiB at `path`."""
    if size_mib < MIN_DISK_MIB:
        raise ValueError(f"lab disks need at least {MIN_DISK_MIB} MiB for the pattern layout")
    _run("qemu-img", "create", "-q", "-f", "qcow2", str(path), f"{size_mib}M")
    return path


def copy_disk(source: Path, target: Path) -> Path:
    """Copies the image `source` (not in use by a running domain) to a new qcow2 `target`."""
    _run("qemu-img", "convert", "-O", "qcow2", str(source), str(target))
    return target


@dataclass(frozen=True)
class DomainSpec:
    """Everything `domain_xml` needs for one lab domain."""

    name: str
    image: GuestImage
    disk: Path
    console_log: Path
    cmdline: str
    memory_mib: int = 256
    agent: bool = False
    nvram: Path | None = None  # UEFI boot (OVMF) with this variable store


def disk_element(disk: Path) -> str:
    """The <disk> of vda: a qcow2 file, or a raw block device (a loop device, an LV)."""
    if disk.is_block_device():
        kind, driver, source = "block", "raw", f"dev={quoteattr(str(disk))}"
    else:
        kind, driver, source = "file", "qcow2", f"file={quoteattr(str(disk))}"
    return f"""<disk type='{kind}' device='disk'>
      <driver name='qemu' type='{driver}' discard='unmap'/>
      <source {source}/>
      <target dev='vda' bus='virtio'/>
    </disk>"""


def domain_xml(spec: DomainSpec) -> str:
    """A TCG domain: direct kernel boot, one virtio disk (vda), serial console to a file."""
    channel = AGENT_CHANNEL if spec.agent else ""
    firmware = ""
    if spec.nvram is not None:
        if not OVMF_CODE.is_file():
            raise LabError(f"UEFI lab domains need {OVMF_CODE}: ./scripts/test installs ovmf")
        firmware = (
            f"<loader readonly='yes' type='pflash'>{OVMF_CODE}</loader>"
            f"<nvram template='{OVMF_VARS}'>{escape(str(spec.nvram))}</nvram>"
        )
    return f"""<domain type='qemu'>
  <name>{escape(spec.name)}</name>
  <memory unit='MiB'>{spec.memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(str(spec.image.kernel))}</kernel>
    <initrd>{escape(str(spec.image.initrd))}</initrd>
    <cmdline>{escape(spec.cmdline)}</cmdline>
    {firmware}
  </os>
  <features><acpi/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    {disk_element(spec.disk)}
    <serial type='file'>
      <source path={quoteattr(str(spec.console_log))}/>
      <target port='0'/>
    </serial>
    {channel}
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
</domain>
"""


class LabDomain:
    """A started lab domain: its libvirt handle, disk, console log and marker waits."""

    def __init__(self, domain: libvirt.virDomain, spec: DomainSpec) -> None:
        self.domain = domain
        self.spec = spec
        self.started_at = time.monotonic()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def disk(self) -> Path:
        return self.spec.disk

    @property
    def console_log(self) -> Path:
        return self.spec.console_log

    def console(self) -> str:
        """Everything the guest printed on its serial console so far."""
        if not self.console_log.exists():
            return ""
        return self.console_log.read_text(errors="replace")

    def is_active(self) -> bool:
        try:
            return bool(self.domain.isActive())
        except libvirt.libvirtError:
            return False

    def _failure(self, why: str) -> LabError:
        tail = "\n".join(self.console().splitlines()[-25:])
        return LabError(f"{self.name}: {why}; console log {self.console_log} ends:\n{tail}")

    def wait_for(self, marker: str, timeout: float = 90.0) -> str:
        """Waits until a console line contains `marker` and returns that line.

        Raises LabError (with the end of the console log) when the guest reports an error
        before the marker, the domain stops without printing it, or `timeout` seconds pass.
        """
        deadline = time.monotonic() + timeout
        while True:
            active = self.is_active()  # read the log after this, or the last lines may be missed
            for line in self.console().splitlines():
                if marker in line:
                    return line.strip()
                if ERROR_MARKER in line and ERROR_MARKER not in marker:
                    raise self._failure(f"guest error before {marker!r}: {line.strip()}")
            if not active:
                raise self._failure(f"domain stopped without printing {marker!r}")
            if time.monotonic() > deadline:
                raise self._failure(f"no {marker!r} within {timeout:.0f} s")
            time.sleep(0.1)

    def agent_command(self, command: str, timeout: int = 10) -> str:
        """Sends a QMP-style JSON `command` to qemu-ga in the guest; returns its JSON reply."""
        reply: str = libvirt_qemu.qemuAgentCommand(self.domain, command, timeout, 0)
        return reply

    def wait_for_agent(self, timeout: float = 60.0) -> None:
        """Waits until qemu-ga in the guest (made with agent=True) answers guest-ping.

        libvirt reports the agent as not connected for a moment after qemu-ga opened its
        port, hence the retries. Raises LabError when it does not answer within `timeout`.
        """
        self.wait_for(AGENT_MARKER, timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.agent_command('{"execute": "guest-ping"}', timeout=5)
                return
            except libvirt.libvirtError as error:
                if time.monotonic() > deadline:
                    raise self._failure(f"guest agent did not answer: {error}") from error
            time.sleep(0.25)

    def wait_shutoff(self, timeout: float = 60.0) -> None:
        """Waits until the guest has powered off (the domain is no longer active)."""
        deadline = time.monotonic() + timeout
        while self.is_active():
            if time.monotonic() > deadline:
                raise self._failure(f"still running after {timeout:.0f} s")
            time.sleep(0.1)

    def remove(self) -> None:
        """Destroys (if running) and undefines the domain; tolerates it being gone already."""
        remove_domain(self.domain)


def remove_domain(domain: libvirt.virDomain) -> None:
    """Destroys and undefines `domain`, ignoring 'not running' and 'no such domain'.

    For lab domains (NAME_PREFIX) libvirt's QEMU log of the domain is deleted too.
    """
    with contextlib.suppress(libvirt.libvirtError):
        if domain.isActive():
            domain.destroy()
    with contextlib.suppress(libvirt.libvirtError):
        domain.undefineFlags(_UNDEFINE_FLAGS)
    with contextlib.suppress(libvirt.libvirtError):
        name = domain.name()
        if name.startswith(NAME_PREFIX):
            (QEMU_LOG_DIR / f"{name}.log").unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(name: str) -> bool:
    match = _LAB_NAME.match(name)
    return match is not None and not _pid_alive(int(match.group(1)))


def reap_stale_domains(conn: libvirt.virConnect) -> list[str]:
    """Removes lab domains (and QEMU logs) whose pytest process has exited; returns names."""
    reaped = []
    for domain in conn.listAllDomains():
        if _stale(domain.name()):
            reaped.append(domain.name())
            remove_domain(domain)
    for log in QEMU_LOG_DIR.glob(f"{NAME_PREFIX}*.log"):
        if _stale(log.name.removesuffix(".log")):
            log.unlink(missing_ok=True)
    return reaped


class DomainFactory:
    """Makes lab domains with files under `workdir`; `cleanup` removes domains and files."""

    def __init__(self, conn: libvirt.virConnect, image: GuestImage, workdir: Path) -> None:
        self.conn = conn
        self.image = image
        self.workdir = workdir
        self.token = uuid.uuid4().hex[:6]
        self.domains: list[LabDomain] = []
        self.own_connections: list[libvirt.virConnect] = []
        workdir.mkdir(parents=True, exist_ok=True)

    def reconnect(self, uri: str) -> libvirt.virConnect:
        """After a libvirtd restart: a new connection to `uri` (closed by `cleanup`), with the
        handles of this factory's domains looked up again on it (by UUID); returns it."""
        conn = libvirt.open(uri)
        self.own_connections.append(conn)
        self.conn = conn
        for lab_domain in self.domains:
            lab_domain.domain = conn.lookupByUUIDString(lab_domain.domain.UUIDString())
        return conn

    def path(self, filename: str) -> Path:
        """A path in the factory's directory (removed by `cleanup`), e.g. for disk copies."""
        return self.workdir / filename

    def __call__(
        self,
        action: str = "idle",
        tag: str | None = None,
        after: str | None = None,
        disk: Path | None = None,
        disk_mib: int = 64,
        memory_mib: int = 256,
        agent: bool = False,
        layout: str = "raw",
        freeze_hang: int = 0,
        name_suffix: str = "",
        uefi: bool = False,
    ) -> LabDomain:
        """Defines and starts a domain whose guest does `action` (see tests.lab.guest).

        `disk` is an existing image to attach; without it a blank qcow2 of `disk_mib` MiB
        is created. `agent` adds the guest-agent channel and starts qemu-ga in the guest.
        `layout` "fs" keeps the pattern in files on an ext2 filesystem instead of raw blocks.
        `freeze_hang` seconds: the agent's filesystem freeze hangs that long.
        `name_suffix` is appended to the unique name (e.g. shell metacharacters).
        `uefi` boots through OVMF with an NVRAM of the domain's own (a pflash variable store).
        """
        if agent and not self.image.has_agent:
            raise LabError("the guest image has no qemu-ga: install qemu-guest-agent")
        stem = f"{NAME_PREFIX}{os.getpid()}-{self.token}-{len(self.domains) + 1}"
        name = f"{stem}{name_suffix}"  # files are named after the stem: no odd characters
        if disk is None:
            disk = create_disk(self.path(f"{stem}.qcow2"), disk_mib)
        spec = DomainSpec(
            name=name,
            image=self.image,
            disk=disk,
            console_log=self.path(f"{stem}.console.log"),
            cmdline=guest_cmdline(
                action, tag=tag, after=after, agent=agent, layout=layout, freeze_hang=freeze_hang
            ),
            memory_mib=memory_mib,
            agent=agent,
            nvram=self.path(f"{stem}_VARS.fd") if uefi else None,
        )
        domain = self.conn.defineXML(domain_xml(spec))
        lab_domain = LabDomain(domain, spec)
        self.domains.append(lab_domain)
        try:
            domain.create()
        except libvirt.libvirtError as error:
            raise LabError(f"starting {name} failed: {error}") from error
        lab_domain.started_at = time.monotonic()
        return lab_domain

    def cleanup(self) -> None:
        """Destroys and undefines every domain made here, then deletes `workdir`."""
        for lab_domain in reversed(self.domains):
            lab_domain.remove()
        self.domains.clear()
        for conn in self.own_connections:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

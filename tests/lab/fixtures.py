"""pytest fixtures of the libvirt lab; import them into a test module by name.

- `libvirt_daemon` (session): qemu:///system answering, daemons started by hand if needed
  and stopped (only those) by the last session using them (see tests.lab.daemons);
- `libvirt_conn` (session): a libvirt-python connection; removes domains of crashed runs;
- `guest_image` (session): kernel + initramfs paths (`tests.lab.guest.GuestImage`);
- `make_domain` (function): a `DomainFactory`; `make_domain(action=..., tag=..., disk=...)`
  returns a started `LabDomain` with name, disk, console_log and `wait_for(marker, timeout)`.
  Its domains are destroyed and undefined, its files deleted, also when the test fails.
- `remote_host` (module): a running nested "remote KVM host" (`tests.lab.remote_host.RemoteHost`,
  plain QEMU, no libvirt) with LVM, NFS and sshd, booted once per test module that imports
  it (a fixture imported into a module is that module's own anyway); its QEMU is killed by
  PID and its files deleted when the module ends, so no two of these guests share the
  two cores (in CI, three idle guests to the end of the session slowed the third's boot
  until its sshd came up late).

A machine without the lab's setup fails the test (never skips) with a hint at scripts/lab-setup.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import libvirt
import pytest

from tests.lab.daemons import LibvirtDaemons, start_libvirt_daemons
from tests.lab.domains import DomainFactory, reap_stale_domains
from tests.lab.errors import LabUnavailable
from tests.lab.guest import GuestImage, build_guest_image
from tests.lab.remote_host import RemoteHost, start_remote_host
from tests.lab.remote_image import build_remote_host_image, generate_ssh_keys

T = TypeVar("T")


def _or_fail(make: Callable[[], T]) -> T:
    """make(), but a machine without the lab's setup fails the test (never skips it)."""
    try:
        return make()
    except LabUnavailable as missing:
        message = str(missing)
    pytest.fail(message, pytrace=False)


@pytest.fixture(scope="session")
def libvirt_daemon() -> Iterator[LibvirtDaemons]:
    daemons = _or_fail(start_libvirt_daemons)
    try:
        yield daemons
    finally:
        daemons.stop()


@pytest.fixture(scope="session")
def libvirt_conn(libvirt_daemon: LibvirtDaemons) -> Iterator[libvirt.virConnect]:
    conn = libvirt.open(libvirt_daemon.uri)
    try:
        reap_stale_domains(conn)
        yield conn
    finally:
        with contextlib.suppress(libvirt.libvirtError):  # broken by a libvirtd restart test
            conn.close()


@pytest.fixture(scope="session")
def guest_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GuestImage]:
    workdir = tmp_path_factory.mktemp("lab-guest")
    image = _or_fail(lambda: build_guest_image(workdir))
    try:
        yield image
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def make_domain(
    libvirt_conn: libvirt.virConnect, guest_image: GuestImage, tmp_path: Path
) -> Iterator[DomainFactory]:
    factory = DomainFactory(libvirt_conn, guest_image, tmp_path / "lab")
    try:
        yield factory
    finally:
        factory.cleanup()


@pytest.fixture(scope="module")
def remote_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteHost]:
    workdir = tmp_path_factory.mktemp("remote-host")
    try:
        keys = _or_fail(lambda: generate_ssh_keys(workdir / "keys"))
        image = _or_fail(lambda: build_remote_host_image(workdir, keys))
        host = _or_fail(lambda: start_remote_host(workdir / "run", image))
        try:
            yield host
        finally:
            host.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

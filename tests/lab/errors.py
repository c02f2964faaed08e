"""The two ways the lab fails: the machine is not prepared, or a lab step went wrong."""

from __future__ import annotations

import os
import shutil

SETUP_HINT = "run `scripts/lab-setup` as root first"


class LabUnavailable(Exception):
    """The machine lacks something the lab needs (root, a tool, the guest kernel)."""


class LabError(Exception):
    """A lab step failed: a daemon did not answer, a guest did not print its marker."""


class HostHung(LabError):
    """A command in a lab host guest did not end in time: the guest is treated as hung
    from then on (its later commands fail at once instead of each waiting out a timeout)."""


def require_root() -> None:
    """Raises LabUnavailable unless we are root (libvirtd, qemu:///system need it)."""
    if os.geteuid() != 0:
        raise LabUnavailable(f"the libvirt lab needs root: {SETUP_HINT}, then run pytest as root")


def require_tools(*tools: str) -> None:
    """Raises LabUnavailable naming every tool of `tools` that is not on PATH."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        raise LabUnavailable(f"the libvirt lab needs {', '.join(missing)}: {SETUP_HINT}")

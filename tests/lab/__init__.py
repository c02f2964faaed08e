"""A libvirt lab for the system tests: real libvirtd, TCG guests booted from a tiny initramfs.

Prepare a machine once with `scripts/lab-setup` (as root). Then:

- `daemons.py` starts virtlogd and libvirtd by hand (there is no systemd) or reuses running ones;
- `guest.py` builds the guest: a Debian cloud kernel plus a busybox initramfs whose /init
  writes or checks a known pattern on /dev/vda, driven by the kernel command line;
- `domains.py` creates qcow2 disks and libvirt domains (`type='qemu'`, direct kernel boot,
  serial console to a file) and waits for markers in the console log;
- `fixtures.py` wraps them as pytest fixtures that clean up after themselves.
"""

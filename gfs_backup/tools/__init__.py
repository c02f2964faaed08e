"""Wrappers of the system's tools: argv builders and output parsers for btrfs, LVM,
libvirt and its domain XML, the guest agent, fsck, the drill's QEMU, /proc mountinfo.
Imports `transport` and `core`, nothing above."""

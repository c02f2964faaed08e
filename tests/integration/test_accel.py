"""The KVM probe runs real guest code (into protected mode) in a bounded child: TCG
always passes it; a /dev/kvm that exists but hangs at the first protected-mode instruction
(these machines) fails it within the bound, and the drill then uses TCG."""

from __future__ import annotations

import time

from gfs_backup.tools.accel import PROBE_SECONDS, best_accel, runs_guest_code


def test_tcg_runs_the_probe_guest() -> None:
    started = time.monotonic()
    assert runs_guest_code("tcg") == (True, "")
    assert time.monotonic() - started < 3


def test_the_kvm_probe_answers_within_its_bound_and_decides_the_accelerator() -> None:
    started = time.monotonic()
    works, why = runs_guest_code("kvm")
    assert time.monotonic() - started < PROBE_SECONDS + 2
    accel, reason = best_accel()
    assert accel == ("kvm" if works else "tcg")
    if not works:  # on these machines: /dev/kvm exists and hangs (LAB.md)
        assert why and reason == why
        assert "did not run within" in why or "/dev/kvm" in why or "QEMU" in why

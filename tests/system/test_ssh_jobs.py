"""`gfs run` of a job on a remote host: the "remote" is a real sshd on this machine, so the
job's btrfs commands and its `btrfs send` stream go over SSH."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import RunGfs
from tests.system.conftest import Mounter, make_subvolume, subvolumes_below
from tests.system.helpers import KEEP_LAST_ONE, listing, write_config
from tests.system.sshd import Sshd, sshd

pytestmark = [pytest.mark.system, pytest.mark.slow]
__all__ = ["sshd"]


def test_btrfs_job_on_a_remote_host_runs_over_ssh(
    sshd: Sshd, mounts: Mounter, tmp_path: Path, run_gfs: RunGfs
) -> None:
    sshd.trust()
    source = mounts("src")
    target = mounts("tgt", kind="tmpfs", size_mb=64)
    volume = make_subvolume(source / "vol")
    (volume / "data.bin").write_bytes(os.urandom(8 << 20))
    config = write_config(
        tmp_path, target, "vol", "btrfs", "subvolume", volume, KEEP_LAST_ONE, 'host = "lab"\n'
    )
    with config.open("a") as handle:
        handle.write(
            f'[hosts.lab]\naddress = "127.0.0.1"\nport = {sshd.port}\n'
            f"identity_file = {json.dumps(str(sshd.client_key))}\n"
            f"known_hosts = {json.dumps(str(sshd.known_hosts))}\n"
        )
    result = run_gfs("run", "--force", "--config", str(config), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["jobs"][0]["status"] == "ok"
    (generation,) = listing(run_gfs("list", "--config", str(config), "--json"))
    assert generation["verified"]["result"] == "ok"
    assert generation["size"] > 8 << 20
    assert subvolumes_below(volume) == []
    log = sshd.log.read_text()
    assert log.count("Accepted publickey") == 1  # one connection for the whole job
    assert log.count("Starting session: command") >= 4  # snapshot, show x2, send, delete

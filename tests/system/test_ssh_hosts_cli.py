"""`gfs hosts list|trust|check` against a real OpenSSH sshd on 127.0.0.1."""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path

import pytest

from gfs_backup.transport.known_hosts import lookup_name
from tests.conftest import RunGfs
from tests.system.sshd import Sshd, keygen, sshd

pytestmark = [pytest.mark.system, pytest.mark.slow]
__all__ = ["sshd"]


def _write_config(tmp_path: Path, sshd: Sshd, known_hosts: Path) -> Path:
    config = tmp_path / "gfs.toml"
    config.write_text(
        f"state_dir = {json.dumps(str(tmp_path / 'state'))}\n"
        f'[hosts.lab]\naddress = "127.0.0.1"\nport = {sshd.port}\nuser = "root"\n'
        f"identity_file = {json.dumps(str(sshd.client_key))}\n"
        f"known_hosts = {json.dumps(str(known_hosts))}\n",
        encoding="utf-8",
    )
    return config


def test_hosts_trust_records_the_key_then_commands_work(
    sshd: Sshd, tmp_path: Path, run_gfs: RunGfs
) -> None:
    known_hosts = tmp_path / "new-dir" / "known_hosts"
    config = str(_write_config(tmp_path, sshd, known_hosts))
    listed = run_gfs("hosts", "list", "--config", config)
    assert "key UNKNOWN: run `gfs hosts trust lab`" in listed.stdout
    refused = run_gfs("hosts", "check", "--config", config)
    assert refused.exit_code == 5
    assert "lab: FAILED: host lab" in refused.stdout and "unknown host key" in refused.stdout

    wrong = run_gfs("hosts", "trust", "lab", "--expect", "SHA256:AAAA", "--config", config)
    assert wrong.exit_code == 5 and "not the expected SHA256:AAAA: not recorded" in wrong.stderr
    assert not known_hosts.exists()
    trusted = run_gfs(
        "hosts", "trust", "lab", "--expect", sshd.host_key.fingerprint, "--config", config
    )
    assert trusted.exit_code == 0, trusted.output
    assert trusted.stdout == (
        f"host lab (127.0.0.1:{sshd.port}): {sshd.host_key}: recorded in {known_hosts}\n"
    )
    assert stat.S_IMODE(known_hosts.stat().st_mode) == 0o600
    assert known_hosts.read_text() == (
        f"[127.0.0.1]:{sshd.port} {sshd.host_key.type} {sshd.host_key.base64}\n"
    )
    again = run_gfs("hosts", "trust", "lab", "--config", config)
    assert again.exit_code == 0 and "already trusted" in again.stdout

    checked = run_gfs("hosts", "check", "--config", config, "--json")
    assert checked.exit_code == 0, checked.output
    assert json.loads(checked.stdout) == {"hosts": [{"name": "lab", "ok": True, "message": "ok"}]}
    listed = run_gfs("hosts", "list", "--config", config)
    assert listed.stdout == (f"lab: root@127.0.0.1:{sshd.port}, key {sshd.host_key}\n")


def test_hosts_trust_needs_replace_for_a_changed_key(
    sshd: Sshd, tmp_path: Path, run_gfs: RunGfs
) -> None:
    old = keygen(tmp_path / "old_host_key")
    known_hosts = tmp_path / "known_hosts"
    other_line = f"kvm9.example.net {old.type} {old.base64}\n"
    known_hosts.write_text(
        other_line + f"{lookup_name('127.0.0.1', sshd.port)} {old.type} {old.base64}\n"
    )
    config = str(_write_config(tmp_path, sshd, known_hosts))
    refused = run_gfs("hosts", "trust", "lab", "--config", config)
    assert refused.exit_code == 5
    assert re.fullmatch(
        rf"gfs: error: host lab \(127\.0\.0\.1:{sshd.port}\) sent {re.escape(str(sshd.host_key))},"
        rf" but {known_hosts} records a different key .*: check the new fingerprint on the "
        r"host, then run `gfs hosts trust lab --replace`\n",
        refused.stderr,
    )
    assert old.base64 in known_hosts.read_text()
    replaced = run_gfs("hosts", "trust", "lab", "--replace", "--config", config)
    assert replaced.exit_code == 0, replaced.output
    assert "replaced in" in replaced.stdout
    assert known_hosts.read_text() == other_line + (
        f"[127.0.0.1]:{sshd.port} {sshd.host_key.type} {sshd.host_key.base64}\n"
    )
    assert run_gfs("hosts", "check", "lab", "--config", config).exit_code == 0


def test_hosts_trust_help_explains_out_of_band_check(run_gfs: RunGfs) -> None:
    help_text = run_gfs("hosts", "trust", "--help").stdout
    assert "ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub" in help_text
    assert "--replace" in help_text

"""Pure helpers of the SSH runner: known_hosts lookup, fingerprints, messages, the remote
command line. The hashed line and the fingerprint were recorded from OpenSSH 9.2
(`ssh-keygen -H` and `ssh-keygen -lf`)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from gfs_backup.core.config import Config, Host
from gfs_backup.transport.known_hosts import (
    HostKey,
    Verdict,
    changed_key_message,
    check_host_key,
    known_hosts_path,
    lookup_name,
    parse_known_hosts,
    recorded_keys,
    replace_lines,
    unknown_key_message,
)
from gfs_backup.transport.runner import Command, CommandError, LocalRunner
from gfs_backup.transport.ssh import SSHRunner, close_runners, remote_command_line, runner_for

pytestmark = pytest.mark.unit

KEY = HostKey("ssh-ed25519", "AAAAC3NzaC1lZDI1NTE5AAAAIHn97fgf3DgKkBpFmYVIfYGLVDmGFWdk6HerbEnBNkGg")
KEY_FINGERPRINT = "SHA256:DQ0dktQtzKUES6vVDjWqzFRxatDd/5GiUERtZI+hZ60"
HASHED_2222 = (
    f"|1|7JEmUkSGo378vZosdbtI+oiAhho=|6KsUcFMtcQZ9zr4uwsGBIC9fM8o= {KEY.type} {KEY.base64}"
)
OTHER = HostKey(
    "ssh-ed25519", "AAAAC3NzaC1lZDI1NTE5AAAAIKXJvyDhErLazsSilSgEkIGp+g0J7xRmp7ck8CHuax0S"
)
KVM2 = Host("kvm2", "10.0.0.5", known_hosts="/etc/gfs/known_hosts")


def test_lookup_name_is_bracketed_off_port_22() -> None:
    assert lookup_name("kvm2.example.net", 22) == "kvm2.example.net"
    assert lookup_name("127.0.0.1", 2222) == "[127.0.0.1]:2222"


def test_known_hosts_path_defaults_to_etc_gfs() -> None:
    assert known_hosts_path(Host("a", "a")) == Path("/etc/gfs/known_hosts")
    assert known_hosts_path(Host("a", "a", known_hosts="/x/kh")) == Path("/x/kh")


def test_fingerprint_is_what_ssh_keygen_prints() -> None:
    assert KEY.fingerprint == KEY_FINGERPRINT
    assert str(KEY) == f"ssh-ed25519 {KEY_FINGERPRINT}"


def test_hashed_entry_matches_only_its_host_and_port() -> None:
    entries = parse_known_hosts(HASHED_2222)
    assert recorded_keys(entries, "[127.0.0.1]:2222") == [KEY]
    assert recorded_keys(entries, "[127.0.0.1]:2223") == []
    assert recorded_keys(entries, "127.0.0.1") == []


def test_plain_entries_patterns_and_markers() -> None:
    text = "\n".join(
        [
            "# a comment",
            "",
            f"kvm2,10.0.0.5 {KEY.type} {KEY.base64} root@kvm2",
            f"*.example.net,!evil.example.net {OTHER.type} {OTHER.base64}",
            f"@cert-authority * {OTHER.type} {OTHER.base64}",
            "garbage line",
            "badbase64 ssh-ed25519 not!base64",
        ]
    )
    entries = parse_known_hosts(text)
    assert recorded_keys(entries, "10.0.0.5") == [KEY]
    assert recorded_keys(entries, "KVM2") == [KEY]  # host names are case-insensitive
    assert recorded_keys(entries, "kvm3.example.net") == [OTHER]
    assert recorded_keys(entries, "evil.example.net") == []
    assert recorded_keys(entries, "[10.0.0.5]:2222") == []
    assert recorded_keys(entries, "badbase64") == []


def test_bracket_is_literal_not_a_character_class() -> None:
    entries = parse_known_hosts(f"[127.0.0.1]:2222 {KEY.type} {KEY.base64}")
    assert recorded_keys(entries, "[127.0.0.1]:2222") == [KEY]
    assert recorded_keys(entries, "1:2222") == []


def test_verdicts() -> None:
    entries = parse_known_hosts(
        f"kvm2 {KEY.type} {KEY.base64}\nold {OTHER.type} {OTHER.base64}\n"
        f"@revoked * {OTHER.type} {OTHER.base64}"
    )
    assert check_host_key(entries, "kvm2", KEY) == (Verdict.KNOWN, None)
    assert check_host_key(entries, "new", KEY) == (Verdict.UNKNOWN, None)
    assert check_host_key(entries, "old", KEY) == (Verdict.CHANGED, OTHER)
    assert check_host_key(entries, "old", OTHER) == (Verdict.REVOKED, None)
    rsa = HostKey("ssh-rsa", KEY.base64)
    assert check_host_key(entries, "kvm2", rsa) == (Verdict.UNKNOWN, None)


def test_messages_are_one_line_with_what_to_do() -> None:
    unknown = unknown_key_message(KVM2, KEY)
    assert unknown == (
        f"host kvm2 (10.0.0.5:22): unknown host key ssh-ed25519 {KEY_FINGERPRINT}; check the "
        "fingerprint and run `gfs hosts trust kvm2`"
    )
    changed = changed_key_message(KVM2, OTHER, KEY, Path("/etc/gfs/known_hosts"))
    assert changed.startswith("host key of kvm2 (10.0.0.5:22) CHANGED: it sent ssh-ed25519 ")
    assert KEY_FINGERPRINT in changed
    assert "(possible man-in-the-middle)" in changed
    assert changed.endswith(
        "remove the old key from /etc/gfs/known_hosts and run `gfs hosts trust kvm2`"
    )
    assert "\n" not in unknown + changed


def test_replace_lines_drops_only_lines_for_exactly_that_host() -> None:
    text = (
        "# keep me\n"
        f"kvm2 {OTHER.type} {OTHER.base64}\n"
        f"kvm2,kvm2-alias {OTHER.type} {OTHER.base64}\n"
        f"kvm* {OTHER.type} {OTHER.base64}\n"
        f"{HASHED_2222}\n"
    )
    result = replace_lines(text, "kvm2", KEY).splitlines()
    assert result == [
        "# keep me",
        f"kvm2,kvm2-alias {OTHER.type} {OTHER.base64}",
        f"kvm* {OTHER.type} {OTHER.base64}",
        HASHED_2222,
        f"kvm2 {KEY.type} {KEY.base64}",
    ]
    hashed = replace_lines(HASHED_2222 + "\n", "[127.0.0.1]:2222", OTHER).splitlines()
    assert hashed == [f"[127.0.0.1]:2222 {OTHER.type} {OTHER.base64}"]


def test_remote_command_line_quotes_every_argument_and_wraps_timeout() -> None:
    argv = ("printf", "%s", "; rm -rf /", "$(id)", "a\nb", "it's", "")
    line = remote_command_line(Command(argv, timeout=30))
    assert shlex.split(line) == ["timeout", "--kill-after=10", "30", *argv]
    assert shlex.split(remote_command_line(Command(argv, timeout=2.5)))[2] == "2.5"
    assert shlex.split(remote_command_line(Command(argv, timeout=30 * 86400)))[2] == "2592000"
    assert shlex.split(remote_command_line(Command(argv, timeout=None))) == list(argv)


def test_remote_command_line_refuses_nul() -> None:
    with pytest.raises(CommandError, match="NUL"):
        remote_command_line(Command(("echo", "a\0b")))


def test_runner_for_local_and_shared_remote_runners() -> None:
    config = Config("gfs.toml", Path("/s"), Path("/p"), {}, {"kvm2": KVM2}, [])
    local = runner_for("local", config, dry_run=True)
    assert isinstance(local, LocalRunner) and local.dry_run
    remote = runner_for("kvm2", config)
    assert isinstance(remote, SSHRunner) and remote.host == "kvm2" and not remote.dry_run
    assert runner_for("kvm2", config) is remote  # one connection per host
    assert runner_for("kvm2", config, dry_run=True) is not remote
    close_runners()
    assert runner_for("kvm2", config) is not remote
    close_runners()

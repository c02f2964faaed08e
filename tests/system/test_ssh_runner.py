"""SSHRunner and `gfs hosts` against a real OpenSSH sshd on 127.0.0.1 (tests/system/sshd.py)."""

from __future__ import annotations

import hashlib
import os
import secrets
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gfs_backup.core.errors import GfsError
from gfs_backup.transport.known_hosts import HostKeyError
from gfs_backup.transport.runner import Command, CommandError
from gfs_backup.transport.ssh import SSHError, SSHRunner
from tests.system.sshd import Sshd, free_port, keygen, kill, pids_with, sshd

pytestmark = [pytest.mark.system, pytest.mark.slow]
__all__ = ["sshd"]

STREAM_SIZE = 64 << 20


@pytest.fixture
def runner(sshd: Sshd) -> Iterator[SSHRunner]:
    sshd.trust()
    ssh = SSHRunner(sshd.host())
    yield ssh
    ssh.close()


def marker() -> str:
    """A unique `sleep` argument to find the remote process by (sleep adds it up)."""
    return f"0.{secrets.randbelow(10**12):012d}1"


def gone(runner: SSHRunner, pattern: str, within: float) -> bool:
    """True once no remote process matches `pattern` (pgrep -f), polled for `within` s."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        # "[s]leep" does not match the pgrep (or timeout) process that carries the pattern.
        if runner.run(Command(("pgrep", "-f", pattern)), check=False).returncode == 1:
            return True
        time.sleep(0.2)
    return False


def test_run_captures_output_and_checks_exit_status(runner: SSHRunner) -> None:
    done = runner.run(Command(("echo", "hello", "world")))
    assert (done.returncode, done.stdout, done.stderr) == (0, "hello world\n", "")
    failing = Command(("sh", "-c", 'echo "first line" >&2; echo "disk on fire" >&2; exit 3'))
    assert runner.run(failing, check=False).returncode == 3
    with pytest.raises(CommandError) as caught:
        runner.run(failing)
    assert str(caught.value) == (
        "sh: on host lab: exit status 3: first line disk on fire (command: sh -c "
        '\'echo "first line" >&2; echo "disk on fire" >&2; exit 3\')'
    )
    with pytest.raises(CommandError, match="on host lab: not installed"):
        runner.run(Command(("gfs-no-such-tool", "x")))
    failing_stream = Command(("sh", "-c", "echo data; echo ERR >&2; exit 1"))
    with (
        pytest.raises(CommandError, match=r"exit status 1: .*ERR"),
        runner.reading(failing_stream) as out,
    ):
        assert out.read() == b"data\n"


def test_streams_64_mib_both_ways_unchanged(runner: SSHRunner, tmp_path: Path) -> None:
    remote = tmp_path / "remote-copy"  # the "remote" host is this machine
    sent = hashlib.sha256()
    with runner.writing(Command(("dd", f"of={remote}", "bs=1M", "status=none"))) as feed:
        for _ in range(STREAM_SIZE >> 22):
            chunk = os.urandom(4 << 20)
            sent.update(chunk)
            feed.write(chunk)
    remote_sum = runner.run(Command(("sha256sum", str(remote)))).stdout.split()[0]
    assert remote_sum == sent.hexdigest()
    received = hashlib.sha256()
    size = 0
    buffer = bytearray(4 << 20)
    with runner.reading(Command(("cat", str(remote)))) as stream:
        while count := stream.readinto(buffer):
            received.update(memoryview(buffer)[:count])
            size += count
    assert (size, received.hexdigest()) == (STREAM_SIZE, sent.hexdigest())
    nowhere = Command(("dd", f"of={tmp_path}/no-such-dir/file", "bs=1M", "status=none"))
    with (
        pytest.raises(CommandError, match=r"dd: on host lab: exit status 1: .*No such file"),
        runner.writing(nowhere) as feed,
    ):
        for _ in range(64):
            feed.write(bytes(1 << 20))


def test_streams_ending_at_paramikos_rekey_point_do_not_stall(sshd: Sshd) -> None:
    # paramiko used to start a key exchange after 512 MiB received; with the server's
    # CHANNEL_CLOSE already on its way, its transport thread deadlocked for 30 s and the
    # stream failed ("Key-exchange timed out"): 3 of 4 reads of 512 MiB did.
    sshd.trust()
    for _ in range(4):  # timing decides whether the close overtakes the key exchange
        ssh = SSHRunner(sshd.host())
        try:
            started = time.monotonic()
            size = 0
            with ssh.reading(
                Command(("dd", "if=/dev/zero", "bs=1M", "count=512", "status=none"), timeout=600)
            ) as stream:
                while data := stream.read(1 << 20):
                    size += len(data)
            elapsed = time.monotonic() - started
        finally:
            ssh.close()
        assert size == 512 << 20
        assert elapsed < 25, f"512 MiB took {elapsed:.0f} s: a stalled key exchange?"


HOSTILE = [
    "; rm -rf /",
    "$(touch {canary})",
    "`touch {canary}`",
    "' \"",
    "a\"b'c",
    "line\nbreak",
    "--help",
    "-n",
    "",
    "  spaced  out  ",
    "*",
    "~root",
    "$HOME",
    "back\\slash",
    "&& echo x || true | cat > {canary}",
    "grüße €",
    "\t",
]


def test_hostile_arguments_arrive_as_literal_single_arguments(
    runner: SSHRunner, tmp_path: Path
) -> None:
    canary = tmp_path / "canary"
    args = [arg.format(canary=canary) for arg in HOSTILE]
    done = runner.run(Command(("printf", "%s\\0", *args)))
    assert done.stdout.split("\0")[:-1] == args
    assert not canary.exists()
    # Also as the program name and in a stream.
    with runner.reading(Command(("printf", "%s\\0", *args))) as stream:
        assert stream.read().decode().split("\0")[:-1] == args
    assert runner.run(Command(("sh", "-c", 'printf %s "$1"', "sh", args[0]))).stdout == args[0]


def test_unknown_host_key_is_refused_with_its_fingerprint(sshd: Sshd) -> None:
    printed = subprocess.run(
        ["ssh-keygen", "-lf", str(sshd.directory / "host_ed25519.pub")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[1]
    ssh = SSHRunner(sshd.host())
    with pytest.raises(HostKeyError) as caught:
        ssh.run(Command(("true",)))
    assert str(caught.value) == (
        f"host lab (127.0.0.1:{sshd.port}): unknown host key ssh-ed25519 {printed}; "
        "check the fingerprint and run `gfs hosts trust lab`"
    )
    assert caught.value.exit_code == 5


def test_changed_host_key_is_refused(sshd: Sshd, tmp_path: Path) -> None:
    impostor = keygen(tmp_path / "old_host_key")
    sshd.trust(impostor)
    with pytest.raises(HostKeyError) as caught:
        SSHRunner(sshd.host()).run(Command(("true",)))
    message = str(caught.value)
    assert message.startswith(f"host key of lab (127.0.0.1:{sshd.port}) CHANGED: ")
    assert sshd.host_key.fingerprint in message and impostor.fingerprint in message
    assert "(possible man-in-the-middle)" in message
    assert message.endswith(
        f"remove the old key from {sshd.known_hosts} and run `gfs hosts trust lab`"
    )


def test_connection_failures_are_one_line_errors(sshd: Sshd, tmp_path: Path) -> None:
    sshd.trust()
    stranger = tmp_path / "stranger"
    keygen(stranger)
    with pytest.raises(SSHError, match=r"authentication failed with .*stranger: check"):
        SSHRunner(sshd.host(identity_file=str(stranger))).run(Command(("true",)))
    with pytest.raises(SSHError, match="connection refused: check that sshd runs"):
        SSHRunner(sshd.host(port=free_port())).run(Command(("true",)))
    with pytest.raises(SSHError, match=r"cannot resolve address 'no-such-host\.invalid'"):
        SSHRunner(sshd.host(address="no-such-host.invalid")).run(Command(("true",)))


def test_timeout_kills_the_remote_process(runner: SSHRunner) -> None:
    tag = marker()
    started = time.monotonic()
    with pytest.raises(CommandError, match=r"sleep: on host lab: timed out after 2 s"):
        runner.run(Command(("sleep", "1000", tag), timeout=2))
    assert time.monotonic() - started < 5
    assert gone(runner, f"[s]leep 1000 {tag}", within=8), "remote sleep survived its timeout"


def test_dropped_connection_fails_the_command_instead_of_hanging(
    sshd: Sshd, runner: SSHRunner
) -> None:
    tag = marker()

    def drop_connection() -> None:
        deadline = time.monotonic() + 10
        while not sshd.session_pids(tag) and time.monotonic() < deadline:
            time.sleep(0.05)
        kill(sshd.session_pids(tag))

    killer = threading.Thread(target=drop_connection)
    killer.start()
    started = time.monotonic()
    try:
        with pytest.raises(CommandError, match="on host lab: connection lost"):
            runner.run(Command(("sleep", "1000", tag), timeout=120))
    finally:
        killer.join()
        kill(pids_with(f"sleep 1000 {tag}"))
    assert time.monotonic() - started < 15
    assert runner.run(Command(("echo", "again"))).stdout == "again\n"  # reconnects


def test_dry_run_does_not_run_mutating_commands(sshd: Sshd, tmp_path: Path) -> None:
    sshd.trust()
    ssh = SSHRunner(sshd.host(), dry_run=True)
    made = tmp_path / "made"
    try:
        done = ssh.run(Command(("touch", str(made)), mutating=True))
        assert (done.returncode, made.exists()) == (0, False)
        assert ssh.run(Command(("echo", "reads still run"))).stdout == "reads still run\n"
        with (
            pytest.raises(GfsError, match="internal: streaming"),
            ssh.writing(Command(("dd", f"of={made}"), mutating=True)),
        ):
            pass
        assert not made.exists()
    finally:
        ssh.close()


def test_eight_commands_in_parallel_threads_share_one_connection(
    sshd: Sshd, runner: SSHRunner
) -> None:
    def one(index: int) -> str:
        return runner.run(Command(("sh", "-c", 'sleep 1; printf %s "$1"', "sh", str(index)))).stdout

    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(one, range(8))) == [str(i) for i in range(8)]
    assert time.monotonic() - started < 6  # in parallel, not one after the other
    assert sshd.log.read_text().count("Accepted publickey") == 1

"""`gfs hosts list|trust|check`: remote hosts reached over SSH."""

from __future__ import annotations

import json
from pathlib import Path

import click

from gfs_backup.actions.hosts import check_hosts, host_infos, select_hosts, trust_host
from gfs_backup.cli.options import config_option, json_option
from gfs_backup.core.config import load_config
from gfs_backup.core.errors import ExitCode


@click.group("hosts")
def hosts_group() -> None:
    """Remote hosts (the [hosts.NAME] tables): list them, trust their SSH keys, check them.

    gfs talks to a host only if its SSH host key is recorded in the host's known_hosts
    file (key known_hosts, default /etc/gfs/known_hosts): record it once with
    `gfs hosts trust NAME`.
    """


@hosts_group.command("list")
@config_option
@json_option
def list_hosts_command(config_path: Path, as_json: bool) -> None:
    """List the configured hosts and whether their host key is recorded (offline)."""
    infos = host_infos(load_config(config_path))
    if as_json:
        rows = [
            {
                "name": info.host.name,
                "address": info.host.address,
                "port": info.host.port,
                "user": info.host.user,
                "known_hosts": str(info.known_hosts),
                "keys": [{"type": k.type, "fingerprint": k.fingerprint} for k in info.keys],
            }
            for info in infos
        ]
        click.echo(json.dumps({"hosts": rows}, indent=2))
        return
    if not infos:
        click.echo("no remote hosts configured (jobs run on 'local')")
    for info in infos:
        host = info.host
        key = (
            "key " + ", ".join(str(k) for k in info.keys)
            if info.keys
            else f"key UNKNOWN: run `gfs hosts trust {host.name}`"
        )
        click.echo(f"{host.name}: {host.user}@{host.address}:{host.port}, {key}")


@hosts_group.command("trust")
@click.argument("name")
@click.option("--replace", is_flag=True, help="Replace a different key recorded for the host.")
@click.option(
    "--expect",
    metavar="SHA256:...",
    help="Record the key only if it has this fingerprint (as read on the host's console).",
)
@config_option
def trust_command(name: str, replace: bool, expect: str | None, config_path: Path) -> None:
    """Record the SSH host key of host NAME in its known_hosts file.

    \b
    Connects, fetches the key the host presents, prints its type and SHA256
    fingerprint, and records it (the file is created with mode 0600). Verify the
    fingerprint out of band before trusting the host: on the host's console run
      ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub
    (or the .pub file of the printed key type) and compare, or pass what it printed
    as --expect SHA256:... to record the key only if it matches. If they differ,
    remove the key again: someone may be in between.
    A different key already recorded for the host is kept unless --replace is given
    (use it when the host was reinstalled and you have checked the new fingerprint).
    """
    (host,) = select_hosts(load_config(config_path), [name])
    trusted = trust_host(host, replace, expect)
    click.echo(
        f"host {host.name} ({host.address}:{host.port}): {trusted.key}: {trusted.outcome} "
        f"in {trusted.known_hosts}"
    )


@hosts_group.command("check")
@click.argument("names", nargs=-1)
@config_option
@json_option
def check_hosts_command(names: tuple[str, ...], config_path: Path, as_json: bool) -> None:
    """Connect to each host (or the named ones) and run `true` there; where libvirt jobs
    run (`host =`, or a cluster the host is in), open its libvirt through gfs's tunnel
    (virt-ssh-helper) and show its version.

    Exit 0 if every host answered, 4 if some failed, 5 if all failed.
    """
    config = load_config(config_path)
    results = check_hosts(config, select_hosts(config, names))
    if as_json:
        rows = [{"name": r.host.name, "ok": r.ok, "message": r.message} for r in results]
        click.echo(json.dumps({"hosts": rows}, indent=2))
    else:
        for result in results:
            status = result.message if result.ok else f"FAILED: {result.message}"
            click.echo(f"{result.host.name}: {status}")
    failed = sum(not r.ok for r in results)
    if failed:
        code = ExitCode.FAILED if failed == len(results) else ExitCode.PARTIAL
        raise SystemExit(int(code))

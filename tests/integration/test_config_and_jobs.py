"""`gfs check` and `gfs plan JOB`: config validation and planning from a target's manifests."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from gfs_backup.core.config import load_config
from gfs_backup.core.policy import load_policy_file, shipped_policy_paths
from gfs_backup.target.manifest import Manifest, write_manifest
from tests.conftest import RunGfs

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def write_config(tmp_path: Path, body: str) -> Path:
    target = tmp_path / "target"
    target.mkdir(exist_ok=True)
    config = tmp_path / "gfs.toml"
    config.write_text(
        f'{body}\n[target.usb]\npath = "{target}"\nrequire_nfs = false\n', encoding="utf-8"
    )
    return config


def add_generation(job_dir: Path, name: str, created_at: str, protected: bool = False) -> None:
    folder = job_dir / name
    folder.mkdir(parents=True)
    created = datetime.fromisoformat(created_at.replace("Z", "+00:00"))
    manifest = Manifest(
        job=job_dir.name,
        kind="files",
        host="local",
        generation=name,
        created_at=created,
        protected=protected,
    )
    write_manifest(folder, manifest)


JOB = """
[[job]]
name = "etc"
kind = "files"
path = "/etc"
[job.policy]
semantics = "restic"
timezone = "UTC"
[job.policy.retention]
keep-last = 2
"""


@pytest.mark.parametrize("name", sorted(shipped_policy_paths()))
def test_every_shipped_policy_is_valid(name: str) -> None:
    policy = load_policy_file(shipped_policy_paths()[name])
    assert policy.rules.keeps_something()
    assert policy.description


def test_classic_gfs_policy_is_the_design_table() -> None:
    policy = load_policy_file(shipped_policy_paths()["classic-gfs"])
    rules = policy.rules
    assert (rules.semantics, rules.sons, rules.fathers, rules.grandfathers) == ("gfs", 6, 4, 12)
    assert rules.father_weekday == 0
    assert policy.schedule.weekdays == frozenset(range(6))


def test_hourly_policy_snapshots_hourly_and_exports_daily() -> None:
    policy = load_policy_file(shipped_policy_paths()["hourly-snapshots-daily-export"])
    assert policy.snapshot_schedule is not None and len(policy.snapshot_schedule.times) == 24
    assert len(policy.schedule.times) == 1
    assert policy.keep_snapshots == 24


def test_example_config_is_valid(run_gfs: RunGfs) -> None:
    result = run_gfs("check", "--lint-only", "--config", str(REPO / "contrib" / "gfs.example.toml"))
    assert result.exit_code == 0, result.output
    assert "valid, 4 job(s), 1 target(s)" in result.stdout


def test_check_reports_every_error_at_once(run_gfs: RunGfs, tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        """
state_dir = 5
[[job]]
name = "web 01"
kind = "libvirt"
target = "nope"
policy = "classic-gfs"
[[job]]
name = "db"
kind = "lvm"
volume = "vg0/my;lv"
policy = "no-such-policy"
[[job]]
name = "x"
kind = "files"
path = "/srv"
[job.policy]
timezone = "Mars/Olympus"
[job.policy.retention]
sons = "six"
father-weekday = "someday"
""",
    )
    result = run_gfs("check", "--config", str(config))
    assert result.exit_code == 3
    where = [line.split(": ")[3] for line in result.stderr.splitlines()]
    assert where == [
        "state_dir",
        "job[0].name",
        "job[0].domain",
        "job[0].target",
        "job[db].volume",
        "job[db].policy",
        "job[x].policy.timezone",
        "job[x].policy.retention.sons",
        "job[x].policy.retention.father-weekday",
    ]
    assert all(line.startswith(f"gfs: error: {config}: ") for line in result.stderr.splitlines())
    assert "expected an integer (0 = off, -1 = unlimited), got a string ('six')" in result.stderr


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "[[job]]\nname = 'a'\nkind = 'zfs'\n",
            "job[a].kind: unknown kind 'zfs' (allowed: libvirt, lvm, btrfs, files)",
        ),
        (
            "colour = 1\n",
            "colour: unknown key (allowed: state_dir, policy_dir, concurrency, target, hosts, "
            "cluster, job, files, incremental, coverage, metrics, notify, ping_url)",
        ),
        ("[hosts.kvm2]\nport = 70000\n", "hosts.kvm2.address: required"),
        (
            "[[job]]\nname = 'a'\nkind = 'files'\npath = '/x'\npolicy = 'classic-gfs'\n"
            "[[job]]\nname = 'a'\nkind = 'files'\npath = '/y'\npolicy = 'classic-gfs'\n",
            "job[1].name: duplicate job name 'a'",
        ),
        (
            "[[job]]\nname = 'a'\nkind = 'files'\npath = '/srv/../etc'\npolicy = 'classic-gfs'\n",
            "job[a].path: '/srv/../etc' must be an absolute path without '..'",
        ),
        (
            "[[job]]\nname = 'a'\nkind = 'btrfs'\nsubvolume = 'data'\npolicy = 'classic-gfs'\n",
            "job[a].subvolume: 'data' must be an absolute path without '..'",
        ),
        (
            "[[job]]\nname = 'a'\nkind = 'files'\npath = '/x'\nhost = 'kvm9'\n"
            "policy = 'classic-gfs'\n",
            "job[a].host: unknown host 'kvm9'",
        ),
        (
            "[[job]]\nname = 'a'\nkind = 'files'\npath = '/x'\nrehash_every = 'monthly'\n"
            "policy = 'classic-gfs'\n",
            "job[a].rehash_every: expected seconds or a duration such as '5m', '90s' or '30d'",
        ),
        (
            "[files]\nrehash_every = '10m'\n"
            "[[job]]\nname = 'a'\nkind = 'files'\npath = '/x'\npolicy = 'classic-gfs'\n",
            'files.rehash_every: 600 s is too short: at least 1h, or "off"',
        ),
        ("[files]\nrehash = '1d'\n", "files.rehash: unknown key (allowed: rehash_every)"),
        (
            "[target.nas]\npath = '/mnt/nas'\nbandwidth = 'fast'\n",
            'target.nas.bandwidth: expected bytes per second such as "100M" (MiB/s) or 0 '
            "for no limit, got 'fast'",
        ),
        (
            "[target.nas]\npath = '/mnt/nas'\nbandwidth = '1K'\n",
            "target.nas.bandwidth: '1K' is too low: use 0 (no limit) or at least 64K",
        ),
        (
            "[target.nas]\npath = '/mnt/nas'\nbandwidth = '50M'\n"
            "[[job]]\nname = 'vm'\nkind = 'libvirt'\ndomain = 'vm'\ntarget = 'nas'\n"
            "method = 'push'\npolicy = 'classic-gfs'\n",
            'job[vm].method: "push" cannot be rate limited, and target nas has a bandwidth limit',
        ),
        (
            "[hosts.kvm2]\naddress = '127.0.0.1'\n"
            "[target.nas]\npath = '/mnt/nas'\nhost = 'kvm2'\nbandwidth = '50M'\n",
            "target.nas.bandwidth: cannot be enforced on a target of host 'kvm2': the copy "
            "runs there",
        ),
        # operations keys: validated with the rest, one line each
        ("[metrics]\ntextfile = 'gfs.prom'\n", "metrics.textfile: 'gfs.prom' must be an absolute"),
        ("[metrics]\ntextfile = '/var/lib/x/gfs.txt'\n", "node_exporter reads only *.prom"),
        ("[notify]\non = ['always']\n", "notify.on"),
        ("[notify.email]\nto = []\n", "notify.email.to"),
        ("[[notify.webhook]]\nurl = 'ftp://x/y'\n", "notify.webhook[0].url"),
        ("ping_url = 'hc-ping.com/abc'\n", "ping_url:"),
        (
            "[[job]]\nname = 'a'\nkind = 'files'\npath = '/x'\nping_url = 'nope'\n"
            "policy = 'classic-gfs'\n",
            "job[a].ping_url:",
        ),
        (
            "[[job]]\nname = 'a'\nkind = 'files'\npath = '/x'\nmax_age = 'daily'\n"
            "policy = 'classic-gfs'\n",
            "job[a].max_age: expected seconds or a duration",
        ),
        (
            "[[job]]\nname = 'a'\nkind = 'files'\npath = '/x'\n"
            "hooks = { before = ['flush-db'] }\npolicy = 'classic-gfs'\n",
            "job[a].hooks.before:",
        ),
        (
            "[[job]]\nname = 'a'\nkind = 'files'\npath = '/x'\n"
            "hooks = { pre = ['/bin/true'] }\npolicy = 'classic-gfs'\n",
            "job[a].hooks.pre: unknown key",
        ),
    ],
)
def test_check_names_file_key_and_fix(
    run_gfs: RunGfs, tmp_path: Path, body: str, message: str
) -> None:
    result = run_gfs("check", "--config", str(write_config(tmp_path, body)))
    assert result.exit_code == 3
    assert message in result.stderr


def test_check_bad_toml_and_missing_file(run_gfs: RunGfs, tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("[target\n", encoding="utf-8")
    result = run_gfs("check", "--config", str(broken))
    assert result.exit_code == 3
    assert result.stderr.startswith(f"gfs: error: {broken}: not valid TOML:")
    result = run_gfs("check", "--config", str(tmp_path / "absent.toml"))
    assert result.exit_code == 3
    assert result.stderr == f"gfs: error: {tmp_path / 'absent.toml'}: file not found\n"


def test_plan_job_without_generations(run_gfs: RunGfs, tmp_path: Path) -> None:
    config = write_config(tmp_path, JOB)
    result = run_gfs("plan", "--config", str(config))
    assert result.exit_code == 0, result.output
    assert "no generations on the target yet" in result.stdout


def test_plan_job_from_manifests(run_gfs: RunGfs, tmp_path: Path) -> None:
    config = write_config(tmp_path, JOB)
    job_dir = tmp_path / "target" / "etc"
    add_generation(job_dir, "g1", "2026-11-20T01:00:00Z", protected=True)
    add_generation(job_dir, "g2", "2026-11-21T01:00:00Z")
    add_generation(job_dir, "g3", "2026-11-22T01:00:00Z")
    add_generation(job_dir, "g4", "2026-11-23T01:00:00Z")
    add_generation(job_dir, ".partial-g5", "2026-11-24T01:00:00Z")  # never listed
    (job_dir / "g6").mkdir()  # no manifest: not a generation
    add_generation(job_dir, "g7", "2026-11-19T01:00:00Z")
    (job_dir / "g7" / "manifest.json").write_text("{truncated", encoding="utf-8")
    result = run_gfs("plan", "--config", str(config), "etc", "--json")
    assert result.exit_code == 0, result.output
    (job,) = json.loads(result.stdout)["jobs"]
    assert [(k["id"], k["reasons"]) for k in job["keep"]] == [
        ("g4", ["keep-last"]),
        ("g3", ["keep-last"]),
        ("g1", ["protected"]),
    ]
    assert [p["id"] for p in job["prune"]] == ["g2"]
    assert "g7/manifest.json: not valid JSON" in result.stderr
    assert "left out of planning and pruning" in result.stderr
    assert "g6: no manifest: not a generation, left alone" in result.stderr
    text = run_gfs("plan", "--config", str(config))
    assert "keep 3, prune 1" in text.stdout


def test_plan_unknown_job(run_gfs: RunGfs, tmp_path: Path) -> None:
    result = run_gfs("plan", "--config", str(write_config(tmp_path, JOB)), "nope")
    assert result.exit_code == 3
    assert "no job named 'nope' (jobs: etc)" in result.stderr


def test_files_jobs_rehash_every_30_days_unless_told_otherwise(tmp_path: Path) -> None:
    job = "[[job]]\nname = '{name}'\nkind = 'files'\npath = '/x'\npolicy = 'classic-gfs'\n"
    body = (
        "[files]\nrehash_every = '2w'\n"
        + job.format(name="default")
        + job.format(name="own")
        + "rehash_every = 'off'\n"
    )
    config = load_config(write_config(tmp_path, body))
    assert [j.options["rehash_every"] for j in config.jobs] == [14 * 86400, 0]
    plain = load_config(write_config(tmp_path, job.format(name="plain")))
    assert plain.jobs[0].options["rehash_every"] == 30 * 86400

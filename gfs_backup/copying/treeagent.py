"""Running gfs's file-tree code on a remote host, for files jobs of that host.

Why ship our own code rather than run rsync or tar there: a files generation is defined by
what filetree and treerestore do (change detection by ctime and the scan clock, so a file
rewritten with its old size and mtime is read again; per-file sha256-1m in the manifest;
hard links to the verified previous generation; fifos, devices, xattrs, ACLs and the root
directory recorded). rsync's quick check (size and mtime) misses exactly the rewrite
above, and `--checksum` re-reads every file every night on both sides; tar neither links
to a previous generation nor records a checksum per file. Running the same modules on the
host gives the same manifest, the same checks and one implementation to prove.

How: the host's python3 (>= 3.10, standard library only) gets the sources of AGENT_MODULES
in one argument (JSON, zlib, base64: about 40 KB, far below the kernel's 128 KiB per
argument) and imports them from memory (BOOTSTRAP: nothing is installed or left on the
host); the request is another argument, and treehost.main() answers on stdout.
"""

from __future__ import annotations

import base64
import errno
import functools
import json
import zlib
from importlib import util
from pathlib import Path
from typing import Any, BinaryIO, cast

from gfs_backup.copying.copy import Progress
from gfs_backup.copying.hostimage import ScriptOutput
from gfs_backup.copying.treehost import entries_digest
from gfs_backup.core.errors import GfsError
from gfs_backup.transport.runner import Command, CommandError, Runner

AGENT_MODULES = (
    "gfs_backup",
    "gfs_backup.core",
    "gfs_backup.core.errors",
    "gfs_backup.transport",
    "gfs_backup.transport.runner",
    "gfs_backup.tools",
    "gfs_backup.tools.mounts",
    "gfs_backup.tools.btrfs",
    "gfs_backup.copying",
    "gfs_backup.copying.digest",
    "gfs_backup.copying.copy",
    "gfs_backup.copying.treeentry",
    "gfs_backup.copying.treeio",
    "gfs_backup.copying.filetree",
    "gfs_backup.copying.treerestore",
    "gfs_backup.copying.treehost",
)
BOOTSTRAP = r"""
import sys
if sys.version_info < (3, 10):  # zip(strict=)
    sys.stdout.write("gfs-result " + '{"error": "gfs needs python3 >= 3.10 on this host, found '
                     + sys.version.split()[0] + '", "type": "other"}\n')
    sys.exit(0)
import base64, importlib.abc, importlib.util, json, zlib
SOURCES = json.loads(zlib.decompress(base64.b64decode(sys.argv[1])))

class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name in SOURCES:
            return importlib.util.spec_from_loader(name, self, is_package=SOURCES[name][0])
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        package, source = SOURCES[module.__name__]
        exec(compile(source, "gfs:" + module.__name__, "exec"), module.__dict__)

sys.meta_path.insert(0, Finder())
import gfs_backup.copying.treehost
gfs_backup.copying.treehost.main()
"""


@functools.cache
def payload() -> str:
    """The sources of AGENT_MODULES, as BOOTSTRAP reads them."""
    sources: dict[str, tuple[bool, str]] = {}
    for name in AGENT_MODULES:
        spec = util.find_spec(name)
        assert spec is not None and spec.origin is not None, name
        is_package = spec.submodule_search_locations is not None
        sources[name] = (is_package, Path(spec.origin).read_text(encoding="utf-8"))
    data = json.dumps(sources, separators=(",", ":")).encode()
    return base64.b64encode(zlib.compress(data, 9)).decode()


def make_agent_command(
    request: dict[str, Any], timeout: float | None, idle_timeout: float | None
) -> Command:
    return Command(
        ("python3", "-c", BOOTSTRAP, payload(), json.dumps(request, separators=(",", ":"))),
        mutating=request["op"] in ("export", "restore"),
        timeout=timeout,
        idle_timeout=idle_timeout,
    )


def manifest_request(manifest: Path, tree: list[dict[str, Any]]) -> dict[str, Any]:
    """What the host needs to read a generation's entries from its manifest, and to check
    they are the ones gfs read."""
    return {"manifest": str(manifest), "count": len(tree), "digest": entries_digest(tree)}


def run_agent(
    runner: Runner,
    request: dict[str, Any],
    progress: Progress | None = None,
    *,
    timeout: float | None,
    idle_timeout: float | None,
) -> dict[str, Any]:
    """Run treehost's `request` on the runner's host; its answer. The host's errors come
    back as OSError (with errno and file name) and ValueError, as the local code raises
    them; an agent that ends without an answer is a GfsError."""
    command = make_agent_command(request, timeout, idle_timeout)
    output = ScriptOutput()
    try:
        with runner.reading(command) as stream:
            reader = cast(BinaryIO, stream)
            while chunk := reader.read(1 << 16):
                grown = output.feed(chunk)
                if progress is not None and grown:
                    progress(grown)
    except CommandError as exc:
        if "exit status 127" in str(exc) or "command not found" in str(exc):
            raise GfsError(
                f"host {runner.host} has no python3: files jobs of a remote host run gfs's "
                "tree code there (python3 >= 3.10, standard library only: apt install "
                "python3-minimal)"
            ) from None
        raise
    text = output.result()
    if text is None:
        raise GfsError(f"python3 on host {runner.host} gave no answer to {request['op']}")
    answer: dict[str, Any] = json.loads(text)
    if "ok" in answer:
        return cast(dict[str, Any], answer["ok"])
    message = f"on host {runner.host}: {answer.get('error')}"
    if answer.get("type") == "os":
        raise OSError(answer.get("errno") or errno.EIO, message, answer.get("filename"))
    if answer.get("type") == "value":
        raise ValueError(message)
    raise GfsError(message)

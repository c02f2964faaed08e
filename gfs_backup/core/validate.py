"""Reading TOML tables with every problem collected, each with file and dotted key path.

Used by the policy and config loaders, so validation lives in one place and one run of
`gfs check` reports every error at once.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from gfs_backup.core.errors import InputError, Problem

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 only
    import tomli as tomllib

T = TypeVar("T")
D = TypeVar("D")
Table = Mapping[str, Any]


def read_toml(path: Path) -> dict[str, Any]:
    """Load a TOML file. Raises InputError naming the file (and line) when it cannot."""
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise InputError(Problem(str(path), "file not found")) from None
    except IsADirectoryError:
        raise InputError(Problem(str(path), "is a directory, expected a TOML file")) from None
    except PermissionError:
        raise InputError(Problem(str(path), "permission denied")) from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(Problem(str(path), f"not valid TOML: {exc}")) from None
    except UnicodeDecodeError:
        raise InputError(Problem(str(path), "not valid TOML: not UTF-8 text")) from None


class Collector:
    """Collects problems about one source file; `raise_if_any` ends validation."""

    def __init__(self, source: str, *, options: bool = False) -> None:
        """`options=True`: the keys are command-line options, shown as `--key`."""
        self.source = source
        self.options = options
        self.problems: list[Problem] = []

    def add(self, key: str, message: str) -> None:
        if self.options:
            where = f"--{key}" if key else self.source
        else:
            where = f"{self.source}: {key}" if key else self.source
        self.problems.append(Problem(where, message))

    def extend(self, problems: Iterable[Problem]) -> None:
        self.problems.extend(problems)

    def raise_if_any(self) -> None:
        if self.problems:
            raise InputError(self.problems)

    def unknown_keys(self, table: Table, allowed: Iterable[str], path: str) -> None:
        allowed = tuple(allowed)
        for key in table:
            if key not in allowed:
                self.add(join_key(path, key), f"unknown key (allowed: {', '.join(allowed)})")

    def get(self, table: Table, key: str, path: str, kind: type[T], default: D, what: str) -> T | D:
        """table[key] if it has type `kind`, else `default` (and a problem when present)."""
        if key not in table:
            return default
        value = table[key]
        if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            return value
        self.add(join_key(path, key), f"expected {what}, got {_describe(value)}")
        return default

    def count(self, table: Table, key: str, path: str) -> int:
        """A retention count: an integer >= 0, or -1 for unlimited."""
        value = self.get(table, key, path, int, 0, "an integer (0 = off, -1 = unlimited)")
        if value < -1:
            self.add(
                join_key(path, key), f"{value} is not allowed: use 0 or more, or -1 for unlimited"
            )
            return 0
        return value

    def convert(
        self, table: Table, key: str, path: str, parse: Callable[[str], T], default: D
    ) -> T | D:
        """Parse a string value with `parse`; its ValueError becomes a problem."""
        text = self.get(table, key, path, str, None, "a string")
        if text is None:
            return default
        try:
            return parse(text)
        except ValueError as exc:
            self.add(join_key(path, key), str(exc))
            return default


def join_key(path: str, key: str) -> str:
    """Dotted key path `path.key` (just `key` at top level)."""
    return f"{path}.{key}" if path else key


def _describe(value: object) -> str:
    names = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "a table",
    }
    return f"{names.get(type(value), type(value).__name__)} ({value!r})"[:120]

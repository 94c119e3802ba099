"""Run-config keys from the command line (``--set key=value``) and from TOML files (flat or nested tables)."""
from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from fl_offsite.errors import UserError


def parse_sets(items: list[str]) -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file of flat keys (nested tables are flattened with dots)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such config file: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{path} is not valid TOML: {err}") from err
    return flatten(data)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested TOML tables as flat dotted keys."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out

"""The Flower app that ``flwr run`` bundles, laid out in the cache from a source checkout or an installed package.

A wheel carries the apps' code and the run presets (as ``fl_offsite/simulations``) but no pyproject.toml, and
Flower builds its bundle (FAB) from a folder that has one.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import shutil
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from fl_offsite.config.settings import DEFAULTS
from fl_offsite.data.downloads import cache_dir
from fl_offsite.errors import UserError
from fl_offsite.files import atomic_dir

DISTRIBUTION = "fl-offsite"
CODE_PACKAGES = ("fl_offsite", "strategies")
PRESETS = "simulations"  # the checkout's folder of run presets; fl_offsite/simulations in a wheel

# [tool.flwr.app] of pyproject.toml (a test keeps the two equal), its run config being the settings' defaults.
FLOWER_APP: dict[str, Any] = {
    "publisher": "fl-offsite",
    "fab-format-version": 1,
    "flwr-version-target": "1.42.0",
    # What every node receives with each run: the apps' code and the license, not the benchmarks, docs,
    # measurements, tests or the command line (none of which the ServerApp or ClientApp imports).
    "fab-include": ["fl_offsite/**/*.py", "strategies/**/*.py", "LICENSE"],
    "fab-exclude": ["fl_offsite/testing/**", "fl_offsite/cli/**"],
    "components": {"serverapp": "fl_offsite.app.server_app:app", "clientapp": "fl_offsite.app.client_app:app"},
    "config": DEFAULTS,
}


def app_dir() -> Path:
    """The folder ``flwr run`` bundles: the apps' code, the run presets, LICENSE and pyproject.toml, laid out once
    per version of them into the cache. A source checkout gives its own pyproject.toml and LICENSE; an installed
    package writes them from its metadata. Flower's bundler walks every file under the folder it is given, so a
    checkout's .venv alone added 5 s of CPU to every launch."""
    sources = {package: Path(str(importlib.import_module(package).__file__)).parent for package in CODE_PACKAGES}
    checkout = Path(__file__).resolve().parents[2]
    if is_flower_app(checkout):
        texts = {name: (checkout / name).read_text(encoding="utf-8") for name in ("pyproject.toml", "LICENSE")}
        presets = checkout / PRESETS
    else:
        texts = {"pyproject.toml": tomli_w.dumps(app_pyproject()), "LICENSE": _license_text()}
        presets = sources["fl_offsite"] / PRESETS
    digest = hashlib.sha256()
    for name, text in sorted(texts.items()):
        digest.update(f"{name}\0{text}\0".encode())
    for prefix, folder in [*sources.items(), (PRESETS, presets)]:
        for path in sorted(_code_files(folder)):
            digest.update(f"{prefix}/{path.relative_to(folder)}\0".encode() + path.read_bytes() + b"\0")
    final = cache_dir("flower-app") / f"{_metadata()['Version']}-{digest.hexdigest()[:16]}"
    if (final / "pyproject.toml").is_file():
        return final
    with atomic_dir(final) as folder:
        for package, source in sources.items():
            shutil.copytree(source, folder / package, ignore=shutil.ignore_patterns("__pycache__", PRESETS))
        shutil.copytree(presets, folder / PRESETS, ignore=shutil.ignore_patterns("__pycache__"))
        for name, text in texts.items():
            (folder / name).write_text(text, encoding="utf-8")
    return final


def is_flower_app(folder: Path) -> bool:
    """Whether ``folder`` holds this project's pyproject.toml with its [tool.flwr.app]."""
    try:
        pyproject = tomllib.loads((folder / "pyproject.toml").read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return False
    flower = pyproject.get("tool", {}).get("flwr", {})
    return pyproject.get("project", {}).get("name") == DISTRIBUTION and "app" in flower


def app_pyproject() -> dict[str, Any]:
    """pyproject.toml of the laid-out app: the installed distribution's metadata and :data:`FLOWER_APP`."""
    metadata = _metadata()
    dependencies = [req for req in metadata.get_all("Requires-Dist") or [] if "extra ==" not in req]
    project = {"name": DISTRIBUTION, "version": metadata["Version"], "description": metadata["Summary"],
               "license": {"file": "LICENSE"}, "dependencies": dependencies}
    return {"project": project, "tool": {"flwr": {"app": FLOWER_APP}}}


def _metadata() -> importlib.metadata.PackageMetadata:
    try:
        return importlib.metadata.metadata(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"{DISTRIBUTION} is not installed: `pip install .` in its source folder, or run from a "
                        "source checkout with `pip install -e .`") from None


def _license_text() -> str:
    distribution = importlib.metadata.distribution(DISTRIBUTION)
    for name in ("licenses/LICENSE", "LICENSE"):
        if text := distribution.read_text(name):
            return text
    raise UserError(f"the installed {DISTRIBUTION} has no LICENSE in its metadata: reinstall it from its source")


def _code_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts]

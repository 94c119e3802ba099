"""State dicts on disk as safetensors: written atomically, read back with a one-line error when corrupt."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fl_offsite.errors import UserError


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save a state dict as safetensors, atomically, with ``{"format": "pt"}`` in its metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                  metadata={"format": "pt", **(metadata or {})})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing or corrupt file is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such weights file: {path}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"corrupt weights file {path}: {err}; re-create it or restore a good copy") from err


def state_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every tensor of ``model``'s state (name, dtype, shape, bytes): equal digests, equal weights."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A cheap fingerprint of the weights for cache keys: a few values of every tensor (tells models of one
    config apart without hashing every byte, as :func:`state_digest` does)."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().flatten()
        h.update(name.encode() + flat[:: max(1, flat.numel() // 16)][:16].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]

"""A strategy's state on disk as safetensors plus JSON, not pickle: reading a checkpoint runs no code.

The state is a dict of named values of a few kinds: an ArrayRecord (FedAvgM's arrays), arrays by name
(FedOpt's moments), a list of arrays (FedAvgM's momentum), tensors by name under integer or string keys
(the emulators' re-alignment factors by k), and JSON (the privacy accountant's state).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord

from fl_offsite.errors import UserError
from fl_offsite.files import write_json
from fl_offsite.weights import load_tensors, save_tensors

TENSORS, LAYOUT = "strategy.safetensors", "strategy.json"


def save_state(folder: Path, state: dict[str, Any]) -> None:
    """Write ``state`` into ``folder`` (a checkpoint being written) as :data:`TENSORS` and :data:`LAYOUT`."""
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, Any] = {}
    for name, value in state.items():
        kind, items = _encode(value)
        if kind == "json":
            layout[name] = {"kind": kind, "value": value}
            continue
        tensors.update({f"{name}/{key}": tensor for key, tensor in items.items()})
        layout[name] = {"kind": kind, "keys": list(items)}
    save_tensors(folder / TENSORS, tensors)
    write_json(folder / LAYOUT, layout)


def load_state(folder: Path) -> dict[str, Any]:
    """The state :func:`save_state` wrote in ``folder``; a damaged one is a UserError naming the folder."""
    try:
        layout = json.loads((folder / LAYOUT).read_text())
        tensors = load_tensors(folder / TENSORS)
        return {name: _decode(entry, {key: tensors[f"{name}/{key}"] for key in entry.get("keys", ())})
                for name, entry in layout.items()}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"corrupt strategy state in {folder} ({err}); delete the checkpoint to start over") from err


def _encode(value: Any) -> tuple[str, dict[str, torch.Tensor]]:
    if isinstance(value, ArrayRecord):
        return "array-record", value.to_torch_state_dict()
    if isinstance(value, list) and all(isinstance(v, np.ndarray) for v in value):
        return "array-list", {str(i): torch.from_numpy(np.ascontiguousarray(v)) for i, v in enumerate(value)}
    if isinstance(value, dict) and value and all(isinstance(v, np.ndarray) for v in value.values()):
        return "arrays", {key: torch.from_numpy(np.ascontiguousarray(v)) for key, v in value.items()}
    if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()) \
            and all(isinstance(t, torch.Tensor) for v in value.values() for t in v.values()):
        kind = "tensors-by-int" if all(isinstance(k, int) for k in value) else "tensors-by-str"
        return kind, {f"{k}/{name}": t for k, inner in value.items() for name, t in inner.items()}
    json.dumps(value)  # anything else must be JSON (a TypeError names what is not)
    return "json", {}


def _decode(entry: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Any:
    kind = entry["kind"]
    if kind == "json":
        return entry["value"]
    if kind == "array-record":
        return ArrayRecord(tensors)
    if kind == "array-list":
        return [tensors[str(i)].numpy() for i in range(len(tensors))]
    if kind == "arrays":
        return {key: t.numpy() for key, t in tensors.items()}
    if kind in ("tensors-by-int", "tensors-by-str"):
        out: dict[Any, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            outer, name = key.split("/", 1)
            out.setdefault(int(outer) if kind == "tensors-by-int" else outer, {})[name] = tensor
        return out
    raise ValueError(f"unknown state kind {kind!r}")

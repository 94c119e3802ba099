"""A node's on-disk cache of delivered models, one folder per digest.

Stdlib only: a node answers ``query.model_status`` without importing torch; only storing the weights of a
``query.model`` message needs it.
"""
from __future__ import annotations

import os
from pathlib import Path

from flwr.app import RecordDict

from fl_offsite.data.downloads import cache_dir
from fl_offsite.files import atomic_dir

WEIGHTS_FILE = "model.safetensors"
BF16_KEY = "bf16-tensors"  # Flower's arrays go through NumPy, which has no bfloat16: these travel as int16 bytes


class NodeStore:
    """The delivered models of one node, under ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def folder(self, digest: str) -> Path:
        return self.root / f"model-{digest}"

    def has(self, digest: str) -> bool:
        return (self.folder(digest) / WEIGHTS_FILE).is_file()

    def store(self, digest: str, content: RecordDict) -> Path:
        """Write the model folder a ``query.model`` message carries (its files and weights)."""
        import torch  # only the message that carries weights needs it

        from fl_offsite.weights import save_tensors

        with atomic_dir(self.folder(digest)) as tmp:
            for name, data in content["files"].items():
                (tmp / name).write_bytes(data)
            bf16 = set(content["model"].get(BF16_KEY, []))
            save_tensors(tmp / WEIGHTS_FILE, {k: t.view(torch.bfloat16) if k in bf16 else t
                                              for k, t in content["weights"].to_torch_state_dict().items()})
        return self.folder(digest)


def node_store(node_config: dict, node_id: int) -> NodeStore:
    """The node's store: ``cache-dir`` from the node config, else a per-node cache folder."""
    if "cache-dir" in node_config:
        return NodeStore(os.path.expanduser(str(node_config["cache-dir"])))
    name = f"partition-{node_config['partition-id']}" if "partition-id" in node_config else f"node-{node_id}"
    return NodeStore(cache_dir("nodes", name))

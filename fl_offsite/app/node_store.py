"""A node's on-disk cache of delivered models, one folder per digest.

Stdlib only: a node answers ``query.model_status`` without importing torch; only storing the weights of a
``query.model`` message needs it (fl_offsite.app.delivery.write_weights).
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
        from fl_offsite.app.delivery import write_weights  # torch: only the message that carries weights

        with atomic_dir(self.folder(digest)) as tmp:
            for name, data in content["files"].items():
                (tmp / name).write_bytes(data)
            write_weights(tmp / WEIGHTS_FILE, content)
        return self.folder(digest)


def node_store(node_config: dict, node_id: int) -> NodeStore:
    """The node's store: ``cache-dir`` from the node config, else a per-node cache folder."""
    if "cache-dir" in node_config:
        return NodeStore(os.path.expanduser(str(node_config["cache-dir"])))
    name = f"partition-{node_config['partition-id']}" if "partition-id" in node_config else f"node-{node_id}"
    return NodeStore(cache_dir("nodes", name))

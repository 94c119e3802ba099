"""A node's on-disk cache of delivered models, one folder per digest.

Stdlib only: a node answers ``query.model_status`` without importing torch; only storing the weights of a
``query.model`` message needs it.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from flwr.app import ConfigRecord, Message

from fl_offsite.app import wire
from fl_offsite.data.downloads import cache_dir
from fl_offsite.files import atomic_dir

WEIGHTS_FILE = "model.safetensors"
BF16_KEY = "bf16-tensors"  # Flower's arrays go through NumPy, which has no bfloat16: these travel as int16 bytes
FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # a file of the folder itself: no path, no dot-file
MAX_FILES, MAX_FILES_MB = 64, 256  # a model's config and tokenizer files are a handful, a few MB


class NodeStore:
    """The delivered models of one node, under ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def folder(self, digest: str) -> Path:
        return self.root / f"model-{digest}"

    def has(self, digest: str) -> bool:
        return (self.folder(digest) / WEIGHTS_FILE).is_file()

    def store(self, msg: Message) -> Path:
        """Write the model folder a ``query.model`` message carries (its files and weights), after checking that
        its digest and file names are plain names of this store and its files are few and small."""
        import torch  # only the message that carries weights needs it

        from fl_offsite.weights import save_tensors

        digest = wire.text(wire.config_record(msg, "model"), "digest", pattern=wire.DIGEST)
        files = _checked_files(wire.config_record(msg, "files"))
        bf16 = set(_string_list(wire.config_record(msg, "model"), BF16_KEY))
        weights = wire.array_record(msg, "weights").to_torch_state_dict()
        with atomic_dir(self.folder(digest)) as tmp:
            for name, data in files.items():
                (tmp / name).write_bytes(data)
            save_tensors(tmp / WEIGHTS_FILE, {k: t.view(torch.bfloat16) if k in bf16 else t
                                              for k, t in weights.items()})
        return self.folder(digest)


def _checked_files(record: ConfigRecord) -> dict[str, bytes]:
    """A package's small files (config, tokenizer): plain names, bytes, at most MAX_FILES of MAX_FILES_MB."""
    if len(record) > MAX_FILES:
        raise wire.BadMessage(f"a model package holds at most {MAX_FILES} files besides its weights")
    files = {}
    for name, data in record.items():
        if not FILE_NAME.fullmatch(name) or name == WEIGHTS_FILE or not isinstance(data, bytes):
            raise wire.BadMessage(f"a model package's files must be plain names ({FILE_NAME.pattern}) holding "
                                  "bytes")
        files[name] = data
    if sum(len(data) for data in files.values()) > MAX_FILES_MB * 2**20:
        raise wire.BadMessage(f"a model package's files besides its weights hold at most {MAX_FILES_MB} MB")
    return files


def _string_list(record: ConfigRecord, key: str) -> list[str]:
    """A list of strings, absent meaning empty."""
    value = record.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise wire.BadMessage(f"{key} must be a list of strings")
    return [str(v) for v in value]


def node_store(node_config: dict, node_id: int) -> NodeStore:
    """The node's store: ``cache-dir`` from the node config, else a per-node cache folder."""
    if "cache-dir" in node_config:
        return NodeStore(os.path.expanduser(str(node_config["cache-dir"])))
    name = f"partition-{node_config['partition-id']}" if "partition-id" in node_config else f"node-{node_id}"
    return NodeStore(cache_dir("nodes", name))

"""A node's on-disk cache of delivered models, one folder per digest.

Stdlib only: a node answers ``query.model_status`` without importing torch; only storing the weights of a
``query.model`` message needs it.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from flwr.app import ConfigRecord, Message

from fl_offsite.app import wire
from fl_offsite.data.downloads import cache_dir
from fl_offsite.files import atomic_dir, locked

WEIGHTS_FILE = "model.safetensors"
BF16_KEY = "bf16-tensors"  # Flower's arrays go through NumPy, which has no bfloat16: these travel as int16 bytes
FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # a file of the folder itself: no path, no dot-file
STORE_KEYS = ("max-models", "max-model-mb")  # node config keys that bound the store
MAX_FILES, MAX_FILES_MB = 64, 256  # a model's config and tokenizer files are a handful, a few MB


class NodeStore:
    """The delivered models of one node, under ``root``: at most ``max_models`` (least recently used go first),
    each at most ``max_model_mb`` of weights. Writers take the store's lock, so two SuperNodes may share it."""

    def __init__(self, root: str | Path, max_models: int = 4, max_model_mb: float = 65536) -> None:
        self.root = Path(root)
        self.max_models, self.max_model_mb = max_models, max_model_mb

    def folder(self, digest: str) -> Path:
        return self.root / f"model-{digest}"

    def has(self, digest: str) -> bool:
        return (self.folder(digest) / WEIGHTS_FILE).is_file()

    def use(self, digest: str) -> Path:
        """The folder of a stored model, marked as used now (eviction keeps the recently used)."""
        os.utime(self.folder(digest))
        return self.folder(digest)

    def store(self, msg: Message) -> Path:
        """Write the model folder a ``query.model`` message carries (its files and weights), after checking that
        its digest and file names are plain names of this store and its files are few and small."""
        import torch  # only the message that carries weights needs it

        from fl_offsite.weights import save_tensors

        digest = wire.text(wire.config_record(msg, "model"), "digest", pattern=wire.DIGEST)
        files = _checked_files(wire.config_record(msg, "files"))
        bf16 = set(_string_list(wire.config_record(msg, "model"), BF16_KEY))
        record = wire.array_record(msg, "weights")
        if record.count_bytes() > self.max_model_mb * 2**20:
            raise wire.BadMessage(f"this node stores models of at most {self.max_model_mb:g} MB (node config "
                                  "max-model-mb)")
        with locked(self.root, "another process storing a model"):
            if self.has(digest):  # another process stored it meanwhile
                return self.use(digest)
            weights = record.to_torch_state_dict()
            with atomic_dir(self.folder(digest)) as tmp:
                for name, data in files.items():
                    (tmp / name).write_bytes(data)
                save_tensors(tmp / WEIGHTS_FILE, {k: t.view(torch.bfloat16) if k in bf16 else t
                                                  for k, t in weights.items()})
            self._evict(keep=digest)
        return self.folder(digest)

    def _evict(self, keep: str) -> None:
        """Remove the least recently used models beyond ``max_models`` (never ``keep``)."""
        stored = sorted((p for p in self.root.glob("model-*") if p.is_dir() and p != self.folder(keep)),
                        key=lambda p: p.stat().st_mtime, reverse=True)
        for old in stored[max(self.max_models - 1, 0):]:
            shutil.rmtree(old, ignore_errors=True)



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
    """The node's store: ``cache-dir`` from the node config, else a per-node cache folder; node config
    ``max-models`` (4) and ``max-model-mb`` (65536) bound it."""
    if "cache-dir" in node_config:
        root = Path(os.path.expanduser(str(node_config["cache-dir"])))
    else:
        root = cache_dir("nodes", f"partition-{node_config['partition-id']}" if "partition-id" in node_config
                         else f"node-{node_id}")
    return NodeStore(root, int(node_config.get("max-models", 4)), float(node_config.get("max-model-mb", 65536)))

"""A run's results folder: config, per-round metrics, checkpoints, final weights.

Every file is written atomically; a checkpoint is one folder replaced in a single rename,
so a run killed at any moment resumes from its last complete round.
"""
from __future__ import annotations

import json
import logging
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fl_offsite.errors import UserError
from fl_offsite.files import atomic_dir, write_atomic, write_json
from fl_offsite.surgery.split import SPLIT_FILE
from fl_offsite.weights import load_tensors, save_tensors

log = logging.getLogger(__name__)

AfterRound = Callable[[dict, dict[str, torch.Tensor]], None]  # called with a kept round's record and its payload

CONFIG, METRICS, CHECKPOINT, DELIVERY = "config.json", "metrics.jsonl", "checkpoint", "delivery.json"


@dataclass
class Checkpoint:
    round: int
    payload: dict[str, torch.Tensor]
    strategy_state: dict[str, Any]


class RunFolder:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def write_config(self, config: dict) -> None:
        write_json(self.root / CONFIG, config)

    def read_config(self) -> dict | None:
        path = self.root / CONFIG
        return json.loads(path.read_text()) if path.is_file() else None

    def rounds(self) -> list[dict]:
        path = self.root / METRICS
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def append_round(self, record: dict) -> None:
        """Add one round's line, replacing any line of that round or later (from a crashed run)."""
        kept = [r for r in self.rounds() if r["round"] < record["round"]]
        lines = [json.dumps(r) for r in [*kept, record]]
        write_atomic(self.root / METRICS, "\n".join(lines) + "\n")

    def record_delivery(self, packages: dict[int, tuple[str, int, int]], bytes_per_node: dict[int, int],
                        refused: dict[int, str] | None = None) -> None:
        """Add one (re)start's one-time model delivery: each node's package (node -> digest, bytes, emulator
        size k; 0 for the full model), the bytes sent to it (0 when cached), and the nodes refused (-> why)."""
        path = self.root / DELIVERY
        record = json.loads(path.read_text()) if path.is_file() else {"deliveries": []}
        record.pop("digest", None)  # one digest, as runs before fleets recorded it
        record["digests"] = sorted({d for d, _, _ in packages.values()})
        record["package_bytes"] = max(size for _, size, _ in packages.values())
        record["deliveries"].append({
            "time": time.time(), "bytes_per_node": {str(k): v for k, v in bytes_per_node.items()},
            "nodes": {str(n): {"digest": d, "package_bytes": size, "emulator_layers": k}
                      for n, (d, size, k) in packages.items()},
            **({"refused": {str(n): why for n, why in refused.items()}} if refused else {})})
        write_json(path, record)

    def distillation(self) -> dict | None:
        """The record of the distilled emulator this run used (``split/split.json``), or None."""
        path = self.root / "split" / SPLIT_FILE
        return json.loads(path.read_text()).get("distillation") if path.is_file() else None

    def package_bytes(self) -> int:
        """Size of the model delivered once to each new node (a fleet's largest)."""
        path = self.root / DELIVERY
        return json.loads(path.read_text())["package_bytes"] if path.is_file() else 0

    def delivered_bytes(self) -> int:
        """All bytes of one-time model deliveries over the run's (re)starts."""
        path = self.root / DELIVERY
        if not path.is_file():
            return 0
        return sum(sum(d["bytes_per_node"].values()) for d in json.loads(path.read_text())["deliveries"])

    def save_checkpoint(self, ckpt: Checkpoint) -> None:
        with atomic_dir(self.root / CHECKPOINT) as tmp:
            save_tensors(tmp / "payload.safetensors", ckpt.payload)
            (tmp / "strategy.pkl").write_bytes(pickle.dumps(ckpt.strategy_state))
            write_json(tmp / "round.json", {"round": ckpt.round})

    def load_checkpoint(self) -> Checkpoint | None:
        folder = self.root / CHECKPOINT
        if not folder.exists():
            return None
        try:
            done = json.loads((folder / "round.json").read_text())["round"]
            state = pickle.loads((folder / "strategy.pkl").read_bytes())
        except (OSError, ValueError, KeyError, pickle.UnpicklingError, EOFError) as err:
            raise UserError(f"corrupt checkpoint in {folder} ({err}); delete it to start over") from err
        return Checkpoint(done, load_tensors(folder / "payload.safetensors"), state)

"""A run's results folder: config, per-round records, checkpoints, final weights and the other outputs.

:class:`RunFolder` owns every file name in it. Every file is written atomically; a checkpoint is one folder
replaced in a single rename, so a run killed at any moment resumes from its last complete round.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fl_offsite.errors import UserError
from fl_offsite.files import MARKER, atomic_dir, recover, write_atomic, write_json
from fl_offsite.run.records import RoundRecord
from fl_offsite.run.state_file import load_state, save_state
from fl_offsite.surgery.split import SPLIT_FILE
from fl_offsite.weights import load_tensors, save_tensors

log = logging.getLogger(__name__)

AfterRound = Callable[[RoundRecord, dict[str, torch.Tensor]], None]  # a kept round's record and its payload

CONFIG, METRICS, CHECKPOINT, DELIVERY, CARD = "config.json", "metrics.jsonl", "checkpoint", "delivery.json", "README.md"
PAYLOAD, CHECKPOINT_ROUND = "payload.safetensors", "round.json"  # in checkpoint/, beside the strategy's state
OLD_STRATEGY_STATE = "strategy.pkl"  # before the state files (fl_offsite.run.state_file): never loaded
ADAPTER, MODEL, LORA = "adapter.safetensors", "model.safetensors", "lora.safetensors"  # the final weights
SPLIT, SMALLER_SPLIT, FULL_MODEL = "split", "split-k", "full-model"  # split-k<k>: a fleet's smaller emulators
PEFT, TENSORBOARD = "peft", "tensorboard"  # a LoRA run's PEFT adapter folder; results.tensorboard's events


@dataclass
class Checkpoint:
    round: int
    payload: dict[str, torch.Tensor]
    strategy_state: dict[str, Any]


class RunFolder:
    """The results folder ``root`` of one run (created if need be)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def card(self) -> Path:
        """The run's model card."""
        return self.root / CARD

    @property
    def peft(self) -> Path:
        """A LoRA run's PEFT adapter folder, rewritten after each round."""
        return self.root / PEFT

    @property
    def tensorboard(self) -> Path:
        return self.root / TENSORBOARD

    @property
    def split(self) -> Path:
        """The configured emulator's split (fl_offsite.surgery.split's folder)."""
        return self.root / SPLIT

    def smaller_split(self, k: int) -> Path:
        """The split of a fleet's smaller emulator with ``k`` middle blocks."""
        return self.root / f"{SMALLER_SPLIT}{k}"

    @property
    def full_model(self) -> Path:
        """A copy of a full model that came from the hub, delivered once to full fine-tuning's nodes."""
        return self.root / FULL_MODEL

    def weights(self, name: str) -> Path:
        """The final weights ``name``: :data:`ADAPTER`, :data:`MODEL` or :data:`LORA`."""
        if name not in (ADAPTER, MODEL, LORA):
            raise ValueError(f"no final weights {name!r}")
        return self.root / name

    def clear(self) -> None:
        """Remove an earlier run's records and outputs (the split, a full model's copy and the config stay)."""
        for name in (METRICS, ADAPTER, MODEL, LORA, DELIVERY, CARD):
            (self.root / name).unlink(missing_ok=True)
        for name in (CHECKPOINT, PEFT, TENSORBOARD):
            shutil.rmtree(self.root / name, ignore_errors=True)
        for folder in self.root.glob(f"{SMALLER_SPLIT}*"):
            shutil.rmtree(folder, ignore_errors=True)

    def check_ours(self) -> None:
        """A UserError if the folder holds files but no run (its config): clearing it would delete them."""
        if self.root.is_dir() and not (self.root / CONFIG).exists() and \
                any(p.name not in (".lock", MARKER) for p in self.root.iterdir()):
            raise UserError(f"results.dir {self.root} is not empty and holds no fl-offsite run: choose an empty or "
                            "new folder (nothing in it was touched)")

    def write_config(self, config: dict) -> None:
        write_json(self.root / CONFIG, config)

    def read_config(self) -> dict | None:
        path = self.root / CONFIG
        return json.loads(path.read_text()) if path.is_file() else None

    def rounds(self) -> list[RoundRecord]:
        """The rounds on record, in order; a malformed line is a :class:`UserError` naming it."""
        return [record for _, record in self._lines()]

    def append_round(self, record: RoundRecord) -> None:
        """Add one round's line, replacing any line of that round or later (from a crashed run); the earlier
        lines stay as they were written."""
        kept = [line for line, earlier in self._lines() if earlier.round < record.round]
        write_atomic(self.root / METRICS, "\n".join([*kept, json.dumps(record.to_json())]) + "\n")

    def _lines(self) -> list[tuple[str, RoundRecord]]:
        path = self.root / METRICS
        if not path.is_file():
            return []
        lines = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                lines.append((line, RoundRecord.from_json(json.loads(line))))
            except ValueError as err:  # json.JSONDecodeError and RecordError are ValueErrors
                raise UserError(f"{path}, line {number}: {err}; fix or remove the line, or start the run "
                                "over (results.resume=false)") from err
        return lines

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
        path = self.split / SPLIT_FILE
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
            save_tensors(tmp / PAYLOAD, ckpt.payload)
            save_state(tmp, ckpt.strategy_state)
            write_json(tmp / CHECKPOINT_ROUND, {"round": ckpt.round})

    def load_checkpoint(self) -> Checkpoint | None:
        """The last checkpoint (recovered if a replacement of it was cut short), or None before the first."""
        folder = self.root / CHECKPOINT
        recover(folder)
        if not folder.exists():
            return None
        if (folder / OLD_STRATEGY_STATE).exists():
            raise UserError(f"{folder} is from an earlier fl-offsite, which pickled its strategy state (loading it "
                            "could run code): delete the checkpoint to start the run over")
        try:
            done = json.loads((folder / CHECKPOINT_ROUND).read_text())["round"]
        except (OSError, ValueError, KeyError) as err:
            raise UserError(f"corrupt checkpoint in {folder} ({err}); delete it to start over") from err
        return Checkpoint(done, load_tensors(folder / PAYLOAD), load_state(folder))

"""What a data owner's node accepts and enforces, from its own node config: the model owner cannot change it.

Node config keys (``flower-supernode --node-config`` / ``fl-offsite supernode --policy ...``):

- ``allowed-methods``: comma-separated methods this node trains (default: any);
- ``min-examples-per-update``: batch size x gradient accumulation x local steps a round must use at least, so
  that one update averages over that many examples (default 0: no minimum);
- ``update-clip-norm``: the node clips its update (the change it made) to this L2 norm before sending it;
- ``update-noise-multiplier``: and adds Gaussian noise of this many clip norms to every coordinate, drawn from
  the operating system's randomness (local DP: the owner sees only noised updates).

From the node's environment: ``FL_OFFSITE_TASK_FOLDERS``, the ``jsonl:`` task folders a run may train on.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl_offsite.app.wire import SharedError
from fl_offsite.config.settings import Settings
from fl_offsite.data.tasks import TASK_FOLDERS, jsonl_folder
from fl_offsite.errors import UserError

KEYS = ("allowed-methods", "min-examples-per-update", "update-clip-norm", "update-noise-multiplier")


@dataclass(frozen=True)
class NodePolicy:
    allowed_methods: tuple[str, ...] = ()  # empty: any
    min_examples_per_update: int = 0
    update_clip_norm: float = 0.0  # 0: off
    update_noise_multiplier: float = 0.0

    @classmethod
    def from_node_config(cls, node_config: dict[str, Any]) -> NodePolicy:
        """The policy in ``node_config``; a bad value is a UserError for the node's operator."""
        try:
            policy = cls(tuple(m.strip() for m in str(node_config.get(KEYS[0], "")).split(",") if m.strip()),
                         int(node_config.get(KEYS[1], 0)), float(node_config.get(KEYS[2], 0.0)),
                         float(node_config.get(KEYS[3], 0.0)))
        except ValueError:
            raise UserError(f"node config {', '.join(KEYS[1:])} must be numbers") from None
        if policy.min_examples_per_update < 0 or policy.update_clip_norm < 0 or policy.update_noise_multiplier < 0:
            raise UserError(f"node config {', '.join(KEYS[1:])} must be >= 0")
        if policy.update_noise_multiplier > 0 and policy.update_clip_norm == 0:
            raise UserError("node config update-noise-multiplier needs update-clip-norm > 0 (noise is in clip norms)")
        return policy

    def check(self, settings: Settings) -> None:
        """Refuse a run this node does not take part in; the texts name the node's rule, which the owner may see."""
        if self.allowed_methods and settings.method.name not in self.allowed_methods:
            raise SharedError(f"this node trains only {', '.join(self.allowed_methods)}, not {settings.method.name}")
        train = settings.train
        if train.local_steps <= 0 and self.min_examples_per_update:
            raise SharedError("this node needs train.local-steps > 0 (a fixed number of examples per update)")
        examples = train.batch_size * train.grad_accum * train.local_steps
        if examples < self.min_examples_per_update:
            raise SharedError(f"this node needs at least {self.min_examples_per_update} examples per update "
                              f"(train.batch-size x grad-accum x local-steps), the run asks {examples}")

    @property
    def protects_update(self) -> bool:
        return self.update_clip_norm > 0


def node_task(name: str) -> str:
    """``name``, the run config's task, if this node may load it: a public task by name (bbc-news, the offline
    suite, ``bigbench:<task>``, ``hf:<task>``), or a ``jsonl:`` folder that the node's operator lists in the
    environment variable ``FL_OFFSITE_TASK_FOLDERS`` (``os.pathsep`` between folders). The model owner writes
    the run config: any other folder is refused, or the owner could make the node train on, and so leak, any
    JSONL files it can read."""
    folder = jsonl_folder(name)
    if folder is None:
        return name
    allowed = {Path(f).expanduser().resolve() for f in os.environ.get(TASK_FOLDERS, "").split(os.pathsep) if f}
    if folder not in allowed:
        raise SharedError("this node loads only public tasks by name (bbc-news, the offline suite, bigbench:<task>, "
                          f"hf:<task>), and jsonl: folders only where its operator lists them in {TASK_FOLDERS}")
    return name

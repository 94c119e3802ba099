"""What the offsite strategy is given: the model owner's hooks, the round policy and what travels each round."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from fl_offsite.run.records import RealignRecord, RoundRecord

Payload = dict[str, torch.Tensor]


class OwnerHooks(Protocol):
    """The model owner's side of each round; ``fl_offsite.app.owner.ModelOwner`` implements it."""

    def evaluate(self, rnd: int, payload: Payload) -> dict[str, dict]:
        """The scores of ``payload`` plugged in, by model (``{}`` for a round ``eval.every`` skips)."""

    def after_round(self, record: RoundRecord, payload: Payload) -> None:
        """Called once round ``record.round`` is on record and checkpointed."""

    def realign(self, rnd: int, payload: Payload) -> RealignRecord | None:
        """Re-align the emulators to ``payload`` before round ``rnd`` (0: before its evaluation); None when
        nothing was done."""

    def realign_factors(self) -> dict[int, Payload]:
        """Each emulator's re-alignment factors by k, sent beside the payload (``{}``: no re-alignment)."""

    def restore_factors(self, factors: dict[int, Payload]) -> None:
        """Put back what :meth:`realign_factors` gave (on resume)."""


@dataclass(frozen=True)
class RoundPolicy:
    """How each round runs: fewer than ``min_replies`` usable updates stop the run; an update farther than
    ``max_update_norm`` from the global one is rejected (0: no bound) and a longer aggregate step scaled back;
    a weight outside (0, ``max_examples``] makes the round's weights uniform; ``round_timeout`` (s) is how
    long replies were awaited, for the records; ``seed`` seeds the sampling of nodes; ``lr_at(r)`` is round
    r's learning rate. With ``overlap``, the owner scores round r while round r + 1 trains, except the last
    (``num_rounds``)."""

    min_replies: int
    seed: int
    lr_at: Callable[[int], float]
    max_update_norm: float = 0.0
    round_timeout: float | None = None
    max_examples: int = 1_000_000  # a larger (or unusable) weight makes the round's weights uniform
    overlap: bool = False
    num_rounds: int = 0


@dataclass(frozen=True)
class Exchange:
    """What travels each round: the payload (``reference``: its names, shapes and dtypes, kept as meta tensors;
    ``kind``: what it is, for the reasons of a rejection), the config every training message carries, and each
    node's own keys (its model's digest, split and emulator size). Only the nodes of ``node_config`` train."""

    reference: Payload
    kind: str = "adapter"
    base_config: dict = field(default_factory=dict)
    node_config: dict[int, dict] = field(default_factory=dict)

    def __post_init__(self) -> None:
        meta = {name: torch.empty_like(tensor, device="meta") for name, tensor in self.reference.items()}
        object.__setattr__(self, "reference", meta)

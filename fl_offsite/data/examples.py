"""The one example format every task, data owner's file and evaluator shares."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChoiceExample:
    """A prompt, its candidate continuations (with their own leading space) and the gold index."""

    context: str
    choices: list[str]
    label: int

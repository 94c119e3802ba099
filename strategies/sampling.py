"""Seeded sampling of the nodes that may train, by the inner Flower strategy."""
from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from flwr.serverapp import Grid


class EligibleNodes:
    """A view of ``grid`` whose nodes are those of ``eligible``: what the inner strategy samples from."""

    def __init__(self, grid: Grid, eligible: Iterable[int]) -> None:
        self._grid, self._eligible = grid, set(eligible)

    def get_node_ids(self) -> list[int]:
        return [n for n in self._grid.get_node_ids() if n in self._eligible]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


@contextmanager
def seeded_global_random(seed: int) -> Iterator[None]:
    """Seed Python's global ``random`` for the block, then put its state back.

    Flower's strategies sample nodes with the global ``random`` (``strategy_utils.sample_nodes``), so a
    ``random.Random`` instance cannot reach them; this keeps the sampling seeded without leaking the seed.
    """
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)

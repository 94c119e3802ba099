"""Which middle blocks the emulator keeps: the paper's uniform drop or a data-driven rule.

Rules (``emulator.layers``), each returning ``k`` indices into the ``n`` middle blocks:

- ``uniform``: the paper's layer drop, first and last middle block kept (:func:`uniform_drop`).
- ``similarity``: in the spirit of CRaSh. On public text, the linear CKA between the outputs of
  the middle blocks; the middle is cut into ``k`` runs of adjacent blocks so that, summed over
  the runs, ``1 - CKA(output of the run's first block, output of its last block)`` is smallest;
  the first block of every run is kept (it moves the representation into the run; the others
  barely change it, so dropping them costs least).
- ``greedy``: starting from the whole middle, drop one block at a time, each time the block
  whose removal changes the middle's output least (normalised MSE, the distillation's KD
  measure) on public text.

Only the model owner runs these, on its own public text; the kept indices go into split.json.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from fl_offsite.errors import UserError
from fl_offsite.surgery.blocks import (
    BlockHook,
    find_blocks,
    forward_until_stop,
    hooked,
    normalized_mse,
    record_input,
    record_output,
    skip_block,
)

RULES = ("uniform", "similarity", "greedy")


def uniform_drop(n: int, k: int) -> list[int]:
    """The paper's uniform layer drop: ``k`` of ``n`` indices, first and last kept."""
    if not 0 <= k <= n:
        raise UserError(f"cannot keep {k} of {n} middle blocks: choose 0 <= k <= {n}")
    if k == 0:
        return []
    if k == 1:
        return [0]
    stride = (n - 1) / (k - 1)
    return [round(i * stride) for i in range(k)]


def middle_chooser(rule: str, model: nn.Module, bottom: int, top: int, batches: Sequence[dict[str, torch.Tensor]],
                   progress: bool = True) -> Callable[[int, int], list[int]]:
    """A ``(n, k) -> kept middle indices`` function for ``plan_split`` applying ``rule`` to ``model``.

    ``batches`` (``input_ids`` + ``attention_mask``) is the public calibration text; unused by
    ``uniform``.
    """
    if rule not in RULES:
        raise UserError(f"emulator.layers = {rule!r} is not one of {', '.join(RULES)}")
    if rule == "uniform":
        return uniform_drop

    def choose(n: int, k: int) -> list[int]:
        uniform_drop(n, k)  # the same range check
        if k in (0, n):
            return list(range(k))
        if not batches:
            raise UserError(f"the {rule} layer rule needs calibration text; the corpus gave none")
        if rule == "similarity":
            return similarity_choice(middle_outputs(model, bottom, top, batches), k)
        return greedy_choice(model, bottom, top, batches, k, progress)
    return choose


@torch.no_grad()
def middle_outputs(model: nn.Module, bottom: int, top: int,
                   batches: Sequence[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """Per middle block, its output at every unmasked token of ``batches`` (tokens x hidden, float32)."""
    _, blocks = find_blocks(model)
    middle = range(bottom, len(blocks) - top)
    outputs: dict[int, list[torch.Tensor]] = {i: [] for i in middle}
    for batch in batches:
        keep = batch["attention_mask"].bool()
        store: dict[int, torch.Tensor] = {}
        with hooked([BlockHook(blocks[i], record_output(store, i, stop=i == middle[-1])) for i in middle]):
            forward_until_stop(model, batch)
        for i in middle:
            outputs[i].append(store[i][keep].float())
    return [torch.cat(outputs[i]) for i in middle]


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear centred kernel alignment of two (samples x features) representations, in [0, 1]."""
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    cross = (y.T @ x).pow(2).sum()
    return float(cross / ((x.T @ x).pow(2).sum().sqrt() * (y.T @ y).pow(2).sum().sqrt()).clamp_min(1e-12))


def similarity_choice(outputs: Sequence[torch.Tensor], k: int) -> list[int]:
    """Cut ``len(outputs)`` blocks into ``k`` runs minimising the summed ``1 - CKA(first, last)``; keep each first."""
    n = len(outputs)
    cost = [[1.0 - linear_cka(outputs[a], outputs[b]) if b > a else 0.0 for b in range(n)] for a in range(n)]
    # best[j][m]: least cost of cutting blocks m.. into j runs; cut[j][m]: where the first run ends
    best = [[float("inf")] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][n] = 0.0
    for j in range(1, k + 1):
        for m in range(n - 1, -1, -1):
            for end in range(m, n - j + 1):
                total = cost[m][end] + best[j - 1][end + 1]
                if total < best[j][m]:
                    best[j][m], cut[j][m] = total, end
    kept, m = [], 0
    for j in range(k, 0, -1):
        kept.append(m)
        m = cut[j][m] + 1
    return kept


@torch.no_grad()
def greedy_choice(model: nn.Module, bottom: int, top: int, batches: Sequence[dict[str, torch.Tensor]], k: int,
                  progress: bool = True) -> list[int]:
    """Drop middle blocks one at a time, each time the one whose removal changes the middle's output least."""
    _, blocks = find_blocks(model)
    middle = list(range(bottom, len(blocks) - top))
    last = blocks[middle[-1]]
    targets = [_middle_output(model, last, batch, skipped=[]) for batch in batches]
    kept = list(middle)
    bar = tqdm(total=len(middle) - k, desc="greedy layer choice", unit="block", disable=not progress)
    while len(kept) > k:
        dropped = [i for i in middle if i not in kept]
        errors = {}
        for candidate in kept:
            skipped = [blocks[i] for i in dropped + [candidate]]
            errors[candidate] = sum(float(normalized_mse(t, _middle_output(model, last, batch, skipped),
                                                         batch["attention_mask"].float()))
                                    for t, batch in zip(targets, batches, strict=True))
        kept.remove(min(errors, key=errors.__getitem__))
        bar.update()
    bar.close()
    return [i - bottom for i in kept]


def _middle_output(model: nn.Module, last: nn.Module, batch: dict[str, torch.Tensor],
                   skipped: list[nn.Module]) -> torch.Tensor:
    """The hidden state leaving ``last`` with the ``skipped`` blocks acting as the identity.

    A skipped block still runs (a hook replaces its output by its input): generic over model
    families, at a cost the owner pays once per split.
    """
    store: dict[str, torch.Tensor] = {}
    hooks = [BlockHook(b, skip_block) for b in skipped if b is not last]
    hooks.append(BlockHook(last, record_input(store, "out"), pre=True) if any(b is last for b in skipped)
                 else BlockHook(last, record_output(store, "out", stop=True)))
    with hooked(hooks):
        forward_until_stop(model, batch)
    return store["out"]

"""Find a causal LM's transformer blocks by structure, and resize its config to match.

No table of model classes: the block list is the ``nn.ModuleList`` of same-typed
modules holding the most parameters (``model.layers`` for Llama, ``transformer.h``
for GPT-2, ``gpt_neox.layers`` for GPT-NeoX, ``model.decoder.layers`` for OPT, ...).
"""
from __future__ import annotations

import copy

from torch import nn
from transformers import PretrainedConfig

from fl_offsite.errors import UserError


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(dotted path, ModuleList)`` of the model's transformer blocks."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > 0 and (best is None or size > best[0]):
            best = (size, name, module)
    if best is None:
        raise UserError(
            f"{type(model).__name__} has no list of transformer blocks (an nn.ModuleList of "
            "same-typed modules with parameters); offsite-tuning needs a block-structured decoder")
    return best[1], best[2]


def resize_config(config: PretrainedConfig, num_layers: int, kept: list[int]) -> PretrainedConfig:
    """A copy of ``config`` describing a model made of the blocks ``kept`` (original indices).

    Every ``*layer*`` entry equal to the old block count becomes the new count, and
    every per-layer list (e.g. ``layer_types``) keeps the entries of the kept blocks.
    """
    config = copy.deepcopy(config)
    target = config.get_text_config() if hasattr(config, "get_text_config") else config
    changed = []
    for key, value in target.to_dict().items():
        if "layer" not in key:
            continue
        if isinstance(value, int) and not isinstance(value, bool) and value == num_layers:
            setattr(target, key, len(kept))
            changed.append(key)
        elif isinstance(value, (list, tuple)) and len(value) == num_layers:
            setattr(target, key, [value[i] for i in kept])
            changed.append(key)
    if not changed:
        raise UserError(
            f"{type(config).__name__} has no layer-count entry equal to {num_layers}; "
            "cannot describe a model with fewer blocks")
    return config

"""Find a causal LM's transformer blocks by structure, resize its config to match, hook into them.

No table of model classes: the block list is the ``nn.ModuleList`` of same-typed
modules holding the most parameters (``model.layers`` for Llama, ``transformer.h``
for GPT-2, ``gpt_neox.layers`` for GPT-NeoX, ``model.decoder.layers`` for OPT, ...).
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import torch
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


# --- hooks on blocks: record hidden states, skip a block, stop a forward pass early ---------

class StopForward(Exception):
    """Raised by a hook to end a forward pass once what it needs is recorded."""


@dataclass(frozen=True)
class BlockHook:
    block: nn.Module
    hook: Callable
    pre: bool = False  # a forward pre-hook ``(module, args, kwargs)``, else ``(module, args, kwargs, output)``


@contextmanager
def hooked(hooks: list[BlockHook]) -> Iterator[None]:
    """Register ``hooks`` (with keyword arguments) for the duration of the block."""
    handles = [h.block.register_forward_pre_hook(h.hook, with_kwargs=True) if h.pre
               else h.block.register_forward_hook(h.hook, with_kwargs=True) for h in hooks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden state a block was called with (first positional argument or ``hidden_states``)."""
    return args[0] if args else kwargs["hidden_states"]


def block_output(output) -> torch.Tensor:
    """The hidden state a block returned (alone, or first of a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def record_output(store: dict, key, stop: bool = False) -> Callable:
    """A hook storing the block's output hidden state in ``store[key]``, then stopping if asked."""
    def hook(module, args, kwargs, output):
        store[key] = block_output(output)
        if stop:
            raise StopForward
    return hook


def record_input(store: dict, key) -> Callable:
    """A pre-hook storing the block's input hidden state in ``store[key]`` and stopping the pass."""
    def hook(module, args, kwargs):
        store[key] = block_input(args, kwargs)
        raise StopForward
    return hook


def skip_block(module, args, kwargs, output):
    """A hook making a block the identity: its output is its input (same structure)."""
    hidden = block_input(args, kwargs)
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def forward_until_stop(model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
    """Run ``model`` on ``batch`` until a hook raises :class:`StopForward` (or to the end)."""
    with suppress(StopForward):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)


def normalized_mse(teacher: torch.Tensor, student: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over unmasked tokens of the squared error relative to the teacher's RMS per token."""
    rms = teacher.float().pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-6)
    error = ((teacher.float() - student.float()) / rms).pow(2).mean(-1)
    return (error * mask).sum() / mask.sum().clamp_min(1)

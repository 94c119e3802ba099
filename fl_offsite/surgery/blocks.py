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
from typing import TypeVar

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


# --- shared blocks: a block that runs more than once (CRaSh's layer sharing) -------------

ModelT = TypeVar("ModelT", bound=nn.Module)
REPEATS_KEY = "fl_offsite_block_repeats"  # config entry of a shared emulator: how often each block runs
MAX_REPEATS = 64


def share_blocks(model: ModelT) -> ModelT:
    """Make each block of ``model`` run as often as its config's ``fl_offsite_block_repeats`` says (written by
    ``build_emulator`` for a shared emulator); a model without that entry is returned unchanged.

    A shared emulator has ``use_cache`` off: the repeated runs of a block would share one KV-cache slot.
    """
    repeats = getattr(getattr(model, "config", None), REPEATS_KEY, None)
    if repeats is None:
        return model
    _, blocks = find_blocks(model)
    if not (isinstance(repeats, list) and len(repeats) == len(blocks) and all(
            isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= MAX_REPEATS for r in repeats)):
        raise UserError(f"{REPEATS_KEY} in the model's config must give, for each of its {len(blocks)} blocks, how "
                        f"often it runs (1 to {MAX_REPEATS}); got {str(repeats)[:80]}: a damaged emulator config")
    if getattr(model.config, "use_cache", False):
        raise UserError(f"a model with {REPEATS_KEY} must have use_cache off (its repeated blocks would share a "
                        "KV-cache slot): a damaged emulator config")
    for block, count in zip(blocks, repeats, strict=True):
        if count > 1 and getattr(block, "_fl_offsite_repeats", 1) == 1:
            block.register_forward_hook(_run_again(count - 1), with_kwargs=True)
            block._fl_offsite_repeats = count
    return model


def _run_again(times: int) -> Callable:
    """A hook running its block ``times`` more times on its own output (its other hooks see the last one)."""
    def hook(module, args, kwargs, output):
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        for _ in range(times):
            output = module.forward(block_output(output), *args[1:], **rest)
        return output
    return hook


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

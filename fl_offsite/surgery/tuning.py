"""How the adapter is tuned, and which of its tensors travel each round.

``method`` picks it: ``offsite`` / ``fedavg-full`` train every tensor of the adapter (or the
model); ``-lora`` trains LoRA factors (PEFT); ``offsite-bitfit`` trains the adapter blocks'
bias terms only; ``offsite-bottleneck`` adds a bottleneck adapter (Houlsby-style
down-projection, GELU, zero-initialised up-projection, residual) after each adapter block
and trains only those. Everything travels keyed by full-model names, so the emulator's
clients and the owner's full model agree on them; ``fl_offsite.surgery.payload`` copies them in and out.
"""
from __future__ import annotations

from typing import cast

import torch
from peft import PeftModel
from torch import nn
from transformers import PretrainedConfig

from fl_offsite.config.sections import LoraSpec, Tuning
from fl_offsite.errors import UserError
from fl_offsite.surgery.blocks import find_blocks
from fl_offsite.surgery.lora import add_lora, lora_blocks, lora_names
from fl_offsite.surgery.split import SplitPlan, adapter_names

BOTTLENECK = "bottleneck"  # name of the module added to a block


def apply_tuning(tuning: Tuning, model: nn.Module, plan: SplitPlan | None, seed: int = 0) -> nn.Module:
    """``model`` ready for ``tuning``: wrapped in LoRA, or with bottleneck adapters added."""
    if tuning.kind == "lora":
        return add_lora(model, tuning.lora or LoraSpec(), lora_blocks(model, plan), seed=seed)
    if tuning.kind == "bottleneck":
        add_bottlenecks(model, lora_blocks(model, plan), tuning.bottleneck_size, seed=seed)
    if tuning.kind == "bitfit" and not tuned_names(tuning, model, plan):
        raise UserError(f"{type(model).__name__}'s adapter blocks have no bias terms for BitFit: "
                        "use method offsite-lora or offsite-bottleneck for this model")
    return model


def tuned_names(tuning: Tuning, model: nn.Module, plan: SplitPlan | None) -> dict[str, str]:
    """Map travelling name -> parameter name in ``model`` for the tensors ``tuning`` trains."""
    if isinstance(model, PeftModel):
        return lora_names(model, plan)
    if plan is None:
        return {name: name for name, _ in model.named_parameters()}  # tied weights once
    names = adapter_names(model, plan)
    if tuning.kind == "bitfit":
        return {k: v for k, v in names.items() if k.endswith(".bias")}
    if tuning.kind == "bottleneck":
        return {k: v for k, v in names.items() if f".{BOTTLENECK}." in k}
    return {k: v for k, v in names.items() if f".{BOTTLENECK}." not in k}


class Bottleneck(nn.Module):
    """``h + up(gelu(down(h)))``, the identity at initialisation (``up`` starts at zero)."""

    def __init__(self, hidden: int, size: int):
        super().__init__()
        self.down = nn.Linear(hidden, size)
        self.up = nn.Linear(size, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(nn.functional.gelu(self.down(hidden)))


def add_bottlenecks(model: nn.Module, blocks: list[int], size: int, seed: int = 0) -> None:
    """Add a :class:`Bottleneck` to the blocks at ``blocks``, applied to each block's hidden-state output."""
    _, block_list = find_blocks(model)
    hidden = int(cast(PretrainedConfig, model.config).hidden_size)
    with torch.random.fork_rng():  # the same initial adapters on every call; the caller's generators untouched
        torch.manual_seed(seed)
        for pos in blocks:
            block = block_list[pos]
            if hasattr(block, BOTTLENECK):
                continue
            param = next(block.parameters())
            block.add_module(BOTTLENECK, Bottleneck(hidden, size).to(device=param.device, dtype=param.dtype))
            block.register_forward_hook(_apply_bottleneck)


def _apply_bottleneck(block: nn.Module, args, output):
    adapter = getattr(block, BOTTLENECK)
    if isinstance(output, tuple):
        return (adapter(output[0]), *output[1:])
    return adapter(output)


def prepare_for_adapter(model: nn.Module, adapter: dict[str, torch.Tensor], plan: SplitPlan) -> nn.Module:
    """Add to ``model`` the bottleneck adapters that ``adapter`` holds (if any), so that it plugs in."""
    downs = {name: t for name, t in adapter.items() if name.endswith(f".{BOTTLENECK}.down.weight")}
    if downs:
        positions = plan.positions(model)
        blocks = [positions[int(name.removeprefix(plan.block_prefix + ".").split(".")[0])] for name in downs]
        add_bottlenecks(model, blocks, next(iter(downs.values())).shape[0])
    return model

"""LoRA (via PEFT) on chosen transformer blocks, and the names its weights travel under.

LoRA factors travel keyed by the **full model's** module names (``<block prefix>.<full
index>.<module>.lora_A.weight``), like adapters, so clients training inside the emulator
and the owner's full model agree on them. FedAvg averages A and B separately (as
FedAvg-LoRA and FlowerTune do): the average of products is not the product of averages,
but the clients' factors start from the same global pair each round, so the two stay
close for the few local steps of a round; the owner evaluates exactly the averaged pair.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import cast

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from fl_offsite.config.sections import LoraSpec
from fl_offsite.files import atomic_dir, write_atomic
from fl_offsite.surgery.blocks import find_blocks
from fl_offsite.surgery.split import SplitPlan, block_part

PEFT_PREFIX = "base_model.model."



def add_lora(model: torch.nn.Module, spec: LoraSpec, blocks: list[int], seed: int = 0) -> PeftModel:
    """Wrap ``model`` with LoRA on every linear layer of the blocks at positions ``blocks``."""
    prefix, block_list = find_blocks(model)
    leaves = sorted({name for name, module in block_list[0].named_modules()
                     if isinstance(module, (torch.nn.Linear, Conv1D))})
    if not leaves:
        raise ValueError(f"{type(model).__name__}'s blocks have no linear layers for LoRA")
    pattern = (rf"{re.escape(prefix)}\.({'|'.join(str(b) for b in blocks)})\."
               rf"({'|'.join(re.escape(leaf) for leaf in leaves)})")
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=pattern,
                        fan_in_fan_out=any(isinstance(m, Conv1D) for m in block_list[0].modules()))
    with torch.random.fork_rng():  # the same initial factors on every call; the caller's generators untouched
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def lora_blocks(model: torch.nn.Module, plan: SplitPlan | None) -> list[int]:
    """Block positions in ``model`` that get LoRA: the adapter's with a plan, else all."""
    if plan is None:
        return list(range(len(find_blocks(model)[1])))
    positions = plan.positions(model)
    return [positions[i] for i in plan.adapter_layers]


def lora_names(model: PeftModel, plan: SplitPlan | None) -> dict[str, str]:
    """Map travelling name (full-model module + ``lora_A.weight``) -> parameter name in ``model``."""
    original = plan.full_index(cast(nn.Module, model.base_model.model)) if plan else None
    names = {}
    for local, _ in model.named_parameters():
        if ".lora_" not in local or ".default." not in local:  # not another adapter's (fl_offsite.emulator.realign)
            continue
        name = local.removeprefix(PEFT_PREFIX).replace(".default.", ".")
        if plan is not None and original is not None:
            position, rest = block_part(plan.block_prefix, name)
            name = f"{plan.block_prefix}.{original[position]}.{rest}"
        names[name] = local
    return names


def save_peft_folder(model: PeftModel, folder: str | Path, card: str, base_hub_id: str | None) -> Path:
    """PEFT's own adapter folder of ``model`` (``adapter_config.json``, ``adapter_model.safetensors``) and a card;
    ``base_model_name_or_path`` is ``base_hub_id`` where the base model has one (not a local cache path).

    ``PeftModel.from_pretrained(base, folder)`` loads it onto the full base model: the LoRA
    factors sit on the full model's module names (for offsite-lora, the adapter blocks').
    """
    configs = list(model.peft_config.values())
    local = [config.base_model_name_or_path for config in configs]
    try:
        for config in configs:
            config.base_model_name_or_path = base_hub_id or config.base_model_name_or_path
        with atomic_dir(folder) as tmp:  # LoRA leaves the embeddings alone: no look-up of the base model's config
            model.save_pretrained(str(tmp), save_embedding_layers=False)
            write_atomic(tmp / "README.md", card)
    finally:
        for config, path in zip(configs, local, strict=True):
            config.base_model_name_or_path = path
    return Path(folder)

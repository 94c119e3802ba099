"""What travels each round: named tensors of a model (the adapter, or every parameter)."""
from __future__ import annotations

import torch
from peft import PeftModel

from fl_offsite.lora import lora_names
from fl_offsite.split import SplitPlan, adapter_names, copy_by_name


def payload_names(model: torch.nn.Module, plan: SplitPlan | None) -> dict[str, str]:
    """Map travelling name -> name in ``model``: LoRA factors of a PEFT model, else the adapter
    (with a plan) or every parameter (without)."""
    if isinstance(model, PeftModel):
        return lora_names(model, plan)
    if plan is not None:
        return adapter_names(model, plan)
    return {name: name for name, _ in model.named_parameters()}  # tied weights once


def get_payload(model: torch.nn.Module, names: dict[str, str]) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    return {name: state[local].detach().clone() for name, local in names.items()}


def set_payload(model: torch.nn.Module, payload: dict[str, torch.Tensor], names: dict[str, str]) -> None:
    copy_by_name(model, payload, names)

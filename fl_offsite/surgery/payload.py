"""What travels each round: tensors keyed by full-model names, and the one get / set / check trio.

A payload is a dict of tensors keyed by *travelling* names (the full model's names), whichever
model (full or emulator, plain or wrapped by PEFT) they come from or go into. ``names`` maps
travelling name -> parameter name in that model: ``split.adapter_names`` for an adapter,
``tuning.Tuning.names`` for whatever a method trains. :func:`get_payload` and
:func:`set_payload` are an exact inverse pair over the same ``names`` (as PEFT's
``get_peft_model_state_dict`` / ``set_peft_model_state_dict``); :func:`check_payload` refuses a
payload before anything of it is copied, its errors naming the payload's kind.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from fl_offsite.errors import UserError
from fl_offsite.surgery.split import SplitPlan, adapter_names


def get_payload(model: torch.nn.Module, names: dict[str, str],
                order: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """CPU copies of the tensors of ``model`` named in ``names``, keyed by travelling name.

    ``order``: travelling names in the order to list them, e.g. the request a reply answers
    (Flower's positional strategies, such as FedAdam and Krum, pair arrays by position).
    """
    state = model.state_dict()
    return {name: state[names[name]].detach().to("cpu", copy=True) for name in (order or names)}


@torch.no_grad()
def set_payload(model: torch.nn.Module, payload: dict[str, torch.Tensor], names: dict[str, str],
                kind: str = "adapter") -> torch.nn.Module:
    """Check ``payload`` against ``names`` (see :func:`check_payload`), then copy it into ``model`` in place."""
    state = model.state_dict()
    check_payload(payload, {name: state[local] for name, local in names.items()}, kind)
    for name, local in names.items():
        state[local].copy_(payload[name])
    return model


def check_payload(payload: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], kind: str = "adapter") -> None:
    """Raise a UserError naming ``kind`` and the first key that is missing, extra, misshapen or not finite."""
    missing = sorted(set(reference) - set(payload))
    extra = sorted(set(payload) - set(reference))
    if missing:
        raise UserError(f"{kind} lacks {len(missing)} tensor(s), first {missing[0]!r}: wrong split or model")
    if extra:
        raise UserError(f"{kind} has {len(extra)} unexpected tensor(s), first {extra[0]!r}: wrong split or model")
    for key, ref in reference.items():
        got = payload[key]
        if got.shape != ref.shape:
            raise UserError(f"{kind} tensor {key!r} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}")
        if got.dtype != ref.dtype:
            raise UserError(f"{kind} tensor {key!r} has dtype {got.dtype}, expected {ref.dtype}")
        if got.is_floating_point() and not torch.isfinite(got).all():
            raise UserError(f"{kind} tensor {key!r} holds NaN or Inf values")


def extract_adapter(model: torch.nn.Module, plan: SplitPlan) -> dict[str, torch.Tensor]:
    """The adapter blocks' tensors of ``model`` (full or emulator), keyed by full-model names."""
    return get_payload(model, adapter_names(model, plan))


def plug_in(model: torch.nn.Module, adapter: dict[str, torch.Tensor], plan: SplitPlan) -> torch.nn.Module:
    """Copy ``adapter`` (full-model names) into ``model`` (full or emulator), in place, by name."""
    return set_payload(model, adapter, adapter_names(model, plan), "adapter")

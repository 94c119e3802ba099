"""Heterogeneous fleets: each data owner gets the largest emulator its memory budget fits.

A node states a budget (node config ``memory-budget-mb``) or forces the emulator's size
(``emulator-layers``); in simulation the run config's ``fleet.*`` lists give them by partition-id.
The model owner estimates what training an emulator with k middle blocks costs, without the node:

- weights: trainable ones in fp32, frozen ones at the client's precision;
- gradients and AdamW's two moments of the trainable tensors;
- activations saved for backward, measured once on the owner's emulator at the run's batch and
  sequence length (saved-tensor hooks, as ``benchmarks/client_cost.py`` measures them), per block,
  times :data:`ACTIVATION_FACTOR` for the backward pass's gradients of them;
- a fixed runtime overhead (``fleet.overhead-mb``: the process before it trains).

Every middle block costs the same, so the footprint is ``fixed + k * per_block``; the owner gives each
node the largest k, up to the configured emulator's, that fits, and refuses a node no emulator fits,
naming the budget that would do. The activation probe runs on the owner's device and
:data:`ACTIVATION_FACTOR` is fitted to CPU peaks (``benchmarks/footprint.py``); for GPU nodes, whose
budget is GPU memory, set ``fleet.overhead-mb`` to what the runtime holds there.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn
from transformers import PretrainedConfig

from fl_offsite.app.profile import NodeProfile
from fl_offsite.errors import UserError
from fl_offsite.learn.train import HALF, answer_loss, freeze_except, half_frozen, precision_autocast
from fl_offsite.surgery.blocks import find_blocks
from fl_offsite.surgery.split import SplitPlan

SMALLER_EVAL = "emulator-k"  # a smaller emulator's scores (emulator-k2); its folder: RunFolder.smaller_split
# Peak memory per byte of saved activations: they, plus the gradients backward makes of them. Fitted to the
# measured peaks of benchmarks/footprint.py (SmolLM2-135M, CPU, bf16: each middle block adds 72 MB measured,
# 40 MB counting the saved activations once, 73 MB counting them twice).
ACTIVATION_FACTOR = 2.0
MB = 2 ** 20


@dataclass(frozen=True)
class Footprint:
    """Estimated training memory (bytes) of an emulator with ``k`` middle blocks: ``fixed + k * per_block``."""

    fixed: float  # embeddings, head, adapter blocks (weights, grads, AdamW), their activations, overhead
    per_block: float  # one frozen middle block: weights at the client's precision and its activations

    def mb(self, k: int) -> float:
        return (self.fixed + k * self.per_block) / MB


def measure_footprint(emulator: nn.Module, plan: SplitPlan, trainable: set[str], batch_size: int,
                      seq_len: int, precision: str, overhead_mb: float) -> Footprint:
    """The :class:`Footprint` of ``emulator`` (``plan``'s, with ``trainable`` named as in it), from its
    parameter counts and one probe forward pass at ``batch_size`` x ``seq_len`` tokens."""
    frozen_bytes = HALF[precision].itemsize if precision in HALF else 4
    params = dict(emulator.named_parameters())
    weights = sum(p.numel() * (4 if n in trainable else frozen_bytes) for n, p in params.items())
    state = sum(params[n].numel() for n in trainable) * 4 * 3  # gradients and AdamW's two moments, fp32
    _, blocks = find_blocks(emulator)
    middle = range(plan.adapter_bottom, plan.adapter_bottom + plan.emulator_layers)
    middle_weights = sum(p.numel() for i in middle for p in blocks[i].parameters()) * frozen_bytes
    outside, per_block = activation_bytes(emulator, trainable, batch_size, seq_len, precision)
    middle_acts = ACTIVATION_FACTOR * sum(per_block[i] for i in middle)
    k = max(plan.emulator_layers, 1)
    block = (middle_weights + middle_acts) / k
    total = weights + state + ACTIVATION_FACTOR * (outside + sum(per_block)) + overhead_mb * MB
    return Footprint(fixed=total - plan.emulator_layers * block, per_block=block)


def activation_bytes(model: nn.Module, trainable: set[str], batch_size: int, seq_len: int,
                     precision: str) -> tuple[int, list[int]]:
    """Bytes autograd saves for backward in one training forward of ``batch_size`` x ``seq_len`` tokens (the
    loss on the last two): outside the blocks, and per block. Measured on a copy with the client's dtypes."""
    probe = copy.deepcopy(model)
    if precision in HALF:
        half_frozen(probe, trainable, HALF[precision])
    freeze_except(probe, trainable)
    probe.train()
    _, blocks = find_blocks(probe)
    params = {p.untyped_storage().data_ptr() for p in probe.parameters()}
    saved: dict[int, tuple[int | None, int]] = {}  # storage -> (block index or None, bytes)
    where: list[int | None] = [None]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved.setdefault(storage.data_ptr(), (where[0], storage.nbytes()))
        return tensor

    hooks = [h for i, b in enumerate(blocks) for h in (
        b.register_forward_pre_hook(lambda *_, i=i: where.__setitem__(0, i)),
        b.register_forward_hook(lambda *_: where.__setitem__(0, None)))]
    device = next(probe.parameters()).device
    ids = torch.randint(0, int(cast(PretrainedConfig, probe.config).vocab_size), (batch_size, seq_len), device=device,
                        generator=torch.Generator(device).manual_seed(0))
    labels = torch.full_like(ids, -100)
    labels[:, -2:] = ids[:, -2:]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), precision_autocast(device, precision):
            answer_loss(probe, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    finally:
        for hook in hooks:
            hook.remove()
    per_block = [sum(b for w, b in saved.values() if w == i) for i in range(len(blocks))]
    return sum(b for w, b in saved.values() if w is None), per_block


def choose_layers(node: int, profile: NodeProfile, footprint: Footprint | None, cap: int) -> int:
    """The emulator size (k) for a node: its forced ``emulator-layers``, else the largest k <= ``cap`` (the
    configured emulator's) whose footprint fits its budget, else ``cap``. Raises a UserError that names what
    would do."""
    if profile.emulator_layers is not None:
        if not 1 <= profile.emulator_layers <= cap:
            raise UserError(f"node {node} asks for emulator-layers = {profile.emulator_layers}, but the model "
                            f"owner gives out emulators of 1 to {cap} middle blocks (its configured emulator's)")
        return profile.emulator_layers
    if profile.memory_budget_mb is None or footprint is None:
        return cap
    fits = [k for k in range(cap, 0, -1) if footprint.mb(k) <= profile.memory_budget_mb]
    if not fits:
        needed = math.ceil(footprint.mb(1))
        raise UserError(f"node {node}'s memory-budget-mb = {profile.memory_budget_mb:g} fits no emulator: the "
                        f"smallest (1 middle block) needs about {needed} MB to train at this run's batch and "
                        f"length, fleet.overhead-mb included; give the node at least {needed} MB, or lower "
                        "train.batch-size / train.max-length")
    return fits[0]

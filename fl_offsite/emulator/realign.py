"""Bi-level offsite-tuning (FedBiOT, KDD 2024): the model owner re-aligns the emulator to the current adapter.

A one-shot distilled emulator imitates the full model's middle for the *initial* adapter; as the
federated adapter moves, the emulator drifts from what the full model does with that adapter. Before
every round the owner trains LoRA factors (PEFT, adapter name ``realign``) on the linear layers of the
emulator's kept middle blocks, on its own public text, with the current global adapter in place and
frozen, so that the hidden state leaving the emulator's middle matches the full model's with the same
adapter (normalised MSE, ``fl_offsite.emulator.distill.alignment_losses``; optionally every kept block, and a
KL term on the logits, off by default: it lifts emulator + adapter, which narrows the owner's gap).
Only the factors travel, beside the adapter, to the clients training on that emulator; a client
adds the same LoRA layers to its cached emulator and loads them. Factors travel keyed
``<full-model block index>.<module in the block>.lora_A.weight``.

The client's proximal term of FedBiOT (``eps * ||w - w_round||^2``) is FedProx's ``mu / 2 * ||w - w_global||^2``
with ``mu = 2 * eps``: set ``strategy.name = "fedprox"`` and ``strategy.proximal-mu``.
"""
from __future__ import annotations

import logging
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from peft import LoraConfig, PeftModel, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from fl_offsite.config.sections import EmulatorRecipe, RealignSettings
from fl_offsite.data.corpora import check_public
from fl_offsite.data.encode import collate, lm_blocks
from fl_offsite.emulator.distill import alignment_losses, middle_positions, target_layers
from fl_offsite.emulator.recipe import public_texts
from fl_offsite.errors import UserError
from fl_offsite.learn.train import adamw, freeze_except, precision_autocast
from fl_offsite.surgery.blocks import find_blocks
from fl_offsite.surgery.payload import get_payload, set_payload
from fl_offsite.surgery.split import SplitPlan, block_part

log = logging.getLogger(__name__)

ADAPTER = "realign"  # PEFT adapter name of the emulator's re-alignment factors
KIND = "emulator re-alignment"  # what the factors are, in error messages



def add_realign_lora(emulator: nn.Module, plan: SplitPlan, settings: RealignSettings) -> None:
    """Add LoRA layers (adapter :data:`ADAPTER`, fp32) to every linear layer of ``emulator``'s kept middle blocks,
    in place (also inside a PEFT-wrapped emulator); nothing when they are there already."""
    if realign_names(emulator, plan):
        return
    inner = cast(nn.Module, emulator.base_model.model) if isinstance(emulator, PeftModel) else emulator
    prefix, blocks = find_blocks(inner)
    middle = middle_positions(inner, plan)
    if not middle:
        raise UserError(f"split {plan.name} keeps no middle block: there is nothing to re-align; set "
                        "split.emulator-layers >= 1 or realign.steps = 0")
    leaves = sorted({name for name, module in blocks[middle[0]].named_modules()
                     if isinstance(module, (nn.Linear, Conv1D))})
    pattern = (rf"{re.escape(prefix)}\.({'|'.join(map(str, middle))})\."
               rf"({'|'.join(re.escape(leaf) for leaf in leaves)})")
    config = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=0.0, target_modules=pattern,
                        fan_in_fan_out=any(isinstance(m, Conv1D) for m in blocks[0].modules()))
    trainable = {name: p.requires_grad for name, p in emulator.named_parameters()}
    active = {module: module.active_adapters for module in inner.modules() if isinstance(module, BaseTunerLayer)}
    with torch.random.fork_rng(), warnings.catch_warnings():  # the same initial factors on every call
        torch.manual_seed(settings.seed)
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # the tuning's LoRA: intended
        inject_adapter_in_model(config, inner, adapter_name=ADAPTER)
    for module, adapters in active.items():  # PEFT made the new adapter the active one in the tuning's layers too
        module.set_adapter(adapters)
    for name, param in emulator.named_parameters():  # PEFT froze everything else; put that back
        if f".{ADAPTER}." in name:
            param.data = param.data.float()
            param.requires_grad_(False)
        else:
            param.requires_grad_(trainable.get(name, False))


def realign_names(emulator: nn.Module, plan: SplitPlan) -> dict[str, str]:
    """Travelling name (``<full index>.<module>.lora_A.weight``) -> parameter name in ``emulator``."""
    prefix, _ = find_blocks(emulator)
    original = {pos: orig for orig, pos in plan.positions(emulator).items()}
    names: dict[str, str] = {}
    for local, _ in emulator.named_parameters():
        if f".{ADAPTER}." in local:
            position, rest = block_part(prefix, local)
            names[f"{original[position]}.{rest.replace(f'.{ADAPTER}.', '.')}"] = local
    return names


def get_factors(emulator: nn.Module, plan: SplitPlan) -> dict[str, torch.Tensor]:
    return get_payload(emulator, realign_names(emulator, plan))


def set_factors(emulator: nn.Module, plan: SplitPlan, factors: dict[str, torch.Tensor]) -> None:
    """Check ``factors`` (keys, shapes, dtypes, finite) and copy them into ``emulator``'s re-alignment layers."""
    set_payload(emulator, factors, realign_names(emulator, plan), KIND)


def public_blocks(settings: RealignSettings, recipe: EmulatorRecipe, model: nn.Module,
                  tokenizer: PreTrainedTokenizerBase, task: str, num_rounds: int) -> list[dict[str, list[int]]]:
    """The owner's tokenized public text for a run of ``num_rounds``: ``recipe``'s corpus (the distillation's,
    refused when it is the task's own text), in sequences of ``settings.block_size`` tokens."""
    check_public(recipe.corpus, task, recipe.public_in_domain)
    needed = (settings.pre_steps + settings.steps * num_rounds + 1) * settings.batch_size  # + a held-out batch
    texts = public_texts(recipe.corpus, "train", model, tokenizer, task, settings.seed, count=needed,
                         length=settings.block_size)
    return [b for b in lm_blocks(tokenizer, texts, settings.block_size, max_blocks=needed)
            if len(b["input_ids"]) == settings.block_size]


@dataclass
class Realignment:
    """The owner's re-alignment of its emulators (by middle size k) to the current adapter.

    ``plug(model, payload, plan)`` copies a round's adapter payload into the full model (plan None) or an
    emulator; ``blocks`` are the owner's tokenized public text: the last ``batch_size`` of them are held out to
    measure the middle-output error before and after each re-alignment, the others are drawn per round from a
    seeded order, so a resumed run draws what the uninterrupted one did.
    """

    settings: RealignSettings
    model: nn.Module
    emulators: dict[int, tuple[SplitPlan, nn.Module]]
    plug: Callable[[nn.Module, dict[str, torch.Tensor], SplitPlan | None], None]
    blocks: list[dict[str, list[int]]]
    pad_id: int

    def __post_init__(self) -> None:
        if len(self.blocks) < 2 * self.settings.batch_size:
            raise UserError(f"re-alignment needs at least {2 * self.settings.batch_size} sequences of the owner's "
                            f"public text, the corpus gave {len(self.blocks)}: use a larger corpus")
        self.held_out = collate(self.blocks[-self.settings.batch_size:], self.pad_id)
        self.blocks = self.blocks[:-self.settings.batch_size]
        for plan, emulator in self.emulators.values():
            add_realign_lora(emulator, plan, self.settings)

    def before_round(self, rnd: int, payload: dict[str, torch.Tensor]) -> dict | None:
        """Re-align every emulator to ``payload`` (the global adapter) before round ``rnd``: ``pre_steps`` before
        round 0's evaluation, ``steps`` before each training round. Returns the record (None: no steps)."""
        steps = self.settings.pre_steps if rnd == 0 else self.settings.steps
        if steps == 0:
            return None
        began = time.perf_counter()
        self.plug(self.model, payload, None)
        record: dict[str, Any] = {"steps": steps, "emulators": {}}
        for k, (plan, emulator) in sorted(self.emulators.items()):
            self.plug(emulator, payload, plan)
            record["emulators"][str(k)] = self._train(emulator, plan, self._batches(rnd, steps))
        record["seconds"] = time.perf_counter() - began
        for k, r in record["emulators"].items():
            log.info("round %d: re-aligned emulator k=%s in %d steps (%.1f s): held-out middle-output error %.4f -> "
                     "%.4f", rnd, k, steps, record["seconds"], r["error_before"], r["error_after"])
        return record

    def factors(self) -> dict[int, dict[str, torch.Tensor]]:
        """Every emulator's current factors, by k: what its clients are sent (and the checkpoint keeps)."""
        return {k: get_factors(emulator, plan) for k, (plan, emulator) in self.emulators.items()}

    def restore(self, factors: dict[int, dict[str, torch.Tensor]]) -> None:
        for k, (plan, emulator) in self.emulators.items():
            set_factors(emulator, plan, factors[k])

    def _batches(self, rnd: int, steps: int) -> list[dict[str, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.settings.seed * 1_000_003 + rnd)
        needed = steps * self.settings.batch_size
        order = torch.cat([torch.randperm(len(self.blocks), generator=generator)
                           for _ in range(-(-needed // len(self.blocks)))])[:needed].tolist()
        size = self.settings.batch_size
        return [collate([self.blocks[i] for i in order[j:j + size]], self.pad_id) for j in range(0, needed, size)]

    def _train(self, emulator: nn.Module, plan: SplitPlan, batches: list[dict[str, torch.Tensor]]) -> dict:
        s = self.settings
        device = next(emulator.parameters()).device
        trainable = {name: p.requires_grad for name, p in emulator.named_parameters()}
        params = freeze_except(emulator, set(realign_names(emulator, plan).values()))
        optimizer = adamw(params, s.lr, 0.0)
        targets = target_layers(plan, s.targets)
        losses = []
        emulator.eval()  # no dropout: the factors fit the emulator the clients run
        before = self._error(emulator, plan, targets)
        for batch in batches:
            batch = {key: value.to(device) for key, value in batch.items()}
            with precision_autocast(device, s.precision):
                _, mse, kl = alignment_losses(self.model, emulator, plan, batch, targets, s.kl_weight, lm=False)
                loss = mse + s.kl_weight * kl
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        for name, param in emulator.named_parameters():
            param.requires_grad_(trainable[name])
        return {"error_before": before, "error_after": self._error(emulator, plan, targets), "losses": losses}

    @torch.no_grad()
    def _error(self, emulator: nn.Module, plan: SplitPlan, targets: list[int]) -> float:
        """The normalised MSE of the middle's output (``targets``) on the held-out batch."""
        device = next(emulator.parameters()).device
        batch = {key: value.to(device) for key, value in self.held_out.items()}
        with precision_autocast(device, self.settings.precision):
            return alignment_losses(self.model, emulator, plan, batch, targets, 0.0, lm=False)[1].item()

"""Emulator distillation on the model owner's side (the paper's recipe), cached on disk.

Only the emulator's kept middle blocks train, on the owner's public text; the adapter blocks,
embeddings and head stay frozen. The loss is the emulator's LM loss plus ``kd_weight`` times
the normalised MSE ``mean(((h_full - h_emu) / rms(h_full))^2)`` between the hidden state
leaving the emulator's middle and the one leaving the full model's middle (``targets =
"per-block"``: averaged over every kept middle block, each against its original index), plus
``kl_weight`` times KL(full model || emulator) on the next-token distributions. AdamW with a
cosine schedule and warm-up; held-out perplexity is measured every ``eval_every`` steps and
the best emulator is kept.
"""
from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_cosine_schedule_with_warmup

from fl_offsite.config.sections import TARGETS, DistillSettings
from fl_offsite.data.downloads import cache_dir
from fl_offsite.data.encode import collate, lm_blocks, pad_id
from fl_offsite.data.models import placed
from fl_offsite.errors import UserError
from fl_offsite.files import json_digest
from fl_offsite.learn.evaluate import perplexity
from fl_offsite.learn.train import adamw, freeze_except, half_weights, precision_autocast
from fl_offsite.surgery.blocks import BlockHook, find_blocks, forward_until_stop, hooked, normalized_mse, record_output
from fl_offsite.surgery.payload import extract_adapter
from fl_offsite.surgery.split import SPLIT_FILE, SplitPlan, build_emulator, write_split
from fl_offsite.weights import weights_fingerprint

log = logging.getLogger(__name__)
EVAL_CHARS = 16_000  # held-out text per perplexity check (about 4k tokens): checks must not dominate short runs


def middle_positions(emulator: nn.Module, plan: SplitPlan) -> list[int]:
    """Positions in ``emulator`` of its kept middle blocks (the ones distillation trains)."""
    positions = plan.positions(emulator)
    return [positions[i] for i in plan.kept_middle]


def distill(model: PreTrainedModel, emulator: PreTrainedModel, plan: SplitPlan, tokenizer: PreTrainedTokenizerBase,
            settings: DistillSettings, train_texts: list[str], held_out: list[str], progress: bool = True) -> dict:
    """Train ``emulator``'s middle blocks in place on the owner's public text; return the record.

    The emulator with the best held-out perplexity (measured every ``eval_every`` steps) is the one kept.
    """
    middle = middle_positions(emulator, plan)
    train, held_out = _checked_text(plan, middle, tokenizer, settings, train_texts, held_out)
    _, student_blocks = find_blocks(emulator)
    prefixes = tuple(f"{plan.block_prefix}.{pos}." for pos in middle)
    params = freeze_except(emulator, {name for name, _ in emulator.named_parameters() if name.startswith(prefixes)})
    step_once = _trainer(model, emulator, plan, params, settings)

    def held_out_ppl(m: nn.Module) -> float:
        return perplexity(m, tokenizer, held_out, block_size=256, progress=False)["ppl"]

    start = time.perf_counter()
    full_ppl = held_out_ppl(model)
    best_ppl = before_ppl = held_out_ppl(emulator)
    best_state, best_step = _middle_state(student_blocks, middle), 0
    curve, losses, eval_seconds = [{"step": 0, "ppl": before_ppl}], [], time.perf_counter() - start
    model.eval()
    with half_weights(model, settings.precision):  # the teacher only runs forward
        bar = tqdm(range(1, settings.steps + 1), desc="distill", unit="step", disable=not progress)
        for step, batch in zip(bar, _batches(train, settings, pad_id(tokenizer)), strict=False):
            losses.append({"step": step, **step_once({k: v.to(params[0].device) for k, v in batch.items()})})
            if step % settings.eval_every == 0 or step == settings.steps:
                started = time.perf_counter()
                curve.append({"step": step, "ppl": held_out_ppl(emulator)})
                eval_seconds += time.perf_counter() - started
                if curve[-1]["ppl"] < best_ppl:
                    best_ppl, best_step, best_state = curve[-1]["ppl"], step, _middle_state(student_blocks, middle)
            bar.set_postfix(lm=f"{losses[-1]['lm_loss']:.2f}", kd=f"{losses[-1]['kd_loss']:.3f}",
                            ppl=f"{curve[-1]['ppl']:.0f}")
    _load_middle_state(student_blocks, best_state)
    for param in emulator.parameters():
        param.requires_grad_(True)
    seconds = time.perf_counter() - start
    record = {**asdict(settings), "seconds": round(seconds, 1), "train_steps_per_s": round(
                  settings.steps / max(seconds - eval_seconds, 1e-9), 3), "eval_seconds": round(eval_seconds, 1),
              "best_step": best_step, "full_ppl": full_ppl, "emulator_ppl_before": before_ppl,
              "emulator_ppl_after": best_ppl, "perplexity": curve, "losses": losses}
    log.info("distilled %s for %d steps in %.0f s: held-out perplexity %.1f -> %.1f (full model %.1f, best step %d)",
             plan.name, settings.steps, record["seconds"], before_ppl, best_ppl, full_ppl, best_step)
    return record


def _checked_text(plan: SplitPlan, middle: list[int], tokenizer: PreTrainedTokenizerBase, settings: DistillSettings,
                  train_texts: list[str], held_out: list[str]) -> tuple[list[dict], list[str]]:
    """The training blocks (one per draw: no repeats) and held-out texts; UserErrors for what cannot distil."""
    if not middle:
        raise UserError(f"split {plan.name} keeps no middle block: there is nothing to distill")
    if settings.steps < 1:
        raise UserError(f"distillation needs at least one step (got {settings.steps})")
    if settings.targets not in TARGETS:
        raise UserError(f"distill.targets = {settings.targets!r} is not one of {', '.join(TARGETS)}")
    train = [b for b in lm_blocks(tokenizer, train_texts, settings.block_size,
                                  max_blocks=settings.steps * settings.batch_size)
             if len(b["input_ids"]) == settings.block_size]
    held_out = held_out_texts(held_out, settings)
    if not train or not held_out:
        raise UserError(f"corpus {settings.corpus!r} gives no training blocks or no held-out text")
    return train, held_out


def _batches(train: list[dict], settings: DistillSettings, pad: int) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of ``train`` in seeded random order, reshuffled each time it runs out."""
    generator = torch.Generator().manual_seed(settings.seed)
    order: list[int] = []
    while True:
        if len(order) < settings.batch_size:
            order += torch.randperm(len(train), generator=generator).tolist()
        yield collate([train[i] for i in order[:settings.batch_size]], pad)
        del order[:settings.batch_size]


def _trainer(model: PreTrainedModel, emulator: PreTrainedModel, plan: SplitPlan, params: list[nn.Parameter],
             settings: DistillSettings) -> Callable[[dict[str, torch.Tensor]], dict[str, float]]:
    """One distillation step on a batch (AdamW, cosine schedule with warm-up, clipped): its losses."""
    optimizer = adamw(params, settings.lr, 0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(settings.warmup_steps, settings.steps // 10),
                                               settings.steps)
    autocast = precision_autocast(params[0].device, settings.precision)
    targets = target_layers(plan, settings.targets)

    def step(batch: dict[str, torch.Tensor]) -> dict[str, float]:
        emulator.train()
        with autocast:
            out, kd_loss, kl_loss = alignment_losses(model, emulator, plan, batch, targets, settings.kl_weight, lm=True)
            loss = out.loss + settings.kd_weight * kd_loss + settings.kl_weight * kl_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        emulator.eval()
        return {"loss": loss.item(), "lm_loss": out.loss.item(), "kd_loss": kd_loss.item(), "kl_loss": kl_loss.item()}

    return step


def target_layers(plan: SplitPlan, targets: str) -> list[int]:
    """Original indices of the kept middle blocks whose outputs are matched: the last one (``"output"``, the
    middle's output) or every one (``"per-block"``)."""
    return plan.kept_middle if targets == "per-block" else plan.kept_middle[-1:]


def alignment_losses(model: nn.Module, emulator: nn.Module, plan: SplitPlan, batch: dict[str, torch.Tensor],
                     targets: list[int], kl_weight: float, lm: bool):
    """One batch through the full ``model`` (the teacher, no grad) and the ``emulator``: the emulator's output
    (None unless ``lm`` or a KL term needs its logits), the normalised MSE between the hidden states leaving the
    ``targets`` blocks (original indices; averaged) and KL(full || emulator) on the logits (0 when
    ``kl_weight`` is 0). Forward passes stop after the last target block when no logits are needed."""
    mask = batch["attention_mask"].float()
    _, teacher_blocks = find_blocks(model)
    _, student_blocks = find_blocks(emulator)
    position = plan.positions(emulator)
    teacher: dict[int, torch.Tensor] = {}
    student: dict[int, torch.Tensor] = {}
    with_kl, whole = kl_weight > 0, lm or kl_weight > 0
    with torch.no_grad(), hooked([BlockHook(teacher_blocks[plan.last_slot(i)], record_output(
            teacher, i, stop=not with_kl and i == targets[-1])) for i in targets]):
        if with_kl:
            teacher_logits = model(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False).logits
        else:
            forward_until_stop(model, batch)
    with hooked([BlockHook(student_blocks[position[i]], record_output(student, i, stop=not whole and
                                                                      i == targets[-1])) for i in targets]):
        if whole:
            out = emulator(**batch, use_cache=False)
        else:
            out = None
            forward_until_stop(emulator, batch)
    mse = torch.stack([normalized_mse(teacher[i], student[i], mask) for i in targets]).mean()
    kl = kl_divergence(teacher_logits, out.logits, mask) if with_kl else torch.zeros((), device=mse.device)
    return out, mse, kl


def kl_divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over unmasked tokens of KL(teacher || student) between next-token distributions."""
    teacher = teacher_logits.float().log_softmax(-1)
    student = student_logits.float().log_softmax(-1)
    per_token = (teacher.exp() * (teacher - student)).sum(-1)
    return (per_token * mask).sum() / mask.sum().clamp_min(1)


def held_out_texts(texts: list[str], settings: DistillSettings) -> list[str]:
    """What the held-out perplexity reads: the first ``eval_texts`` texts, at most EVAL_CHARS characters in all."""
    out, left = [], EVAL_CHARS
    for text in texts[:settings.eval_texts]:
        if left <= 0:
            break
        out.append(text[:left])
        left -= len(out[-1])
    return out


def _middle_state(blocks: nn.ModuleList, middle: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    return {pos: {k: v.detach().cpu().clone() for k, v in blocks[pos].state_dict().items()} for pos in middle}


def _load_middle_state(blocks: nn.ModuleList, state: dict[int, dict[str, torch.Tensor]]) -> None:
    for pos, tensors in state.items():
        blocks[pos].load_state_dict(tensors)


def cache_key(model_name: str, model: PreTrainedModel, plan: SplitPlan, settings: DistillSettings,
              texts: list[str]) -> str:
    """What identifies a distilled emulator: the model (name, config and weights), the split, the settings and
    the text."""
    identity = {"model": model_name, "config": model.config.to_json_string(use_diff=False),
                "weights": weights_fingerprint(model),
                "plan": plan.to_json(), "settings": asdict(settings),
                "text": hashlib.sha256("\x00".join(texts).encode()).hexdigest()}
    return json_digest(identity)


def distilled_split(model_name: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, plan: SplitPlan,
                    settings: DistillSettings, train_texts: list[str], held_out: list[str],
                    progress: bool = True) -> Path:
    """A split folder with a distilled emulator: from the cache, or distilled now and cached."""
    key = cache_key(model_name, model, plan, settings, train_texts + held_out)
    folder = cache_dir("distilled") / f"{model_name.strip('/').replace('/', '--')[-60:]}-{plan.name}-" \
                                      f"{settings.steps}steps-{key}"
    if (folder / SPLIT_FILE).is_file():
        log.info("distilled emulator found in the cache: %s", folder)
        return folder
    emulator = placed(build_emulator(model, plan), model.device)
    record = distill(model, emulator, plan, tokenizer, settings, train_texts, held_out, progress=progress)
    write_split(folder, emulator, extract_adapter(model, plan), plan, tokenizer,
                record={"source_model": model_name, "distillation": record})
    return folder


def ppl_summary(record: dict) -> str:
    """One line: perplexities before/after distillation and of the full model."""
    return (f"held-out perplexity: full model {record['full_ppl']:.1f}, emulator {record['emulator_ppl_before']:.1f}"
            f" -> {record['emulator_ppl_after']:.1f} after {record['best_step']} of {record['steps']} steps"
            f" ({record['seconds']:.0f} s)") if record else "no distillation"


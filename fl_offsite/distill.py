"""Emulator distillation on the model owner's side (the paper's recipe), cached on disk.

Only the emulator's kept middle blocks train; the adapter blocks, embeddings and head stay
frozen. The loss is the emulator's LM loss plus ``kd_weight`` times the normalised MSE
between the hidden state leaving the emulator's middle and the one leaving the full
model's middle: ``mean(((h_full - h_emu) / rms(h_full))^2)``. AdamW with a cosine schedule
and warm-up; held-out perplexity is measured every ``eval_every`` steps and the best
emulator is kept.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_cosine_schedule_with_warmup

from fl_offsite.assets import cache_dir
from fl_offsite.blocks import find_blocks
from fl_offsite.data import collate, lm_blocks, pad_id
from fl_offsite.errors import UserError
from fl_offsite.evaluate import perplexity
from fl_offsite.split import SPLIT_FILE, SplitPlan, build_emulator, extract_adapter, write_split
from fl_offsite.corpora import load_text_corpus
from fl_offsite.train import freeze_except

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillSettings:
    steps: int = 100
    corpus: str = "bbc-news"  # see fl_offsite.tasks.load_text_corpus
    lr: float = 1e-4
    kd_weight: float = 30.0  # the paper's weight of the hidden-state loss
    batch_size: int = 8
    block_size: int = 160  # tokens per training sequence
    warmup_steps: int = 10
    eval_every: int = 25
    eval_texts: int = 40  # held-out ("validation") texts for the perplexity
    seed: int = 1234

    @classmethod
    def from_config(cls, config: dict) -> DistillSettings:
        return cls(steps=config["distill.steps"], corpus=config["distill.corpus"], lr=config["distill.lr"],
                   kd_weight=config["distill.kd-weight"], batch_size=config["distill.batch-size"],
                   block_size=config["distill.block-size"], seed=config["seed"])


class _Stop(Exception):
    """Raised by a hook to end the teacher's forward pass once the middle is computed."""


@contextmanager
def _capture(block: nn.Module, store: dict, stop: bool = False) -> Iterator[None]:
    """Record ``block``'s output hidden state in ``store["h"]`` (and stop the forward pass if asked)."""
    def hook(module, args, output):
        store["h"] = output[0] if isinstance(output, tuple) else output
        if stop:
            raise _Stop

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def middle_positions(emulator: nn.Module, plan: SplitPlan) -> list[int]:
    """Positions in ``emulator`` of its kept middle blocks (the ones distillation trains)."""
    positions = plan.positions(emulator)
    return [positions[i] for i in plan.kept_layers if i not in set(plan.adapter_layers)]


def normalized_mse(teacher: torch.Tensor, student: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over unmasked tokens of the squared error relative to the teacher's RMS per token."""
    rms = teacher.float().pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-6)
    error = ((teacher.float() - student.float()) / rms).pow(2).mean(-1)
    return (error * mask).sum() / mask.sum().clamp_min(1)


def distill(model: PreTrainedModel, emulator: PreTrainedModel, plan: SplitPlan,
            tokenizer: PreTrainedTokenizerBase, settings: DistillSettings, progress: bool = True) -> dict:
    """Train ``emulator``'s middle blocks in place; return the distillation record."""
    middle = middle_positions(emulator, plan)
    if not middle:
        raise UserError(f"split {plan.name} keeps no middle block: there is nothing to distill")
    if settings.steps < 1:
        raise UserError(f"distillation needs at least one step (got {settings.steps})")
    device = next(emulator.parameters()).device
    train = [b for b in lm_blocks(tokenizer, load_text_corpus(settings.corpus, "train", settings.seed),
                                  settings.block_size) if len(b["input_ids"]) == settings.block_size]
    held_out = load_text_corpus(settings.corpus, "validation", settings.seed)[:settings.eval_texts]
    if not train or not held_out:
        raise UserError(f"corpus {settings.corpus!r} gives no training blocks or no held-out text")

    _, teacher_blocks = find_blocks(model)
    _, student_blocks = find_blocks(emulator)
    teacher_out = teacher_blocks[plan.num_layers - plan.adapter_top - 1]
    student_out = student_blocks[len(plan.kept_layers) - plan.adapter_top - 1]
    prefixes = tuple(f"{plan.block_prefix}.{pos}." for pos in middle)
    params = freeze_except(emulator, {name for name, _ in emulator.named_parameters() if name.startswith(prefixes)})
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(settings.warmup_steps, settings.steps // 10),
                                               settings.steps)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    def held_out_ppl(m: nn.Module) -> float:
        return perplexity(m, tokenizer, held_out, block_size=256, progress=False)["ppl"]

    start = time.perf_counter()
    full_ppl = held_out_ppl(model)
    best_ppl = before_ppl = held_out_ppl(emulator)
    best_state, best_step = _middle_state(student_blocks, middle), 0
    curve, losses = [{"step": 0, "ppl": before_ppl}], []
    generator = torch.Generator().manual_seed(settings.seed)
    order: list[int] = []
    model.eval()
    bar = tqdm(range(1, settings.steps + 1), desc="distill", unit="step", disable=not progress)
    for step in bar:
        if len(order) < settings.batch_size:
            order += torch.randperm(len(train), generator=generator).tolist()
        batch = collate([train[i] for i in order[:settings.batch_size]], pad_id(tokenizer))
        del order[:settings.batch_size]
        batch = {k: v.to(device) for k, v in batch.items()}
        teacher, student = {}, {}
        with torch.no_grad(), autocast, _capture(teacher_out, teacher, stop=True):
            try:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            except _Stop:
                pass
        emulator.train()
        with autocast, _capture(student_out, student):
            lm_loss = emulator(**batch).loss
            kd_loss = normalized_mse(teacher["h"], student["h"], batch["attention_mask"].float())
            loss = lm_loss + settings.kd_weight * kd_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        emulator.eval()
        losses.append({"step": step, "loss": loss.item(), "lm_loss": lm_loss.item(), "kd_loss": kd_loss.item()})
        if step % settings.eval_every == 0 or step == settings.steps:
            ppl = held_out_ppl(emulator)
            curve.append({"step": step, "ppl": ppl})
            if ppl < best_ppl:
                best_ppl, best_step, best_state = ppl, step, _middle_state(student_blocks, middle)
        bar.set_postfix(lm=f"{lm_loss.item():.2f}", kd=f"{kd_loss.item():.3f}", ppl=f"{curve[-1]['ppl']:.0f}")
    _load_middle_state(student_blocks, best_state)
    for param in emulator.parameters():
        param.requires_grad_(True)
    record = {**asdict(settings), "seconds": round(time.perf_counter() - start, 1), "best_step": best_step,
              "full_ppl": full_ppl, "emulator_ppl_before": before_ppl, "emulator_ppl_after": best_ppl,
              "perplexity": curve, "losses": losses}
    log.info("distilled %s for %d steps in %.0f s: held-out perplexity %.1f -> %.1f (full model %.1f, best step %d)",
             plan.name, settings.steps, record["seconds"], before_ppl, best_ppl, full_ppl, best_step)
    return record


def _middle_state(blocks: nn.ModuleList, middle: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    return {pos: {k: v.detach().cpu().clone() for k, v in blocks[pos].state_dict().items()} for pos in middle}


def _load_middle_state(blocks: nn.ModuleList, state: dict[int, dict[str, torch.Tensor]]) -> None:
    for pos, tensors in state.items():
        blocks[pos].load_state_dict(tensors)


def cache_key(model_name: str, model: PreTrainedModel, plan: SplitPlan, settings: DistillSettings) -> str:
    """What identifies a distilled emulator: the model (name and config), the split and the settings."""
    identity = {"model": model_name, "config": model.config.to_json_string(use_diff=False),
                "plan": plan.to_json(), "settings": asdict(settings)}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def distilled_split(model_name: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, plan: SplitPlan,
                    settings: DistillSettings, progress: bool = True) -> Path:
    """A split folder with a distilled emulator: from the cache, or distilled now and cached."""
    folder = cache_dir("distilled") / f"{model_name.strip('/').replace('/', '--')[-60:]}-{plan.name}-" \
                                      f"{settings.steps}steps-{cache_key(model_name, model, plan, settings)}"
    if (folder / SPLIT_FILE).is_file():
        log.info("distilled emulator found in the cache: %s", folder)
        return folder
    emulator = build_emulator(model, plan).to(model.device)
    record = distill(model, emulator, plan, tokenizer, settings, progress=progress)
    write_split(folder, emulator, extract_adapter(model, plan), plan, tokenizer,
                record={"source_model": model_name, "distillation": record})
    return folder


def ppl_summary(record: dict) -> str:
    """One line: perplexities before/after distillation and of the full model."""
    return (f"held-out perplexity: full model {record['full_ppl']:.1f}, emulator {record['emulator_ppl_before']:.1f}"
            f" -> {record['emulator_ppl_after']:.1f} after {record['best_step']} of {record['steps']} steps"
            f" ({record['seconds']:.0f} s)") if record else "no distillation"


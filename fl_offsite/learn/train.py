"""Local training of the trainable tensors (the adapter) with everything else frozen."""
from __future__ import annotations

import contextlib
import functools
import logging
import platform
import random
import resource
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from fl_offsite.config.sections import TrainSettings
from fl_offsite.data.encode import IGNORE_INDEX, collate

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class TrainStats:
    loss: float
    steps: int
    examples: int
    tokens: int
    seconds: float
    tokens_per_s: float
    peak_memory_mb: float
    trainable_params: int


def freeze_except(model: nn.Module, trainable: set[str]) -> list[nn.Parameter]:
    """Make exactly the parameters named in ``trainable`` require grad; return them."""
    params = dict(model.named_parameters())
    unknown = trainable - params.keys()
    if unknown:
        raise KeyError(f"not parameters of the model: {sorted(unknown)[:3]}")
    for name, param in params.items():
        param.requires_grad_(name in trainable)
    return [params[name] for name in sorted(trainable)]


HALF = {"bf16": torch.bfloat16}  # fp16 would need loss scaling


def precision_autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to ``precision`` on ``device`` for "bf16"; nothing for "fp32"."""
    if precision not in ("fp32", *HALF):
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    if precision in HALF and device.type == "cpu" and not native_cpu_bf16():
        warn_slow_cpu_bf16()
    return torch.autocast(device.type, dtype=HALF[precision]) if precision in HALF else contextlib.nullcontext()


def native_cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (x86: AVX-512 BF16 or AMX; other CPUs are assumed to)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


@functools.cache
def warn_slow_cpu_bf16() -> None:
    """Once per process: x86 CPUs without bf16 instructions ran bf16 matrix products 40x slower than fp32."""
    log.warning("bf16 on this CPU (no AVX-512 BF16 or AMX) is far slower than fp32: a 512x512 matrix product "
                "ran at 0.6 GFLOPS against 24 in fp32 on an AVX2 machine; set the precision to fp32 "
                "(train.precision, eval.precision, distill.precision)")


@contextlib.contextmanager
def half_weights(model: nn.Module, precision: str) -> Iterator[None]:
    """For "bf16", hold ``model``'s floating-point weights in bf16 inside the block; the originals come back after.

    For inference under autocast: it spares the cast of every weight on every forward pass. Nothing
    for "fp32".
    """
    originals = {}
    if precision in HALF:
        for param in model.parameters():
            if param.is_floating_point() and param.dtype != HALF[precision]:
                originals[param] = param.data
                param.data = param.data.to(HALF[precision])
    try:
        yield
    finally:
        for param, data in originals.items():
            param.data = data


def adamw(params: Sequence[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused where torch has the kernel (CPU and CUDA): one kernel per step instead of one per tensor."""
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)


def half_frozen(model: nn.Module, trainable: set[str], dtype: torch.dtype = torch.bfloat16) -> int:
    """Store every frozen floating-point parameter in ``dtype`` (trainable ones stay as they are).

    Frozen weights get no gradient and no optimizer state, so half precision halves their
    memory and, under autocast, spares the per-step cast of each weight. Returns the bytes saved.
    """
    saved = 0
    for name, param in model.named_parameters():
        if name not in trainable and param.is_floating_point() and param.dtype != dtype:
            saved += param.numel() * (param.element_size() - torch.finfo(dtype).bits // 8)
            param.data = param.data.to(dtype)
    return saved


def peak_memory_mb(device: torch.device) -> float:
    """Allocator peak on GPU; the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_local(
    model: nn.Module,
    trainable: set[str],
    features: Sequence[dict[str, list[int]]],
    settings: TrainSettings,
    pad_id: int,
    desc: str = "train",
) -> TrainStats:
    """AdamW on the ``trainable`` parameters over ``features`` (input_ids + labels, -100 masked)."""
    if not features:
        raise ValueError("no training examples in this partition")
    device = next(model.parameters()).device
    params = freeze_except(model, trainable)
    autocast = precision_autocast(device, settings.precision)
    anchors = [p.detach().clone() for p in params] if settings.proximal_mu > 0 else None
    optimizer = adamw(params, settings.lr, settings.weight_decay)
    steps = settings.steps_for(len(features))
    order = _example_order(len(features), steps * settings.grad_accum * settings.batch_size, settings.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.random.fork_rng():  # dropout draws from this client-round's seed; the caller's generators untouched
        torch.manual_seed(settings.seed)
        model.train()
        start, losses, tokens = time.perf_counter(), [], 0
        bar = tqdm(range(steps), desc=desc, unit="step", leave=False, mininterval=2.0)
        for step in bar:
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for micro in range(settings.grad_accum):
                first = (step * settings.grad_accum + micro) * settings.batch_size
                batch = collate([features[i] for i in order[first:first + settings.batch_size]], pad_id)
                batch = {k: v.to(device) for k, v in batch.items()}
                with autocast:
                    loss = answer_loss(model, batch) / settings.grad_accum
                if anchors is not None:
                    drift = sum(((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True))
                    loss = loss + settings.proximal_mu / 2 * drift
                loss.backward()
                step_loss += loss.item()
                tokens += int(batch["attention_mask"].sum())
            if settings.grad_clip > 0:
                nn.utils.clip_grad_norm_(params, settings.grad_clip)
            optimizer.step()
            losses.append(step_loss)
            bar.set_postfix(loss=f"{step_loss:.3f}")
    model.eval()
    for param in params:
        param.requires_grad_(False)
    seconds = time.perf_counter() - start
    return TrainStats(
        loss=sum(losses) / len(losses), steps=steps, examples=len(order), tokens=tokens, seconds=seconds,
        tokens_per_s=tokens / seconds, peak_memory_mb=peak_memory_mb(device),
        trainable_params=sum(p.numel() for p in params))


def answer_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens (the answers).

    The LM head runs only at the positions where some row has a label: for short answers
    after long prompts that skips most of its (large-vocabulary) work, forward and backward.
    """
    targets = batch["labels"][:, 1:]
    keep = (targets != IGNORE_INDEX).any(0).nonzero()[:, 0]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    return token_cross_entropy(logits, targets[:, keep])


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``logits`` (batch, positions, vocab) against ``labels`` (batch, positions), -100 ignored.

    The logits are flattened to (tokens, vocab) rows: the softmax then runs along contiguous memory.
    Passing them as (batch, vocab, positions) instead (``transpose(1, 2)``) makes CUDA take its
    strided "spatial" log-softmax, which took 58 ms forward + 27 ms backward for 512 x 50k logits
    on an H100, 70% of an offsite-LoRA step of GPT2-XL (benchmarks/README.md, GPU section).
    """
    return nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                       reduction=reduction)


def _example_order(num_examples: int, needed: int, seed: int) -> list[int]:
    """Seeded epochs of shuffled example indices, long enough for ``needed`` draws."""
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < needed:
        epoch = list(range(num_examples))
        rng.shuffle(epoch)
        order.extend(epoch)
    return order[:needed]


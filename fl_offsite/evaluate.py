"""Zero-shot multiple-choice accuracy (lm-eval-harness style) and perplexity."""
from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from fl_offsite.data import IGNORE_INDEX, collate, encode_pair, lm_blocks, truncate_context
from fl_offsite.tasks import ChoiceExample, TaskData, load_task

log = logging.getLogger(__name__)


@contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """``eval()`` + ``inference_mode`` for the block; the model's training mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    return torch.device(device) if device is not None else next(model.parameters()).device


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Any id works under the attention mask; prefer the tokenizer's pad, then EOS."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


@dataclass
class _Row:
    """One sequence to run: an example's context, plus one choice's tokens but its last."""

    example: int
    input_ids: list[int]
    # (choice index, position of the logits predicting its first token, its tokens)
    targets: list[tuple[int, int, list[int]]]


def _rows(tokenizer: PreTrainedTokenizerBase, examples: Sequence[ChoiceExample],
          max_length: int | None) -> list[_Row]:
    """The fewest sequences that score every choice of every example.

    The logits at the context's last position score the first token of every choice, so all
    single-token choices of an example (every BBC topic, most class labels) share one row
    holding just the context; each multi-token choice gets a row of context + its tokens but
    the last. Choices of one example therefore cost one context pass instead of one each.
    """
    rows = []
    for i, ex in enumerate(examples):
        pairs = [encode_pair(tokenizer, ex.context, choice) for choice in ex.choices]
        context = pairs[0][0]
        conts = [cont for _, cont in pairs]
        if max_length is not None:  # the last answer token is never fed, hence the +1
            context = truncate_context(context, max(conts, key=len), max_length + 1)
        start = len(context) - 1
        single = [(j, start, cont) for j, cont in enumerate(conts) if len(cont) == 1]
        multi = [_Row(i, context + cont[:-1], [(j, start, cont)])
                 for j, cont in enumerate(conts) if len(cont) > 1]
        if multi:
            multi[0].targets.extend(single)
            rows.extend(multi)
        else:
            rows.append(_Row(i, context, single))
    return rows


def choice_logliks(model: nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[ChoiceExample],
                   batch_size: int = 16, device: torch.device | str | None = None,
                   progress: bool = True, max_length: int | None = None) -> list[list[float]]:
    """Log-likelihood of each choice's tokens given its context, per example.

    Runs the rows of :func:`_rows` longest first, ``batch_size`` rows a forward pass, right
    padded. (Caching the context's keys/values and expanding them per choice would also save
    the context pass for multi-token choices, but with right padding the cache has holes and
    every architecture handles that differently; sharing the pass for single-token choices
    gets the large win on CPU with plain batched forwards.) Only the needed positions go
    through the LM head when the model accepts ``logits_to_keep``. ``max_length`` (default:
    the model's ``max_position_embeddings``) truncates long contexts from the left.
    """
    device = _device(model, device)
    if max_length is None:
        max_length = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    rows = sorted(_rows(tokenizer, examples, max_length), key=lambda r: -len(r.input_ids))
    keep_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    logliks = [[0.0] * len(ex.choices) for ex in examples]
    pad_id = _pad_id(tokenizer)
    with _inference(model):
        for b in tqdm(range(0, len(rows), batch_size), desc="scoring", unit="batch", disable=not progress):
            batch = rows[b:b + batch_size]
            tensors = collate([{"input_ids": r.input_ids, "labels": r.input_ids} for r in batch], pad_id)
            width = tensors["input_ids"].shape[1]
            # every needed position is >= offset; keep the logits from there on
            offset = min(start for r in batch for _, start, _ in r.targets) if keep_logits else 0
            kwargs = {"logits_to_keep": width - offset} if keep_logits else {}
            logits = model(input_ids=tensors["input_ids"].to(device),
                           attention_mask=tensors["attention_mask"].to(device), **kwargs).logits
            row_idx, pos, target, owner = [], [], [], []
            for k, r in enumerate(batch):
                for j, start, cont in r.targets:
                    row_idx += [k] * len(cont)
                    pos += range(start - offset, start - offset + len(cont))
                    target += cont
                    owner += [(r.example, j)] * len(cont)
            picked = logits[torch.tensor(row_idx), torch.tensor(pos)].float().log_softmax(-1)
            scores = picked.gather(1, torch.tensor(target, device=picked.device)[:, None])[:, 0].tolist()
            for (i, j), score in zip(owner, scores):
                logliks[i][j] += score
    return logliks


def _mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (sample std / sqrt(n), as lm-eval); NaN stderr below 2 values."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def score_choices(model: nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[ChoiceExample],
                  batch_size: int = 16, device: torch.device | str | None = None,
                  progress: bool = True) -> dict[str, float]:
    """lm-eval-harness multiple-choice metrics.

    ``acc``: the gold choice has the highest log-likelihood. ``acc_norm``: the same after
    dividing each log-likelihood by its choice's length in characters (without the leading
    delimiter space, as lm-eval counts it). Ties go to the first choice.
    """
    if not examples:
        raise ValueError("no examples to score")
    begin = time.perf_counter()
    logliks = choice_logliks(model, tokenizer, examples, batch_size=batch_size, device=device, progress=progress)
    seconds = time.perf_counter() - begin
    correct, correct_norm = [], []
    for ex, lls in zip(examples, logliks):
        normed = [ll / max(1, len(choice.lstrip())) for ll, choice in zip(lls, ex.choices)]
        correct.append(float(_argmax(lls) == ex.label))
        correct_norm.append(float(_argmax(normed) == ex.label))
    acc, acc_stderr = _mean_stderr(correct)
    acc_norm, acc_norm_stderr = _mean_stderr(correct_norm)
    return {"acc": acc, "acc_stderr": acc_stderr, "acc_norm": acc_norm, "acc_norm_stderr": acc_norm_stderr,
            "n": len(examples), "seconds": seconds, "examples_per_s": len(examples) / seconds}


def perplexity(model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], block_size: int = 256,
               batch_size: int = 8, device: torch.device | str | None = None,
               progress: bool = True) -> dict[str, float]:
    """Perplexity over non-overlapping ``block_size`` blocks of the EOS-joined texts.

    ``nll`` is the mean negative log-likelihood per predicted token (each block's first token
    is not predicted), ``tokens`` their count, ``ppl`` = exp(nll).
    """
    device = _device(model, device)
    blocks = lm_blocks(tokenizer, texts, block_size)
    if not blocks:
        raise ValueError("the texts give no block of at least two tokens")
    total, count = 0.0, 0
    with _inference(model):
        for b in tqdm(range(0, len(blocks), batch_size), desc="perplexity", unit="batch", disable=not progress):
            tensors = {k: v.to(device) for k, v in collate(blocks[b:b + batch_size], _pad_id(tokenizer)).items()}
            logits = model(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"]).logits
            labels = tensors["labels"][:, 1:]
            total += nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels,
                                                 ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((labels != IGNORE_INDEX).sum())
    nll = total / count
    return {"ppl": math.exp(nll), "nll": nll, "tokens": count}


def evaluate_task(model: nn.Module, tokenizer: PreTrainedTokenizerBase, task: TaskData | str, split: str = "test",
                  limit: int | None = None, batch_size: int = 16, progress: bool = True) -> dict[str, float | str]:
    """Score ``split`` of ``task`` (a :class:`TaskData` or a task name); ``limit``: its first N examples."""
    data = load_task(task) if isinstance(task, str) else task
    examples = data.split(split)[:limit]
    metrics = score_choices(model, tokenizer, examples, batch_size=batch_size, progress=progress)
    log.info("%s/%s: acc %.3f acc_norm %.3f (n=%d, %.1f examples/s)", data.name, split, metrics["acc"],
             metrics["acc_norm"], metrics["n"], metrics["examples_per_s"])
    return {"task": data.name, "split": split, **metrics}

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

from fl_offsite.data.encode import IGNORE_INDEX, collate, encode_pair, lm_blocks, pad_id, truncate_context
from fl_offsite.data.tasks import ChoiceExample, TaskData, load_task

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


@dataclass(frozen=True)
class _Item:
    """One example's context tokens and the tokens of each of its choices."""

    example: int
    context: list[int]
    choices: list[list[int]]

    @property
    def multi_token(self) -> list[int]:
        """Indices of the choices longer than one token (they need a continuation pass)."""
        return [j for j, cont in enumerate(self.choices) if len(cont) > 1]


def _items(tokenizer: PreTrainedTokenizerBase, examples: Sequence[ChoiceExample],
           max_length: int | None) -> list[_Item]:
    items = []
    for i, ex in enumerate(examples):
        pairs = [encode_pair(tokenizer, ex.context, choice) for choice in ex.choices]
        context, choices = pairs[0][0], [cont for _, cont in pairs]
        if max_length is not None:  # the last choice token is never fed, hence the +1
            context = truncate_context(context, max(choices, key=len), max_length + 1)
        items.append(_Item(i, context, choices))
    return items


def _groups(items: Sequence[_Item], batch_size: int) -> Iterator[list[_Item]]:
    """Consecutive items with at most ``batch_size`` contexts and multi-token choices each."""
    group: list[_Item] = []
    for item in items:
        if group and (len(group) == batch_size or
                      sum(len(g.multi_token) for g in group) + len(item.multi_token) > batch_size):
            yield group
            group = []
        group.append(item)
    if group:
        yield group


def _score_group(model: nn.Module, group: Sequence[_Item], pad_id: int, device: torch.device,
                 keep_logits: bool) -> list[list[float]]:
    """Log-likelihoods of every choice of ``group``: one context pass, then one continuation pass (or, for a
    model whose config turns the KV cache off, such as a shared emulator, one pass per choice)."""
    if not getattr(getattr(model, "config", None), "use_cache", True) and any(it.multi_token for it in group):
        return _score_without_cache(model, group, pad_id, device)
    ctx = {k: v.to(device) for k, v in
           collate([{"input_ids": it.context, "labels": it.context} for it in group], pad_id).items()}
    lengths = ctx["attention_mask"].sum(1)
    rows = [(g, j) for g, it in enumerate(group) for j in it.multi_token]
    offset = int(lengths.min()) - 1 if keep_logits else 0  # the logits needed start here
    kwargs = {"logits_to_keep": ctx["input_ids"].shape[1] - offset} if keep_logits else {}
    out = model(input_ids=ctx["input_ids"], attention_mask=ctx["attention_mask"], use_cache=bool(rows), **kwargs)
    first = out.logits[torch.arange(len(group), device=device), lengths - 1 - offset].float().log_softmax(-1)
    scores = [first[g, [cont[0] for cont in it.choices]].tolist() for g, it in enumerate(group)]
    if not rows:
        return scores
    # one copy of its example's context cache per multi-token choice, then the choice's tokens but the last;
    # the cache goes back under the name it came out with ("cache" in transformers 5, "past_key_values" in 4)
    cache_name = "cache" if "cache" in out else "past_key_values"
    cache = out[cache_name]
    index = torch.tensor([g for g, _ in rows], device=device)
    cache.batch_select_indices(index)
    tails = [group[g].choices[j] for g, j in rows]
    cont = {k: v.to(device) for k, v in
            collate([{"input_ids": t[:-1], "labels": t[1:]} for t in tails], pad_id).items()}
    positions = lengths[index, None] + torch.arange(cont["input_ids"].shape[1], device=device)
    mask = torch.cat([ctx["attention_mask"][index], cont["attention_mask"]], 1)
    logits = model(input_ids=cont["input_ids"], attention_mask=mask, position_ids=positions,
                   **{cache_name: cache}).logits
    picked = logits.float().log_softmax(-1).gather(2, cont["labels"].clamp(min=0)[..., None])[..., 0]
    tail_scores = (picked * (cont["labels"] != IGNORE_INDEX)).sum(1).tolist()
    for (g, j), tail_score in zip(rows, tail_scores, strict=True):
        scores[g][j] += tail_score
    return scores


def _score_without_cache(model: nn.Module, group: Sequence[_Item], pad_id: int,
                         device: torch.device) -> list[list[float]]:
    """Log-likelihoods of every choice of ``group``, one (context + choice) row each."""
    rows = [(g, j) for g, it in enumerate(group) for j in range(len(it.choices))]
    pairs = [(group[g].context, group[g].choices[j]) for g, j in rows]
    batch = {k: v.to(device) for k, v in collate([{"input_ids": context + choice[:-1],
                                                   "labels": [IGNORE_INDEX] * (len(context) - 1) + choice}
                                                  for context, choice in pairs], pad_id).items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    picked = logits.float().log_softmax(-1).gather(2, batch["labels"].clamp(min=0)[..., None])[..., 0]
    totals = (picked * (batch["labels"] != IGNORE_INDEX)).sum(1).tolist()
    scores: list[list[float]] = [[] for _ in group]
    for (g, _), total in zip(rows, totals, strict=True):
        scores[g].append(total)
    return scores


def choice_logliks(model: nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[ChoiceExample],
                   batch_size: int = 16, device: torch.device | str | None = None,
                   progress: bool = True, max_length: int | None = None, desc: str = "scoring") -> list[list[float]]:
    """Log-likelihood of each choice's tokens given its context, per example.

    Each context runs once: the context pass (right padded, longest first) gives the logits
    that score every choice's first token (all of them, for one-token choices such as BBC
    topics), and its key/value cache, copied per multi-token choice, feeds a short second pass
    over the choices' remaining tokens. Against one (context + choice) row per choice, this
    cuts the tokens run by about the number of choices, which is what costs on CPU. A group
    holds at most ``batch_size`` contexts and ``batch_size`` multi-token choices (a single
    example may have more), which bounds the copied cache. Only the needed positions go
    through the LM head when the model accepts ``logits_to_keep``. ``max_length`` (default:
    the model's ``max_position_embeddings``) truncates long contexts from the left.
    """
    device = _device(model, device)
    if max_length is None:
        max_length = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    items = sorted(_items(tokenizer, examples, max_length), key=lambda it: -len(it.context))
    groups = list(_groups(items, batch_size))
    keep_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    logliks: list[list[float]] = [[] for _ in examples]
    with _inference(model):
        for group in tqdm(groups, desc=desc, unit="batch", disable=not progress, mininterval=2.0):
            scores_of = _score_group(model, group, pad_id(tokenizer), device, keep_logits)
            for item, scores in zip(group, scores_of, strict=True):
                logliks[item.example] = scores
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
                  progress: bool = True, desc: str = "scoring") -> dict[str, float]:
    """lm-eval-harness multiple-choice metrics.

    ``acc``: the gold choice has the highest log-likelihood. ``acc_norm``: the same after
    dividing each log-likelihood by its choice's length in characters (without the leading
    delimiter space, as lm-eval counts it). Ties go to the first choice.
    """
    if not examples:
        raise ValueError("no examples to score")
    begin = time.perf_counter()
    logliks = choice_logliks(model, tokenizer, examples, batch_size=batch_size, device=device, progress=progress,
                             desc=desc)
    seconds = time.perf_counter() - begin
    correct, correct_norm = [], []
    for ex, lls in zip(examples, logliks, strict=True):
        normed = [ll / max(1, len(choice.lstrip())) for ll, choice in zip(lls, ex.choices, strict=True)]
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
            tensors = {k: v.to(device) for k, v in collate(blocks[b:b + batch_size], pad_id(tokenizer)).items()}
            logits = model(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"]).logits
            labels = tensors["labels"][:, 1:]
            # (tokens, vocab) rows: a (batch, vocab, positions) transpose takes CUDA's slow strided log-softmax
            total += nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(),
                                                 ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((labels != IGNORE_INDEX).sum())
    nll = total / count
    return {"ppl": math.exp(nll), "nll": nll, "tokens": count}


def evaluate_task(model: nn.Module, tokenizer: PreTrainedTokenizerBase, task: TaskData | str, split: str = "test",
                  limit: int | None = None, batch_size: int = 16, progress: bool = True,
                  desc: str = "scoring") -> dict[str, float | str]:
    """Score ``split`` of ``task`` (a :class:`TaskData` or a task name); ``limit``: its first N examples."""
    data = load_task(task) if isinstance(task, str) else task
    whole = data.split(split)
    metrics = score_choices(model, tokenizer, whole[:limit], batch_size=batch_size, progress=progress, desc=desc)
    log.info("%s/%s: acc %.3f acc_norm %.3f (n=%d of %d, %.1f examples/s)", data.name, split, metrics["acc"],
             metrics["acc_norm"], metrics["n"], len(whole), metrics["examples_per_s"])
    return {"task": data.name, "split": split, **metrics, "split_size": len(whole)}

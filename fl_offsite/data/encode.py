"""Turn task examples and texts into token tensors for causal language models."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from fl_offsite.data.tasks import ChoiceExample
from fl_offsite.errors import UserError

IGNORE_INDEX = -100


def bos_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """``[BOS]`` when the tokenizer starts every text with it by default (Llama 2, Gemma, OPT), else ``[]``."""
    first = tokenizer.encode("a")[:1]
    return first if tokenizer.bos_token_id is not None and first == [tokenizer.bos_token_id] else []


def encode_pair(tokenizer: PreTrainedTokenizerBase, context: str,
                continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids, tokenized as lm-eval-harness does.

    Trailing whitespace of the context moves to the continuation; the continuation's tokens
    are those of ``context + continuation`` past the context's own tokens, so merges across
    the boundary fall in the continuation. The context starts with the model's BOS when its
    tokenizer adds one by default (:func:`bos_prefix`); an empty context becomes BOS (or EOS)
    regardless, so the first answer token has something to follow.
    """
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    continuation_ids = whole[len(context_ids):]
    context_ids = bos_prefix(tokenizer) + context_ids
    if not context_ids:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        context_ids = [prefix]
    if not continuation_ids:
        raise ValueError("an example's answer encodes to no tokens after its context (no leading space?); the "
                         "text is not quoted: it may be private")
    return context_ids, continuation_ids


def truncate_context(context_ids: list[int], continuation_ids: list[int], max_length: int) -> list[int]:
    """Drop tokens from the left of the context so that context + continuation fit ``max_length``."""
    room = max_length - len(continuation_ids)
    if room < 1:
        raise UserError(f"the answer has {len(continuation_ids)} tokens, more than max_length={max_length} "
                         "allows with any context; raise max_length")
    return context_ids[-room:]


def encode_choice_example(tokenizer: PreTrainedTokenizerBase, ex: ChoiceExample,
                          max_length: int) -> dict[str, list[int]]:
    """``input_ids`` = context + gold answer; ``labels`` = -100 on the context, the answer's ids after.

    Labels are unshifted (Hugging Face causal LMs shift them). A long context loses tokens on
    its left; the answer is never cut.
    """
    context_ids, answer_ids = encode_pair(tokenizer, ex.context, ex.choices[ex.label])
    context_ids = truncate_context(context_ids, answer_ids, max_length)
    return {"input_ids": context_ids + answer_ids,
            "labels": [IGNORE_INDEX] * len(context_ids) + answer_ids}


def lm_blocks(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], block_size: int,
              max_blocks: int | None = None) -> list[dict[str, list[int]]]:
    """Plain language-modelling blocks: texts joined with EOS, cut into ``block_size`` tokens.

    Each text starts with BOS when the tokenizer adds one by default (:func:`bos_prefix`). The
    last block keeps the remainder (shorter; ``collate`` pads it) unless it has a single token.
    ``max_blocks``: stop reading texts once that many full blocks are made.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; set tokenizer.eos_token to separate texts")
    bos = bos_prefix(tokenizer)
    ids: list[int] = []
    for text in texts:
        ids += bos + tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
        if max_blocks is not None and len(ids) >= max_blocks * block_size:
            ids = ids[:max_blocks * block_size]
            break
    blocks = [ids[i:i + block_size] for i in range(0, len(ids), block_size)]
    return [{"input_ids": b, "labels": list(b)} for b in blocks if len(b) > 1]


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Any id works under the attention mask; prefer the tokenizer's pad, then EOS."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


def collate(batch: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids`` with ``pad_id`` and ``labels`` with -100; add ``attention_mask``."""
    width = max(len(row["input_ids"]) for row in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, row in enumerate(batch):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

"""Tokenization of choice examples, LM blocks and padding."""
from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, processors
from transformers import PreTrainedTokenizerFast

from fl_offsite.data.encode import IGNORE_INDEX, collate, encode_choice_example, encode_pair, lm_blocks
from fl_offsite.data.tasks import ChoiceExample

EXAMPLE = ChoiceExample("Article: The striker scored twice.\nTopic:", [" business", " sport"], 1)


def test_encode_pair_splits_the_whole_encoding(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    context, answer = encode_pair(tiny_tokenizer, EXAMPLE.context, " sport")
    assert context == tiny_tokenizer.encode(EXAMPLE.context, add_special_tokens=False)
    assert context + answer == tiny_tokenizer.encode(EXAMPLE.context + " sport", add_special_tokens=False)


def test_encode_pair_moves_trailing_space_to_the_answer(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    assert encode_pair(tiny_tokenizer, "Topic: ", "sport") == encode_pair(tiny_tokenizer, "Topic:", " sport")


def test_encode_pair_empty_context_starts_with_bos(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    context, answer = encode_pair(tiny_tokenizer, "", "sport")
    assert context == [tiny_tokenizer.bos_token_id]
    assert answer == tiny_tokenizer.encode("sport", add_special_tokens=False)


@pytest.fixture(scope="module")
def bos_tokenizer(tiny_tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """The tiny tokenizer with a distinct BOS it puts before every text, as Llama 2 / Gemma do."""
    backend = Tokenizer.from_str(tiny_tokenizer.backend_tokenizer.to_str())
    backend.add_special_tokens(["<s>"])
    bos_id = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<|endoftext|>")


def test_bos_is_added_only_where_the_tokenizer_adds_it(tiny_tokenizer: PreTrainedTokenizerFast,
                                                      bos_tokenizer: PreTrainedTokenizerFast) -> None:
    plain = encode_choice_example(tiny_tokenizer, EXAMPLE, max_length=128)
    with_bos = encode_choice_example(bos_tokenizer, EXAMPLE, max_length=128)
    assert with_bos["input_ids"] == [bos_tokenizer.bos_token_id] + plain["input_ids"]
    assert with_bos["labels"] == [IGNORE_INDEX] + plain["labels"]
    blocks = lm_blocks(bos_tokenizer, ["The band.", "The cup."], block_size=64)
    assert blocks[0]["input_ids"].count(bos_tokenizer.bos_token_id) == 2


def test_answer_masking(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    encoded = encode_choice_example(tiny_tokenizer, EXAMPLE, max_length=128)
    prompt = tiny_tokenizer.encode(EXAMPLE.context, add_special_tokens=False)
    answer = encoded["input_ids"][len(prompt):]
    assert encoded["input_ids"][:len(prompt)] == prompt
    assert encoded["labels"] == [IGNORE_INDEX] * len(prompt) + answer
    assert tiny_tokenizer.decode(answer) == " sport"
    assert len(answer) > 1  # the tiny vocabulary splits " sport": every answer token keeps its label


def test_long_context_is_cut_on_the_left_never_the_answer(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    full = encode_choice_example(tiny_tokenizer, EXAMPLE, max_length=128)
    cut = encode_choice_example(tiny_tokenizer, EXAMPLE, max_length=6)
    assert len(cut["input_ids"]) == 6
    assert cut["input_ids"] == full["input_ids"][-6:] and cut["labels"] == full["labels"][-6:]
    answer = [t for t in full["labels"] if t != IGNORE_INDEX]
    with pytest.raises(ValueError, match="raise max_length"):
        encode_choice_example(tiny_tokenizer, EXAMPLE, max_length=len(answer))


def test_lm_blocks_join_texts_with_eos(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    texts = ["The band released a new album.", "The minister told parliament."]
    ids = []
    for text in texts:
        ids += tiny_tokenizer.encode(text, add_special_tokens=False) + [tiny_tokenizer.eos_token_id]
    blocks = lm_blocks(tiny_tokenizer, texts, block_size=8)
    assert [t for b in blocks for t in b["input_ids"]] == ids[:len(ids) - (len(ids) % 8 == 1)]
    assert all(len(b["input_ids"]) == 8 for b in blocks[:-1])
    assert all(b["labels"] == b["input_ids"] for b in blocks)


def test_collate_right_pads() -> None:
    batch = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    out = collate(batch, pad_id=0)
    assert torch.equal(out["input_ids"], torch.tensor([[5, 6, 7], [8, 0, 0]]))
    assert torch.equal(out["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0]]))
    assert torch.equal(out["labels"], torch.tensor([[-100, 6, 7], [8, -100, -100]]))

"""Tiny random causal LMs of many families, built from configs (no hub access)."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from fl_offsite.data.tasks import ChoiceExample

CORPUS = [
    "Article: Quarterly profits at the media giant jumped as advert sales rose.\nTopic: business",
    "Article: The band released a new album and the film won an award.\nTopic: entertainment",
    "Article: The minister told parliament the election will be held in May.\nTopic: politics",
    "Article: The striker scored twice as the club won the cup final.\nTopic: sport",
    "Article: The phone maker showed a faster chip and new software.\nTopic: tech",
    "Question: What do plants need to grow?\nAnswer: water and light",
    "Q: Where would you keep milk cold?\nA: in the fridge",
]

# Multiple-choice examples of every shape the scorer meets (shared by the evaluation tests, CPU and GPU).
CHOICE_EXAMPLES = [
    ChoiceExample("Article: The striker scored twice as the club won.\nTopic:",
                  [" business", " entertainment", " politics", " sport", " tech"], 3),
    ChoiceExample("Question: What do plants need to grow?\nAnswer:", [" water and light", " rocks"], 0),
    ChoiceExample("Q: Where would you keep milk cold?\nA:", [" in the fridge", " oven", " x", " on a warm shelf"], 2),
    ChoiceExample("Topic:", [" b", " t"], 1),  # single-token choices only
    ChoiceExample("", ["The band", "A film won"], 0),  # empty context
]

VOCAB = 96
LAYERS = 8

_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
               num_attention_heads=4, max_position_embeddings=128)

# model_type -> config overrides; each family names its sizes its own way.
FAMILIES: dict[str, dict] = {
    "gpt2": dict(vocab_size=VOCAB, n_embd=32, n_layer=LAYERS, n_head=4, n_positions=128, bos_token_id=0,
                 eos_token_id=0),
    "opt": dict(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                word_embed_proj_dim=32, max_position_embeddings=128),
    "bloom": dict(vocab_size=VOCAB, hidden_size=32, n_layer=LAYERS, n_head=4),
    "llama": dict(_COMMON, num_key_value_heads=2),
    "qwen2": dict(_COMMON, num_key_value_heads=2),
    "mistral": dict(_COMMON, num_key_value_heads=2),
    "gpt_neox": dict(_COMMON),
    "phi": dict(_COMMON),
    "falcon": dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4),
    "gemma2": dict(_COMMON, num_key_value_heads=2, head_dim=8),
}


def tiny_model(family: str, seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, **FAMILIES[family])
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def save_tiny_model(family: str, folder: Path, seed: int = 0) -> Path:
    tiny_model(family, seed).save_pretrained(folder)
    return folder


def save_tiny_lm(folder: Path, tokenizer, family: str = "llama", layers: int = 6) -> Path:
    """A tiny random model with a real tokenizer, saved as a model folder (the real loading path)."""
    overrides = dict(FAMILIES[family], vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    overrides["n_layer" if "n_layer" in overrides else "num_hidden_layers"] = layers
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **overrides))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def byte_bpe_tokenizer(vocab_size: int = 400):
    """A GPT-2-style byte-level BPE (any text encodes) trained on ``CORPUS``; EOS = BOS = pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<|endoftext|>")

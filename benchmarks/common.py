"""Helpers shared by the benchmarks: time-stamped log capture, small model folders, a fresh node cache, /proc
memory fields, a fresh process for a measurement, random training rows."""
from __future__ import annotations

import io
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import torch

from fl_offsite.data.downloads import cache_dir
from fl_offsite.data.encode import IGNORE_INDEX
from fl_offsite.testing.models import byte_bpe_tokenizer

T = TypeVar("T")


class Stamped(io.TextIOBase):
    """A stdout stand-in that keeps (seconds since ``start``, line) for every line written."""

    def __init__(self, start: float, echo=None) -> None:
        self.start, self.echo, self.lines, self._buf = start, echo, [], ""

    def write(self, text: str) -> int:
        self._buf += text
        *done, self._buf = self._buf.split("\n")
        now = time.perf_counter() - self.start
        for line in done:
            self.lines.append((now, line))
            if self.echo:
                self.echo.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        pass


def tiny_model_folder(folder: Path, layers: int = 6, hidden: int = 64, tokenizer: str = "smollm2") -> Path:
    """A small random Llama saved with a real tokenizer (the smollm2 one, or a 400-token byte BPE)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if tokenizer == "smollm2":
        from fl_offsite.data.models import load_tokenizer, resolve_model_path

        tok = load_tokenizer(resolve_model_path("smollm2-135m"))
    else:
        tok = byte_bpe_tokenizer()
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=1024, tie_word_embeddings=True,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def status_kb(field: str) -> int:
    """A kB field of this process's /proc/self/status, e.g. VmRSS (resident now) or VmHWM (its peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def in_fresh_process(fn: Callable[..., T], *args: Any, env: dict[str, str] | None = None) -> T:
    """``fn(*args)`` in a new interpreter (spawned, not forked), with ``env`` added to its environment; its result.

    For peak-memory measurements: the child's heap holds nothing of this process. The child's output is discarded.
    """
    saved = {key: os.environ.get(key) for key in env or {}}
    os.environ.update(env or {})  # a spawned child inherits the environment as it is when it starts
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(_quietly, fn, *args).result()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _quietly(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` with this process's stdout and stderr sent to /dev/null (file descriptors 1 and 2)."""
    sys.stdout.flush()
    sys.stderr.flush()
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    return fn(*args)


def fresh_node_cache(folder: Path) -> None:
    """Point FL_OFFSITE_CACHE at ``folder``: empty node stores, the shared model/task downloads linked in."""
    shared = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("models", "pypi", "tasks", "distilled"):
        if (shared / name).exists() and not (folder / name).exists():
            (folder / name).symlink_to(shared / name)
    os.environ["FL_OFFSITE_CACHE"] = str(folder)


def features(vocab: int, n: int, seq: int, answer: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """Random rows of ``seq`` tokens; the last ``answer`` tokens are labelled (0: every token, an LM block)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (seq,), generator=g).tolist()
        labels = list(ids) if answer == 0 else [IGNORE_INDEX] * (seq - answer) + ids[-answer:]
        rows.append({"input_ids": ids, "labels": labels})
    return rows
